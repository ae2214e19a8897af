"""The shared test matrix: parameter sets with odd shapes and layouts, several groups and
hyper-parameters, and gradient schedules with skipped parameters."""
from __future__ import annotations

import torch

from adai_kernels import backends

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tolerances per parameter dtype, for parameters compared with the float64 oracle after a few
# steps. float32: the kernels' float32 math vs float64, amplified by at most 1/eps in
# m / (1 - beta1_prod); one step moves a parameter by about lr. bf16/fp16: the parameter is
# rounded to the dtype after every step in both, so they differ by the rare rounding flip
# (one ulp, 2^-8 for bf16 and 2^-11 for fp16, relative).
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2 * 2**-8, atol=1e-3),
    torch.float16: dict(rtol=2 * 2**-11, atol=1e-4),
}
# float32 states, compared with the oracle's float64 states.
STATE_TOL = dict(rtol=2e-4, atol=1e-6)


def cpu_backends() -> list[str]:
    """Backends that can run on CPU tensors here (triton only under its interpreter)."""
    return [n for n, why in backends.available(torch.device("cpu")).items() if why is None]


def _param(shape, dtype, layout, gen):
    if layout == "transposed":
        t = torch.randn(shape[::-1], generator=gen).t()
    else:
        t = torch.randn(shape, generator=gen)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    return torch.nn.Parameter(t.to(dtype))


def make_groups(dtype=torch.float32, seed=0, lr=None):
    """Three groups: coupled L2 decay; decoupled decay with dampening 0.5; plain defaults."""
    gen = torch.Generator().manual_seed(seed)
    lr = lr if lr is not None else (1e-2 if dtype == torch.float32 else 5e-2)
    specs = [
        (dict(lr=lr, weight_decay=1e-2, decoupled=False, dampening=1.0),
         [((0,), "c"), ((1,), "c"), ((7,), "c"), ((13, 17), "c"), ((3, 5, 7), "c")]),
        (dict(lr=lr, weight_decay=0.1, decoupled=True, dampening=0.5),
         [((29, 31), "transposed"), ((2, 3, 5, 5), "channels_last"), ((4099,), "c")]),
        (dict(lr=2 * lr, weight_decay=0.0, decoupled=False, dampening=1.0),
         [((101,), "c")]),
    ]
    groups = []
    for hyper, shapes in specs:
        params = [_param(s, dtype, layout, gen) for s, layout in shapes]
        groups.append(dict(params=params, betas=(0.1, 0.99), eps=1e-3, **hyper))
    return groups


def clone_groups(groups):
    out = []
    for g in groups:
        g = dict(g)
        g["params"] = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
                       for p in g["params"]]
        out.append(g)
    return out


def make_grads(groups, step, seed=1):
    """Fresh random gradients for `step`; some parameters get none on some steps."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = []
    for gi, g in enumerate(groups):
        row = []
        for pi, p in enumerate(g["params"]):
            skip = (gi, pi) == (0, 2) and step % 2 == 1 or (gi, pi) == (2, 0) and step == 3
            grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            if p.dim() == 4:  # as autograd makes it: in the parameter's layout
                grad = grad.contiguous(memory_format=torch.channels_last)
            row.append(None if skip else grad)
        grads.append(row)
    return grads


def set_grads(groups, grads):
    for g, row in zip(groups, grads):
        for p, grad in zip(g["params"], row):
            p.grad = None if grad is None else grad.clone()
