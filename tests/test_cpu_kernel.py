"""The fused CPU kernels (torch.ops.adai.stats / .update, csrc/cpu/) against a float64
implementation of the two phases written here from the spec (ADAI_SPEC.md, "One step,
exactly"; docs/design.md, "Two phases, two calls"). It shares no code with the package.

Each step starts from the kernel's own state (read back as float64), so the comparison
measures one step's error and does not accumulate trajectory drift; several steps with fresh
random gradients cover the evolving m, v, b and the per-tensor step counters.

Tolerances, per element. u = 2^-24 (fp32 rounding), ulp_T(x) = spacing of dtype T at x.
Per-element math is fp32, so the bounds are a first-order fp32 error analysis, computed by
`reference_step` next to each result (|g| there stands for |g| + |l2 theta|):

| quantity          | bound                                                                  |
|-------------------|------------------------------------------------------------------------|
| v (exp_avg_sq)    | 1e-6 * (beta2 v + (1 - beta2) (|g| + |l2 theta|)^2)                    |
| beta1 (internal)  | dbeta1 = (1 - beta1) * 4e-6 + 2u   (vhat / vbar to 4e-6 relative)      |
| b (beta1_prod)    | b_old * dbeta1 + u b                                                   |
| m (exp_avg)       | 3u (|beta1 m| + beta3 |g|) + dbeta1 |m| + d beta3 / (1 - beta1) dbeta1 |g| |
| theta, float32    | 1 ulp_f32 + lr * dmhat + 2u (|theta| + lr |mhat|)                      |
| theta, bf16/fp16  | 1 ulp of the dtype + the same fp32 error                               |
| stats row         | 1e-5 relative + 4e-6 of the column's sum of |terms| (Bgt cancels)      |
| v_sums            | 1e-5 relative                                                          |

with dmhat = beta0^(1-d) (dm / (1 - b) + |m| db / (1 - b)^2) + 2u |mhat|. For a well
conditioned element (1 - b of order 1) theta's bound is about 1e-5 of the step lr * mhat.
It grows only where fp32 itself is ill-conditioned: 1 - b and 1 - beta1 near eps = 1e-3 lose
~10 bits (b and beta1 are stored and computed near 1), so early steps of low-gradient
elements are allowed ~1e-4 of their step. The 4e-6 on vhat / vbar: vbar comes from fp32 lane
sums of <= 32 terms added in double (<= 32u ~ 2e-6, in both V_i and G_i), plus a few u from
v, 1 / bc2 and pow. Reduced-precision params are rounded once (nearest even) from the fp32
result, so they land on the float64 value rounded to the dtype or its neighbour. The
measured errors stay within about half of these bounds.

Three more error sources enter through the gradient and pow:
- unscaling: g = grad * float(1 / scale) is one more rounding of g (2u relative, none for a
  power-of-two scale);
- clipping: the kernel's clip coefficient comes from its own fp32-lane sum of g^2
  (<= 32u relative, so c is within 16u) and is applied as one float multiplier: e_g = 20u.
  Both add e_g |g| to g's error, which enters v, vbar (through S: 2 e_g relative, so the
  ratio's bound grows by 4 e_g) and m (beta3 e_g |g|);
- AdaiV2's two pow(x, e) are 2^(e log2 x) in the kernel: (|e ln x| + 2) u relative
  (csrc/cpu/vec_pow.h), added to 1 - beta1 and to beta3.
"""
from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sysconfig
import zlib

import pytest
import torch

from adai_kernels import _native

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MANTISSA = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
MIN_NORMAL_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}
U32 = 2.0 ** -24
# Relative error of the kernel's vhat / vbar: vbar from fp32 lane sums of <= 32 terms added in
# double (<= 32 U32 ~ 2e-6, in V_i and G_i), v, 1/bc2 and pow (a few U32 each).
E_RATIO = 4e-6
V_RTOL = 1e-6  # v = beta2 v + (1 - beta2) g^2: a few roundings, no cancellation


@pytest.fixture(autouse=True)
def _ops_loaded():
    assert _native.load_error() is None, _native.load_error()


# ---- tensors ------------------------------------------------------------------------------

