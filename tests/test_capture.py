"""What CUDA-graph capture needs, checked on CPU (the capture itself: tests/test_capture_gpu.py).

- `capturable` is a group option, validated and saved like torch.optim's.
- A step being captured is refused, before anything changes, when a group does not allow it,
  when a parameter is not on the GPU, or when a parameter still has no state (creating state
  cannot be replayed).
- A step performs no host synchronisation and creates no tensor from host data (a captured
  host-to-device copy would read host memory that is gone at replay): checked by recording
  every aten op of a step, for every backend that runs here.
- load_state_dict copies into the existing buffers when the same parameters have state, so a
  graph captured before the load steps the loaded state.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adai_kernels.plan as plan_module
from adai_kernels import Adai, AdaiV2, AdaiW
from cases import clone_groups, cpu_backends, make_grads, make_groups, set_grads

BACKENDS = cpu_backends()


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def test_capturable_is_a_validated_group_option():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Adai([p], lr=0.1)
    assert opt.param_groups[0]["capturable"] is False
    opt = Adai([p], lr=0.1, capturable=True)
    assert opt.state_dict()["param_groups"][0]["capturable"] is True
    with pytest.raises(ValueError, match="capturable"):
        Adai([p], lr=0.1, capturable=1)
    with pytest.raises(ValueError, match="capturable"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(2))],
                                 capturable="yes"))
    assert len(opt.param_groups) == 1


def test_authors_checkpoint_without_capturable_takes_the_default():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Adai([p], lr=0.1, capturable=True)
    sd = opt.state_dict()
    del sd["param_groups"][0]["capturable"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["capturable"] is True


@pytest.mark.parametrize("cls", [AdaiW, AdaiV2])
def test_variants_take_the_keyword_options(cls):
    p = torch.nn.Parameter(torch.randn(5))
    opt = cls([p], lr=0.1, capturable=True, max_grad_norm=1.0, skip_nonfinite=True,
              backend="reference")
    assert opt.param_groups[0]["capturable"] and opt.max_grad_norm == 1.0
    assert opt.skip_nonfinite and opt.backend == "reference"
    with pytest.raises(TypeError):
        cls([p], lr=0.1, no_such_option=1)


def _snapshot(opt):
    return [p.detach().clone() for p in _params(opt)], opt.state_dict()["state"]


def _fresh(capturable=True):
    groups = make_groups()
    opt = Adai(groups, lr=1.0, capturable=capturable)
    set_grads(groups, make_grads(groups, 0))
    return groups, opt


def test_capture_refused_when_a_group_does_not_allow_it(monkeypatch):
    groups, opt = _fresh(capturable=False)
    opt.step()
    before = _snapshot(opt)
    monkeypatch.setattr(plan_module, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="param group 0 has capturable=False"):
        opt.step()
    after = _snapshot(opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1].keys() == after[1].keys()
    for k, entry in before[1].items():
        assert after[1][k]["step"] == entry["step"]
        assert torch.equal(after[1][k]["exp_avg"], entry["exp_avg"])


def test_capture_refused_for_parameters_off_the_gpu(monkeypatch):
    groups, opt = _fresh()
    opt.step()
    before = [p.detach().clone() for p in _params(opt)]
    monkeypatch.setattr(plan_module, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="parameter on cpu"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, _params(opt)))


def test_capture_refused_before_state_exists():
    groups, opt = _fresh()
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 \(shape \(0,\)\) has "
                                           r"no optimizer state yet.*eager step"):
        plan_module.prepare(opt, capturing=True)
    assert not opt.state and not opt._buckets
    opt.step()  # eager: creates the state
    set_grads(groups, make_grads(groups, 1))
    works = plan_module.prepare(opt, capturing=True)
    assert sum(len(w.params) for w in works) == sum(
        p.grad is not None for p in _params(opt))
    # a parameter that has never had a gradient joins later: refused again
    extra = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group(dict(params=[extra]))
    extra.grad = torch.randn(4)
    with pytest.raises(RuntimeError, match="parameter 0 of param group 3 .* no optimizer state"):
        plan_module.prepare(opt, capturing=True)
    assert extra not in opt.state


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# _local_scalar_dense: .item() / bool(tensor), a host synchronisation on a GPU.
# lift_fresh: torch.tensor(host data), a host-to-device copy on a GPU.
_HOST_OPS = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.lift_fresh_copy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, dict(max_grad_norm=1.0, skip_nonfinite=True)],
                         ids=["plain", "clip"])
def test_step_has_no_host_synchronisation_or_host_data(backend, options):
    groups = make_groups()
    lr = torch.tensor(0.01)
    opt = Adai(groups, lr=lr, backend=backend, capturable=True, **options)
    for g in opt.param_groups:
        g["lr"] = lr
    set_grads(groups, make_grads(groups, 0))
    opt.step()  # the first step creates state (not capturable, by design)
    for k in (1, 2):  # a replanned step (other gradients are None) and a replayed plan
        set_grads(groups, make_grads(groups, k))
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        with _Recorder() as rec:
            opt.step()
        del opt.grad_scale, opt.found_inf
        bad = sorted({op for op in rec.ops if op in _HOST_OPS})
        assert not bad, f"step {k} ran {bad}"
        assert rec.ops, "the recorder saw nothing"


def _continue(opt, groups, steps):
    for k in steps:
        set_grads(groups, make_grads(groups, k))
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("join_order", ["same", "other"])
def test_load_state_dict_keeps_the_buffers(backend, join_order):
    groups = make_groups()
    opt = Adai(groups, lr=1.0, backend=backend)
    if join_order == "other":  # the last parameter joins first: bucket order != index order
        last = groups[0]["params"][-1]
        last.grad = torch.randn_like(last)
        opt.step()
    _continue(opt, groups, range(3))
    saved_params = [p.detach().clone() for p in _params(opt)]
    saved = opt.state_dict()
    _continue(opt, groups, range(3, 5))  # move away from the checkpoint
    pointers = {id(p): {k: s[k].data_ptr() for k in ("exp_avg", "exp_avg_sq", "beta1_prod",
                                                     "step")}
                for p, s in opt.state.items()}

    with torch.no_grad():
        for p, q in zip(_params(opt), saved_params):
            p.copy_(q)
    opt.load_state_dict(saved)
    assert {id(p): {k: s[k].data_ptr() for k in pointers[id(p)]}
            for p, s in opt.state.items()} == pointers
    loaded = opt.state_dict()
    for i, entry in saved["state"].items():
        assert loaded["state"][i]["step"] == entry["step"]
        for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
            assert torch.equal(loaded["state"][i][k], entry[k])

    # and it continues exactly as a fresh optimizer loaded from the same checkpoint
    twin = clone_groups(groups)
    with torch.no_grad():
        for p, q in zip([p for g in twin for p in g["params"]], saved_params):
            p.copy_(q)
    other = Adai(twin, lr=1.0, backend=backend)
    other.load_state_dict(saved)
    _continue(opt, groups, range(5, 8))
    _continue(other, twin, range(5, 8))
    for p, q in zip(_params(opt), _params(other)):
        assert torch.equal(p, q)
