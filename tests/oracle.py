"""The float64 oracle every kernel is tested against, written from the spec
(/work/shared/ADAI_SPEC.md "One step, exactly") and the statistics row of docs/design.md
("Two phases, two calls"), one element-wise formula per line. It shares no code with the
package.

`oracle_step` is one optimizer step over buckets (tensors whose states the ops take together,
each with its own hyper-parameters) plus, optionally, other buckets' statistics rows: the rows
the ops' `stats` must write, the global skip and clip decisions, and every tensor after
`update`. Gradients are unscaled (multiplied by float32(1 / grad_scale), as the ops define
it), clipped with torch.nn.utils.clip_grad_norm_'s coefficient over every row, and only then
get the L2 term. vbar is the spec's: the mean of the new bias-corrected v over this step's
tensors (from the new v itself, not from the rows), plus the other rows' share.

`Oracle` is the optimizer's trajectory: parameters in float64, rounded to their real dtype
after every step, so a bf16 model is compared with a bf16 trajectory rather than with an
unreachable float64 one.
"""
from __future__ import annotations

import math
import struct

import torch

F64 = torch.float64
COLUMNS = 7  # the statistics row (csrc/adai_math.h StatsColumn)
A, B, BGG, BGT, BTT, GN, N = range(COLUMNS)