def _layouts(dtype, gen):
    """Parameters of odd sizes and layouts: (name, tensor)."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return [
        ("empty", rnd(0)),
        ("one", rnd(1)),
        ("7", rnd(7)),
        ("1023", rnd(1023)),
        ("4099", rnd(4099)),
        ("3d", rnd(3, 5, 7)),
        ("transposed", rnd(33, 65).t()),
        ("channels_last", rnd(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)),
        ("multi_chunk", rnd(40000)),  # more than two of the kernel's 16K-element chunks
    ]


ALIGN = 16   # segment starts, padded as adai_kernels/buckets.py pads them
GAP = -77.0  # state buffer elements outside every segment: no op may write them


def segment_offsets(numels, misaligned=False):
    """Offsets of one segment per tensor in a flat buffer, and the buffer's length: starts
    padded to ALIGN elements, or (misaligned) at offsets that are not multiples of 4 floats,
    so vector loads and stores of the states are unaligned."""
    offsets, size = [], 0
    for i, n in enumerate(numels):
        size = (size + ALIGN - 1) // ALIGN * ALIGN
        if misaligned:
            size += (1, 2, 3, 5, 6, 7)[i % 6]
        offsets.append(size)
        size += n
    return offsets, size + (3 if misaligned else 0)


class Bucket:
    """One bucket's tensors as the optimizer passes them: flat state buffers (exp_avg,
    exp_avg_sq, beta1_prod), a step counter and a v_sum slot per tensor, and `segments`.
    Slots are assigned in reverse order, so a tensor's slot is not its index. `exp_avg`,
    `exp_avg_sq`, `beta1_prod`, `steps` and `v_sums` are per-tensor views (the parameter's
    layout; 0-dim for the slots)."""

    def __init__(self, params, misaligned=False):
        self.misaligned = misaligned
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.grads = [torch.zeros_like(p) for p in self.params]
        n = len(self.params)
        self.offsets, size = segment_offsets([p.numel() for p in self.params], misaligned)
        self.slots = list(range(n))[::-1]
        self.segments = torch.tensor(
            [(o, p.numel(), s) for o, p, s in zip(self.offsets, self.params, self.slots)],
            dtype=torch.int64).reshape(n, 3)
        self.m_buf, self.v_buf, self.b_buf = (torch.full((size,), GAP) for _ in range(3))
        self.step_vec = torch.zeros(n, dtype=F64)
        self.v_sum_vec = torch.zeros(n, dtype=F64)
        self.exp_avg, self.exp_avg_sq, self.beta1_prod = (
            [buf.as_strided(p.shape, p.stride(), o) for p, o in zip(self.params, self.offsets)]
            for buf in (self.m_buf, self.v_buf, self.b_buf))
        for m, v, b in zip(self.exp_avg, self.exp_avg_sq, self.beta1_prod):
            m.zero_()
            v.zero_()
            b.fill_(1.0)
        self.steps = [self.step_vec[s] for s in self.slots]
        self.v_sums = [self.v_sum_vec[s] for s in self.slots]

    def clone(self) -> "Bucket":
        c = Bucket(list(zip(self.names, [p.clone() for p in self.params])), self.misaligned)
        for d, s in zip(c.grads, self.grads):
            d.copy_(s)
        for d, s in zip(c.flat(), self.flat()):
            d.copy_(s)
        return c

    def flat(self):
        """The state buffers and the slot vectors."""
        return [self.m_buf, self.v_buf, self.b_buf, self.step_vec, self.v_sum_vec]

    def tensors(self):
        return self.state() + self.grads

    def state(self):
        """What a step writes: params, state buffers (gaps included), step counters, v_sums."""
        return self.params + self.flat()

    def gaps_untouched(self) -> bool:
        """No element outside the segments was written."""
        inside = torch.zeros(self.m_buf.numel(), dtype=torch.bool)
        for o, p in zip(self.offsets, self.params):
            inside[o:o + p.numel()] = True
        return all(bool((buf[~inside] == GAP).all()) for buf in (self.m_buf, self.v_buf,
                                                                self.b_buf))


def fresh_grads(bucket: Bucket, gen, zero_fraction=0.1):
    """New random gradients, a different scale per tensor, some elements exactly zero."""
    for g in bucket.grads:
        if g.numel() == 0:
            continue
        scale = 10.0 ** (torch.rand((), generator=gen).item() * 3 - 2)
        x = torch.randn(g.shape, generator=gen) * scale
        x[torch.rand(g.shape, generator=gen) < zero_fraction] = 0.0
        g.copy_(x)  # keeps g's strides (those of the parameter)


HP = dict(lr=0.1, beta0=0.1, beta2=0.99, eps=1e-3, weight_decay=0.0, decoupled=False,
          dampening=1.0, grad_scale=None, max_grad_norm=0.0, skip_nonfinite=False)
COLS = 7  # A, B, Bgg, Bgt, Btt, Gn, N (csrc/adai_math.h, StatsColumn)
A, B, BGG, BGT, BTT, GN, N = range(COLS)


def _f32(x):
    return None if x is None else torch.tensor(float(x), dtype=torch.float32)


def kernel_step(buckets: list[Bucket], hp: dict, found_inf=None,
                lr_tensor=None) -> torch.Tensor:
    """One optimizer step over all buckets: a stats row each, then update; returns the rows."""
    l2 = 0.0 if hp["decoupled"] else hp["weight_decay"]
    scale = _f32(hp["grad_scale"])
    rows = torch.full((len(buckets), COLS), float("nan"), dtype=F64)
    for j, b in enumerate(buckets):
        torch.ops.adai.stats(b.params, b.grads, b.segments, b.step_vec, b.v_sum_vec, scale,
                             hp["beta2"], l2, rows[j])
    for b in buckets:
        torch.ops.adai.update(b.params, b.grads, b.segments, b.m_buf, b.v_buf, b.b_buf,
                              b.v_sum_vec, b.step_vec, rows, scale, _f32(found_inf),
                              _f32(lr_tensor), hp["lr"], hp["beta0"], hp["beta2"], hp["eps"],
                              hp["weight_decay"], hp["decoupled"], hp["dampening"],
                              hp["max_grad_norm"], hp["skip_nonfinite"])
    return rows


# ---- the float64 reference ----------------------------------------------------------------

def snapshot(buckets: list[Bucket]):
    """The state before a step, as float64 (per bucket, per tensor)."""
    return [[dict(p=b.params[i].to(F64), g=b.grads[i].to(F64), m=b.exp_avg[i].to(F64),
                  v=b.exp_avg_sq[i].to(F64), b=b.beta1_prod[i].to(F64),
                  k=int(b.steps[i].item())) for i in range(len(b.params))]
            for b in buckets]


def reference_step(pre, hp):
    """Phase 1 over every tensor of every bucket, the global vbar, then phase 2, in float64 from
    the spec: unscale, clip (with torch.nn.utils.clip_grad_norm_'s coefficient) first, then
    L2. Returns the per-tensor results, with a first-order bound on an fp32 kernel's error
    next to each (`*_tol`, see the table), and each bucket's expected stats row (and a row of
    sums of |terms| for its tolerance)."""
    lr, beta0, beta2, eps = hp["lr"], hp["beta0"], hp["beta2"], hp["eps"]
    lam, decoupled, d = hp["weight_decay"], hp["decoupled"], hp["dampening"]
    l2 = 0.0 if decoupled else lam
    u = U32
    scale = hp["grad_scale"]
    # unscaled gradients, and the global clip coefficient
    grads = [[t["g"] / scale if scale is not None else t["g"] for t in bucket] for bucket in pre]
    gn2 = sum((g * g).sum().item() for gs in grads for g in gs)
    clip = 1.0
    if hp["max_grad_norm"] > 0:
        clip = min(1.0, hp["max_grad_norm"] / (math.sqrt(gn2) + 1e-6))
    e_g = 0.0  # relative error of the kernel's g beyond its own rounding
    if scale is not None and math.frexp(scale)[0] != 0.5:
        e_g += 2 * u
    if clip < 1.0:
        e_g += 20 * u
    e_ratio = E_RATIO + 4 * e_g

    rows, abs_rows, total, count, out = [], [], 0.0, 0, []
    for bucket, gs in zip(pre, grads):
        row, abs_row = [0.0] * COLS, [0.0] * COLS
        res = []
        for t, g in zip(bucket, gs):
            k = t["k"] + 1
            bc2 = 1.0 - beta2 ** k
            w = (1.0 - beta2) / bc2
            theta = t["p"]
            # the row: unclipped g
            terms = [beta2 * t["v"].sum().item() / bc2,
                     w * ((g + l2 * theta) ** 2).sum().item(), w * (g * g).sum().item(),
                     w * (2 * l2 * g * theta).sum().item(), w * ((l2 * theta) ** 2).sum().item(),
                     (g * g).sum().item(), float(g.numel())]
            abs_terms = list(terms)
            abs_terms[BGT] = w * (2 * l2 * g * theta).abs().sum().item()
            for j in range(COLS):
                row[j] += terms[j]
                abs_row[j] += abs_terms[j]
            # the step: clip first, then L2
            g = g * clip
            g_err = e_g * g.abs()                         # extra error of the kernel's g
            g_mag = g.abs()                               # |g| + |l2 theta|: g's scale
            if lam != 0 and not decoupled:
                g = g + lam * theta                       # L2, never written back
                g_mag = g_mag + (lam * theta).abs()
            theta_tol = torch.zeros_like(theta)
            if lam != 0 and decoupled:
                theta = theta * (1.0 - lr * lam)          # decoupled decay
                theta_tol = u * theta.abs()
            v = beta2 * t["v"] + (1.0 - beta2) * g * g
            total += v.sum().item() / bc2
            count += v.numel()
            v_tol = (V_RTOL * (beta2 * t["v"] + (1.0 - beta2) * g_mag ** 2)
                     + (1.0 - beta2) * 2 * g_mag * g_err)
            res.append(dict(k=k, bc2=bc2, theta=theta, theta_tol=theta_tol, g=g, g_mag=g_mag,
                            g_err=g_err, v=v, v_tol=v_tol, m_old=t["m"], b_old=t["b"]))
        rows.append(row)
        abs_rows.append(abs_row)
        out.append(res)
    vbar = total / count if count else 0.0
    for res in out:
        for r in res:
            vhat = r["v"] / r["bc2"]
            ratio = vhat / vbar if vbar > 0 else torch.zeros_like(vhat)   # vbar == 0: 0
            e = 1.0 / (3.0 - 2.0 * d)
            beta1 = (1.0 - beta0 * ratio ** e).clamp(0.0, 1.0 - eps)
            beta3 = (1.0 - beta1) ** d
            b = r["b_old"] * beta1
            m = beta1 * r["m_old"] + beta3 * r["g"]
            mhat = m / (1.0 - b) * beta0 ** (1.0 - d)
            theta = r["theta"] - lr * mhat
            r.update(b=b, m=m, mhat=mhat, theta_new=theta)
            # error propagation (first order); g_mag also covers fp32's l2 and ge rounding
            m_old, g_mag = r["m_old"].abs(), r["g_mag"]
            d_beta1 = (1.0 - beta1) * e_ratio + 2 * u
            d_beta3 = d * beta3 / (1.0 - beta1) * d_beta1
            if d != 1.0:  # 2^(e log2 x) for both pows (csrc/cpu/vec_pow.h)
                log_ratio = torch.where(ratio > 0, ratio.clamp_min(1e-300).log().abs(),
                                        torch.zeros_like(ratio))
                d_beta1 = d_beta1 + (1.0 - beta1) * (e * log_ratio + 2) * u
                d_beta3 = (d * beta3 / (1.0 - beta1) * d_beta1
                           + beta3 * (d * (1.0 - beta1).log().abs() + 2) * u)
            r["b_tol"] = r["b_old"] * d_beta1 + u * b
            r["m_tol"] = (3 * u * (beta1 * m_old + beta3 * g_mag)
                          + d_beta1 * m_old + d_beta3 * g_mag + beta3 * r["g_err"])
            d_mhat = (beta0 ** (1.0 - d) * (r["m_tol"] / (1.0 - b)
                                            + m.abs() * r["b_tol"] / (1.0 - b) ** 2)
                      + 2 * u * mhat.abs())
            r["theta_tol"] = (r["theta_tol"] + lr * d_mhat
                              + 2 * u * (r["theta"].abs() + lr * mhat.abs()))
    return out, rows, abs_rows


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (float64 x), subnormals included."""
    _, e = torch.frexp(x.abs())  # |x| = f * 2^e, f in [0.5, 1)
    e = torch.clamp(e - 1, min=MIN_NORMAL_EXP[dtype])
    return torch.pow(2.0, (e - (MANTISSA[dtype] - 1)).to(F64))


