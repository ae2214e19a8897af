"""Adai(..., stochastic_rounding=True, seed=...): bf16 parameters written from the step's fp32
result with the counter-based rounding of csrc/adai_random.h (adai_kernels/rounding.py;
docs/design.md, "Stochastic rounding"). Each step's write is checked bitwise against the
fp32 result of the same step rounded at each element's index (parameter number << 40 +
position in memory); runs are reproducible, checkpoints carry the seed, and over many steps
too small for rounding to nearest the weights move as an fp32 run's do on average."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from adai_kernels import Adai
from adai_kernels import rounding as R
from adai_kernels.backends.base import STOCHASTIC_ROUNDING
from adai_kernels.backends.reference import REFERENCE
from cases import make_grads, make_groups, set_grads
from precision_cases import feature_backends, flat, memory_positions, set_grads_as, twin
from test_capture import _HOST_OPS, _Recorder

BACKENDS = feature_backends(STOCHASTIC_ROUNDING)
SEED = 3_000_000_019  # above 2^31: the seed is a uint32
BF16 = torch.bfloat16


def _sr(groups, backend, seed=SEED, **options):
    return Adai(groups, lr=1.0, backend=backend, stochastic_rounding=True, seed=seed, **options)


def _run(opt, groups, steps):
    for k in steps:
        set_grads(groups, make_grads(groups, k))
        opt.step()


def _rounded(theta: torch.Tensor, number: int, step: int, seed: int = SEED) -> torch.Tensor:
    """theta (fp32) rounded as parameter `number` at `step` must be: the hash's bits at
    index (number << 40) + each element's position in memory."""
    bits = R.rounding_bits(R.rounding_stream(torch.tensor(seed), torch.tensor(step)),
                           (number << 40) + memory_positions(theta))
    return R.bf16_round_stochastic(theta, bits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, dict(max_grad_norm=5.0, skip_nonfinite=True)],
                         ids=["plain", "clip"])
def test_each_step_rounds_the_fp32_result_with_the_hash(backend, options):
    """Before every step, an fp32 twin takes the bf16 values and the state; its result,
    rounded with the hash at the parameter's number and incremented step, is what the bf16
    parameter must hold. Three groups, odd shapes and layouts (transposed, channels_last),
    parameters without a gradient on some steps (their step counter, and so their stream,
    lags behind)."""
    low = make_groups(BF16)
    opt = _sr(low, backend, **options)
    for k in range(4):
        high = twin(low)
        ref = Adai(high, lr=1.0, backend=backend, **options)
        if k:
            ref.load_state_dict(opt.state_dict())
        grads = make_grads(low, k)
        before = [p.detach().clone() for p in flat(low)]
        set_grads(low, grads)
        set_grads_as(high, grads, torch.float32)
        opt.step()
        ref.step()
        for number, (p, q, old) in enumerate(zip(flat(low), flat(high), before)):
            if p.grad is None:
                assert torch.equal(p, old)
                continue
            step = int(opt.state[p]["step"])
            assert step == int(ref.state[q]["step"])
            assert torch.equal(p, _rounded(q.detach(), number, step)), (k, number)
    assert any(not torch.equal(p, q.to(BF16)) for p, q in zip(flat(low), flat(high))), \
        "some element rounded otherwise than to nearest"


def test_runs_are_reproducible_and_the_seed_matters():
    runs = {}
    for name, make in (("a", lambda g: _sr(g, "reference")), ("b", lambda g: _sr(g, "reference")),
                       ("seed", lambda g: _sr(g, "reference", seed=SEED + 1)),
                       ("nearest", lambda g: Adai(g, lr=1.0, backend="reference"))):
        groups = make_groups(BF16)
        _run(make(groups), groups, range(3))
        runs[name] = [p.detach() for p in flat(groups)]
    assert all(torch.equal(x, y) for x, y in zip(runs["a"], runs["b"]))
    for other in ("seed", "nearest"):
        assert any(not torch.equal(x, y) for x, y in zip(runs["a"], runs[other])), other


