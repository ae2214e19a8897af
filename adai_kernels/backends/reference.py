"""The reference backend: the spec's two phases in plain PyTorch, on any device.

It is the oracle the fused kernels are tested against and the fallback where no kernel
runs, so it favours the spec's literal order of operations over speed: it allocates
temporaries the size of the parameters and launches many small kernels. Math is in the state
dtype: float32 for float32, bfloat16 and float16 parameters, float64 for float64 ones; global
sums are float64 where the device has it. The beta1_prod elision (adai_kernels/elision.py)
is expressed per tensor with torch.where on its done flag, so it writes the b and max values
a kernel writes.
Like the kernels, it never synchronises with the host (a skipped step is a device-side
select, not a Python branch) and never copies from the host, so a CUDA graph can capture it.
With master weights, theta is read from and written to the fp32 master and the parameter is
its rounding to nearest; with stochastic rounding, the bf16 parameter is rounded with the
bits of adai_kernels/rounding.py, the hash the kernels use.
"""
from __future__ import annotations

import torch

from .. import elision, rounding
from ..work import Control, Work
from .base import FEATURES, STATS_COLUMNS, Backend


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class ReferenceBackend(Backend):
    name = "reference"
    features = frozenset(FEATURES)
    elides_beta1_prod = True

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def unsupported(self, dtype: torch.dtype) -> str | None:
        return None  # every dtype the optimizer steps, float64 included

    def stats(self, work: Work, out: torch.Tensor, ctl: Control) -> None:
        acc = _acc_dtype(work.device)
        # theta: the fp32 master weights when kept, else the parameters (copies unless
        # already of the state dtype)
        sd = work.bucket.state_dtype
        params = list(work.master) if work.master else [p.to(sd) for p in work.params]
        grads = [g.to(sd) for g in work.grads]    # likewise: the caller's grads stay as they are
        if ctl.grad_scale is not None:
            # float32(1 / scale) for every dtype: the ops' definition, and what
            # GradScaler.unscale_ multiplies float64 gradients by
            inv_scale = ctl.grad_scale.double().reciprocal().float()
            grads = torch._foreach_mul(grads, inv_scale.to(sd))
        beta2, l2 = work.beta2, work.l2
        torch._foreach_add_(work.steps, 1.0)
        bc2 = 1.0 - torch.pow(beta2, torch.stack(work.steps).to(acc))
        w = (1.0 - beta2) / bc2

        def per_tensor(ts):
            return torch.stack([t.sum(dtype=acc) for t in ts])

        gg = per_tensor(torch._foreach_mul(grads, grads))
        if l2 != 0.0:
            ge = torch._foreach_add(grads, params, alpha=l2)
            b = per_tensor(torch._foreach_mul(ge, ge))
            gt = per_tensor(torch._foreach_mul(grads, params)) * (2.0 * l2)
            tt = per_tensor(torch._foreach_mul(params, params)) * (l2 * l2)
        else:
            b, gt, tt = gg, torch.zeros_like(gg), torch.zeros_like(gg)
        v_sums = torch.stack(work.v_sums).to(acc)
        row = torch.stack([
            (beta2 * v_sums / bc2).sum(), (w * b).sum(), (w * gg).sum(), (w * gt).sum(),
            (w * tt).sum(), gg.sum(),
            # a fill, not a copy from the host: a CUDA graph can capture it
            torch.full((), float(work.numel), dtype=acc, device=work.device)])
        assert row.numel() == STATS_COLUMNS
        out.copy_(row)
        work.scratch.update(params=params, grads=grads, bc2=bc2)

    def update(self, work: Work, stats: torch.Tensor, ctl: Control) -> None:
        s = work.scratch
        params, grads, bc2 = s["params"], s["grads"], s["bc2"]
        skip, clip, inv_vbar = _globals(stats, ctl, work.device)
        if ctl.max_grad_norm is not None:
            grads = torch._foreach_mul(grads, clip.to(work.bucket.state_dtype))
        if work.l2 != 0.0:
            grads = torch._foreach_add(grads, params, alpha=work.l2)
        v, beta1, beta3 = _second_moment_and_inertia(work, grads, bc2, inv_vbar)
        m, b, b_max, new_params = _momentum_and_params(work, params, grads, beta1, beta3)
        _commit(work, skip, new_params, v, m, b, b_max, work.rounding_seed(ctl))
        work.scratch.clear()

    def v_sum(self, bucket) -> None:
        for p in bucket.params:
            views = bucket.state_of(p)
            views["v_sum"].copy_(views["exp_avg_sq"].sum(dtype=_acc_dtype(bucket.device)))


def _globals(stats: torch.Tensor, ctl: Control, device: torch.device):
    """From the rows of `stats`: whether the step is skipped, the clip coefficient and
    1 / vbar (0 when vbar is 0), as 0-dim tensors (docs/design.md, the statistics row)."""
    A, B, Bgg, Bgt, Btt, Gn, N = stats.sum(0).unbind()
    finite = torch.isfinite(Gn)
    skip = torch.zeros((), dtype=torch.bool, device=device)
    if ctl.found_inf is not None:
        skip = skip | (ctl.found_inf.to(device) != 0)
    clip = torch.ones_like(Gn)
    if ctl.max_grad_norm is not None:
        clip = torch.clamp(ctl.max_grad_norm / (Gn.sqrt() + 1e-6), max=1.0)
        clip = torch.where(finite, clip, torch.ones_like(clip))
    if ctl.skip_nonfinite or ctl.max_grad_norm is not None:
        skip = skip | ~finite
    S = torch.where(clip == 1.0, A + B, A + clip * clip * Bgg + clip * Bgt + Btt)
    vbar = S / N
    inv_vbar = torch.where(vbar > 0, 1.0 / vbar, torch.zeros_like(vbar))  # vbar = 0 rule
    return skip, clip, inv_vbar


