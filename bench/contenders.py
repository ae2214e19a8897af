"""The optimizers that run side by side: every available backend of ours, the PyPI Adai
(`pytorch_optimizer.Adai`), a plain per-tensor Adai (the unfused baseline, written the way the
authors' code is), torch's Adam (foreach and fused) and apex's FusedAdam when importable.

Hyper-parameters are the same for every contender: lr 1e-3, betas (0.1, 0.99) for Adai and
torch's defaults (0.9, 0.999) for Adam, no weight decay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.optim import Optimizer

LR = 1e-3


class PlainAdai(Optimizer):
    """Adai written as the authors' reference code is: a Python loop over tensors, a handful of
    torch ops per tensor and phase, states in the parameter's dtype. The "unfused" baseline."""

    def __init__(self, params, lr=LR, betas=(0.1, 0.99), eps=1e-3):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        param_size = 0
        exp_avg_sq_hat_sum = 0.0
        for group in self.param_groups:
            beta0, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_size += p.numel()
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["beta1_prod"] = torch.ones_like(p)
                state["step"] += 1
                bias_correction2 = 1 - beta2 ** state["step"]
                exp_avg_sq = state["exp_avg_sq"]
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                exp_avg_sq_hat_sum = exp_avg_sq_hat_sum + exp_avg_sq.sum() / bias_correction2
        exp_avg_sq_hat_mean = exp_avg_sq_hat_sum / param_size
        for group in self.param_groups:
            beta0, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1_prod = state["beta1_prod"]
                bias_correction2 = 1 - beta2 ** state["step"]
                exp_avg_sq_hat = exp_avg_sq / bias_correction2
                beta1 = (1.0 - (exp_avg_sq_hat / exp_avg_sq_hat_mean).mul(beta0)).clamp(
                    0.0, 1 - group["eps"])
                beta1_prod.mul_(beta1)
                bias_correction1 = 1 - beta1_prod
                exp_avg.mul_(beta1).addcmul_(1 - beta1, p.grad)
                exp_avg_hat = exp_avg / bias_correction1
                p.add_(exp_avg_hat, alpha=-group["lr"])


@dataclass
class Contender:
    name: str              # column label
    algo: str              # "adai" or "adam": which minimal byte count applies
    fp32_states: bool      # True: fp32 states whatever the param dtype; False: param dtype
    make: Callable[[list[torch.Tensor]], Optimizer]
    kind: str              # "ours", "baseline", "reference-point"
    # bytes of persistent state per element (for the memory check before a case runs)
    state_tensors: int
    # rough transient temporaries a step allocates, in parameter-sized tensors
    temporaries: float = 0.0


def _ours(name: str) -> Contender:
    def make(params):
        from adai_kernels import Adai
        opt = Adai(params, lr=LR, backend=name)
        assert opt.backend == name, (opt.backend, name)
        return opt
    return Contender(f"adai_kernels[{name}]", "adai", True, make, "ours", 3,
                     8.0 if name == "reference" else 0.0)


def _ptopt(params):
    import pytorch_optimizer
    return pytorch_optimizer.Adai(params, lr=LR)


def _apex(params):
    from apex.optimizers import FusedAdam  # type: ignore
    return FusedAdam(params, lr=LR)


def contenders(device: torch.device) -> tuple[list[Contender], dict[str, str]]:
    """(the contenders that run on `device`, {name: why skipped} for the others)."""
    from adai_kernels import backends

    run: list[Contender] = []
    skipped: dict[str, str] = {}
    try:
        avail = backends.available(device)
    except Exception as e:  # a half-finished backend must not stop the benchmark
        avail = {n: f"backends.available() failed: {type(e).__name__}: {e}"
                 for n in getattr(backends, "NAMES", ("cuda", "triton", "cpu", "reference"))}
    for name, reason in avail.items():
        label = f"adai_kernels[{name}]"
        if reason is None and name == "triton" and device.type != "cuda":
            reason = ("runs on CPU only under TRITON_INTERPRET=1 (interpreted): "
                      "not benchmarked")
        if reason is None:
            run.append(_ours(name))
        else:
            skipped[label] = reason
    try:
        import pytorch_optimizer  # noqa: F401
        run.append(Contender("pytorch_optimizer.Adai", "adai", False, _ptopt, "baseline", 3, 4.0))
    except Exception as e:
        skipped["pytorch_optimizer.Adai"] = f"not importable: {e}"
    run.append(Contender("plain per-tensor Adai", "adai", False, PlainAdai, "baseline", 3, 3.0))
    run.append(Contender("torch Adam(foreach)", "adam", False,
                         lambda ps: torch.optim.Adam(ps, lr=LR, foreach=True),
                         "reference-point", 2, 2.0))
    run.append(Contender("torch Adam(fused)", "adam", False,
                         lambda ps: torch.optim.Adam(ps, lr=LR, fused=True),
                         "reference-point", 2, 0.0))
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore # noqa: F401
            run.append(Contender("apex FusedAdam", "adam", False, _apex, "reference-point", 2))
        except Exception as e:
            skipped["apex FusedAdam"] = f"not importable: {e}"
    else:
        skipped["apex FusedAdam"] = "CUDA only"
    return run, skipped


# -- byte counts (ADAI_SPEC.md, "Minimal bytes per element") -------------------------------
def bytes_per_element(algo: str, param_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """Minimal bytes one step must move per element.
    Adai: theta r+w, g read twice (global reduction, then update), m, v, b r+w.
    Adam: theta r+w, g read once, m, v r+w."""
    p = torch.empty((), dtype=param_dtype).element_size()
    s = torch.empty((), dtype=state_dtype).element_size()
    if algo == "adai":
        return 2 * p + 2 * p + 3 * 2 * s
    if algo == "adam":
        return 2 * p + p + 2 * 2 * s
    raise ValueError(algo)


def contender_bytes(c: Contender, param_dtype: torch.dtype) -> int:
    return bytes_per_element(c.algo, param_dtype, torch.float32 if c.fp32_states else param_dtype)
