"""The control tensors of the ops (grad_scale, found_inf, lr_tensor) follow one rule on every
namespace and in the fake kernels (csrc/op_checks.h and adai_kernels/op_checks.py,
check_control): float32 with one element, 0-dim or of shape (1,). A shape-(1,) tensor steps
bitwise like the 0-dim one; anything else is refused with the same message."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import adai_kernels._native  # noqa: F401  (registers adai:: and its fake kernels)
from adai_kernels import backends

F64 = torch.float64
NAMESPACES = ["adai"] + (["adai_triton"] if backends.get("triton").unavailable(
    torch.device("cpu")) is None else [])


def _args(gen):
    p = torch.randn(37, generator=gen)
    g = torch.randn(37, generator=gen) * 8.0
    seg = torch.tensor([[0, 37, 1]], dtype=torch.int64)
    states = [torch.zeros(48), torch.zeros(48), torch.ones(48)]
    return p, g, seg, states, torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)


def _steps(ns, shape, n=3):
    """n steps with grad_scale 8, found_inf 0 and a tensor lr, all of `shape`."""
    ops = getattr(torch.ops, ns)
    gen = torch.Generator().manual_seed(0)
    p, g, seg, states, steps, v_sums = _args(gen)
    scale, inf, lr = (torch.full(shape, x) for x in (8.0, 0.0, 2.0**-6))
    for _ in range(n):
        stats = torch.zeros(1, 7, dtype=F64)
        ops.stats([p], [g], seg, steps, v_sums, scale, 0.99, 1e-2, stats[0])
        ops.update([p], [g], seg, *states, v_sums, steps, stats, scale, inf, lr, 0.0, 0.1, 0.99,
                   1e-3, 1e-2, False, 1.0, 0.0, True)
    return [p, *states, steps, v_sums]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_shape_1_steps_like_0_dim(ns):
    for x, y in zip(_steps(ns, ()), _steps(ns, (1,))):
        assert torch.equal(x, y)


def _call(ops, name, t, ctl):
    """The op that takes control tensor `name`, with `ctl` for it (tensors `t`)."""
    one = t["one"]
    if name == "grad_scale":
        return ops.stats([t["p"]], [t["g"]], t["seg"], t["steps"], t["v_sums"], ctl, 0.99, 0.0,
                         t["stats"][0])
    found_inf, lr = (ctl, one) if name == "found_inf" else (one, ctl)
    return ops.update([t["p"]], [t["g"]], t["seg"], *t["states"], t["v_sums"], t["steps"],
                      t["stats"], one, found_inf, lr, 0.0, 0.1, 0.99, 1e-3, 0.0, False, 1.0,
                      0.0, False)


@pytest.mark.parametrize("bad", [(2,), (1, 1), "float64"], ids=str)
@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("ns", NAMESPACES)
def test_other_shapes_and_dtypes_are_refused(ns, fake, bad):
    ops = getattr(torch.ops, ns)
    p, g, seg, states, steps, v_sums = _args(torch.Generator().manual_seed(1))
    t = dict(p=p, g=g, seg=seg, states=states, steps=steps, v_sums=v_sums,
             stats=torch.zeros(1, 7, dtype=F64), one=torch.ones(()))
    ctl = torch.ones((), dtype=F64) if bad == "float64" else torch.ones(bad)
    with FakeTensorMode() if fake else contextlib.nullcontext() as mode:
        if fake:
            t = {k: [mode.from_tensor(x) for x in v] if isinstance(v, list)
                 else mode.from_tensor(v) for k, v in t.items()}
            ctl = mode.from_tensor(ctl)
        for name in ("grad_scale", "found_inf", "lr_tensor"):
            with pytest.raises(Exception, match=f"`{name}` must be a float32 tensor of one "
                                                f"element"):
                _call(ops, name, t, ctl)
            if fake:  # shape (1,) passes the fake kernel
                _call(ops, name, t, mode.from_tensor(torch.ones(1)))
