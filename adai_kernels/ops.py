"""The ops stats / update / v_sum (schemas: csrc/op_schemas.h; semantics: docs/design.md,
"Native op schemas") as Python calls by keyword, and their fake kernels.

One schema, three namespaces: `adai` (the compiled CPU and CUDA kernels, loaded by
adai_kernels/_native.py), `adai_triton` (backends/triton.py) and `adai_emu` (the CUDA
kernels on the CPU emulator, a development build). `Ops(namespace)` calls one namespace's ops
with every argument named, so that no caller has to pass update's 21 arguments in schema
order. The fake kernels are what torch.compile and torch.library.opcheck run instead of an
op: the checks of adai_kernels/op_checks.py (the ones the Triton ops run too) and no result,
as the ops return nothing."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import op_checks as checks


class Ops:
    """torch.ops.<namespace>.stats / .update / .v_sum, called by keyword."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    @property
    def _lib(self):
        return getattr(torch.ops, self.namespace)

    def stats(self, *, params: list[Tensor], grads: list[Tensor], segments: Tensor,
              steps: Tensor, v_sums: Tensor, grad_scale: Optional[Tensor], beta2: float,
              l2: float, out: Tensor, master: Optional[Tensor] = None) -> None:
        """Phase 1: increment the step slots, write one statistics row into `out` (theta read
        from `master` when given)."""
        self._lib.stats(params, grads, segments, steps, v_sums, grad_scale, beta2, l2, out,
                        master=master)

    def update(self, *, params: list[Tensor], grads: list[Tensor], segments: Tensor,
               exp_avg: Tensor, exp_avg_sq: Tensor, beta1_prod: Tensor, v_sums: Tensor,
               steps: Tensor, stats: Tensor, grad_scale: Optional[Tensor],
               found_inf: Optional[Tensor], lr_tensor: Optional[Tensor], lr: float,
               beta0: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
               dampening: float, max_grad_norm: float, skip_nonfinite: bool,
               beta1_prod_max: Optional[Tensor] = None, master: Optional[Tensor] = None,
               rounding_seed: Optional[Tensor] = None,
               rounding_index: Optional[Tensor] = None) -> None:
        """Phase 2: one pass over every element (or, skipping, take the increments back).
        Optional: `beta1_prod_max` (the per-tensor max |b|: tensors whose b is done skip it),
        `master` (fp32 master weights of bf16/fp16 params), `rounding_seed` with
        `rounding_index` (stochastic rounding of bf16 params)."""
        self._lib.update(params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums,
                         steps, stats, grad_scale, found_inf, lr_tensor, lr, beta0, beta2, eps,
                         weight_decay, decoupled, dampening, max_grad_norm, skip_nonfinite,
                         beta1_prod_max=beta1_prod_max, master=master,
                         rounding_seed=rounding_seed, rounding_index=rounding_index)

    def v_sum(self, *, exp_avg_sq: Tensor, segments: Tensor, v_sums: Tensor) -> None:
        """v_sums[slot] = the sum of each row's span of exp_avg_sq, as update sums it."""
        self._lib.v_sum(exp_avg_sq, segments, v_sums)


def fake_kernels(namespace: str) -> dict:
    """The fake kernels of `namespace`::stats, ::update and ::v_sum, by op name (they take
    the arguments in schema order, as the dispatcher passes them)."""

    def float64(device: torch.device) -> bool:  # what the op there steps (op_checks.py)
        return namespace == "adai" and device.type == "cpu"

    def stats(params, grads, segments, steps, v_sums, grad_scale, beta2, l2, out,
              master=None):
        checks.check_stats(f"{namespace}::stats", params, grads, segments, steps, v_sums,
                           master, grad_scale, out, float64(out.device))

    def update(params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats,
               grad_scale, found_inf, lr_tensor, lr, beta0, beta2, eps, weight_decay,
               decoupled, dampening, max_grad_norm, skip_nonfinite, beta1_prod_max=None,
               master=None, rounding_seed=None, rounding_index=None):
        checks.check_update(f"{namespace}::update", params, grads, segments, exp_avg,
                            exp_avg_sq, beta1_prod, v_sums, steps, beta1_prod_max, master,
                            stats, grad_scale, found_inf, lr_tensor, rounding_seed,
                            rounding_index, float64(stats.device))

    def v_sum(exp_avg_sq, segments, v_sums):
        checks.check_v_sum(f"{namespace}::v_sum", exp_avg_sq, segments, v_sums,
                           float64(exp_avg_sq.device))

    return {"stats": stats, "update": update, "v_sum": v_sum}


def register_fakes(namespace: str) -> list[str]:
    """Attach the fake kernels to the ops of `namespace` (defined in C++ or by
    torch.library.custom_op). Returns why each one that failed did (eager calls still work
    then; torch.compile and opcheck would not)."""
    errors = []
    for name, fn in fake_kernels(namespace).items():
        try:
            torch.library.register_fake(f"{namespace}::{name}")(fn)
        except Exception as e:
            errors.append(f"registering the fake kernel of {namespace}::{name} failed: "
                          f"{type(e).__name__}: {e}")
    return errors
