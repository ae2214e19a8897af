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
    def make(params, **options):
        from adai_kernels import Adai
        opt = Adai(params, lr=LR, backend=name, **options)
        assert opt.backend == name, (opt.backend, name)
        return opt
    return Contender(f"adai_kernels[{name}]", "adai", True, make, "ours", 3,
                     8.0 if name == "reference" else 0.0)


class ClipThenStep:
    """torch.nn.utils.clip_grad_norm_ followed by the optimizer's step: what a contender
    without clipping of its own costs when the gradients must be clipped. The clip reads
    every gradient for the norm, then reads and writes it again to scale it."""

    def __init__(self, opt, params, max_norm: float):
        self.opt, self.params, self.max_norm = opt, list(params), max_norm

    @property
    def state(self):
        return self.opt.state

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self.opt.step()


def build(c: Contender, params, case_meta: dict):
    """Contender `c` on `params` for a case: our optimizer gets the case's options (steady
    state: a large eps; mixed precision: master weights, stochastic rounding) and clips with
    its own max_grad_norm; the others clip with clip_grad_norm_ before each step."""
    clip = case_meta.get("clip")
    if c.kind == "ours":
        options = dict(case_meta.get("adai_options", {}))
        if clip is not None:
            options["max_grad_norm"] = clip
        return c.make(params, **options)
    opt = c.make(params)
    return opt if clip is None else ClipThenStep(opt, params, clip)


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
def bytes_per_element(algo: str, param_dtype: torch.dtype, state_dtype: torch.dtype, *,
                      elided: bool = False, master: bool = False, clip: bool = False) -> int:
    """Minimal bytes one step must move per element.
    Adai: theta r+w, g read twice (global reduction, then update), m, v, b r+w; `elided`:
    without b (every b done, the exact shortcut); `master`: an fp32 master r+w and the
    parameter written, instead of the parameter r+w.
    Adam: theta r+w, g read once, m, v r+w.
    `clip` adds what torch.nn.utils.clip_grad_norm_ moves (g read for the norm, then read
    and written to scale it) to an optimizer that cannot fold the norm into its step."""
    p = torch.empty((), dtype=param_dtype).element_size()
    s = torch.empty((), dtype=state_dtype).element_size()
    theta = 2 * 4 + p if master else 2 * p
    if algo == "adai":
        return theta + 2 * p + (2 if elided else 3) * 2 * s
    if algo == "adam":
        return theta + p + 2 * 2 * s + (3 * p if clip else 0)
    raise ValueError(algo)


def contender_bytes(c: Contender, param_dtype: torch.dtype, case_meta: dict | None = None) -> int:
    """The minimal bytes of contender `c` in a case: only our optimizer elides b and keeps
    master weights; a baseline Adai clips with clip_grad_norm_ like Adam (+12 B in fp32)."""
    meta = case_meta or {}
    ours = c.kind == "ours"
    options = meta.get("adai_options", {}) if ours else {}
    state_dtype = torch.float32 if c.fp32_states else param_dtype
    master = bool(options.get("master_weights")) and param_dtype != torch.float32
    n = bytes_per_element(c.algo, param_dtype, state_dtype, elided=ours and bool(meta.get("steady")),
                          master=master, clip=c.algo == "adam" and "clip" in meta)
    if c.algo == "adai" and not ours and "clip" in meta:
        n += 3 * torch.empty((), dtype=param_dtype).element_size()
    return n