def test_fp32_parameters_ignore_stochastic_rounding():
    groups, plain = make_groups(), make_groups()
    opt = _sr(groups, "reference")
    _run(opt, groups, range(3))
    _run(Adai(plain, lr=1.0, backend="reference"), plain, range(3))
    assert all(torch.equal(p, q) for p, q in zip(flat(groups), flat(plain)))
    assert not any(b.rounding for b in opt._buckets.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_a_checkpoint_is_bitwise(backend):
    """The seed travels in every param group as rounding_seed: an optimizer made with
    another seed takes the checkpoint's, and continues on the uninterrupted trajectory."""
    groups = make_groups(BF16)
    opt = _sr(groups, backend)
    _run(opt, groups, range(3))
    saved = opt.state_dict()
    assert [g["rounding_seed"] for g in saved["param_groups"]] == [SEED] * 3
    resumed = twin(groups, BF16)
    other = _sr(resumed, backend, seed=7)
    other.load_state_dict(saved)
    assert other.seed == SEED and "rounding_seed" not in other.param_groups[0]
    _run(opt, groups, range(3, 6))
    _run(other, resumed, range(3, 6))
    assert all(torch.equal(p, q) for p, q in zip(flat(groups), flat(resumed)))


def test_a_loaded_seed_reaches_the_tensor_the_kernels_read():
    """The seed lives in one int64 tensor per device, which a captured graph reads: loading
    fills that tensor rather than replacing it."""
    groups = make_groups(BF16)
    opt = _sr(groups, "reference", seed=5)
    _run(opt, groups, range(1))
    tensor = opt._seeds[torch.device("cpu")]
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        g["rounding_seed"] = 2**32 - 1
    opt.load_state_dict(saved)
    assert opt._seeds[torch.device("cpu")] is tensor and int(tensor) == 2**32 - 1
    assert opt.state_dict()["param_groups"][1]["rounding_seed"] == 2**32 - 1


def test_seed_keys_absent_when_off_and_bad_seeds_refused():
    groups = make_groups(BF16)
    opt = _sr(groups, "reference")
    _run(opt, groups, range(2))
    saved = opt.state_dict()
    plain = Adai(groups, lr=1.0, backend="reference")
    assert all("rounding_seed" not in g for g in plain.state_dict()["param_groups"])
    plain.load_state_dict(saved)  # the seed of a checkpoint means nothing to it
    assert all("rounding_seed" not in g for g in plain.param_groups)
    assert all("rounding_seed" not in g for g in plain.state_dict()["param_groups"])

    before = opt.state_dict()
    mixed = copy.deepcopy(saved)
    mixed["param_groups"][2]["rounding_seed"] = 11
    with pytest.raises(ValueError, match=r"different rounding_seed values \[11, 3000000019\]"):
        opt.load_state_dict(mixed)
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["rounding_seed"] = -1
    with pytest.raises(ValueError, match="rounding_seed of param group 0 of the loaded"):
        opt.load_state_dict(bad)
    assert opt.seed == SEED and opt.state_dict()["state"].keys() == before["state"].keys()
    for seed in (-1, 2**32, 1.5, True, "0"):
        with pytest.raises(ValueError, match="Invalid seed"):
            _sr(make_groups(BF16), "reference", seed=seed)
    with pytest.raises(ValueError, match="Invalid stochastic_rounding"):
        Adai(flat(groups), lr=1.0, stochastic_rounding=1)


def test_master_weights_and_float16_are_refused():
    p = torch.nn.Parameter(torch.randn(3).to(BF16))
    with pytest.raises(ValueError, match="master_weights=True and stochastic_rounding=True"):
        Adai([p], lr=0.1, backend="reference", master_weights=True, stochastic_rounding=True)
    half = torch.nn.Parameter(torch.randn(2, 3).half())
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 \(shape \(2, 3\)\) "
                                         r"is float16"):
        Adai([p, half], lr=0.1, backend="reference", stochastic_rounding=True)
    # a model made float16 after the optimizer: refused at the step, before any state
    model = torch.nn.Linear(3, 2)
    opt = Adai(model.parameters(), lr=0.1, backend="reference", stochastic_rounding=True)
    model.half()
    model(torch.randn(4, 3).half()).sum().backward()
    before = [q.detach().clone() for q in model.parameters()]
    with pytest.raises(ValueError, match="parameter 0 of param group 0 .* float16"):
        opt.step()
    assert not opt.state and not opt._buckets
    assert all(torch.equal(q, b) for q, b in zip(model.parameters(), before))


