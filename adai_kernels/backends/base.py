"""The two calls every backend implements (docs/design.md, "Two phases, two calls")."""
from __future__ import annotations

import torch

from ..work import Work


class Backend:
    """A way to run the fused step. Subclasses implement the three methods below."""

    name: str = "?"

    def unavailable(self, device: torch.device) -> str | None:
        """None if this backend can step parameters on `device`, else the reason why not."""
        raise NotImplementedError

    def stats(self, work: Work, out: torch.Tensor) -> None:
        """Phase 1: increment `work.steps` and write the bucket's share of the global sum of
        bias-corrected second moments into the 0-dim float64 tensor `out`."""
        raise NotImplementedError

    def update(self, work: Work, stats: torch.Tensor, numel: int) -> None:
        """Phase 2: vbar = stats.sum() / numel, then one pass over every element."""
        raise NotImplementedError

    def sum_v(self, exp_avg_sq: list[torch.Tensor], v_sums: list[torch.Tensor]) -> None:
        """v_sums[i] = exp_avg_sq[i].sum(), summed exactly as `update` sums the new v (used
        when state is loaded, so that a restored run matches an uninterrupted one bitwise)."""
        raise NotImplementedError


class OpsBackend(Backend):
    """A backend whose two phases are the custom ops `<namespace>::stats` / `::update`
    (docs/design.md, "Native op schemas"). The C++ CPU and CUDA kernels and the Triton
    kernels all share that schema, so they share this wrapper."""

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

    def stats(self, work: Work, out: torch.Tensor) -> None:
        self._ops.stats(work.params, work.grads, work.steps, work.v_sums,
                        work.beta2, work.l2, out)

    def update(self, work: Work, stats: torch.Tensor, numel: int) -> None:
        g = work.group
        self._ops.update(work.params, work.grads, work.exp_avg, work.exp_avg_sq,
                         work.beta1_prod, work.v_sums, work.steps, stats, float(numel),
                         g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"],
                         g["decoupled"], g["dampening"])

    def sum_v(self, exp_avg_sq: list[torch.Tensor], v_sums: list[torch.Tensor]) -> None:
        self._ops.sum_v(exp_avg_sq, v_sums)