def check_rows(rows, ref_rows, abs_rows, what=""):
    """The kernel's stats rows against the float64 sums (see the table)."""
    ref, absr = torch.tensor(ref_rows, dtype=F64), torch.tensor(abs_rows, dtype=F64)
    assert rows.shape == ref.shape, what
    _le(rows - ref, 1e-5 * ref.abs() + 4e-6 * absr, f"{what} stats rows")
    assert torch.equal(rows[:, N], ref[:, N]), what


def check_step(buckets, pre, stats, hp, what=""):
    ref, ref_rows, abs_rows = reference_step(pre, hp)
    check_rows(stats, ref_rows, abs_rows, what)
    for b, res in zip(buckets, ref):
        for i, r in enumerate(res):
            name = f"{what} {b.params[i].dtype} {b.names[i]}"
            assert b.steps[i].item() == r["k"], name
            v = b.exp_avg_sq[i].to(F64)
            _le(v - r["v"], r["v_tol"], f"{name} v")
            _le(b.exp_avg[i].to(F64) - r["m"], r["m_tol"], f"{name} m")
            _le(b.beta1_prod[i].to(F64) - r["b"], r["b_tol"], f"{name} b")
            theta = b.params[i].to(F64)
            # the dtype's rounding of the fp32 result (1 ulp covers a halfway flip), plus the
            # fp32 result's own error
            tol = ulp(r["theta_new"], b.params[i].dtype) + r["theta_tol"]
            _le(theta - r["theta_new"], tol, f"{name} theta")
            # v_sums: the sum of the new exp_avg_sq, as written by update
            torch.testing.assert_close(b.v_sums[i], v.sum(), rtol=1e-5, atol=0,
                                       msg=lambda m: f"{name} v_sums: {m}")
            assert torch.isfinite(theta).all(), name
        assert b.gaps_untouched(), what


