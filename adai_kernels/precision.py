"""Low-precision parameters: fp32 master weights and stochastic rounding (docs/design.md,
"Master weights" and "Stochastic rounding"). Which parameters the options apply to, the
checks of a parameter against them, the buckets they make and the rounding indices.

Free functions of an Adai optimizer (adai_kernels/optimizer.py), whose options
`master_weights` and `stochastic_rounding` they read."""
from __future__ import annotations

import torch

from . import sharding
from .backends.base import MASTER_WEIGHTS, STOCHASTIC_ROUNDING
from .buckets import Bucket
from .rounding import INDEX_SHIFT

LOW_PRECISION = (torch.bfloat16, torch.float16)  # the dtypes master weights apply to


def feature(opt, dtype: torch.dtype) -> str | None:
    """The option that changes how a parameter of `dtype` is written, or None: master
    weights for bf16 / fp16, stochastic rounding for bf16; fp32 ignores both."""
    if opt.master_weights and dtype in LOW_PRECISION:
        return MASTER_WEIGHTS
    if opt.stochastic_rounding and dtype is torch.bfloat16:
        return STOCHASTIC_ROUNDING
    return None


def check_param(opt, p: torch.Tensor, gi: int, pi: int) -> None:
    """Parameter `pi` of param group `gi` against the options: stochastic rounding of a
    float16 parameter is refused (ValueError), and so is an option its backend's kernels do
    not implement (RuntimeError). The backend is looked up only when an option applies: a
    dtype no backend of the device takes fails at its first step, as without options."""
    where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
    if opt.stochastic_rounding and p.dtype is torch.float16:
        raise ValueError(f"stochastic_rounding=True rounds bfloat16 parameters only, and "
                         f"{where} is float16; use master_weights=True for float16")
    needed = feature(opt, p.dtype)
    if needed is None:
        return
    backend = opt._backend_for(p.device, p.dtype)
    if not backend.supports(needed):
        raise RuntimeError(f"{needed}=True: backend {backend.name!r} does not implement it "
                           f"for {where}, which is {str(p.dtype).removeprefix('torch.')}; "
                           f"choose a backend that does (backend='reference')")


def check_group(opt, group: dict, gi: int) -> None:
    """Every parameter of param group `gi` against the options (check_param)."""
    for pi, p in enumerate(group["params"]):
        check_param(opt, p, gi, pi)


def new_bucket(opt, device: torch.device, dtype: torch.dtype) -> Bucket:
    """An empty bucket for parameters of `dtype` on `device`, keeping master weights or
    rounding stochastically as the options say for that dtype."""
    needed = feature(opt, dtype)
    return Bucket(device, dtype, master=needed == MASTER_WEIGHTS,
                  rounding=needed == STOCHASTIC_ROUNDING, elide=opt._elide_beta1_prod)


def first_indices(opt, dtype: torch.dtype, numbering: dict, params: list) -> list[int] | None:
    """The rounding index of each parameter's first element, when parameters of `dtype`
    are rounded stochastically (else None): (its number in `numbering`, the state dict's
    index -> (group index, parameter), << 40) + the position of its local shard's first
    element in the full parameter. Raises for a shard that is not one run of its
    parameter (sharding.first_position)."""
    if feature(opt, dtype) != STOCHASTIC_ROUNDING:
        return None
    number = {id(p): i for i, (_, p) in numbering.items()}
    out = []
    for p in params:
        gi, where = numbering[number[id(p)]][0], f"parameter {number[id(p)]}"
        out.append((number[id(p)] << INDEX_SHIFT)
                   + sharding.first_position(p, f"{where} (param group {gi})"))
    return out
