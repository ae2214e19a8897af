"""The calls every backend implements (docs/design.md, "Two phases, two calls")."""
from __future__ import annotations

import torch

from ..work import Control, Work

STATS_COLUMNS = 7  # csrc/adai_math.h, StatsColumn
GRAD_NORM_SQ = 5   # the column with the squared gradient norm


class Backend:
    """A way to run the fused step. Subclasses implement the methods below."""

    name: str = "?"

    def unavailable(self, device: torch.device) -> str | None:
        """None if this backend can step parameters on `device`, else the reason why not."""
        raise NotImplementedError

    def stats(self, work: Work, out: torch.Tensor, ctl: Control) -> None:
        """Phase 1: increment `work.steps` and write the bucket's row of statistics into the
        float64 vector `out` (STATS_COLUMNS long)."""
        raise NotImplementedError

    def update(self, work: Work, stats: torch.Tensor, ctl: Control) -> None:
        """Phase 2: sum the rows of `stats` (float64, rows x STATS_COLUMNS), then one pass over
        every element; a skipped step only takes back the step increments."""
        raise NotImplementedError

    def v_sum(self, bucket) -> None:
        """Every parameter's v_sum = the sum of its exp_avg_sq, summed exactly as `update`
        sums the new v (used when state is loaded, so that a restored run matches an
        uninterrupted one bitwise)."""
        raise NotImplementedError


class OpsBackend(Backend):
    """A backend whose phases are the custom ops `<namespace>::stats` / `::update` /
    `::v_sum` (docs/design.md, "Native op schemas"). The C++ CPU and CUDA kernels and the
    Triton kernels all share that schema, so they share this wrapper."""

    def __init__(self, name: str, namespace: str, device_types: tuple[str, ...], load):
        self.name = name
        self._namespace = namespace
        self._device_types = device_types
        self._load = load  # () -> str | None: imports the ops, returns why they are missing

    def unavailable(self, device: torch.device) -> str | None:
        if device.type not in self._device_types:
            return (f"backend {self.name!r} runs on {'/'.join(self._device_types)} tensors, "
                    f"not {device.type}")
        return self._load()

    @property
    def _ops(self):
        return getattr(torch.ops, self._namespace)

    def stats(self, work: Work, out: torch.Tensor, ctl: Control) -> None:
        b = work.bucket
        self._ops.stats(work.params, work.grads, work.segments, b.steps, b.v_sums,
                        ctl.grad_scale, work.beta2, work.l2, out)

    def update(self, work: Work, stats: torch.Tensor, ctl: Control) -> None:
        g, b = work.group, work.bucket
        lr_tensor = work.lr_tensor
        self._ops.update(work.params, work.grads, work.segments, b.buffers["exp_avg"],
                         b.buffers["exp_avg_sq"], b.buffers["beta1_prod"], b.v_sums, b.steps,
                         stats, ctl.grad_scale,
                         ctl.found_inf, lr_tensor, 0.0 if lr_tensor is not None else g["lr"],
                         g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"],
                         g["decoupled"], g["dampening"], ctl.max_grad_norm or 0.0,
                         ctl.skip_nonfinite)

    def v_sum(self, bucket) -> None:
        self._ops.v_sum(bucket.buffers["exp_avg_sq"], bucket.segments(), bucket.v_sums)