def _le(err: torch.Tensor, tol, what: str):
    if err.numel() == 0:
        return
    bad = err.abs() > tol
    if bad.any():
        tol = torch.as_tensor(tol, dtype=F64).expand_as(err)
        j = int(torch.argmax((err.abs() / tol.clamp_min(1e-300)).flatten()))
        pytest.fail(f"{what}: {int(bad.sum())} of {err.numel()} elements out of tolerance, "
                    f"worst error {err.flatten()[j].item():.3e} vs tol {tol.flatten()[j].item():.3e}")


# ---- tests --------------------------------------------------------------------------------

CONFIGS = {
    "adai": dict(),
    "l2": dict(weight_decay=0.01),
    "decoupled": dict(weight_decay=0.05, decoupled=True),
    "v2": dict(dampening=0.5),
    "v2_l2": dict(dampening=0.5, weight_decay=0.01),
    "v2_d0": dict(dampening=0.0),
    "scaled": dict(grad_scale=3.0),  # not a power of two: one more rounding of g
    # clipping (max_grad_norm = 1 is far below these gradients' norm): clip first, then L2
    "clip": dict(max_grad_norm=1.0),
    "clip_l2": dict(max_grad_norm=1.0, weight_decay=0.01),
    "clip_v2_l2_scaled": dict(max_grad_norm=1.0, weight_decay=0.01, dampening=0.5,
                              grad_scale=3.0),
    # clipping on but inactive (coefficient exactly 1)
    "clip_off": dict(max_grad_norm=1e6),
    "clip_off_l2": dict(max_grad_norm=1e6, weight_decay=0.01),
}


