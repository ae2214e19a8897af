"""Fake (meta) kernels of the stats / update / v_sum schema (csrc/op_schemas.h), shared by the
compiled ops (`adai::`) and the Triton ops (`adai_triton::`): shape, dtype and device checks
only (what torch.compile and opcheck need); the ops return nothing."""
from __future__ import annotations

import torch

from .backends.base import STATS_COLUMNS  # csrc/adai_math.h, StatsColumn

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_grads(op: str, params, grads) -> None:
    torch._check(len(grads) == len(params),
                 lambda: f"{op}: `grads` has {len(grads)} tensors but `params` has {len(params)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        torch._check(p.dtype in PARAM_DTYPES,
                     lambda: f"{op}: params[{i}] has dtype {p.dtype}; expected float32, "
                             f"bfloat16 or float16")
        torch._check(g.dtype == p.dtype,
                     lambda: f"{op}: grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype}")
        torch._check(g.shape == p.shape,
                     lambda: f"{op}: grads[{i}] has shape {tuple(g.shape)} but params[{i}] has "
                             f"{tuple(p.shape)}")


def _check_segments(op: str, segments, n: int | None) -> None:
    """An int64 CPU tensor of shape (n, 3) (n None: any number of rows)."""
    torch._check(segments.dtype == torch.int64 and segments.dim() == 2
                 and segments.shape[1] == 3 and segments.device.type == "cpu"
                 and (n is None or segments.shape[0] == n),
                 lambda: f"{op}: `segments` must be an int64 CPU tensor of shape "
                         f"({'n' if n is None else n}, 3), got {segments.dtype} on "
                         f"{segments.device} with shape {tuple(segments.shape)}")


def _check_flat(op: str, name: str, t, dtype: torch.dtype, device) -> None:
    """A 1-D buffer of `dtype` on `device`."""
    torch._check(t.dim() == 1 and t.dtype == dtype,
                 lambda: f"{op}: `{name}` must be a 1-D {dtype} tensor, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    torch._check(t.device == device,
                 lambda: f"{op}: `{name}` is on {t.device} but the op runs on {device}")


def _check_slots(op: str, steps, v_sums, device) -> None:
    _check_flat(op, "steps", steps, torch.float64, device)
    _check_flat(op, "v_sums", v_sums, torch.float64, device)
    torch._check(steps.shape[0] == v_sums.shape[0],
                 lambda: f"{op}: `steps` has {steps.shape[0]} slots but `v_sums` has "
                         f"{v_sums.shape[0]}")


def check_control(op: str, name: str, t, device) -> None:
    """An optional control tensor (grad_scale, found_inf, lr_tensor): float32 with one
    element, 0-dim or of shape (1,), on `device`. The rule of csrc/op_checks.h's
    check_control, for the fake kernels and the Triton ops."""
    if t is None:
        return
    torch._check(t.dtype == torch.float32 and t.dim() <= 1 and t.numel() == 1,
                 lambda: f"{op}: `{name}` must be a float32 tensor of one element (shape () "
                         f"or (1,)), got {t.dtype} of shape {tuple(t.shape)}")
    torch._check(t.device == device,
                 lambda: f"{op}: `{name}` is on {t.device} but the op runs on {device}")


def kernels(namespace: str) -> dict:
    """The fake kernels of `namespace`::stats, ::update and ::v_sum, by op name."""

    def stats(params, grads, segments, steps, v_sums, grad_scale, beta2, l2, out):
        op = f"{namespace}::stats"
        _check_grads(op, params, grads)
        _check_segments(op, segments, len(params))
        _check_slots(op, steps, v_sums, out.device)
        check_control(op, "grad_scale", grad_scale, out.device)
        torch._check(out.dim() == 1 and out.shape[0] == STATS_COLUMNS
                     and out.dtype == torch.float64,
                     lambda: f"{op}: `out` must be a 1-D float64 tensor of {STATS_COLUMNS} "
                             f"elements, got {out.dtype} of shape {tuple(out.shape)}")
        return None

    def update(params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats,
               grad_scale, found_inf, lr_tensor, lr, beta0, beta2, eps, weight_decay,
               decoupled, dampening, max_grad_norm, skip_nonfinite):
        op = f"{namespace}::update"
        _check_grads(op, params, grads)
        _check_segments(op, segments, len(params))
        for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                        ("beta1_prod", beta1_prod)):
            _check_flat(op, name, t, torch.float32, stats.device)
            torch._check(t.shape[0] == exp_avg.shape[0],
                         lambda: f"{op}: `{name}` has {t.shape[0]} elements but `exp_avg` has "
                                 f"{exp_avg.shape[0]}")
        _check_slots(op, steps, v_sums, stats.device)
        torch._check(stats.dim() == 2 and stats.shape[1] == STATS_COLUMNS
                     and stats.dtype == torch.float64,
                     lambda: f"{op}: `stats` must be a 2-D float64 tensor with "
                             f"{STATS_COLUMNS} columns, got {stats.dtype} of shape "
                             f"{tuple(stats.shape)}")
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf),
                        ("lr_tensor", lr_tensor)):
            check_control(op, name, t, stats.device)
        return None

    def v_sum(exp_avg_sq, segments, v_sums):
        op = f"{namespace}::v_sum"
        _check_segments(op, segments, None)
        _check_flat(op, "exp_avg_sq", exp_avg_sq, torch.float32, exp_avg_sq.device)
        _check_flat(op, "v_sums", v_sums, torch.float64, exp_avg_sq.device)
        return None

    return {"stats": stats, "update": update, "v_sum": v_sum}