def test_a_backend_without_stochastic_rounding_refuses_it(monkeypatch):
    monkeypatch.setattr(REFERENCE, "features", frozenset())
    p = torch.nn.Parameter(torch.randn(3).to(BF16))
    with pytest.raises(RuntimeError, match="stochastic_rounding=True: backend 'reference' "
                                           "does not implement it for parameter 0"):
        _sr([p], "reference")
    q = torch.nn.Parameter(torch.randn(3))  # fp32: the option does not apply
    opt = _sr([q], "reference")
    q.grad = torch.ones(3)
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_changes_nothing_not_even_the_stream(backend):
    """GradScaler: a step with inf is skipped and its step counters taken back, so the
    next step rounds with the bits it would have had: the run equals one that never saw
    the bad step."""
    groups, straight = make_groups(BF16), make_groups(BF16)
    opt, ref = _sr(groups, backend), _sr(straight, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)
    for k in (0, 1, "inf", 2, 3):
        grads = make_grads(groups, 1 if k == "inf" else k)
        if k == "inf":
            grads[0][3][1, 2] = float("inf")
        else:
            set_grads(straight, grads)
            ref.step()
        scale = float(scaler.scale(torch.tensor(1.0)))  # a power of two: exact in bf16
        set_grads(groups, [[None if g is None else g * scale for g in row] for row in grads])
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(flat(groups), flat(straight)))


def test_stochastic_rounding_drifts_as_fp32_where_nearest_stalls():
    """lr * mhat = 1e-4 per step, below half a bf16 ulp at 1.0 (2^-9 = 2e-3): rounded to
    nearest the weights never move, while fp32 ones move by 200 * 1e-4 = 0.02. Every
    element sees the same update (equal gradients, no weight decay, so no theta in it).

    The bound: a stochastic rounding is unbiased given the value rounded (it rounds up with
    probability equal to the dropped fraction of the ulp), so sr_K - fp32_K is a sum of K
    uncorrelated increments, each of variance <= ulp^2 / 4 with ulp = 2^-8 in [0.5, 1)
    (plus fp32 rounding of the subtraction, <= 2^-24 per step: 1.2e-5 in all). The elements
    draw independent bits (distinct indices), so the mean over n of them has a standard
    deviation <= sqrt(K / 4) * ulp / sqrt(n) = 4.3e-4 for K = 200, n = 4096; the test allows
    6 of them (2.6e-3, 13% of the drift). The run is deterministic (seeded hash): the bound
    says that a pass is not luck."""
    n, steps, lr = 4096, 200, 1e-4
    runs = {}
    for name, dtype, options in (("fp32", torch.float32, {}), ("nearest", BF16, {}),
                                 ("sr", BF16, dict(stochastic_rounding=True, seed=SEED))):
        p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = Adai([p], lr=lr, backend="reference", **options)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        runs[name] = p.detach().double()
    drift = 1.0 - runs["fp32"]
    torch.testing.assert_close(drift, torch.full_like(drift, steps * lr), rtol=1e-3, atol=0)
    assert torch.all(runs["nearest"] == 1.0), "rounding to nearest stalls"
    bound = 6 * math.sqrt(steps / 4) * 2**-8 / math.sqrt(n)
    assert bound < 0.2 * steps * lr
    assert abs(float((runs["sr"] - runs["fp32"]).mean())) < bound
    assert runs["sr"].std() > 0, "the elements rounded independently"


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_keeps_stochastic_rounding(copier):
    groups = make_groups(BF16)
    opt = _sr(groups, "reference", max_grad_norm=5.0)
    _run(opt, groups, range(2))
    other = copier(opt)
    assert other.stochastic_rounding and other.seed == SEED and not other.master_weights
    _run(opt, groups, range(2, 4))
    _run(other, other.param_groups, range(2, 4))
    assert all(torch.equal(p, q) for p, q in zip(flat(groups), flat(other.param_groups)))


def test_print_shows_stochastic_rounding():
    text = repr(_sr([torch.nn.Parameter(torch.randn(3).to(BF16))], "reference"))
    for line in ("master_weights: False", "stochastic_rounding: True", f"seed: {SEED}"):
        assert f"\n    {line}\n" in text, line


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_has_no_host_synchronisation_or_host_data(backend):
    groups = make_groups(BF16)
    lr = torch.tensor(0.05)
    opt = Adai(groups, lr=lr, backend=backend, capturable=True, stochastic_rounding=True,
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
    """torch.compile(fullgraph=True): the reference traced by dynamo only (backend="eager";
    inductor takes about two minutes on it), the kernels' custom ops as in
    tests/test_compile.py."""
    import torch._dynamo

    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(5, 7).to(BF16)),
              torch.nn.Parameter(torch.randn(7, 3).to(BF16).t())]
    copies = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
              for p in params]
    opts = [_sr(ps, backend, weight_decay=1e-2, max_grad_norm=1.0) for ps in (params, copies)]
    compiled = torch.compile(opts[0].step, fullgraph=True,
                             backend="eager" if backend == "reference" else "inductor")
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen).to(BF16)
            q.grad = p.grad.clone()
        compiled()
        opts[1].step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