def scale_grads(buckets, hp):
    """Multiply the gradients by hp's grad_scale (as GradScaler's backward would)."""
    if hp["grad_scale"] is not None:
        for b in buckets:
            for g in b.grads:
                g.mul_(hp["grad_scale"])


# Misaligned states (segment offsets not multiples of 4 floats) against the oracle in a few
# configurations; test_misaligned_states_bitwise covers every configuration.
ORACLE_CASES = ([(c, False) for c in CONFIGS]
                + [(c, True) for c in ("adai", "v2_l2", "clip_v2_l2_scaled")])


@pytest.mark.parametrize("config, misaligned", ORACLE_CASES,
                         ids=[c + ("-misaligned" if m else "") for c, m in ORACLE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_against_float64(dtype, config, misaligned):
    hp = dict(HP, **CONFIGS[config])
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype} {config}".encode()))
    # Two buckets share one global vbar: this dtype's tensors, and a small fp32 bucket.
    buckets = [Bucket(_layouts(dtype, gen), misaligned),
               Bucket([("other", torch.randn(300, generator=gen))], misaligned)]
    for step in range(4):
        for b in buckets:
            fresh_grads(b, gen)
        scale_grads(buckets, hp)
        pre = snapshot(buckets)
        stats = kernel_step(buckets, hp)
        check_step(buckets, pre, stats, hp, what=f"step {step + 1}")
        if hp["max_grad_norm"] > 0:  # clipping is active exactly when meant to be
            norm = stats[:, GN].sum().sqrt().item()
            assert (norm > hp["max_grad_norm"]) == (not config.startswith("clip_off")), norm


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_states_bitwise(dtype, config):
    """Where a tensor's states sit in the buffers changes nothing: misaligned segments give
    bitwise the results of aligned ones, and no element outside a segment is written."""
    hp = dict(HP, **CONFIGS[config])
    gen = torch.Generator().manual_seed(zlib.crc32(f"placement {dtype} {config}".encode()))
    params = _layouts(dtype, gen)
    aligned = Bucket([(n, p.clone()) for n, p in params])
    misaligned = Bucket([(n, p.clone()) for n, p in params], misaligned=True)
    assert all(o % 4 for o in misaligned.offsets)
    for _ in range(3):
        fresh_grads(aligned, gen)
        scale_grads([aligned], hp)
        for g, src in zip(misaligned.grads, aligned.grads):
            g.copy_(src)
        rows_a = kernel_step([aligned], hp)
        rows_m = kernel_step([misaligned], hp)
        assert torch.equal(rows_a, rows_m)
        for a, m in ((aligned.params, misaligned.params), (aligned.exp_avg, misaligned.exp_avg),
                     (aligned.exp_avg_sq, misaligned.exp_avg_sq),
                     (aligned.beta1_prod, misaligned.beta1_prod),
                     (aligned.steps, misaligned.steps), (aligned.v_sums, misaligned.v_sums)):
            for x, y in zip(a, m):
                assert torch.equal(x, y)
        assert aligned.gaps_untouched() and misaligned.gaps_untouched()


def test_lagging_tensor_counts_its_own_step():
    """A tensor that skipped steps keeps its own (smaller) k and bias correction."""
    gen = torch.Generator().manual_seed(1)
    a = Bucket([("a", torch.randn(100, generator=gen))])
    b = Bucket([("b", torch.randn(50, generator=gen))])
    for _ in range(3):
        fresh_grads(a, gen)
        kernel_step([a], HP)
    for _ in range(2):
        fresh_grads(a, gen)
        fresh_grads(b, gen)
        pre = snapshot([a, b])
        stats = kernel_step([a, b], HP)
        check_step([a, b], pre, stats, HP)
    assert a.steps[0].item() == 5 and b.steps[0].item() == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dampening", [1.0, 0.5])
def test_all_zero_gradients(dtype, dampening):
    """vbar == 0: vhat / vbar := 0, beta1 = 1 - eps, m stays 0, theta does not move."""
    gen = torch.Generator().manual_seed(2)
    bucket = Bucket(_layouts(dtype, gen))
    before = [p.clone() for p in bucket.params]
    hp = dict(HP, dampening=dampening)
    for _ in range(2):
        stats = kernel_step([bucket], hp)
        n = sum(p.numel() for p in bucket.params)
        assert stats.tolist() == [[0.0] * (COLS - 1) + [float(n)]]
    for p, p0, m, v, b, vs in zip(bucket.params, before, bucket.exp_avg, bucket.exp_avg_sq,
                                  bucket.beta1_prod, bucket.v_sums):
        assert torch.equal(p, p0)
        assert torch.equal(m, torch.zeros_like(m))
        assert torch.equal(v, torch.zeros_like(v))
        assert not torch.isnan(b).any()
        beta1 = torch.tensor(1.0 - HP["eps"], dtype=torch.float32)
        assert torch.equal(b, torch.full_like(b, (beta1 * beta1).item()))
        assert vs.item() == 0.0


def test_grads_not_modified_and_params_not_read_by_stats_without_l2():
    gen = torch.Generator().manual_seed(3)
    bucket = Bucket(_layouts(torch.float32, gen))
    fresh_grads(bucket, gen)
    grads = [g.clone() for g in bucket.grads]
    # Non-finite params must not leak into stats when l2 == 0 (params are not read).
    saved = [p.clone() for p in bucket.params]
    for p in bucket.params:
        p.fill_(float("nan"))
    out = torch.zeros(COLS, dtype=F64)
    torch.ops.adai.stats(bucket.params, bucket.grads, bucket.segments, bucket.step_vec,
                         bucket.v_sum_vec, None, 0.99, 0.0, out)
    assert torch.isfinite(out).all() and out[B] > 0
    assert out[B] == out[BGG] and out[BGT] == 0 and out[BTT] == 0
    # nor when l2 rounds to 0 in float (the per-element math's l2, adai_math.h Consts)
    out2 = torch.zeros(COLS, dtype=F64)
    torch.ops.adai.stats(bucket.params, bucket.grads, bucket.segments, bucket.step_vec,
                         bucket.v_sum_vec, None, 0.99, 1e-50, out2)
    assert torch.isfinite(out2).all() and out2[BGT] == 0 and out2[BTT] == 0
    for p, s in zip(bucket.params, saved):
        p.copy_(s)
    kernel_step([bucket], dict(HP, weight_decay=0.01))
    for g, g0 in zip(bucket.grads, grads):
        assert torch.equal(g, g0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ["adai", "v2_l2", "clip_v2_l2_scaled"])
def test_deterministic_across_thread_counts(dtype, config):
    """Bitwise identical results with 1 and 2 threads (fixed chunks, fixed summation order)."""
    hp = dict(HP, **CONFIGS[config])
    gen = torch.Generator().manual_seed(4)
    base = [Bucket(_layouts(dtype, gen) + [("big", torch.randn(100_003, generator=gen)
                                                    .to(dtype))])]
    grads = []
    for _ in range(3):
        fresh_grads(base[0], gen)
        grads.append([g.clone() for g in base[0].grads])
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            buckets = [base[0].clone()]
            all_stats = []
            for gs in grads:
                for g, src in zip(buckets[0].grads, gs):
                    g.copy_(src)
                all_stats.append(kernel_step(buckets, hp))
            results.append((buckets[0].tensors(), all_stats))
    finally:
        torch.set_num_threads(old)
    (t0, s0), *rest = results
    for t1, s1 in rest:
        for a, b in zip(s0 + t0, s1 + t1):
            assert torch.equal(a, b)


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_v_sum_matches_update_bitwise(dtype, misaligned):
    """v_sum (run when state is loaded) recomputes v_sums exactly as update summed them, for
    any layout, size and placement in the buffer and any thread count, so a restored run
    continues bitwise."""
    gen = torch.Generator().manual_seed(6)
    bucket = Bucket(_layouts(dtype, gen) + [("big", torch.randn(70_001, generator=gen)
                                                     .to(dtype))], misaligned)
    for _ in range(3):
        fresh_grads(bucket, gen)
        kernel_step([bucket], dict(HP, dampening=0.5))
    expected = bucket.v_sum_vec.clone()
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            bucket.v_sum_vec.fill_(float("nan"))
            torch.ops.adai.v_sum(bucket.v_buf, bucket.segments, bucket.v_sum_vec)
            assert torch.equal(bucket.v_sum_vec, expected)
    finally:
        torch.set_num_threads(old)
    # and the sums are the sums (fp32 lanes of <= 32 terms, added in double)
    for v, vs in zip(bucket.exp_avg_sq, bucket.v_sums):
        torch.testing.assert_close(vs, v.to(F64).sum(), rtol=1e-6, atol=0)
    # the rows name the tensors: a subset (in any order) writes only its own slots
    rows = [5, 0, 9, 3]
    bucket.v_sum_vec.fill_(float("nan"))
    torch.ops.adai.v_sum(bucket.v_buf, bucket.segments[rows], bucket.v_sum_vec)
    written = torch.zeros(len(bucket.params), dtype=torch.bool)
    written[[bucket.slots[i] for i in rows]] = True
    assert torch.equal(bucket.v_sum_vec[written], expected[written])
    assert torch.isnan(bucket.v_sum_vec[~written]).all()
    assert bucket.gaps_untouched()


def test_stats_v_sums_linearity():
    """stats uses V_i = v_sums[i] instead of reading exp_avg_sq: feeding a V_i changes column
    A by beta2 * V_i / bc2, and nothing else."""
    gen = torch.Generator().manual_seed(5)
    b1 = Bucket([("x", torch.randn(1000, generator=gen))])
    fresh_grads(b1, gen)
    b2 = b1.clone()
    b2.v_sum_vec.fill_(123.0)
    o1, o2 = torch.zeros(COLS, dtype=F64), torch.zeros(COLS, dtype=F64)
    for b, o in ((b1, o1), (b2, o2)):
        torch.ops.adai.stats(b.params, b.grads, b.segments, b.step_vec, b.v_sum_vec, None, 0.99,
                             0.0, o)
    torch.testing.assert_close(o2[A] - o1[A], torch.tensor(0.99 * 123.0 / (1 - 0.99), dtype=F64))
    assert torch.equal(o1[1:], o2[1:])


# ---- unscaling, skipping, tensor lr ---------------------------------------------------------

def _bucket_pair(dtype, seed, extra=()):
    gen = torch.Generator().manual_seed(seed)
    a = Bucket(_layouts(dtype, gen) + list(extra))
    for _ in range(2):  # some state to start from
        fresh_grads(a, gen)
        kernel_step([a], HP)
    fresh_grads(a, gen)
    return a, a.clone()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ["adai", "v2_l2", "clip_l2"])
