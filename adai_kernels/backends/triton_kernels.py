"""Triton kernels of the Adai step (docs/design.md, "Two phases, two calls").

Imported only by `triton.py`'s loader, never by `import adai_kernels`: it imports triton.

Every launch is multi-tensor: a device-side int64 table (built by the launcher, one
host-to-device copy per op) holds, for T tensors and C chunks of BLOCK elements:

    [0 : NC)                 float64 constants, bit-cast to int64 (NC per kernel, constexpr)
    [NC + j*T : NC+(j+1)*T)  column j of the per-tensor rows: data_ptr values and numel
    [CS : CS + T + 1)        prefix sums of chunk counts: tensor t owns chunks [cs[t], cs[t+1])
    [CH : CH + C)            chunk c -> (tensor << 32) | (chunk index inside the tensor)

so the grid is C programs (or T for the per-tensor finalizers) whatever T is, and the launch
count of a step does not depend on the number of tensors. Elements are processed in memory
order: a dense non-overlapping tensor (transposed, channels_last) is the flat span of numel
elements from its data_ptr, and its grad and states have the same strides.

The per-element arithmetic is csrc/adai_math.h's, in the same order of operations, in fp32.
Sums are deterministic: fp32 `tl.sum` inside a chunk, float64 per chunk, then float64 per
tensor and per launch in a fixed order by one program each. No float atomics.

Chunks that lie wholly inside their tensor run unmasked (`numel` is read from the table, so a
mask would defeat vector accesses); a tensor's last chunk runs masked. Pointers are declared
16-byte aligned when the launcher found them so, and offsets contiguous in runs of VEC: with
the buckets' aligned states every access of `update` and `v_sum` gets the same register
layout (VEC elements per thread), hence the same reduction order for the chunk sums of v, and
a checkpoint restored through `v_sum` continues bitwise (checked in the compiled TTGIR for
sm_90 by tests/test_compiled_kernels.py).

`stats` writes per chunk fp32 sums of g^2 (and, with L2, of (g + l2 theta)^2, g theta and
theta^2) as float64 partials, one program per tensor turns them into the tensor's share of
each column of the statistics row (adai_math.h StatsColumn), and one program adds the shares
in a fixed order. `update` needs no extra launch for adai_math.h::globals: every program sums
the rows of `stats` (few: one per bucket) and derives inv_vbar, the clip coefficient and the
skip flag itself. A skipped step is a branch on that device-side flag: no program of
`update` reads or writes an element, and its finalizer takes back the step increments
instead of writing v_sums.

Portability notes (the same code runs compiled on CUDA/ROCm and under TRITON_INTERPRET=1):
- pow(x, e) is exp2(e * log2(x)) (the interpreter has no pow); x == 0 is handled explicitly,
  and d == 1 (Adai proper) needs no pow at all (ADAI_V1 is a constexpr).
- bf16 is loaded and stored through its bits (int16): loads shift left by 16; stores round
  to nearest even with integer ops (NaN -> 0x7FC0), like torch's own conversion. The
  interpreter's fp32 -> bf16 cast truncates, so this keeps both paths bitwise identical.
- fp32 division m / (1 - b) is `div_rn` (IEEE); Triton's `/` on NVIDIA is div.full (approx).
- float64 constants (beta2, ln beta2, the l2 factors, max_grad_norm, clip_grad_norm_'s 1e-6,
  the decoupled decay for a device-side lr) come through the table: Triton passes Python
  floats as fp32. The clip coefficient is IEEE float64 (sqrt.rn.f64, div.rn.f64). fp32
  constants (adai_math.h's Consts) are rounded on the host, so the launcher's conversion is
  exact.
- beta2^k is exp(k * ln beta2) in float64 (tl.exp on fp64 lowers to __nv_exp/__ocml_exp_f64).
- Compiled, fp32 mul + add may contract to FMA (as nvcc does by default); the interpreter
  (numpy) never contracts.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_random import bf16_round_stochastic, rounding_bits, rounding_stream

BLOCK = 1024  # elements per program (one chunk) in the element-wise kernels
VEC = 4  # elements per thread and vector access (see _offsets)
NUM_WARPS = 4  # of every element-wise kernel (the same for update and v_sum)
FBLOCK = 1024  # partials per iteration in the finalizers

# dtype codes of params / grads (CODE, one per launch, a constexpr): fp32, fp16, bf16
F32, F16, BF16 = 0, 1, 2


@triton.jit
def _ld(ptr, mask, MASKED: tl.constexpr, other):
    if MASKED:
        return tl.load(ptr, mask=mask, other=other)
    else:
        return tl.load(ptr)


@triton.jit
def _st(ptr, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, x, mask=mask)
    else:
        tl.store(ptr, x)


@triton.jit
def _load_param(ptr, offs, mask, CODE: tl.constexpr, MASKED: tl.constexpr):
    """Load params/grads of dtype CODE (0 fp32, 1 fp16, 2 bf16: a pointer from _param_ptr)
    as fp32. bf16 goes through its bits: exact, and the same compiled or interpreted."""
    if CODE == 2:
        bits = _ld(ptr + offs, mask, MASKED, 0)
        x = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = _ld(ptr + offs, mask, MASKED, 0.0).to(tl.float32)
    return x


@triton.jit
def _store_param(ptr, offs, x, mask, CODE: tl.constexpr, MASKED: tl.constexpr):
    """Store fp32 `x` as dtype CODE, rounded to nearest even. bf16: with integer ops (the
    interpreter's fp32 -> bf16 cast truncates), NaN -> 0x7FC0, as torch does."""
    if CODE == 2:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        _st(ptr + offs, rounded.to(tl.int16), mask, MASKED)
    elif CODE == 1:
        _st(ptr + offs, x.to(tl.float16), mask, MASKED)
    else:
        _st(ptr + offs, x, mask, MASKED)


@triton.jit
def _offsets(local, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Element offsets of chunk `local`, declared contiguous in runs of VEC only: every load
    and store of every kernel then gets the same register layout (VEC elements per thread),
    so a chunk's sum is reduced in the same order by `update` and by `v_sum`."""
    return tl.max_contiguous(local * BLOCK + tl.arange(0, BLOCK), VEC)


@triton.jit
def _ptr(meta, T, t, j, NC: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Column j (a data_ptr value) of tensor t's row as a pointer to DTYPE, declared 16-byte
    aligned when ALIGNED (checked on the host for every tensor of the launch)."""
    ptr = tl.load(meta + (NC + j * T) + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _param_ptr(meta, T, t, j, NC: tl.constexpr, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """_ptr for params/grads of dtype CODE (bf16 as int16: handled through its bits)."""
    if CODE == 2:
        ptr = _ptr(meta, T, t, j, NC, tl.int16, ALIGNED)
    elif CODE == 1:
        ptr = _ptr(meta, T, t, j, NC, tl.float16, ALIGNED)
    else:
        ptr = _ptr(meta, T, t, j, NC, tl.float32, ALIGNED)
    return ptr


@triton.jit
def _powf(x, e):
    """x ** e for x >= 0 (or NaN) and e >= 0, as exp2(e * log2(x)); pow(0, e) = (e == 0)."""
    pos = x > 0.0
    r = tl.exp2(e * tl.log2(tl.where(pos, x, 1.0)))
    zero = tl.where(e == 0.0, 1.0, 0.0)
    return tl.where(pos, r, tl.where(x == 0.0, zero, x))


@triton.jit
def _chunk(meta, pid, T, NC: tl.constexpr, NCOL: tl.constexpr):
    """(tensor index, chunk index inside the tensor) of program `pid`."""
    packed = tl.load(meta + (NC + NCOL * T + T + 1) + pid)
    return packed >> 32, packed & 0xFFFFFFFF


@triton.jit
def _col(meta, T, t, j, NC: tl.constexpr):
    """Column j of tensor t's row (a data_ptr value or numel), as int64."""
    return tl.load(meta + (NC + j * T) + t)


@triton.jit
def _segment_sum(meta, T, t, partials, NC: tl.constexpr, NCOL: tl.constexpr,
                 FB: tl.constexpr):
    """sum of partials[cs[t] : cs[t+1]] in float64, in a fixed order."""
    cs = meta + (NC + NCOL * T)
    c0 = tl.load(cs + t)
    c1 = tl.load(cs + t + 1)
    acc = tl.zeros([FB], dtype=tl.float64)
    for start in range(c0, c1, FB):
        idx = start + tl.arange(0, FB)
        acc += tl.load(partials + idx, mask=idx < c1, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _inv_scale(gs_ptr):
    """GradScaler's multiplier: float32(1 / double(grad_scale)), as GradScaler.unscale_."""
    return (1.0 / tl.load(gs_ptr).to(tl.float64)).to(tl.float32)


# ----------------------------------------------------------------------------- stats
# the stats table: S_NC float64 constants, then these columns
S_NC = tl.constexpr(5)  # beta2, 1 - beta2, ln(beta2), 2 * l2, l2 * l2 (l2 rounded to fp32)
S_G, S_P, S_STEP, S_V_SUM, S_NUMEL = (tl.constexpr(i) for i in range(5))
S_NCOL = tl.constexpr(5)
# adai_math.h StatsColumn
C_A, C_B, C_BGG, C_BGT, C_BTT, C_GN, C_N = (tl.constexpr(i) for i in range(7))
N_COLS = tl.constexpr(7)


@triton.jit
def _masked_sum(x, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.where(mask, x, 0.0)
    return tl.sum(x, axis=0)


@triton.jit
def _stats_chunk(g_ptr, p_ptr, offs, mask, inv_scale, l2, partials, P, pid,
                 CODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_L2: tl.constexpr,
                 THETA_F32: tl.constexpr, MASKED: tl.constexpr):
    """A chunk's fp32 sums (adai_math.h StatsSum, g unscaled): gg = g^2 and, with L2,
    grad_sq = (g + l2 theta)^2, gt = g theta and tt = theta^2, stored as float64 in
    partials[q * P + pid], q = 0, 1, 2, 3."""
    g = _load_param(g_ptr, offs, mask, CODE, MASKED)
    if HAS_SCALE:
        g = g * inv_scale
    tl.store(partials + pid, _masked_sum(g * g, mask, MASKED).to(tl.float64))
    if HAS_L2:
        if THETA_F32:  # theta from the fp32 master copy
            theta = _ld(p_ptr + offs, mask, MASKED, 0.0)
        else:
            theta = _load_param(p_ptr, offs, mask, CODE, MASKED)
        ge = g + l2 * theta  # adai_math.h::grad_sq
        tl.store(partials + P + pid, _masked_sum(ge * ge, mask, MASKED).to(tl.float64))
        tl.store(partials + 2 * P + pid, _masked_sum(g * theta, mask, MASKED).to(tl.float64))
        tl.store(partials + 3 * P + pid,
                 _masked_sum(theta * theta, mask, MASKED).to(tl.float64))


@triton.jit
def stats_partials_kernel(meta, partials, P, T, gs_ptr, l2, CODE: tl.constexpr,
                          HAS_SCALE: tl.constexpr, HAS_L2: tl.constexpr,
                          THETA_F32: tl.constexpr, P_ALIGNED: tl.constexpr,
                          BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Per chunk c: partials[q * P + c] (see _stats_chunk). THETA_F32: the S_P column
    points into the fp32 master copy (read only with L2)."""
    pid = tl.program_id(0)
    t, local = _chunk(meta, pid, T, S_NC, S_NCOL)
    numel = _col(meta, T, t, S_NUMEL, S_NC)
    offs = _offsets(local, BLOCK, VEC)
    g_ptr = _param_ptr(meta, T, t, S_G, S_NC, CODE, P_ALIGNED)
    if THETA_F32:
        p_ptr = _ptr(meta, T, t, S_P, S_NC, tl.float32, P_ALIGNED)
    else:
        p_ptr = _param_ptr(meta, T, t, S_P, S_NC, CODE, P_ALIGNED)
    if HAS_SCALE:
        inv_scale = _inv_scale(gs_ptr)
    else:
        inv_scale = 1.0
    if (local + 1) * BLOCK <= numel:  # a whole chunk: unmasked, vector accesses
        _stats_chunk(g_ptr, p_ptr, offs, offs < numel, inv_scale, l2, partials, P, pid,
                     CODE, HAS_SCALE, HAS_L2, THETA_F32, False)
    else:
        _stats_chunk(g_ptr, p_ptr, offs, offs < numel, inv_scale, l2, partials, P, pid,
                     CODE, HAS_SCALE, HAS_L2, THETA_F32, True)


@triton.jit
def stats_finalize_kernel(meta, partials, P, contrib, T, HAS_L2: tl.constexpr,
                          FB: tl.constexpr):
    """One program per tensor t: k += 1, then tensor t's share of every column of the
    statistics row (adai_math.h StatsColumn), float64, into contrib[col * T + t]."""
    t = tl.program_id(0).to(tl.int64)
    beta2 = tl.load(meta + 0).to(tl.float64, bitcast=True)
    one_minus_beta2 = tl.load(meta + 1).to(tl.float64, bitcast=True)
    ln_beta2 = tl.load(meta + 2).to(tl.float64, bitcast=True)
    GG = _segment_sum(meta, T, t, partials, S_NC, S_NCOL, FB)
    step_ptr = _col(meta, T, t, S_STEP, S_NC).to(tl.pointer_type(tl.float64))
    k = tl.load(step_ptr) + 1.0
    tl.store(step_ptr, k)
    bc2 = 1.0 - tl.exp(k.to(tl.float64) * ln_beta2)
    w = one_minus_beta2 / bc2
    V = tl.load(_col(meta, T, t, S_V_SUM, S_NC).to(tl.pointer_type(tl.float64)))
    Bgg = w * GG
    if HAS_L2:
        two_l2 = tl.load(meta + 3).to(tl.float64, bitcast=True)
        l2_sq = tl.load(meta + 4).to(tl.float64, bitcast=True)
        grad_sq = _segment_sum(meta, T, t, partials + P, S_NC, S_NCOL, FB)
        B = w * grad_sq
        Bgt = w * (two_l2 * _segment_sum(meta, T, t, partials + 2 * P, S_NC, S_NCOL, FB))
        Btt = w * (l2_sq * _segment_sum(meta, T, t, partials + 3 * P, S_NC, S_NCOL, FB))
    else:
        B = Bgg
        Bgt = tl.zeros([], dtype=tl.float64)
        Btt = tl.zeros([], dtype=tl.float64)
    tl.store(contrib + C_A * T + t, beta2 * V / bc2)
    tl.store(contrib + C_B * T + t, B)
    tl.store(contrib + C_BGG * T + t, Bgg)
    tl.store(contrib + C_BGT * T + t, Bgt)
    tl.store(contrib + C_BTT * T + t, Btt)
    tl.store(contrib + C_GN * T + t, GG)
    tl.store(contrib + C_N * T + t, _col(meta, T, t, S_NUMEL, S_NC).to(tl.float64))


@triton.jit
def row_sum_kernel(contrib, T, out, out_stride, FB: tl.constexpr):
    """out[col * out_stride] = sum over tensors of contrib[col * T : (col + 1) * T], float64,
    in a fixed order (one program)."""
    for col in tl.static_range(N_COLS):
        acc = tl.zeros([FB], dtype=tl.float64)
        for start in range(0, T, FB):
            idx = start + tl.arange(0, FB)
            acc += tl.load(contrib + col * T + idx, mask=idx < T, other=0.0)
        tl.store(out + col * out_stride, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------- update
# the update (and v_sum) table: U_NC float64 constants, then these columns
U_NC = tl.constexpr(4)  # ln(beta2), max_grad_norm, weight decay when decoupled, 1e-6
U_P, U_G, U_M, U_V, U_B, U_STEP, U_V_SUM, U_NUMEL = (tl.constexpr(i) for i in range(8))
# the optional columns: beta1_prod_max[slot] (pointer), the master span (pointer), the
# tensor's first rounding index (0 where the option is off)
U_BMAX, U_MASTER, U_RIDX = (tl.constexpr(i) for i in range(8, 11))
U_NCOL = tl.constexpr(11)
# B_MODE: how b is handled. B_FULL: read and written everywhere (no beta1_prod_max);
# B_FLAGS: per tensor, by its beta1_prod_max flag read on the device; B_DONE: every tensor
# done (an empty beta1_prod, never indexed)
B_FULL, B_FLAGS, B_DONE = 0, 1, 2  # the launcher's values; the kernels' constexprs below
_B_FULL, _B_FLAGS, _B_DONE = (tl.constexpr(x) for x in (B_FULL, B_FLAGS, B_DONE))
# THETA: where theta comes from and how the param is written. TH_PARAM: the param, rounded
# to nearest; TH_MASTER: the fp32 master copy, written too, the param = master rounded to
# nearest; TH_STOCHASTIC: the (bf16) param, written rounded stochastically
TH_PARAM, TH_MASTER, TH_STOCHASTIC = 0, 1, 2
_TH_MASTER, _TH_STOCHASTIC = tl.constexpr(TH_MASTER), tl.constexpr(TH_STOCHASTIC)
# adai_math.h::kBeta1ProdDone
B_DONE_MAX = tl.constexpr(2.98023223876953125e-08)  # 2^-25


@triton.jit
def _column(acc, cols, j):
    """Element j of a small float64 vector (the others are added as exact zeros)."""
    return tl.sum(tl.where(cols == j, acc, 0.0), axis=0)


@triton.jit
def _globals(meta, stats, n_rows, fi_ptr, HAS_FOUND_INF: tl.constexpr, CLIP: tl.constexpr,
             SKIP_NONFINITE: tl.constexpr):
    """adai_math.h::globals: the rows of `stats` (n_rows x 7, float64, contiguous) summed in
    row order; returns (inv_vbar fp32, clip coefficient fp32, skip). Every program computes
    it alike."""
    cols = tl.arange(0, 8)
    acc = tl.zeros([8], dtype=tl.float64)
    for r in range(0, n_rows):
        acc += tl.load(stats + r * N_COLS + cols, mask=cols < N_COLS, other=0.0)
    gn2 = _column(acc, cols, C_GN)
    finite = gn2 - gn2 == 0.0  # false for inf and NaN
    if HAS_FOUND_INF:
        skip = tl.load(fi_ptr) != 0.0
    else:
        skip = tl.full([], 0, dtype=tl.int1)
    if CLIP or SKIP_NONFINITE:
        skip = skip | (gn2 - gn2 != 0.0)
    c = tl.full([], 1.0, dtype=tl.float64)
    if CLIP:
        max_norm = tl.load(meta + 1).to(tl.float64, bitcast=True)
        norm_eps = tl.load(meta + 3).to(tl.float64, bitcast=True)  # 1e-6, as clip_grad_norm_
        q = max_norm / (tl.sqrt(tl.where(finite, gn2, 0.0)) + norm_eps)
        c = tl.where(finite & (q < 1.0), q, c)
    A = _column(acc, cols, C_A)
    s = tl.where(c == 1.0, A + _column(acc, cols, C_B),
                 A + c * c * _column(acc, cols, C_BGG) + c * _column(acc, cols, C_BGT)
                 + _column(acc, cols, C_BTT))
    count = _column(acc, cols, C_N)
    pos = s > 0.0
    inv_vbar = tl.where(pos, count / tl.where(pos, s, 1.0), 0.0).to(tl.float32)
    return inv_vbar, c.to(tl.float32), skip


@triton.jit
def _v_sum(v, mask, MASKED: tl.constexpr):
    """A chunk's sum of v (fp32). The same code in `update` and `v_sum`, so that with the
    same layout (see _offsets) they reduce in the same order."""
    if MASKED:
        v = tl.where(mask, v, 0.0)
    return tl.sum(v, axis=0)


@triton.jit
def _abs_bits(b, mask, MASKED: tl.constexpr):
    """|b| as int32 bits (0 where masked off): for non-negative floats the bits order as the
    values do, and every NaN's lie above inf's, so their max is adai_math.h::max_abs_nan
    (a NaN when any b is NaN)."""
    bits = b.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if MASKED:
        bits = tl.where(mask, bits, 0)
    return bits


# _update_chunk and update_kernel run past 50 lines: most of each is its argument list (every
# pointer and float32 constant of adai_math.h is an argument of its own in Triton), and the
# rest is one element pass, kept whole so it reads as csrc/cpu's update_block does.
@triton.jit
def _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, w_ptr, offs, mask, inv_bc2, inv_vbar,
                  mult, stream, first_index, lr, beta0, beta2, one_minus_beta2, beta1_max, l2,
                  lr_wd, dampening, exponent, mhat_scale,
                  CODE: tl.constexpr, ADAI_V1: tl.constexpr, HAS_L2: tl.constexpr,
                  MULT: tl.constexpr, ELIDED: tl.constexpr, THETA: tl.constexpr,
                  MASKED: tl.constexpr):
    """adai_math.h::update (ELIDED: update_b_done, b neither read nor written) of one chunk;
    returns the new v and |b'| as _abs_bits (0 when ELIDED). w_ptr: the master span
    (TH_MASTER)."""
    if THETA == _TH_MASTER:
        theta = _ld(w_ptr + offs, mask, MASKED, 0.0)
    else:
        theta = _load_param(p_ptr, offs, mask, CODE, MASKED)
    g = _load_param(g_ptr, offs, mask, CODE, MASKED)
    m = _ld(m_ptr + offs, mask, MASKED, 0.0)
    v = _ld(v_ptr + offs, mask, MASKED, 0.0)

    if MULT:  # unscaling and clipping: g * (1 / grad_scale) * c, the product as fp32
        g = g * mult
    # adai_math.h::update, operation for operation (effective_grad: theta only with L2)
    if HAS_L2:
        ge = g + l2 * theta
    else:
        ge = g
    v = beta2 * v + one_minus_beta2 * ge * ge
    ratio = v * inv_bc2 * inv_vbar
    if ADAI_V1:
        scaled = ratio
    else:
        scaled = _powf(ratio, exponent)
    beta1 = 1.0 - beta0 * scaled
    beta1 = tl.where(beta1 < 0.0, 0.0, tl.where(beta1 > beta1_max, beta1_max, beta1))
    one_minus_beta1 = 1.0 - beta1
    if ADAI_V1:
        beta3 = one_minus_beta1
    else:
        beta3 = _powf(one_minus_beta1, dampening)
    m = beta1 * m + beta3 * ge
    if ELIDED:  # 1 - b == 1 exactly: mhat = m bitwise
        mhat = m
        b_bits = tl.zeros(offs.shape, dtype=tl.int32)
    else:
        b = _ld(b_ptr + offs, mask, MASKED, 0.0) * beta1
        mhat = tl.math.div_rn(m, 1.0 - b)
        _st(b_ptr + offs, b, mask, MASKED)
        b_bits = _abs_bits(b, mask, MASKED)
    if not ADAI_V1:
        mhat = mhat * mhat_scale
    theta = theta - lr_wd * theta - lr * mhat

    if THETA == _TH_MASTER:
        _st(w_ptr + offs, theta, mask, MASKED)
        _store_param(p_ptr, offs, theta, mask, CODE, MASKED)
    elif THETA == _TH_STOCHASTIC and CODE == 2:
        bits = rounding_bits(stream, first_index + offs)
        rounded = bf16_round_stochastic(theta, bits).to(tl.int16, bitcast=True)
        _st(p_ptr + offs, rounded, mask, MASKED)
    else:
        _store_param(p_ptr, offs, theta, mask, CODE, MASKED)
    _st(m_ptr + offs, m, mask, MASKED)
    _st(v_ptr + offs, v, mask, MASKED)
    return v, b_bits


@triton.jit
def _update_part(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, w_ptr, offs, mask, inv_bc2, inv_vbar,
                 mult, stream, first_index, done, partials, P, pid, lr, beta0, beta2,
                 one_minus_beta2, beta1_max, l2, lr_wd, dampening, exponent, mhat_scale,
                 CODE: tl.constexpr, ADAI_V1: tl.constexpr, HAS_L2: tl.constexpr,
                 MULT: tl.constexpr, B_MODE: tl.constexpr, THETA: tl.constexpr,
                 MASKED: tl.constexpr):
    """_update_chunk with b handled as B_MODE says (`done`: the tensor's flag, B_FLAGS);
    stores the chunk's sum of v in partials[pid] (one reduction after the branch, in
    v_sum's layout) and, under B_FLAGS, its max |b'| (0 when done) in partials[P + pid]."""
    if B_MODE == _B_FLAGS:
        if done:
            v, b_bits = _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, w_ptr, offs, mask,
                                      inv_bc2, inv_vbar, mult, stream, first_index, lr, beta0,
                                      beta2, one_minus_beta2, beta1_max, l2, lr_wd, dampening,
                                      exponent, mhat_scale, CODE, ADAI_V1, HAS_L2, MULT, True,
                                      THETA, MASKED)
        else:
            v, b_bits = _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, w_ptr, offs, mask,
                                      inv_bc2, inv_vbar, mult, stream, first_index, lr, beta0,
                                      beta2, one_minus_beta2, beta1_max, l2, lr_wd, dampening,
                                      exponent, mhat_scale, CODE, ADAI_V1, HAS_L2, MULT, False,
                                      THETA, MASKED)
        b_max = tl.max(b_bits, axis=0).to(tl.float32, bitcast=True)
        tl.store(partials + P + pid, b_max.to(tl.float64))
    else:
        v, _ = _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, w_ptr, offs, mask, inv_bc2,
                             inv_vbar, mult, stream, first_index, lr, beta0, beta2,
                             one_minus_beta2, beta1_max, l2, lr_wd, dampening, exponent,
                             mhat_scale, CODE, ADAI_V1, HAS_L2, MULT, B_MODE == _B_DONE,
                             THETA, MASKED)
    tl.store(partials + pid, _v_sum(v, mask, MASKED).to(tl.float64))


@triton.jit
def update_kernel(meta, stats, n_rows, partials, P, T, gs_ptr, fi_ptr, lr_ptr, seed_ptr,
                  lr, beta0, beta2, one_minus_beta2, beta1_max, l2, lr_wd, dampening,
                  exponent, mhat_scale,
                  CODE: tl.constexpr, ADAI_V1: tl.constexpr, HAS_L2: tl.constexpr,
                  P_ALIGNED: tl.constexpr, S_ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr, HAS_LR: tl.constexpr, CLIP: tl.constexpr,
                  SKIP_NONFINITE: tl.constexpr, B_MODE: tl.constexpr, THETA: tl.constexpr,
                  BLOCK: tl.constexpr, VEC: tl.constexpr):
    """One chunk of adai_math.h::update; partials[c] = the chunk's sum of the new v (and
    partials[P + c] its max |b'|, see _update_part). When the step is skipped, nothing is
    read or written. Over 50 lines: the per-tensor values every chunk derives alike."""
    pid = tl.program_id(0)
    inv_vbar, clip, skip = _globals(meta, stats, n_rows, fi_ptr, HAS_FOUND_INF, CLIP,
                                    SKIP_NONFINITE)
    if not skip:
        t, local = _chunk(meta, pid, T, U_NC, U_NCOL)
        ln_beta2 = tl.load(meta + 0).to(tl.float64, bitcast=True)
        # inv_bc2 per tensor: float64, then fp32 (adai_math.h)
        step_ptr = _col(meta, T, t, U_STEP, U_NC).to(tl.pointer_type(tl.float64))
        k = tl.load(step_ptr)
        inv_bc2 = (1.0 / (1.0 - tl.exp(k * ln_beta2))).to(tl.float32)
        if HAS_SCALE:
            if CLIP:
                mult = _inv_scale(gs_ptr) * clip
            else:
                mult = _inv_scale(gs_ptr)
        else:
            mult = clip
        if HAS_LR:  # adai_math.h::make_consts with the device's lr
            lr = tl.load(lr_ptr)
            wd = tl.load(meta + 2).to(tl.float64, bitcast=True)  # 0 unless decoupled
            lr_wd = (lr.to(tl.float64) * wd).to(tl.float32)
        if THETA == _TH_STOCHASTIC:  # seed and step as uint32 (adai_random.h)
            seed = tl.load(seed_ptr).to(tl.uint32)
            stream = rounding_stream(seed, k.to(tl.int64).to(tl.uint32))
        else:
            stream = tl.zeros([], dtype=tl.uint32)
        first_index = _col(meta, T, t, U_RIDX, U_NC)
        if B_MODE == _B_FLAGS:  # the tensor's flag, on the device
            b_max_ptr = _col(meta, T, t, U_BMAX, U_NC).to(tl.pointer_type(tl.float32))
            done = tl.load(b_max_ptr) <= B_DONE_MAX
        else:
            done = B_MODE == _B_DONE

        numel = _col(meta, T, t, U_NUMEL, U_NC)
        offs = _offsets(local, BLOCK, VEC)
        p_ptr = _param_ptr(meta, T, t, U_P, U_NC, CODE, P_ALIGNED)
        g_ptr = _param_ptr(meta, T, t, U_G, U_NC, CODE, P_ALIGNED)
        m_ptr = _ptr(meta, T, t, U_M, U_NC, tl.float32, S_ALIGNED)
        v_ptr = _ptr(meta, T, t, U_V, U_NC, tl.float32, S_ALIGNED)
        b_ptr = _ptr(meta, T, t, U_B, U_NC, tl.float32, S_ALIGNED)
        w_ptr = _ptr(meta, T, t, U_MASTER, U_NC, tl.float32, S_ALIGNED)
        if (local + 1) * BLOCK <= numel:  # a whole chunk: unmasked, vector accesses
            _update_part(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, w_ptr, offs, offs < numel,
                         inv_bc2, inv_vbar, mult, stream, first_index, done, partials, P,
                         pid, lr, beta0, beta2, one_minus_beta2, beta1_max, l2, lr_wd,
                         dampening, exponent, mhat_scale, CODE, ADAI_V1, HAS_L2,
                         HAS_SCALE or CLIP, B_MODE, THETA, False)
        else:
            _update_part(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, w_ptr, offs, offs < numel,
                         inv_bc2, inv_vbar, mult, stream, first_index, done, partials, P,
                         pid, lr, beta0, beta2, one_minus_beta2, beta1_max, l2, lr_wd,
                         dampening, exponent, mhat_scale, CODE, ADAI_V1, HAS_L2,
                         HAS_SCALE or CLIP, B_MODE, THETA, True)


@triton.jit
def _segment_max(meta, T, t, partials, NC: tl.constexpr, NCOL: tl.constexpr,
                 FB: tl.constexpr):
    """The NaN-propagating max of partials[cs[t] : cs[t+1]] (0 for none), as fp32."""
    cs = meta + (NC + NCOL * T)
    c0 = tl.load(cs + t)
    c1 = tl.load(cs + t + 1)
    acc = tl.zeros([FB], dtype=tl.float64)
    nan = tl.zeros([FB], dtype=tl.int32)
    for start in range(c0, c1, FB):
        idx = start + tl.arange(0, FB)
        x = tl.load(partials + idx, mask=idx < c1, other=0.0)
        acc = tl.where(x > acc, x, acc)
        nan = nan | (x != x).to(tl.int32)
    has_nan = tl.max(nan, axis=0)
    return tl.where(has_nan != 0, float("nan"), tl.max(acc, axis=0)).to(tl.float32)


@triton.jit
def update_finalize_kernel(meta, stats, n_rows, partials, P, T, fi_ptr,
                           HAS_FOUND_INF: tl.constexpr, CLIP: tl.constexpr,
                           SKIP_NONFINITE: tl.constexpr, B_MODE: tl.constexpr,
                           FB: tl.constexpr):
    """One program per tensor t: v_sums[t] = sum of its chunks' partials (float64, in order)
    and, under B_FLAGS for a tensor not done, beta1_prod_max[t] = the max of its chunks' max
    |b'|; on a skipped step instead steps[t] -= 1 (the increment of `stats` taken back)."""
    t = tl.program_id(0).to(tl.int64)
    _, _, skip = _globals(meta, stats, n_rows, fi_ptr, HAS_FOUND_INF, CLIP, SKIP_NONFINITE)
    if skip:
        step_ptr = _col(meta, T, t, U_STEP, U_NC).to(tl.pointer_type(tl.float64))
        tl.store(step_ptr, tl.load(step_ptr) - 1.0)
    else:
        total = _segment_sum(meta, T, t, partials, U_NC, U_NCOL, FB)
        tl.store(_col(meta, T, t, U_V_SUM, U_NC).to(tl.pointer_type(tl.float64)), total)
        if B_MODE == _B_FLAGS:  # the flag update_kernel read: this kernel runs after it
            b_max_ptr = _col(meta, T, t, U_BMAX, U_NC).to(tl.pointer_type(tl.float32))
            if not tl.load(b_max_ptr) <= B_DONE_MAX:
                tl.store(b_max_ptr, _segment_max(meta, T, t, partials + P, U_NC, U_NCOL, FB))


@triton.jit
def v_sum_partials_kernel(meta, partials, T, S_ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                         VEC: tl.constexpr):
    """v_sum: partials[c] = chunk c's sum of exp_avg_sq, exactly as update_kernel sums it
    (update's table layout, only the U_V, U_V_SUM and U_NUMEL columns used)."""
    pid = tl.program_id(0)
    t, local = _chunk(meta, pid, T, U_NC, U_NCOL)
    numel = _col(meta, T, t, U_NUMEL, U_NC)
    offs = _offsets(local, BLOCK, VEC)
    v_ptr = _ptr(meta, T, t, U_V, U_NC, tl.float32, S_ALIGNED)
    mask = offs < numel
    if (local + 1) * BLOCK <= numel:
        part = _v_sum(_ld(v_ptr + offs, mask, False, 0.0), mask, False)
    else:
        part = _v_sum(_ld(v_ptr + offs, mask, True, 0.0), mask, True)
    tl.store(partials + pid, part.to(tl.float64))


@triton.jit
def v_sum_finalize_kernel(meta, partials, T, FB: tl.constexpr):
    """One program per tensor t: v_sums[t] = sum of its chunks' partials (float64, in order)."""
    t = tl.program_id(0).to(tl.int64)
    total = _segment_sum(meta, T, t, partials, U_NC, U_NCOL, FB)
    tl.store(_col(meta, T, t, U_V_SUM, U_NC).to(tl.pointer_type(tl.float64)), total)
