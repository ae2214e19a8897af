"""An independent float64 Adai, written from the spec's "One step, exactly" section, one
element-wise formula per line. The tests compare every backend against it; it shares no code
with the package.

Parameters are held in float64 but rounded to their real dtype after every step, so a bf16
model is compared with a bf16 trajectory rather than with an unreachable float64 one.
"""
from __future__ import annotations

import torch


class Oracle:
    def __init__(self, groups: list[dict]):
        """`groups`: dicts with `params` (tensors, any dtype) and every hyper-parameter."""
        self.groups = []
        for g in groups:
            g = dict(g)
            g["dtypes"] = [p.dtype for p in g["params"]]
            g["params"] = [p.detach().to(torch.float64).clone() for p in g["params"]]
            self.groups.append(g)
        self.state: dict[tuple[int, int], dict] = {}

    def params(self, gi: int) -> list[torch.Tensor]:
        return self.groups[gi]["params"]

    def step(self, grads: list[list[torch.Tensor | None]]) -> None:
        total, count, phase2 = 0.0, 0, []
        for gi, group in enumerate(self.groups):
            beta0, beta2 = group["betas"]
            lam, lr = group["weight_decay"], group["lr"]
            for pi, (theta, grad) in enumerate(zip(group["params"], grads[gi])):
                if grad is None:
                    continue
                g = grad.to(torch.float64)
                st = self.state.setdefault((gi, pi), dict(
                    step=0, m=torch.zeros_like(theta), v=torch.zeros_like(theta),
                    b=torch.ones_like(theta)))
                st["step"] += 1
                bc2 = 1.0 - beta2 ** st["step"]
                if lam != 0 and not group["decoupled"]:
                    g = g + lam * theta
                if lam != 0 and group["decoupled"]:
                    theta.mul_(1.0 - lr * lam)
                st["v"] = beta2 * st["v"] + (1.0 - beta2) * g * g
                total += float(st["v"].sum()) / bc2
                count += theta.numel()
                phase2.append((group, gi, pi, theta, g, st, bc2))
        if count == 0:
            return
        vbar = total / count
        for group, gi, pi, theta, g, st, bc2 in phase2:
            beta0, d = group["betas"][0], group["dampening"]
            ratio = (st["v"] / bc2) / vbar if vbar != 0 else torch.zeros_like(theta)
            beta1 = (1.0 - beta0 * ratio ** (1.0 / (3.0 - 2.0 * d))).clamp(0.0, 1.0 - group["eps"])
            beta3 = (1.0 - beta1) ** d
            st["b"] = st["b"] * beta1
            st["m"] = beta1 * st["m"] + beta3 * g
            mhat = st["m"] / (1.0 - st["b"]) * beta0 ** (1.0 - d)
            theta.sub_(group["lr"] * mhat)
            theta.copy_(theta.to(group["dtypes"][pi]).to(torch.float64))