def test_grad_scale_power_of_two_is_exact(dtype, config):
    """Gradients scaled by 2^8 and unscaled by the kernel give bitwise the unscaled step (the
    scaling and 1 / scale are exact), with and without clipping and L2."""
    hp = dict(HP, **CONFIGS[config])
    a, b = _bucket_pair(dtype, 7)
    for g in b.grads:
        g.mul_(256.0)
    grads_b = [g.clone() for g in b.grads]
    rows_a = kernel_step([a], hp)
    rows_b = kernel_step([b], dict(hp, grad_scale=256.0))
    assert torch.equal(rows_a, rows_b)
    for x, y in zip(a.state(), b.state()):
        assert torch.equal(x, y)
    for g, g0 in zip(b.grads, grads_b):  # the caller's (scaled) gradients are not unscaled
        assert torch.equal(g, g0)


def _assert_skipped(bucket, before):
    """Nothing changed: params, states, v_sums, and the step counters (restored)."""
    for x, y in zip(bucket.state(), before.state()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_found_inf_skips_the_step(dtype):
    a, before = _bucket_pair(dtype, 8)
    steps0 = a.step_vec.clone()
    rows = kernel_step([a], dict(HP, dampening=0.5, weight_decay=0.01), found_inf=1.0)
    assert torch.isfinite(rows).all()  # stats ran (and counted the step) ...
    assert torch.equal(a.step_vec, steps0)  # ... and update took the increment back
    _assert_skipped(a, before)
    # found_inf == 0: an ordinary step
    pre = snapshot([a])
    rows = kernel_step([a], HP, found_inf=0.0)
    check_step([a], pre, rows, HP)
    assert torch.equal(a.step_vec, steps0 + 1)


@pytest.mark.parametrize("dampening", [1.0, 0.5])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("how", ["skip_nonfinite", "clipping", "neither"])
def test_nonfinite_gradient(bad, how, dampening):
    """A non-finite gradient skips the whole step with skip_nonfinite or with clipping on
    (every bucket of the step unchanged); otherwise nothing skips: elements with a non-finite
    gradient become NaN, the others step with vhat / vbar := 0 (beta1 = 1 - eps)."""
    a, before_a = _bucket_pair(torch.float32, 9)
    b, before_b = _bucket_pair(torch.bfloat16, 10)
    a.grads[3].view(-1)[5] = bad  # "1023"
    hp = dict(HP, skip_nonfinite=how == "skip_nonfinite", dampening=dampening,
              max_grad_norm=1.0 if how == "clipping" else 0.0)
    rows = kernel_step([a, b], hp)
    assert not math.isfinite(rows[:, GN].sum().item())
    if how != "neither":
        _assert_skipped(a, before_a)
        _assert_skipped(b, before_b)
        return
    assert torch.equal(a.step_vec, before_a.step_vec + 1)
    pre = snapshot([before_a, before_b])
    for bucket, pre_b in zip((a, b), pre):
        for i, t in enumerate(pre_b):
            nonfinite = ~torch.isfinite(bucket.grads[i])
            assert torch.equal(torch.isnan(bucket.params[i]), nonfinite)
            assert torch.equal(torch.isnan(bucket.exp_avg_sq[i]) | torch.isinf(
                bucket.exp_avg_sq[i]), nonfinite)
            # finite elements: beta1 = 1 - eps, beta3 = eps^d (float(1 - eps) is 2^-24 from
            # the real value, so beta3 is within d 2^-24 / eps relative, plus pow's error)
            beta1, eps = 1.0 - HP["eps"], HP["eps"]
            beta3 = eps ** dampening
            ok = ~nonfinite
            m = beta1 * t["m"] + beta3 * t["g"]
            tol = (4 * U32 * t["m"].abs()
                   + (dampening * U32 / eps + 12 * U32) * beta3 * t["g"].abs())
            _le(bucket.exp_avg[i].to(F64)[ok] - m[ok], tol[ok], "m")


@pytest.mark.parametrize("decoupled", [False, True])
def test_lr_tensor(decoupled):
    """lr_tensor replaces the float lr (which is then ignored): bitwise the float-lr step."""
    hp = dict(HP, weight_decay=0.05, decoupled=decoupled, dampening=0.5)
    a, b = _bucket_pair(torch.float32, 11)
    kernel_step([a], dict(hp, lr=0.125))
    kernel_step([b], dict(hp, lr=1e9), lr_tensor=0.125)
    for x, y in zip(a.state(), b.state()):
        assert torch.equal(x, y)


def test_stats_row_columns():
    """The row's columns as design.md defines them, against float64 sums, with L2 and a
    gradient scale, over tensors with different step counts and v_sums."""
    gen = torch.Generator().manual_seed(12)
    bucket = Bucket([(str(n), torch.randn(n, generator=gen)) for n in (5, 100, 40000)])
    fresh_grads(bucket, gen)
    for k, vs, step, v_sum in zip((0.0, 3.0, 10.0), (0.5, 2.0, 30.0), bucket.steps,
                                  bucket.v_sums):
        step.fill_(k)
        v_sum.fill_(vs)
    beta2, l2, scale = 0.99, 0.03, 3.0
    out = torch.zeros(COLS, dtype=F64)
    torch.ops.adai.stats(bucket.params, bucket.grads, bucket.segments, bucket.step_vec,
                         bucket.v_sum_vec, torch.tensor(scale), beta2, l2, out)
    exp = torch.zeros(COLS, dtype=F64)
    for i, (p, g) in enumerate(zip(bucket.params, bucket.grads)):
        k = [1, 4, 11][i]
        assert bucket.steps[i].item() == k
        bc2 = 1 - beta2 ** k
        w = (1 - beta2) / bc2
        th, g = p.to(F64), g.to(F64) / scale
        exp += torch.tensor([beta2 * bucket.v_sums[i].item() / bc2,
                             w * ((g + l2 * th) ** 2).sum(), w * (g * g).sum(),
                             w * (2 * l2 * g * th).sum(), w * ((l2 * th) ** 2).sum(),
                             (g * g).sum(), g.numel()], dtype=F64)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-9)
    assert out[N].item() == 40105


# ---- the vector pow (AdaiV2) ----------------------------------------------------------------

_ISA_FLAGS = {  # as setup.py builds the CPU variants
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def _cxx():
    for cand in (os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++"):
        if cand and shutil.which(cand.split()[0]):
            return shutil.which(cand.split()[0])
    return None


@pytest.mark.parametrize("isa", list(_ISA_FLAGS))
def test_vec_pow(isa, tmp_path):
    """csrc/cpu/vec_pow.h (AdaiV2's pow in the AVX2 / AVX-512 kernels) against a float64 pow:
    within (|e ln x| + 2) ulp, and powf's special cases (tests/vec_pow_check.cpp)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 only")
    if not _native._hardware_allows(isa):
        pytest.skip(f"this CPU has no {isa}")
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import include_paths

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path / "vec_pow_check")
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror",
           "-Wno-maybe-uninitialized"]  # GCC's own AVX-512 intrinsic headers
    cmd += _ISA_FLAGS[isa]
    for inc in include_paths():
        cmd += ["-isystem", inc]
    cmd += ["-I", os.path.join(root, "csrc"), os.path.join(root, "tests", "vec_pow_check.cpp"),
            "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, " ".join(cmd) + "\n" + build.stdout + build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
