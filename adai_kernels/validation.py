"""The checks of the optimizer's options: a ValueError naming the first bad value, raised
before anything changes (in the constructor, add_param_group and load_state_dict)."""
from __future__ import annotations

import math

import torch
from torch.optim.optimizer import required


def _check_number(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({what})")


def check_lr(lr) -> None:
    """A number, or a tensor of one element (the kernels read it on the device)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a tensor of shape {tuple(lr.shape)} (a tensor lr "
                             f"must have exactly one element)")
        value = lr.item()
    else:
        value = lr
    _check_number("lr", lr, isinstance(value, (int, float)) and math.isfinite(value)
                  and value >= 0, "must be a finite number >= 0")


def validate_hyperparameters(group: dict) -> None:
    """Raise ValueError naming the first bad hyper-parameter of `group`. An lr left
    `required` (the defaults, when every group gives its own) is not a value to check."""
    if group["lr"] is not required:
        check_lr(group["lr"])
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta0, beta2))")
    beta0, beta2 = betas
    _check_number("beta0 (betas[0])", beta0, isinstance(beta0, (int, float)) and beta0 >= 0,
                  "must be >= 0")
    _check_number("beta2 (betas[1])", beta2,
                  isinstance(beta2, (int, float)) and 0.0 <= beta2 < 1.0, "must be in [0, 1)")
    eps = group["eps"]
    _check_number("eps", eps, isinstance(eps, (int, float)) and eps >= 0, "must be >= 0")
    wd = group["weight_decay"]
    _check_number("weight_decay", wd, isinstance(wd, (int, float)) and wd >= 0, "must be >= 0")
    d = group["dampening"]
    _check_number("dampening", d, isinstance(d, (int, float)) and 0.0 <= d <= 1.0,
                  "must be in [0, 1]")
    for name in ("decoupled", "capturable"):
        if not isinstance(group.get(name, False), bool):
            raise ValueError(f"Invalid {name}: {group[name]!r} (must be a bool)")
    for name in ("eps", "weight_decay", "dampening"):
        value = group[name]
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be finite)")


def check_max_grad_norm(max_grad_norm) -> None:
    """None (no clipping) or a finite number > 0."""
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                          and math.isfinite(max_grad_norm)
                                          and max_grad_norm > 0):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be a finite "
                         f"number > 0, or None)")


def check_has_lr(optimizer, group: dict, where: str) -> None:
    """lr may be left out of the constructor when every group gives its own."""
    if "lr" not in group and optimizer.defaults["lr"] is required:
        name = type(optimizer).__name__
        raise ValueError(f"{where} has no lr and {name}() was given no default lr (give "
                         f"lr= to {name}() or an 'lr' to every param group)")


def check_precision_options(master_weights, stochastic_rounding, seed) -> None:
    """The low-precision options (docs/design.md, "Master weights" and "Stochastic
    rounding"): two bools that exclude each other, and a 32-bit seed."""
    for name, value in (("master_weights", master_weights),
                        ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (must be a bool)")
    if master_weights and stochastic_rounding:
        raise ValueError("master_weights=True and stochastic_rounding=True exclude each "
                         "other: with an fp32 master the parameter is rounded to nearest "
                         "from it, and there is no rounding error left to randomise")
    check_seed(seed)


def check_seed(seed, where: str = "seed") -> None:
    """The stochastic rounding seed: an int in [0, 2^32)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid {where}: {seed!r} (must be an int in [0, 2**32))")
