"""What one bucket contributes to one step: the tensor lists a backend needs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Control:
    """Per-step inputs shared by every bucket (docs/design.md, "Native op schemas")."""

    grad_scale: torch.Tensor | None = None  # GradScaler's scale: gradients are divided by it
    found_inf: torch.Tensor | None = None   # nonzero: skip the step (GradScaler)
    max_grad_norm: float | None = None      # clip the global gradient norm to this
    skip_nonfinite: bool = False            # skip the step when the gradient norm is not finite
    # stochastic_rounding: the seed (int64, one element, on the device) the kernels read
    rounding_seed: torch.Tensor | None = None


@dataclass
class Work:
    """One (group, device, dtype) bucket's participating tensors for one step.

    All lists are aligned. `params[i]` and `grads[i]` share dtype, shape and strides and are
    non-overlapping and dense; states are views (float32, float64 for float64 parameters) with
    the same shape and strides (and so are the fp32 masters, when the bucket keeps them);
    `steps[i]` and `v_sums[i]` are 0-dim float64 views; `first_index[i]` is the rounding index
    of tensor i's first element. The same state as the compiled ops take it: `bucket`'s flat
    buffers, `segments` and `rounding_index` (csrc/op_schemas.h).
    """

    group: dict
    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avg: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sq: list[torch.Tensor] = field(default_factory=list)
    beta1_prod: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    v_sums: list[torch.Tensor] = field(default_factory=list)
    master: list[torch.Tensor] = field(default_factory=list)  # fp32 master weights, if kept
    first_index: list[int] = field(default_factory=list)  # rounding index of element 0
    # 0-dim float32 views of the bucket's beta1_prod_max; empty when the elision is off
    beta1_prod_max: list[torch.Tensor] = field(default_factory=list)
    bucket: object = None                   # the Bucket that owns the states
    segments: torch.Tensor | None = None    # (offset, numel, slot) per tensor, int64 CPU
    # stochastic rounding: first_index as the ops take it, int64 CPU (n,); else None
    rounding_index: torch.Tensor | None = None
    # (param, dense stand-in) pairs: the stand-in is stepped, then copied into the param.
    write_back: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    scratch: dict = field(default_factory=dict)  # a backend's data between its two phases

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def beta2(self) -> float:
        return float(self.group["betas"][1])

    @property
    def lr_tensor(self) -> torch.Tensor | None:
        """The group's learning rate when it is a tensor (read on the device, so a schedule
        changes no kernel argument), as 0-dim float32 on this bucket's device."""
        lr = self.group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr.to(device=self.device, dtype=torch.float32).reshape(())
        return None

    def rounding_seed(self, ctl: Control) -> torch.Tensor | None:
        """The seed when this bucket's parameters are rounded stochastically, else None."""
        return ctl.rounding_seed if self.bucket.rounding else None

    @property
    def l2(self) -> float:
        """Coupled (L2) weight decay; 0 when decay is decoupled."""
        return 0.0 if self.group["decoupled"] else float(self.group["weight_decay"])
