"""Adai(..., master_weights=True): bf16 / fp16 parameters stepped through an fp32 master copy
(docs/design.md, "Master weights"). The master follows an fp32 run fed the same gradients
(bitwise on the reference backend, whose math is the same for both), the parameter is the
master rounded to nearest, and the master lives in the state dict as `master_param`."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from adai_kernels import Adai, AdaiV2
from adai_kernels.backends.base import MASTER_WEIGHTS
from adai_kernels.backends.reference import REFERENCE
from cases import PARAM_TOL, make_grads, make_groups, set_grads
from precision_cases import feature_backends, flat, set_grads_as, twin
from test_capture import _HOST_OPS, _Recorder

BACKENDS = feature_backends(MASTER_WEIGHTS)
LOW = (torch.bfloat16, torch.float16)


def _exact_or_close(backend, actual, expected):
    """The reference's math is the same for the master as for an fp32 parameter: bitwise.
    Other backends: within the fp32 tolerance of cases.PARAM_TOL."""
    if backend == "reference":
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, **PARAM_TOL[torch.float32])


def _check_master(opt, low_groups, high_groups, backend):
    for p, q in zip(flat(low_groups), flat(high_groups)):
        if p not in opt.state:
            continue
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32 and master.stride() == p.stride()
        _exact_or_close(backend, master, q.detach())
        assert torch.equal(p, master.to(p.dtype)), "the parameter is its master rounded"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("options", [{}, dict(max_grad_norm=5.0, skip_nonfinite=True)],
                         ids=["plain", "clip"])
def test_master_weights_follow_an_fp32_run(backend, dtype, options):
    """Three groups (L2 decay, which reads theta in both phases; decoupled decay with
    AdaiV2's dampening; none), odd shapes and layouts, parameters without a gradient on
    some steps."""
    low = make_groups(dtype)
    high = twin(low)
    plain = twin(low, dtype)
    opt = Adai(low, lr=1.0, backend=backend, master_weights=True, **options)
    ref = Adai(high, lr=1.0, backend=backend, **options)
    rounded = Adai(plain, lr=1.0, backend=backend, **options)
    for k in range(4):
        grads = make_grads(low, k)  # values of `dtype`: the same gradients for every run
        set_grads(low, grads)
        set_grads(plain, grads)
        set_grads_as(high, grads, torch.float32)
        for o in (opt, ref, rounded):
            o.step()
        _check_master(opt, low, high, backend)
    # without the master the bf16 / fp16 run drifts away from the fp32 one
    assert any(not torch.equal(p, q.to(dtype)) for p, q in zip(flat(plain), flat(high)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_with_grad_scaler(backend):
    """GradScaler: gradients unscaled in the step (a power of two: exact), a step with inf
    skipped, the master and the parameter left as they were."""
    low = make_groups(torch.bfloat16)
    high = twin(low)
    opt = Adai(low, lr=1.0, backend=backend, master_weights=True)
    ref = Adai(high, lr=1.0, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for k in range(3):
        grads = make_grads(low, k)
        set_grads_as(high, grads, torch.float32)
        ref.step()
        scale = float(scaler.scale(torch.tensor(1.0)))
        set_grads(low, [[None if g is None else g * scale for g in row] for row in grads])
        scaler.step(opt)
        scaler.update()
    _check_master(opt, low, high, backend)
    before = {p: (p.detach().clone(), opt.state[p]["master_param"].clone()) for p in opt.state}
    grads = make_grads(low, 3)
    grads[1][2][5] = float("inf")
    set_grads(low, grads)
    scaler.step(opt)
    for p, (param, master) in before.items():
        assert torch.equal(p, param) and torch.equal(opt.state[p]["master_param"], master)


def test_master_is_made_from_the_parameter_at_its_first_step():
    a, b = (torch.nn.Parameter(torch.randn(6, 5).bfloat16()) for _ in range(2))
    opt = Adai([a, b], lr=0.1, backend="reference", master_weights=True)
    assert not opt.state and opt.state_dict()["state"] == {}
    with torch.no_grad():
        a.mul_(2.0)  # changed after the optimizer was made: the master is the new value
    a.grad = torch.zeros_like(a)  # vbar = 0: nothing moves, the master is the parameter
    opt.step()
    assert b not in opt.state, "a parameter that never had a gradient has no state"
    assert torch.equal(opt.state[a]["master_param"], a.float())
    assert list(opt.state_dict()["state"]) == [0]


def test_fp32_parameters_ignore_master_weights():
    """A group of fp32 parameters next to a bf16 one: the fp32 ones step bitwise as without
    the option and have no master, in their buckets or their state."""
    groups = make_groups(torch.float32)
    groups[2]["params"] = [torch.nn.Parameter(torch.randn(33).bfloat16())]
    opt = Adai(groups, lr=1.0, backend="reference", master_weights=True)
    _run(opt, groups, range(3))
    for bucket in opt._buckets.values():
        assert (bucket.master is not None) == (bucket.dtype == torch.bfloat16)
    bf16 = groups[2]["params"][0]
    state = opt.state_dict()["state"]
    for i, p in enumerate(flat(groups)):
        if p in opt.state:
            assert ("master_param" in opt.state[p]) == (p is bf16)
            assert ("master_param" in state[i]) == (p is bf16)
    alone = make_groups(torch.float32)
    twins = twin(alone)
    a = Adai(alone, lr=1.0, backend="reference", master_weights=True)
    b = Adai(twins, lr=1.0, backend="reference")
    for k in range(3):
        grads = make_grads(alone, k)
        set_grads(alone, grads)
        set_grads(twins, grads)
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(flat(alone), flat(twins)))


def _run(opt, groups, steps):
    for k in steps:
        set_grads(groups, make_grads(groups, k))
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_resumes_bitwise(backend):
    groups = make_groups(torch.bfloat16)
    opt = Adai(groups, lr=1.0, backend=backend, master_weights=True)
    _run(opt, groups, range(3))
    saved = opt.state_dict()
    saved_params = [p.detach().clone() for p in flat(groups)]
    for i, p in enumerate(flat(groups)):
        if i in saved["state"]:
            master = saved["state"][i]["master_param"]
            assert master.dtype == torch.float32 and master.shape == p.shape
            live = opt.state[p]["master_param"]
            assert p.numel() == 0 or master.data_ptr() != live.data_ptr()  # a copy
    pointers = {p: s["master_param"].data_ptr() for p, s in opt.state.items()}
    resumed = twin(groups, torch.bfloat16)
    other = Adai(resumed, lr=1.0, backend=backend, master_weights=True)
    other.load_state_dict(saved)
    _run(opt, groups, range(3, 6))
    _run(other, resumed, range(3, 6))
    for p, q in zip(flat(groups), flat(resumed)):
        assert torch.equal(p, q)
        if p in opt.state:
            assert torch.equal(opt.state[p]["master_param"], other.state[q]["master_param"])
    # loaded into the same parameters: the same buffers (a captured graph keeps stepping)
    with torch.no_grad():
        for p, q in zip(flat(groups), saved_params):
            p.copy_(q)
    opt.load_state_dict(saved)
    assert {p: s["master_param"].data_ptr() for p, s in opt.state.items()} == pointers
    for i, p in enumerate(flat(groups)):
        if i in saved["state"]:
            assert torch.equal(opt.state[p]["master_param"], saved["state"][i]["master_param"])


def test_checkpoint_without_master_takes_it_from_the_parameter():
    """The authors' format (or a run without the option) into a master-weights optimizer:
    the master is the parameter's value; the other way round the master is left out."""
    groups = make_groups(torch.bfloat16)
    plain = Adai(groups, lr=1.0, backend="reference")
    _run(plain, groups, range(2))
    saved = plain.state_dict()
    assert all("master_param" not in e for e in saved["state"].values())
    opt = Adai(groups, lr=1.0, backend="reference", master_weights=True)
    opt.load_state_dict(saved)
    for p in opt.state:
        assert torch.equal(opt.state[p]["master_param"], p.float())
    with_master = opt.state_dict()
    plain.load_state_dict(with_master)
    assert all("master_param" not in s for s in plain.state.values())
    assert all("master_param" not in e for e in plain.state_dict()["state"].values())


def test_bad_master_param_is_refused_before_anything_changes():
    groups = make_groups(torch.bfloat16)
    opt = Adai(groups, lr=1.0, backend="reference", master_weights=True)
    _run(opt, groups, range(2))
    bad = opt.state_dict()
    bad["state"][3]["master_param"] = torch.zeros(3)
    _run(opt, groups, range(2, 3))  # the live state moves on
    live = opt.state_dict()
    with pytest.raises(ValueError, match=r"parameter 3: master_param has shape \(3,\)"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for i, e in live["state"].items():
        assert after["state"][i]["step"] == e["step"]
        assert torch.equal(after["state"][i]["master_param"], e["master_param"])


def test_a_backend_without_master_weights_refuses_it(monkeypatch):
    """Kernels that do not implement the option refuse it, naming the parameter: at
    construction, or at the first step of a parameter that became bf16 later; fp32
    parameters, which ignore the option, are stepped."""
    monkeypatch.setattr(REFERENCE, "features", frozenset())
    low = torch.nn.Parameter(torch.randn(4, 3).bfloat16())
    with pytest.raises(RuntimeError, match=r"master_weights=True: backend 'reference' does "
                                           r"not implement it for parameter 0 of param group "
                                           r"0 \(shape \(4, 3\)\), which is bfloat16"):
        Adai([low], lr=0.1, backend="reference", master_weights=True)
    model = torch.nn.Linear(3, 2)
    opt = Adai(model.parameters(), lr=0.1, backend="reference", master_weights=True)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    model.half()
    model.zero_grad()
    model(torch.randn(5, 3).half()).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 .* float16"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(b.dtype == torch.float32 for b in opt._buckets.values())


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_keeps_master_weights(copier):
    groups = make_groups(torch.float16)
    opt = AdaiV2(groups, lr=1.0, backend="reference", master_weights=True, dampening=0.5)
    _run(opt, groups, range(2))
    other = copier(opt)
    assert other.master_weights and not other.stochastic_rounding
    copied = flat(other.param_groups)
    for p, q in zip(flat(groups), copied):
        if p in opt.state:
            assert torch.equal(opt.state[p]["master_param"], other.state[q]["master_param"])
    _run(opt, groups, range(2, 4))
    _run(other, other.param_groups, range(2, 4))
    assert all(torch.equal(p, q) for p, q in zip(flat(groups), copied))


def test_print_shows_master_weights():
    p = torch.nn.Parameter(torch.randn(3).bfloat16())
    text = repr(Adai([p], lr=0.1, backend="reference", master_weights=True))
    for line in ("master_weights: True", "stochastic_rounding: False", "seed: 0"):
        assert f"\n    {line}\n" in text, line


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_has_no_host_synchronisation_or_host_data(backend):
    groups = make_groups(torch.bfloat16)
    lr = torch.tensor(0.05)
    opt = Adai(groups, lr=lr, backend=backend, capturable=True, master_weights=True,
               max_grad_norm=5.0)
    for g in opt.param_groups:
        g["lr"] = lr
    _run(opt, groups, range(1))
    for k in (1, 2):  # a planned step (some gradients are None) and a replayed plan
        set_grads(groups, make_grads(groups, k))
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        with _Recorder() as rec:
            opt.step()
        del opt.grad_scale, opt.found_inf
        assert rec.ops and not sorted({op for op in rec.ops if op in _HOST_OPS})


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_eager(backend):
    """torch.compile(fullgraph=True) of a master-weights step: the reference is traced by
    dynamo only (backend="eager"; inductor takes about a minute on it), the kernels'
    custom ops as in tests/test_compile.py."""
    import torch._dynamo

    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(5, 7).bfloat16()),
              torch.nn.Parameter(torch.randn(3).half())]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [Adai(ps, lr=0.05, weight_decay=1e-2, max_grad_norm=1.0, backend=backend,
                 master_weights=True) for ps in (params, copies)]
    compiled = torch.compile(opts[0].step, fullgraph=True,
                             backend="eager" if backend == "reference" else "inductor")
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            q.grad = p.grad.clone()
        compiled()
        opts[1].step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
    for p, q in zip(params, copies):
        assert torch.equal(opts[0].state[p]["master_param"], opts[1].state[q]["master_param"])
