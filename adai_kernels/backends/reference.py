"""The reference backend: the spec's two phases in plain PyTorch, on any device.

It is the oracle the fused kernels are tested against and the fallback where no kernel
runs, so it favours the spec's literal order of operations over speed: it allocates
temporaries the size of the parameters and launches many small kernels. Math is float32 (the
state dtype) for every parameter dtype; global sums are float64 where the device has it.
"""
from __future__ import annotations

import torch

from ..work import Work
from .base import Backend


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def stats(self, work: Work, out: torch.Tensor) -> None:
        acc = _acc_dtype(work.device)
        params = [p.float() for p in work.params]  # copies unless already float32
        grads = [g.float() for g in work.grads]
        if work.l2 != 0.0:
            grads = torch._foreach_add(grads, params, alpha=work.l2)  # never the caller's grad
        beta2 = work.beta2
        v = torch._foreach_mul(work.exp_avg_sq, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
        torch._foreach_add_(work.steps, 1.0)
        bc2 = 1.0 - torch.pow(beta2, torch.stack(work.steps).to(acc))
        v_sums = torch.stack([t.sum(dtype=acc) for t in v])
        out.copy_((v_sums / bc2).sum())
        work.scratch.update(params=params, grads=grads, v=v, bc2=bc2, v_sums=v_sums)

    def update(self, work: Work, stats: torch.Tensor, numel: int) -> None:
        s = work.scratch
        params, grads, v, bc2 = s["params"], s["grads"], s["v"], s["bc2"]
        g = work.group
        lr, (beta0, _), eps = g["lr"], g["betas"], g["eps"]
        d = float(g["dampening"])

        vbar = stats.sum() / numel
        inv_vbar = torch.where(vbar > 0, 1.0 / vbar, torch.zeros_like(vbar))  # vbar = 0 rule
        ratio = torch._foreach_div(v, list(bc2.float().unbind()))  # vhat
        torch._foreach_mul_(ratio, inv_vbar.float())  # vhat / vbar
        if d != 1.0:
            torch._foreach_pow_(ratio, 1.0 / (3.0 - 2.0 * d))
        beta1 = torch._foreach_mul(ratio, -beta0)
        torch._foreach_add_(beta1, 1.0)
        torch._foreach_clamp_min_(beta1, 0.0)
        torch._foreach_clamp_max_(beta1, 1.0 - eps)
        beta3 = torch._foreach_mul(beta1, -1.0)
        torch._foreach_add_(beta3, 1.0)
        if d != 1.0:
            torch._foreach_pow_(beta3, d)

        torch._foreach_mul_(work.beta1_prod, beta1)
        torch._foreach_mul_(work.exp_avg, beta1)
        torch._foreach_addcmul_(work.exp_avg, beta3, grads)
        denom = torch._foreach_mul(work.beta1_prod, -1.0)
        torch._foreach_add_(denom, 1.0)
        mhat = torch._foreach_div(work.exp_avg, denom)
        if d != 1.0:
            torch._foreach_mul_(mhat, beta0 ** (1.0 - d))
        if g["decoupled"] and g["weight_decay"] != 0.0:
            # theta - (lr * wd) * theta, not theta * (1 - lr * wd): the latter rounds the
            # small decay to float32 precision relative to 1
            torch._foreach_add_(params, torch._foreach_mul(params, -lr * g["weight_decay"]))
        torch._foreach_add_(params, mhat, alpha=-lr)
        if params[0] is not work.params[0]:  # float32 temporaries of bf16/fp16 params
            torch._foreach_copy_(work.params, params)
        torch._foreach_copy_(work.exp_avg_sq, v)
        torch._foreach_copy_(work.v_sums, list(s["v_sums"].to(torch.float64).unbind()))
        work.scratch.clear()

    def sum_v(self, exp_avg_sq: list[torch.Tensor], v_sums: list[torch.Tensor]) -> None:
        for v, out in zip(exp_avg_sq, v_sums):
            out.copy_(v.sum(dtype=_acc_dtype(v.device)))


REFERENCE = ReferenceBackend()