def f32(x: float) -> float:
    """x rounded to the nearest float32 (as the ops round a host double)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _flat(tensors) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=F64)
    return torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=F64) for t in tensors])


def _per_element(values, numels) -> torch.Tensor:
    return torch.tensor(values, dtype=F64).repeat_interleave(torch.tensor(numels,
                                                                          dtype=torch.int64))


def row_s(row, clip: float) -> float:
    """S of a statistics row for the clip coefficient (adai::globals): the clipped gradient
    enters before the L2 term, so only the expanded columns give it when clipping."""
    if clip == 1.0:
        return row[A] + row[B]
    return row[A] + clip * clip * row[BGG] + clip * row[BGT] + row[BTT]


class _Bucket:
    """One bucket's inputs flattened (each tensor in its logical order, tensors one after the
    other), its phase-1 values and its statistics row."""

    def __init__(self, bucket: dict, inv_scale: float):
        hp = bucket["hp"]
        self.hp = hp
        self.shapes = [tuple(t.shape) for t in bucket["params"]]
        self.numels = [t.numel() for t in bucket["params"]]
        self.beta0, self.beta2 = hp["betas"]
        self.l2 = 0.0 if hp["decoupled"] else hp["weight_decay"]
        self.theta = _flat(bucket["params"])
        self.g = _flat(bucket["grads"]) * inv_scale                 # unscaled
        self.m0, self.v0, self.b0 = (_flat(bucket[k]) for k in ("m", "v", "b"))
        self.steps0 = [float(k) for k in bucket["steps"]]
        self.v_sums0 = [float(x) for x in bucket["v_sums"]]
        self.k = [k + 1.0 for k in self.steps0]                      # phase 1: k <- k + 1
        bc2 = [1.0 - self.beta2 ** k for k in self.k]
        w = [(1.0 - self.beta2) / c for c in bc2]
        self.bc2 = _per_element(bc2, self.numels)
        weight = _per_element(w, self.numels)
        g, theta, l2 = self.g, self.theta, self.l2
        terms = [None, None, weight * g * g, None, None, g * g]
        if l2 != 0.0:  # without L2 the params are never read (a non-finite one stays out)
            terms[B] = weight * (g + l2 * theta) ** 2
            terms[BGT] = weight * 2.0 * l2 * g * theta
            terms[BTT] = weight * (l2 * theta) ** 2
        else:
            terms[B], terms[BGT], terms[BTT] = terms[BGG], torch.zeros_like(g), torch.zeros_like(g)
        a = [self.beta2 * v / c for v, c in zip(self.v_sums0, bc2)]
        self.row = [sum(a), *(float(t.sum()) for t in terms[1:]), float(theta.numel())]
        # the sum of each column's |terms|: what a float32 partial sum of it can be off by
        self.abs_row = [sum(abs(x) for x in a), *(float(t.abs().sum()) for t in terms[1:]),
                        float(theta.numel())]

    def new_v(self, clip: float, lr: float) -> None:
        """Step 2 (decay) and 3 of the spec with the global clip coefficient."""
        hp, wd = self.hp, self.hp["weight_decay"]
        self.lr = lr
        self.gc = self.g * clip                                      # clipped, before L2
        self.ge = self.gc + self.l2 * self.theta if self.l2 != 0.0 else self.gc  # + L2
        self.theta_decayed = (self.theta * (1.0 - lr * wd) if hp["decoupled"] and wd != 0.0
                              else self.theta)
        self.v = self.beta2 * self.v0 + (1.0 - self.beta2) * self.ge * self.ge

    def phase2(self, inv_vbar: float) -> dict:
        """Steps 5 to 11 of the spec: the new values and every intermediate, flat."""
        hp, beta0, lr, v, ge = self.hp, self.beta0, self.lr, self.v, self.ge
        eps, d = hp["eps"], hp["dampening"]
        ratio = v / self.bc2 * inv_vbar                              # vhat / vbar
        e = 1.0 / (3.0 - 2.0 * d)
        beta1 = (1.0 - beta0 * ratio ** e).clamp(0.0, 1.0 - eps)
        beta3 = (1.0 - beta1) ** d
        b = self.b0 * beta1
        m = beta1 * self.m0 + beta3 * ge
        mhat = m / (1.0 - b) * beta0 ** (1.0 - d)
        theta_new = self.theta_decayed - lr * mhat
        v_sums = [float(x.sum()) for x in v.split(self.numels)]
        return dict(g=self.gc, ge=ge, theta_old=self.theta, theta_decayed=self.theta_decayed,
                    m_old=self.m0, b_old=self.b0, v_old=self.v0, v=v, ratio=ratio,
                    beta1=beta1, beta3=beta3, b=b, m=m, mhat=mhat, params=theta_new, lr=lr, e=e,
                    v_sums=v_sums, steps=list(self.k))

    def unchanged(self) -> dict:
        return dict(params=self.theta, m=self.m0, v=self.v0, b=self.b0,
                    v_sums=list(self.v_sums0), steps=list(self.steps0))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [x.reshape(s) for x, s in zip(flat.split(self.numels), self.shapes)]


def oracle_step(buckets: list[dict], extra=(), grad_scale=None, found_inf=None, lr=None,
                max_grad_norm=0.0, skip_nonfinite=False) -> dict:
    """One step over `buckets` (dicts: `hp` with lr, betas, eps, weight_decay, decoupled,
    dampening; per tensor `params`, `grads`, `m`, `v`, `b`; `steps` and `v_sums` before the
    step) and `extra` (other buckets' statistics rows). `lr` replaces every bucket's lr (a
    tensor lr). Returns `rows` (each bucket's statistics row, and `abs_rows`, the sums of
    |terms|), `skip`, `clip`, `inv_vbar`, and per bucket `buckets[j]`: `params`, `m`, `v`,
    `b` (per tensor), `steps`, `v_sums`, and `flat`, the flat values and intermediates of
    phase 2 (None when the step is skipped: then every tensor is as it was)."""
    inv_scale = 1.0 if grad_scale is None else f32(1.0 / grad_scale)
    parts = [_Bucket(bk, inv_scale) for bk in buckets]
    rows = [p.row for p in parts]
    total = [sum(col) for col in zip(*rows, *extra)] if rows or extra else [0.0] * COLUMNS
    finite = math.isfinite(total[GN])
    skip = (found_inf is not None and found_inf != 0) or (
        (skip_nonfinite or max_grad_norm > 0) and not finite)
    clip = 1.0
    if max_grad_norm > 0 and finite:
        clip = min(1.0, max_grad_norm / (math.sqrt(total[GN]) + 1e-6))
    out = dict(rows=rows, abs_rows=[p.abs_row for p in parts], skip=skip, clip=clip,
               inv_vbar=None, buckets=[])
    if skip:
        for p in parts:
            res = p.unchanged()
            out["buckets"].append(dict(res, **{k: p.split(res[k]) for k in "mvb"},
                                       params=p.split(res["params"]), flat=None))
        return out
    # vbar: this step's tensors from their new v (the spec's definition), other buckets from
    # their rows; 1 / vbar := 0 when vbar is 0 (all gradients zero) or not finite
    for p in parts:
        p.new_v(clip, p.hp["lr"] if lr is None else lr)
    s = sum(float((p.v / p.bc2).sum()) for p in parts) + sum(row_s(r, clip) for r in extra)
    count = sum(p.row[N] for p in parts) + sum(row[N] for row in extra)
    inv_vbar = count / s if s > 0 else 0.0
    out["inv_vbar"] = inv_vbar
    for p in parts:
        r = p.phase2(inv_vbar)
        out["buckets"].append(dict(params=p.split(r["params"]), m=p.split(r["m"]),
                                   v=p.split(r["v"]), b=p.split(r["b"]), steps=r["steps"],
                                   v_sums=r["v_sums"], flat=r))
    return out


class Oracle:
    """The optimizer's trajectory over param groups (each a bucket of `oracle_step`), state
    per (group, param) index as the authors' Adai keeps it."""

    def __init__(self, groups: list[dict]):
        """`groups`: dicts with `params` (tensors, any dtype) and every hyper-parameter."""
        self.groups = []
        for g in groups:
            g = dict(g)
            g["dtypes"] = [p.dtype for p in g["params"]]
            g["params"] = [p.detach().to(F64).clone() for p in g["params"]]
            self.groups.append(g)
        self.state: dict[tuple[int, int], dict] = {}

    def params(self, gi: int) -> list[torch.Tensor]:
        return self.groups[gi]["params"]

    def step(self, grads: list[list[torch.Tensor | None]]) -> None:
        """Only parameters with a gradient take part (their step advances)."""
        buckets, keys = [], []
        for gi, group in enumerate(self.groups):
            live = [(pi, theta, g) for pi, (theta, g) in enumerate(zip(group["params"],
                                                                        grads[gi]))
                    if g is not None]
            if not live:
                continue
            states = [self.state.setdefault((gi, pi), dict(
                step=0, m=torch.zeros_like(theta), v=torch.zeros_like(theta),
                b=torch.ones_like(theta))) for pi, theta, _ in live]
            buckets.append(dict(hp=group, params=[t for _, t, _ in live],
                                grads=[g for _, _, g in live],
                                m=[s["m"] for s in states], v=[s["v"] for s in states],
                                b=[s["b"] for s in states], steps=[s["step"] for s in states],
                                v_sums=[float(s["v"].sum()) for s in states]))
            keys.append([(gi, pi) for pi, _, _ in live])
        if not buckets:
            return
        res = oracle_step(buckets)
        for bucket_keys, new in zip(keys, res["buckets"]):
            for i, (gi, pi) in enumerate(bucket_keys):
                st = self.state[(gi, pi)]
                st.update(step=int(new["steps"][i]), m=new["m"][i], v=new["v"][i],
                          b=new["b"][i])
                theta = self.groups[gi]["params"][pi]
                theta.copy_(new["params"][i].to(self.groups[gi]["dtypes"][pi]).to(F64))