def _second_moment_and_inertia(work: Work, grads, bc2, inv_vbar):
    """The new second moment v, the inertia beta1 = clamp(1 - beta0 (vhat / vbar)^(1 / (3 -
    2d)), 0, 1 - eps) and the gradient's weight (1 - beta1)^d."""
    g = work.group
    (beta0, beta2), eps, d = g["betas"], g["eps"], float(g["dampening"])
    v = torch._foreach_mul(work.exp_avg_sq, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
    sd = work.bucket.state_dtype
    ratio = torch._foreach_div(v, list(bc2.to(sd).unbind()))  # vhat
    torch._foreach_mul_(ratio, inv_vbar.to(sd))  # vhat / vbar
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
    return v, beta1, beta3


def _momentum_and_params(work: Work, params, grads, beta1, beta3):
    """The new momentum m, beta1_prod b and its max (None: not written) and parameters
    (decoupled decay, then the step of the bias-corrected momentum)."""
    g = work.group
    lr = work.lr_tensor if work.lr_tensor is not None else g["lr"]
    beta0, d = g["betas"][0], float(g["dampening"])
    m = torch._foreach_mul(work.exp_avg, beta1)
    torch._foreach_addcmul_(m, beta3, grads)
    b, b_max, mhat = _bias_correction(work, m, beta1)
    if d != 1.0:
        mhat = torch._foreach_mul(mhat, beta0 ** (1.0 - d))
    new_params = list(params)
    if g["decoupled"] and g["weight_decay"] != 0.0:
        # theta - (lr * wd) * theta, not theta * (1 - lr * wd): the latter rounds the
        # small decay to float32 precision relative to 1
        decay = torch._foreach_mul(params, g["weight_decay"])
        new_params = torch._foreach_sub(new_params, torch._foreach_mul(decay, lr))
    new_params = torch._foreach_sub(new_params, torch._foreach_mul(mhat, lr))
    return m, b, b_max, new_params


def _bias_correction(work: Work, m, beta1):
    """b' = b * beta1, its per-tensor max |b'| and mhat = m / (1 - b'). A done tensor (its
    max at the start of the step says so) keeps b and its max and takes mhat = m, bitwise
    what the full path gives (1 - b' == 1 there); with the buffer freed every tensor is
    done and b is neither read nor written (b and its max are None)."""
    bucket = work.bucket
    if bucket.beta1_prod_freed:
        return None, None, list(m)
    b = torch._foreach_mul(work.beta1_prod, beta1)
    denom = torch._foreach_mul(b, -1.0)
    torch._foreach_add_(denom, 1.0)
    mhat = torch._foreach_div(m, denom)
    if not work.beta1_prod_max:  # the elision is off: no tensor is done, no max written
        return b, None, mhat
    done = [elision.done(x, bucket.state_dtype) for x in work.beta1_prod_max]
    b_max = [torch.where(f, old, elision.max_abs(new))
             for f, old, new in zip(done, work.beta1_prod_max, b)]
    b = [torch.where(f, old, new) for f, old, new in zip(done, work.beta1_prod, b)]
    mhat = [torch.where(f, m_, h) for f, m_, h in zip(done, m, mhat)]
    return b, b_max, mhat


def _commit(work: Work, skip: torch.Tensor, new_params, v, m, b, b_max, seed) -> None:
    """Write the new values, or (skip, decided on the device) keep the old ones and take
    the step increments back. theta goes to the master weights when there are, and to the
    parameters rounded to nearest (the cast) or, with a rounding `seed`, stochastically."""
    v_sums = [x.sum(dtype=_acc_dtype(work.device)) for x in v]

    def commit(dst, src):
        torch._foreach_copy_(dst, [torch.where(skip, d_, s_) for d_, s_ in zip(dst, src)])

    if work.master:
        commit(work.master, new_params)
    if seed is not None:
        new_params = _rounded_stochastically(work, new_params, seed)
    commit(work.params, new_params)
    commit(work.exp_avg_sq, v)
    commit(work.exp_avg, m)
    if b is not None:
        commit(work.beta1_prod, b)
    if b_max is not None:
        commit(work.beta1_prod_max, b_max)
    commit(work.v_sums, v_sums)
    torch._foreach_sub_(work.steps, [skip.to(work.steps[0].dtype)] * len(work.steps))


def _rounded_stochastically(work: Work, thetas, seed: torch.Tensor) -> list[torch.Tensor]:
    """thetas (float32) rounded to bfloat16 with the bits of each element's rounding index:
    stream (seed, the tensor's incremented step), index first_index + memory position."""
    steps = torch.stack(work.steps).to(torch.int64) & rounding.MASK32
    streams = rounding.rounding_stream(seed.reshape(()), steps)
    out = []
    for i, (p, theta) in enumerate(zip(work.params, thetas)):
        index = rounding.element_index(p.shape, p.stride(), work.first_index[i], p.device)
        out.append(rounding.bf16_round_stochastic(
            theta, rounding.rounding_bits(streams[i], index)))
    return out


REFERENCE = ReferenceBackend()
