"""backend="triton": the custom ops `adai_triton::stats / update / v_sum` against a float64
implementation of the two phases written here from the spec, run on CPU tensors under
Triton's interpreter (no GPU needed).

Each step compares the kernels' outputs with float64 results computed from the kernels' own
state before that step, so errors do not accumulate across steps and the tolerances stay
tight. bf16 stores round to nearest even (explicit integer rounding in the kernel), checked
bitwise in `test_bf16_store_rounds_to_nearest_even`.
"""
import os

import pytest
import torch  # only to see whether a GPU is here; triton is not imported yet

if torch.cuda.is_available():  # the compiled kernels are tested on the GPU instead
    pytest.skip("a GPU is present: tests/test_triton_gpu.py runs the compiled kernels",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import subprocess  # noqa: E402
import sys  # noqa: E402

pytest.importorskip("triton")

from adai_kernels.backends import triton as triton_backend  # noqa: E402
from adai_kernels.backends.triton import TRITON  # noqa: E402

_why = TRITON.unavailable(torch.device("cpu"))
if _why is not None:  # e.g. triton was imported without the interpreter by another module
    pytest.skip(f"triton backend unavailable on CPU: {_why}", allow_module_level=True)

ops = torch.ops.adai_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Per-step tolerances against float64. States are float32 in every case: a few fp32
# roundings, amplified by up to 1/eps in m / (1 - b) for theta. Parameters of bf16/fp16 are
# rounded to their dtype after the step by both sides: at most one ulp apart (relative
# 2^-7 for bf16, 2^-10 for fp16) where the float32 and float64 values straddle a midpoint.
PARAM_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}
STATE_TOL = {"exp_avg": dict(rtol=2e-5, atol=1e-6), "exp_avg_sq": dict(rtol=2e-6, atol=1e-9),
             "beta1_prod": dict(rtol=2e-5, atol=1e-7)}
SUM_TOL = dict(rtol=2e-6, atol=0.0)  # float32 chunk sums, float64 beyond

# sizes 0, 1, 7, 1023, 4099; 3-D; transposed; channels_last (all one multi-tensor launch)
SHAPES = [((0,), "c"), ((1,), "c"), ((7,), "c"), ((1023,), "c"), ((4099,), "c"),
          ((3, 5, 7), "c"), ((33, 17), "t"), ((2, 3, 5, 4), "cl")]


# ------------------------------------------------------------------------------ fixtures
def _like(shape, layout, dtype, fill):
    if layout == "t":
        x = fill(shape[::-1]).t()
    else:
        x = fill(shape)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


# Fill of the buffers' elements and slots that no tensor owns: the ops must not touch them.
UNOWNED = -7.0
STATE_LAYOUTS = ("aligned", "misaligned", "shuffled")


def _round_up(x, m):
    return (x + m - 1) // m * m


class Bucket:
    """Tensors as the optimizer hands them to the ops: params/grads in their own layout; the
    states in three flat float32 buffers, tensor i's at [offset_i, offset_i + numel_i) in the
    memory order of params[i], its step (float32) and v_sum (float64) in slot_i of two vectors
    (`segments`, csrc/op_schemas.h). `states` lays the buffers out:
      "aligned"     offsets padded to 16 elements, slot i = i (the optimizer's buckets);
      "misaligned"  every offset 1, 2 or 3 modulo 4 (no 16-byte aligned state pointer);
      "shuffled"    aligned spans in reverse order with gaps, slots reversed, two spare
                    slots.
    `exp_avg[i]`, ... are views of the buffers with the param's shape and strides, and
    `steps[i]`, `v_sums[i]` 0-dim views of the slots (for the checks, not the ops)."""

    STATES = ("exp_avg", "exp_avg_sq", "beta1_prod")

    def __init__(self, dtype, seed=0, shapes=SHAPES, fresh=False, states="aligned"):
        gen = torch.Generator().manual_seed(seed)

        def randn(s):
            return torch.randn(s, generator=gen)

        def rand(s):
            return torch.rand(s, generator=gen)

        self.shapes, self.dtype, self.gen = shapes, dtype, gen
        self.params = [_like(s, lay, dtype, randn) for s, lay in shapes]
        n = len(shapes)
        numels = [p.numel() for p in self.params]
        offsets, cursor = [0] * n, 0
        for i in (reversed(range(n)) if states == "shuffled" else range(n)):
            if states == "aligned":
                cursor = _round_up(cursor, 16)
            elif states == "misaligned":
                cursor = _round_up(cursor, 4) + 1 + i % 3
            else:
                cursor = _round_up(cursor + 5, 16)
            offsets[i] = cursor
            cursor += numels[i]
        length = _round_up(cursor, 16) + (3 if states == "shuffled" else 0)
        slots = [n + 1 - i for i in range(n)] if states == "shuffled" else list(range(n))
        n_slots = n + 2 if states == "shuffled" else n
        self.segments = torch.tensor(list(zip(offsets, numels, slots)),
                                     dtype=torch.int64).reshape(n, 3)
        self.slot_index = torch.tensor(slots, dtype=torch.int64)
        self.buf = {k: torch.full((length,), UNOWNED) for k in self.STATES}
        for k in self.STATES:
            setattr(self, k, [self.buf[k].as_strided(p.shape, p.stride(), o)
                              for p, o in zip(self.params, offsets)])
        self.step_buf = torch.full((n_slots,), UNOWNED, dtype=torch.float64)
        self.v_sum_buf = torch.full((n_slots,), UNOWNED, dtype=torch.float64)
        self.steps = [self.step_buf[s] for s in slots]
        self.v_sums = [self.v_sum_buf[s] for s in slots]
        for i, (s, lay) in enumerate(shapes):
            if fresh:  # a new bucket: zeros, ones, step 0
                m, v, b = torch.zeros(s), torch.zeros(s), torch.ones(s)
                k = 0.0
            else:  # mid-training, tensors at different steps (so bc2 differs between them)
                m = _like(s, lay, torch.float32, lambda s: 0.1 * randn(s))
                v = _like(s, lay, torch.float32, lambda s: 0.5 * rand(s))
                b = _like(s, lay, torch.float32, lambda s: 0.05 + 0.9 * rand(s))
                k = float(torch.randint(1, 6, (), generator=gen))
            for key, x in zip(self.STATES, (m, v, b)):
                getattr(self, key)[i].copy_(x)
            self.steps[i].fill_(k)
            self.v_sums[i].fill_(self.exp_avg_sq[i].double().sum())
        owned = torch.zeros(length, dtype=torch.bool)
        for o, k in zip(offsets, numels):
            owned[o:o + k] = True
        self.unowned = ~owned
        self.spare = torch.ones(n_slots, dtype=torch.bool)
        self.spare[self.slot_index] = False

    def grads(self, scale=1.0):
        return [_like(s, lay, self.dtype, lambda s: scale * torch.randn(s, generator=self.gen))
                for s, lay in self.shapes]

    def k(self):
        """The tensors' step counters, in tensor order."""
        return self.step_buf[self.slot_index]

    def v(self):
        """The tensors' v_sums, in tensor order."""
        return self.v_sum_buf[self.slot_index]

    def outside(self):
        """What no tensor owns: the buffers' gaps and the spare slots."""
        return {k: self.buf[k][self.unowned].clone() for k in self.STATES} | {
            "spare_steps": self.step_buf[self.spare].clone(),
            "spare_v_sums": self.v_sum_buf[self.spare].clone()}

    def snapshot(self):
        """Per-tensor copies (steps and v_sums in tensor order) and the whole buffers."""
        return {k: [t.clone(memory_format=torch.preserve_format) for t in getattr(self, k)]
                for k in ("params",) + self.STATES} | {
            "steps": self.k().clone(), "v_sums": self.v().clone(),
            "buffers": [self.buf[k].clone() for k in self.STATES],
            "slots": [self.step_buf.clone(), self.v_sum_buf.clone()]}


# ------------------------------------------------------------------ float64, from the spec
def f32(x):
    return triton_backend._f32(x)


def spec_row(snap, grads, beta2, l2, inv_scale=1.0):
    """The bucket's statistics row (docs/design.md), float64, from the definitions: k += 1,
    g = grad * inv_scale. Returns (k, row, mass): mass[j] is the sum of the absolute values of
    column j's terms (what its float32 chunk sums can be off by, relative)."""
    k = snap["steps"].double() + 1.0
    row = torch.zeros(7, dtype=torch.float64)
    mass = torch.zeros(7, dtype=torch.float64)
    for i, (p, g, v) in enumerate(zip(snap["params"], grads, snap["exp_avg_sq"])):
        bc2 = 1.0 - beta2 ** float(k[i])
        w = (1.0 - beta2) / bc2
        g = g.double() * inv_scale
        theta = p.double()
        a = beta2 * v.double().sum() / bc2
        terms = [None, (g + l2 * theta) ** 2, g * g, 2.0 * l2 * g * theta, (l2 * theta) ** 2]
        row[0] += a
        mass[0] += a.abs()
        for j in range(1, 5):
            row[j] += w * terms[j].sum()
            mass[j] += w * terms[j].abs().sum()
        row[5] += (g * g).sum()
        mass[5] += (g * g).sum()
        row[6] += g.numel()
    return k, row, mass


def other_s(row, c):
    """S of a statistics row for the clip coefficient c (adai_math.h::globals)."""
    A, B, Bgg, Bgt, Btt = (float(x) for x in row[:5])
    return A + B if c == 1.0 else A + c * c * Bgg + c * Bgt + Btt


def spec_update(snap, grads, other, hp, inv_scale=1.0, max_norm=0.0):
    """Phase 2 (steps 5 to 11 of the spec) with the decoupled decay, in float64, for this
    bucket and the statistics `other` (float64 row: the other buckets' sum). Gradients are
    unscaled, then clipped as torch.nn.utils.clip_grad_norm_ over every bucket, then the L2
    term is added. `snap["steps"]` already incremented by phase 1. vbar comes from the spec's
    definition (sum of the new v / bc2 over this bucket), not from the kernels' row."""
    beta0, beta2, eps, d, lr, wd = (hp[k] for k in ("beta0", "beta2", "eps", "d", "lr", "wd"))
    decoupled = hp["decoupled"]
    l2 = 0.0 if decoupled else wd
    gs = [g.double() * inv_scale for g in grads]
    gn2 = sum(float((g * g).sum()) for g in gs) + float(other[5])
    c = min(1.0, max_norm / (gn2 ** 0.5 + 1e-6)) if max_norm > 0 else 1.0
    gs = [g * c for g in gs]
    total, count = other_s(other, c), float(other[6])
    out = {k: [] for k in ("params", "exp_avg", "exp_avg_sq", "beta1_prod", "v_sums")}
    phase2 = []
    for i, (p, g, v) in enumerate(zip(snap["params"], gs, snap["exp_avg_sq"])):
        theta = p.double()
        ge = g + l2 * theta
        v = beta2 * v.double() + (1.0 - beta2) * ge * ge
        bc2 = 1.0 - beta2 ** float(snap["steps"][i])
        total += float(v.sum()) / bc2
        count += v.numel()
        phase2.append((theta, ge, v, bc2))
    vbar = total / count
    for (theta, ge, v, bc2), m, b in zip(phase2, snap["exp_avg"], snap["beta1_prod"]):
        ratio = (v / bc2) / vbar if vbar != 0 else torch.zeros_like(v)  # vhat / vbar := 0
        beta1 = (1.0 - beta0 * ratio ** (1.0 / (3.0 - 2.0 * d))).clamp(0.0, 1.0 - eps)
        beta3 = (1.0 - beta1) ** d
        b = b.double() * beta1
        m = beta1 * m.double() + beta3 * ge
        mhat = m / (1.0 - b) * beta0 ** (1.0 - d)
        if decoupled:
            theta = theta * (1.0 - lr * wd)
        theta = theta - lr * mhat
        for k, x in (("params", theta), ("exp_avg", m), ("exp_avg_sq", v),
                     ("beta1_prod", b), ("v_sums", v.sum())):
            out[k].append(x)
    return out, c


# ------------------------------------------------------------------------------- helpers
# Another bucket's row (as the optimizer's other buckets would have written it): B is
# Bgg + Bgt + Btt, as for real rows.
OTHER = torch.tensor([50.0, 2.6, 2.0, 0.1, 0.5, 0.3, 1000.0], dtype=torch.float64)


def run_stats(bk, grads, beta2, l2, others=1, grad_scale=None):
    """stats into row 0 of a (1 + others) x 7 matrix whose other rows are OTHER / others
    (other buckets' rows). Returns the matrix."""
    stats = torch.zeros(1 + others, 7, dtype=torch.float64)
    stats[1:] = OTHER / others if others else 0.0
    ops.stats(bk.params, grads, bk.segments, bk.step_buf, bk.v_sum_buf, grad_scale, beta2, l2,
              stats[0])
    return stats


def run_update(bk, grads, stats, hp, grad_scale=None, found_inf=None, lr_tensor=None,
               max_norm=0.0, skip_nonfinite=False):
    ops.update(bk.params, grads, bk.segments, bk.buf["exp_avg"], bk.buf["exp_avg_sq"],
               bk.buf["beta1_prod"], bk.v_sum_buf, bk.step_buf, stats, grad_scale, found_inf,
               lr_tensor,
               0.0 if lr_tensor is not None else hp["lr"], hp["beta0"], hp["beta2"],
               hp["eps"], hp["wd"], hp["decoupled"], hp["d"], max_norm, skip_nonfinite)


def hyper(decay, d, lr=0.05):
    wd = {"none": 0.0, "coupled": 0.1, "decoupled": 0.2}[decay]
    return dict(lr=lr, beta0=0.1, beta2=0.99, eps=1e-3, wd=wd, decoupled=decay == "decoupled",
                d=d)


def check_step(bk, grads, hp, others=1, scale=None, max_norm=0.0):
    """One step of both ops against the float64 spec, from the bucket's current state; what
    no tensor owns stays as it was. Returns the clip coefficient the spec found."""
    snap = bk.snapshot()
    outside = bk.outside()
    grads_before = [g.clone() for g in grads]
    l2 = 0.0 if hp["decoupled"] else hp["wd"]
    gs = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    inv_scale = 1.0 if scale is None else f32(1.0 / scale)

    stats = run_stats(bk, grads, hp["beta2"], l2, others, grad_scale=gs)
    k, row, mass = spec_row(snap, grads, hp["beta2"], l2, inv_scale)
    assert torch.equal(bk.k(), k.float())
    assert_bitwise(outside, bk.outside())
    assert torch.all((stats[0] - row).abs() <= 2e-6 * mass), (stats[0], row)
    assert stats[0, 6].item() == sum(p.numel() for p in bk.params)
    if l2 == 0.0:  # params not read: B is Bgg, and no decay terms
        assert stats[0, 1].item() == stats[0, 2].item()
        assert stats[0, 3].item() == 0.0 and stats[0, 4].item() == 0.0

    run_update(bk, grads, stats, hp, grad_scale=gs, max_norm=max_norm)
    snap["steps"] = k
    other = stats[1:].sum(0)
    ref, c = spec_update(snap, grads, other, hp, inv_scale, max_norm)
    for i in range(len(bk.params)):
        p = bk.params[i]
        assert p.dtype == bk.dtype and p.stride() == snap["params"][i].stride()
        torch.testing.assert_close(p.double(), ref["params"][i].to(bk.dtype).double(),
                                   **PARAM_TOL[bk.dtype], msg=lambda m: f"params[{i}]: {m}")
        for key, tol in STATE_TOL.items():
            torch.testing.assert_close(getattr(bk, key)[i].double(), ref[key][i], **tol,
                                       msg=lambda m: f"{key}[{i}]: {m}")
        torch.testing.assert_close(bk.v_sums[i].item(), float(ref["v_sums"][i]), **SUM_TOL)
        # v_sums is the sum of the stored exp_avg_sq
        torch.testing.assert_close(bk.v_sums[i].item(), float(bk.exp_avg_sq[i].double().sum()),
                                   **SUM_TOL)
        assert torch.equal(grads[i], grads_before[i])  # the caller's gradient is untouched
    assert torch.equal(bk.k(), k.float())  # not skipped: the increment stays
    assert_bitwise(outside, bk.outside())
    for key in ("params", "exp_avg", "exp_avg_sq", "beta1_prod"):
        assert all(torch.isfinite(t).all() for t in getattr(bk, key))
    return c


def bits(x):
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def assert_bitwise(a, b):
    for key in a:
        xs, ys = (a[key], b[key]) if isinstance(a[key], list) else ([a[key]], [b[key]])
        for x, y in zip(xs, ys):
            assert torch.equal(bits(x), bits(y)), key


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay", ("coupled", "decoupled"))
@pytest.mark.parametrize("d", (1.0, 0.5))
def test_matches_spec_over_steps(dtype, decay, d):
    bk = Bucket(dtype, seed=100 * DTYPES.index(dtype) + 10 * len(decay) + int(4 * d))
    hp = hyper(decay, d)
    for _ in range(2):
        check_step(bk, bk.grads(), hp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fresh_state_first_steps(dtype):
    bk = Bucket(dtype, seed=5, fresh=True)
    hp = hyper("none", 1.0)
    for _ in range(2):
        check_step(bk, bk.grads(), hp, others=0)
    assert torch.equal(bk.k(), torch.full((len(SHAPES),), 2.0))


def test_stats_row_columns():
    """The row's seven columns against float64 sums, written through a strided `out` (a
    column of a 7 x rows matrix) and read by update as a non-contiguous rows x 7 matrix."""
    bk = Bucket(torch.float32, seed=21)
    hp = hyper("coupled", 1.0)
    snap = bk.snapshot()
    grads = bk.grads()
    buf = torch.full((7, 3), -1.0, dtype=torch.float64)
    buf[:, 1:] = (OTHER / 2).unsqueeze(1)
    ops.stats(bk.params, grads, bk.segments, bk.step_buf, bk.v_sum_buf, None, hp["beta2"],
              hp["wd"], buf[:, 0])
    k, row, mass = spec_row(snap, grads, hp["beta2"], hp["wd"])
    assert torch.all((buf[:, 0] - row).abs() <= 2e-6 * mass), (buf[:, 0], row)
    assert torch.equal(buf[:, 1:], (OTHER / 2).unsqueeze(1).expand(7, 2))  # only its row
    # the expansion: B = Bgg + Bgt + Btt up to rounding
    torch.testing.assert_close(buf[1, 0], buf[2:5, 0].sum(), rtol=1e-6, atol=0)
    stats = buf.t()
    assert not stats.is_contiguous()
    run_update(bk, grads, stats, hp)
    snap["steps"] = k
    ref, _ = spec_update(snap, grads, OTHER, hp)
    for p, q in zip(bk.params, ref["params"]):
        torch.testing.assert_close(p.double(), q, **PARAM_TOL[torch.float32])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_grad_scale_is_unscaling(dtype):
    """Scaled gradients with grad_scale = 2^10 step bitwise like the unscaled ones (the
    unscaling multiplier is exact); a scale of 3 matches the spec with float32(1/3)."""
    hp = hyper("coupled", 1.0)
    a, b = Bucket(dtype, seed=7), Bucket(dtype, seed=7)
    for _ in range(2):
        grads = a.grads()
        b.grads()
        scaled = [g * 1024.0 for g in grads]
        gs = torch.tensor(1024.0)
        run_update(a, grads, run_stats(a, grads, hp["beta2"], hp["wd"]), hp)
        stats = run_stats(b, scaled, hp["beta2"], hp["wd"], grad_scale=gs)
        run_update(b, scaled, stats, hp, grad_scale=gs)
        assert_bitwise(a.snapshot(), b.snapshot())
    bk = Bucket(dtype, seed=8)
    check_step(bk, [g * 3.0 for g in bk.grads()], hp, scale=3.0)


@pytest.mark.parametrize("decay", ("none", "coupled"))
@pytest.mark.parametrize("active", (True, False), ids=("clipped", "not-clipped"))
def test_clipping(decay, active):
    """Fused clipping against the spec (clip_grad_norm_'s coefficient over every row, applied
    before the L2 term)."""
    bk = Bucket(torch.float32, seed=30 + len(decay))
    hp = hyper(decay, 1.0)
    for _ in range(2):
        grads = bk.grads()
        norm = (sum(float(g.double().pow(2).sum()) for g in grads) + float(OTHER[5])) ** 0.5
        max_norm = norm / 4 if active else norm * 2
        c = check_step(bk, grads, hp, max_norm=max_norm)
        assert (c < 0.3) if active else (c == 1.0)


def test_clipping_with_grad_scale_and_dampening():
    bk = Bucket(torch.float32, seed=40)
    hp = hyper("coupled", 0.5)
    grads = [g * 3.0 for g in bk.grads()]
    norm = sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5 / 3.0
    assert check_step(bk, grads, hp, scale=3.0, max_norm=norm / 2) < 0.6


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("why", ("found_inf", "nan-skip_nonfinite", "inf-clipping",
                                 "inf-scaled-skip_nonfinite"))
def test_skipped_step_writes_nothing(dtype, why):
    """A skipped step leaves params, states and v_sums bitwise as they were and takes the
    step increments back, decided on the device (the whole buffers and slot vectors
    compared)."""
    bk = Bucket(dtype, seed=50, states="shuffled")
    hp = hyper("coupled", 1.0)
    before = bk.snapshot()
    grads = bk.grads()
    kwargs, gs = {}, None
    if why == "found_inf":
        kwargs["found_inf"] = torch.tensor(1.0)
    elif why == "nan-skip_nonfinite":
        grads[3][5] = float("nan")
        kwargs["skip_nonfinite"] = True
    elif why == "inf-clipping":
        grads[5][1, 2] = float("inf")
        kwargs["max_norm"] = 1.0
    else:
        grads[4][0] = float("inf")
        gs = kwargs["grad_scale"] = torch.tensor(2.0**16)
        kwargs["skip_nonfinite"] = True
    stats = run_stats(bk, grads, hp["beta2"], hp["wd"], grad_scale=gs)
    assert torch.equal(bk.k(), before["steps"] + 1.0)
    if why != "found_inf":
        assert not torch.isfinite(stats[0, 5])
    run_update(bk, grads, stats, hp, **kwargs)
    assert_bitwise(before, bk.snapshot())


def test_not_skipped_without_the_flags():
    """found_inf = 0 skips nothing; a non-finite gradient without skip_nonfinite or clipping
    reaches its own tensor only (the others step with inv_vbar = 0)."""
    hp = hyper("none", 1.0)
    a, b = Bucket(torch.float32, seed=60), Bucket(torch.float32, seed=60)
    grads = a.grads()
    run_update(a, grads, run_stats(a, grads, hp["beta2"], 0.0), hp)
    run_update(b, grads, run_stats(b, grads, hp["beta2"], 0.0), hp,
               found_inf=torch.tensor(0.0))
    assert_bitwise(a.snapshot(), b.snapshot())
    before = b.snapshot()
    grads[3][0] = float("inf")
    run_update(b, grads, run_stats(b, grads, hp["beta2"], 0.0), hp)
    assert torch.equal(b.k(), before["steps"] + 1.0)
    assert not torch.isfinite(b.params[3]).all()
    for i, p in enumerate(b.params):
        if i != 3:
            assert torch.isfinite(p).all() and (p.numel() == 0 or not torch.equal(
                p, before["params"][i]))


@pytest.mark.parametrize("decay", ("coupled", "decoupled"))
def test_lr_tensor(decay):
    """lr read from a device tensor steps bitwise like the same (float32) lr as a float,
    decoupled decay included; changing the tensor in place changes the step."""
    hp = hyper(decay, 1.0)
    a, b = Bucket(torch.float32, seed=70), Bucket(torch.float32, seed=70)
    lr = torch.tensor(0.0)
    for step in range(2):
        lr.fill_(0.03 * (step + 1))
        hp["lr"] = lr.item()
        grads = a.grads()
        run_update(a, grads, run_stats(a, grads, hp["beta2"], 0.0), hp)
        run_update(b, grads, run_stats(b, grads, hp["beta2"], 0.0), hp, lr_tensor=lr)
        assert_bitwise(a.snapshot(), b.snapshot())


@pytest.mark.parametrize("d", (1.0, 0.5))
def test_all_zero_gradients(d):
    """vbar = 0: vhat / vbar := 0, beta1 = 1 - eps, nothing moves, no NaN."""
    bk = Bucket(torch.float32, seed=3, fresh=True)
    before = bk.snapshot()
    grads = [torch.zeros_like(p) for p in bk.params]
    hp = hyper("none", d)
    stats = run_stats(bk, grads, hp["beta2"], 0.0, others=0)
    assert torch.equal(stats[0, :6], torch.zeros(6, dtype=torch.float64))
    run_update(bk, grads, stats, hp)
    for i, p in enumerate(bk.params):
        assert torch.equal(p, before["params"][i])
        assert torch.equal(bk.exp_avg[i], torch.zeros_like(p))
        assert torch.equal(bk.exp_avg_sq[i], torch.zeros_like(p))
        assert torch.equal(bk.beta1_prod[i], torch.full_like(p, 1.0 - 1e-3))
    assert torch.equal(bk.v(), torch.zeros_like(bk.v()))
    assert torch.equal(bk.k(), torch.ones_like(bk.k()))


def _run_steps(dtype, d, steps=2):
    bk = Bucket(dtype, seed=11, shapes=[((4099,), "c"), ((33, 17), "t"), ((7,), "c")])
    hp = hyper("coupled", d)
    for _ in range(steps):
        grads = bk.grads()
        stats = run_stats(bk, grads, hp["beta2"], hp["wd"], others=2,
                          grad_scale=torch.tensor(3.0))
        run_update(bk, grads, stats, hp, grad_scale=torch.tensor(3.0), max_norm=1.0)
    return bk.snapshot()


@pytest.mark.parametrize("dtype,d", [(torch.float32, 0.5), (torch.bfloat16, 1.0)], ids=str)
def test_deterministic(dtype, d):
    assert_bitwise(_run_steps(dtype, d), _run_steps(dtype, d))


@pytest.mark.parametrize("states", STATE_LAYOUTS)
def test_v_sum_matches_update_bitwise(states):
    """v_sum accumulates exactly as update does (a restored checkpoint continues bitwise),
    writes only the slots of its rows, and sums any subset of the tensors."""
    bk = Bucket(torch.float32, seed=2, states=states)
    grads = bk.grads()
    hp = hyper("none", 1.0)
    stats = run_stats(bk, grads, hp["beta2"], 0.0)
    run_update(bk, grads, stats, hp)
    fresh = torch.full_like(bk.v_sum_buf, -1.0)
    ops.v_sum(bk.buf["exp_avg_sq"], bk.segments, fresh)
    assert torch.equal(fresh[bk.slot_index], bk.v())
    assert torch.equal(fresh[bk.spare], torch.full_like(fresh[bk.spare], -1.0))
    rows = [4, 1, 6]
    part = torch.full_like(bk.v_sum_buf, -1.0)
    ops.v_sum(bk.buf["exp_avg_sq"], bk.segments[rows], part)
    named = bk.slot_index[rows]
    assert torch.equal(part[named], bk.v_sum_buf[named])
    others = torch.ones_like(part, dtype=torch.bool)
    others[named] = False
    assert torch.equal(part[others], torch.full_like(part[others], -1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("states", STATE_LAYOUTS)
def test_state_layouts(dtype, states):
    """States at any offsets of the buffers (misaligned ones included), spans in any order,
    slots in any order with spare ones: both ops match the spec, and nothing that no tensor
    owns is written."""
    bk = Bucket(dtype, seed=80 + 10 * DTYPES.index(dtype) + STATE_LAYOUTS.index(states),
                states=states)
    hp = hyper("coupled", 0.5)
    for _ in range(2):
        check_step(bk, bk.grads(), hp)


def test_layouts_step_alike():
    """The same tensors step bitwise alike whatever the layout of their states."""
    snaps = []
    for states in STATE_LAYOUTS:
        bk = Bucket(torch.float32, seed=90, states=states)
        hp = hyper("decoupled", 1.0)
        for _ in range(2):
            grads = bk.grads()
            run_update(bk, grads, run_stats(bk, grads, hp["beta2"], 0.0), hp)
        snaps.append({k: v for k, v in bk.snapshot().items() if k not in ("buffers", "slots")})
    assert_bitwise(snaps[0], snaps[1])
    assert_bitwise(snaps[0], snaps[2])


def _triton_type(x) -> str:
    """The type Triton's JIT gives a launch argument (its signature string)."""
    if isinstance(x, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64",
                      torch.int64: "i64"}[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2**31 <= x < 2**31 else "i64"
    return "fp32" if isinstance(x, float) else type(x).__name__


def _record_launches(monkeypatch, names) -> list:
    """Record (kernel name, args, kwargs) of every launch of the kernels `names`; the
    launches still run."""
    K = triton_backend._state["kernels"]
    seen = []

    class Recording:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.name, args, kwargs))
                return self.fn[grid](*args, **kwargs)
            return launch

    for name in names:
        monkeypatch.setattr(K, name, Recording(name, getattr(K, name)))
    return seen


def test_launches_follow_launch_specs(monkeypatch):
    """Every kernel is launched with the argument types and constexprs of launch_specs, the
    table the kernels are compiled from ahead of time (tests/test_compiled_kernels.py)."""
    specs = triton_backend._state["specs"]
    seen = _record_launches(monkeypatch, specs)
    bk = Bucket(torch.bfloat16, seed=3)
    for extras in (dict(), dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0),
                               lr_tensor=torch.tensor(0.1), max_norm=1.0,
                               skip_nonfinite=True)):
        grads = bk.grads()
        stats = run_stats(bk, grads, 0.99, 0.1, grad_scale=extras.get("grad_scale"))
        run_update(bk, grads, stats, hyper("coupled", 0.5), **extras)
    ops.v_sum(bk.buf["exp_avg_sq"], bk.segments, bk.v_sum_buf)
    assert {name for name, _, _ in seen} == set(specs)
    for name, args, kwargs in seen:
        spec = specs[name]
        assert [_triton_type(a) for a in args] == list(spec.signature.values()), name
        chosen = {k: v for k, v in kwargs.items() if k not in spec.fixed and k != "num_warps"}
        assert chosen.keys() == spec.choices.keys(), name
        assert all(v in spec.choices[k] for k, v in chosen.items()), (name, chosen)


def _launch_flags(seen) -> list:
    """The constexpr alignment flags of recorded launches."""
    return [(name, {k: v for k, v in kwargs.items() if k.endswith("_ALIGNED")})
            for name, _, kwargs in seen]


@pytest.mark.parametrize("states", STATE_LAYOUTS)
def test_alignment_hints_follow_the_pointers(monkeypatch, states):
    """Vector hints only where every state pointer (buffer + 4 * offset) of a non-empty
    tensor is 16-byte aligned: the optimizer's padded layout gets them, misaligned offsets
    do not."""
    seen = _record_launches(monkeypatch,
                            ("stats_partials_kernel", "update_kernel", "v_sum_partials_kernel"))
    bk = Bucket(torch.float32, seed=1, states=states)
    assert all(t.data_ptr() % 16 == 0 for t in bk.params)
    grads = bk.grads()
    run_update(bk, grads, run_stats(bk, grads, 0.99, 0.1), hyper("coupled", 1.0))
    ops.v_sum(bk.buf["exp_avg_sq"], bk.segments, bk.v_sum_buf)
    aligned = states != "misaligned"
    assert _launch_flags(seen) == [
        ("stats_partials_kernel", dict(P_ALIGNED=True)),
        ("update_kernel", dict(P_ALIGNED=aligned, S_ALIGNED=aligned)),
        ("v_sum_partials_kernel", dict(S_ALIGNED=aligned))]


def test_alignment_of_state_pointers():
    """_states_aligned decides from base + 4 * offset, for non-empty tensors only."""
    sa = triton_backend._states_aligned
    assert sa((64, 128), [0, 4, 16], [3, 1, 9])
    assert not sa((64, 128), [0, 5], [3, 1])
    assert sa((64, 128), [0, 5], [3, 0])  # an empty tensor's pointer is never used
    assert not sa((64, 132), [0, 4], [3, 1])  # one base off
    assert sa((52, 4), [3, 7, 11], [1, 1, 1])  # bases off, offsets put every pointer right
    assert not sa((52, 4), [3, 6], [1, 1])
    assert sa((4,), [1], [0])
    al = triton_backend._aligned
    assert al([16, 32], [1, 1]) and not al([16, 36], [1, 1]) and al([16, 36], [1, 0])


def test_bf16_store_rounds_to_nearest_even():
    """theta is computed in fp32 and stored rounded to nearest even (not truncated): the
    kernel's bf16 result equals torch's RNE cast of the same fp32 arithmetic, bitwise.
    (Exact only without FMA contraction, as under the interpreter.)"""
    bk = Bucket(torch.bfloat16, seed=9, shapes=[((4099,), "c"), ((33, 17), "t")])
    hp = hyper("decoupled", 1.0, lr=0.01)
    theta32 = [p.float() for p in bk.params]
    grads = bk.grads()
    stats = run_stats(bk, grads, hp["beta2"], 0.0)
    run_update(bk, grads, stats, hp)
    lr_wd, lr = f32(hp["lr"] * hp["wd"]), f32(hp["lr"])
    differs = 0
    for p, t32, m, b in zip(bk.params, theta32, bk.exp_avg, bk.beta1_prod):
        new32 = (t32 - t32 * lr_wd) - (m / (1.0 - b)) * lr  # adai_math.h's order
        assert torch.equal(p.view(torch.int16), new32.to(torch.bfloat16).view(torch.int16))
        truncated = (new32.view(torch.int32) >> 16).to(torch.int16)
        differs += int((truncated != p.view(torch.int16)).sum())
    assert differs > 0  # the rounding mattered somewhere


def test_launch_count_does_not_grow_with_tensors(monkeypatch):
    K = triton_backend._state["kernels"]
    launches = []

    class Counting:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.fn[grid]

    for name in ("stats_partials_kernel", "stats_finalize_kernel", "row_sum_kernel",
                 "update_kernel", "update_finalize_kernel"):
        monkeypatch.setattr(K, name, Counting(name, getattr(K, name)))

    def count(n_tensors):
        launches.clear()
        bk = Bucket(torch.float32, seed=1, shapes=[((5,), "c")] * n_tensors)
        grads = bk.grads()
        gs = torch.tensor(2.0)
        stats = run_stats(bk, grads, 0.99, 0.1, grad_scale=gs)
        run_update(bk, grads, stats, hyper("coupled", 1.0), grad_scale=gs,
                   found_inf=torch.tensor(0.0), lr_tensor=torch.tensor(0.1), max_norm=1.0,
                   skip_nonfinite=True)
        return list(launches)

    assert count(2) == count(12) and len(count(2)) == 5


@pytest.mark.parametrize("slots", (0, 3))
def test_empty_lists(slots):
    """No tensors: empty buffers and slot vectors, or a bucket's whose tensors all sit out
    the step (nothing is written but the zero row)."""
    segs = torch.zeros(0, 3, dtype=torch.int64)
    steps = torch.full((slots,), 2.0, dtype=torch.float64)
    v_sums = torch.full((slots,), 3.0, dtype=torch.float64)
    states = [torch.full((16 * slots,), 4.0) for _ in range(3)]
    out = torch.full((7,), 7.0, dtype=torch.float64)
    ops.stats([], [], segs, steps, v_sums, None, 0.99, 0.0, out)
    assert torch.equal(out, torch.zeros(7, dtype=torch.float64))
    ops.update([], [], segs, *states, v_sums, steps, torch.zeros(1, 7, dtype=torch.float64),
               None, None, None, 1.0, 0.1, 0.99, 1e-3, 0.0, False, 1.0, 0.0, False)
    ops.v_sum(states[1], segs, v_sums)
    assert torch.equal(steps, torch.full((slots,), 2.0, dtype=torch.float64))
    assert torch.equal(v_sums, torch.full((slots,), 3.0, dtype=torch.float64))
    assert all(torch.equal(s, torch.full((16 * slots,), 4.0)) for s in states)


def test_empty_tensor_at_the_end_of_the_buffers():
    """An empty tensor's span may start at the buffers' end (or anywhere inside them)."""
    shapes = [((5,), "c"), ((0,), "c"), ((0, 3), "c")]
    bk = Bucket(torch.float32, seed=6, shapes=shapes)
    n = bk.buf["exp_avg"].numel()
    bk.segments[1, 0] = n
    bk.segments[2, 0] = 3  # inside the first span: empty spans overlap nothing
    check_step(bk, bk.grads(), hyper("coupled", 1.0), others=0)
    ops.v_sum(bk.buf["exp_avg_sq"], bk.segments, bk.v_sum_buf)
    assert bk.v()[1].item() == 0.0 and bk.v()[2].item() == 0.0


def test_bad_shapes_are_rejected():
    bk = Bucket(torch.float32, seed=4, shapes=[((7,), "c")])
    grads = bk.grads()
    with pytest.raises(RuntimeError, match="`out` must be a 1-D float64"):
        ops.stats(bk.params, grads, bk.segments, bk.step_buf, bk.v_sum_buf, None, 0.99, 0.0,
                  torch.zeros((), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="`stats` must be a 2-D float64"):
        run_update(bk, grads, torch.zeros(7, dtype=torch.float64), hyper("none", 1.0))
    with pytest.raises(RuntimeError, match="grad_scale` must be a float32 tensor of one element"):
        ops.stats(bk.params, grads, bk.segments, bk.step_buf, bk.v_sum_buf,
                  torch.tensor(2.0, dtype=torch.float64), 0.99, 0.0,
                  torch.zeros(7, dtype=torch.float64))


def _call(bk, op, **changes):
    """Call `op` ("stats", "update" or "v_sum") on the bucket with some arguments replaced
    (`segments` may be given as a list of rows)."""
    a = dict(params=bk.params, grads=[torch.ones_like(p) for p in bk.params],
             segments=bk.segments, steps=bk.step_buf, v_sums=bk.v_sum_buf, **bk.buf)
    a.update(changes)
    if isinstance(a["segments"], list):
        a["segments"] = torch.tensor(a["segments"], dtype=torch.int64)
    if op == "stats":
        ops.stats(a["params"], a["grads"], a["segments"], a["steps"], a["v_sums"], None, 0.99,
                  0.1, torch.zeros(7, dtype=torch.float64))
    elif op == "update":
        ops.update(a["params"], a["grads"], a["segments"], a["exp_avg"], a["exp_avg_sq"],
                   a["beta1_prod"], a["v_sums"], a["steps"], torch.zeros(1, 7,
                                                                        dtype=torch.float64),
                   None, None, None, 0.1, 0.1, 0.99, 1e-3, 0.1, False, 1.0, 0.0, False)
    else:
        ops.v_sum(a["exp_avg_sq"], a["segments"], a["v_sums"])


# Three tensors of 7, 5 and 3 elements at offsets 0, 16, 32 of buffers of 48, slots 0, 1, 2.
_ROWS = [[0, 7, 0], [16, 5, 1], [32, 3, 2]]
_SHAPES3 = [((7,), "c"), ((5,), "c"), ((3,), "c")]


def _rows(**at):
    """_ROWS with entries replaced: at = {"r1c2": value} sets row 1, column 2."""
    rows = [list(r) for r in _ROWS]
    for key, value in at.items():
        rows[int(key[1])][int(key[3])] = value
    return rows


F64 = torch.float64
BAD_SEGMENTS = {
    # name: (ops it applies to, segments or a tensor builder, message)
    "int32": ("stats update v_sum", lambda: torch.tensor(_ROWS, dtype=torch.int32),
              r"`segments` must be an int64 CPU tensor of shape \(n, 3\)"),
    "two-columns": ("stats update v_sum", lambda: torch.tensor(_ROWS)[:, :2],
                    r"`segments` must be an int64 CPU tensor of shape \(n, 3\)"),
    "1-D": ("stats update v_sum", lambda: torch.tensor(_ROWS).reshape(-1),
            r"`segments` must be an int64 CPU tensor of shape \(n, 3\)"),
    "meta": ("stats update v_sum", lambda: torch.tensor(_ROWS).to("meta"),
             r"`segments` must be an int64 CPU tensor .* on meta"),
    "rows": ("stats update", lambda: torch.tensor(_ROWS[:2]),
             "`segments` has 2 rows but `params` has 3 tensors"),
    "numel": ("stats update", _rows(r1c1=4), r"segments\[1\] has numel 4 but params\[1\] "
                                               r"has 5 elements"),
    "negative-offset": ("stats update v_sum", _rows(r0c0=-1),
                        r"segments\[0\] = \(offset -1, numel 7\) has a negative entry"),
    "past-the-end": ("update v_sum", _rows(r2c0=46),
                     r"segments\[2\] = \(offset 46, numel 3\) is outside the state "
                     r"buffers of 48 elements"),
    "far-past-the-end": ("update v_sum", _rows(r2c0=2**62),
                         r"segments\[2\] = \(offset 4611686018427387904, numel 3\) is "
                         r"outside"),
    "slot-range": ("stats update v_sum", _rows(r1c2=3),
                   r"segments\[1\] has slot 3 but (steps and )?v_sums have 3 slots"),
    "negative-slot": ("stats update v_sum", _rows(r0c2=-1), r"segments\[0\] has slot -1"),
    "slot-twice": ("stats update v_sum", _rows(r2c2=0),
                   r"segments\[2\] uses slot 0, which an earlier tensor of this call uses"),
    "overlap": ("update v_sum", _rows(r1c0=5),
                r"segments\[0\] and segments\[1\] overlap in the state buffers"),
    "overlap-unordered": ("update v_sum", _rows(r0c0=33, r2c0=20),
                          r"segments\[1\] and segments\[2\] overlap"),
}


@pytest.mark.parametrize("case", sorted(BAD_SEGMENTS))
def test_bad_segments_are_rejected(case):
    """Every row of `segments` is checked before anything is written."""
    names, segments, message = BAD_SEGMENTS[case]
    for op in names.split():
        bk = Bucket(torch.float32, seed=4, shapes=_SHAPES3)
        assert bk.segments.tolist() == _ROWS and bk.buf["exp_avg"].numel() == 48
        before = bk.snapshot()
        with pytest.raises(RuntimeError, match=message):
            _call(bk, op, segments=segments() if callable(segments) else segments)
        assert_bitwise(before, bk.snapshot())


def test_valid_unusual_segments_are_accepted():
    """Spans in any order, touching spans, slots in any order: all valid."""
    bk = Bucket(torch.float32, seed=4, shapes=_SHAPES3)
    for rows in ([[41, 7, 2], [36, 5, 0], [0, 3, 1]], [[0, 7, 1], [7, 5, 2], [12, 3, 0]]):
        for op in ("stats", "update", "v_sum"):
            _call(bk, op, segments=rows)


BAD_BUFFERS = {
    # name: (ops, replaced arguments (a function of the bucket), message)
    "exp_avg-float64": ("update", lambda bk: dict(exp_avg=bk.buf["exp_avg"].double()),
                        "`exp_avg` must be a contiguous 1-D torch.float32 tensor, got "
                        "torch.float64"),
    "exp_avg_sq-2-D": ("update v_sum",
                       lambda bk: dict(exp_avg_sq=bk.buf["exp_avg_sq"].view(6, 8)),
                       r"`exp_avg_sq` must be a contiguous 1-D torch.float32 tensor, got "
                       r"torch.float32 with shape \(6, 8\)"),
    "beta1_prod-strided": ("update", lambda bk: dict(
        beta1_prod=torch.zeros(96)[::2]), "`beta1_prod` must be a contiguous 1-D"),
    "lengths": ("update", lambda bk: dict(beta1_prod=torch.zeros(64)),
                "`beta1_prod` has 64 elements but `exp_avg` has 48; the state buffers must "
                "have one length"),
    "steps-float32": ("stats update", lambda bk: dict(steps=bk.step_buf.float()),
                      "`steps` must be a contiguous 1-D torch.float64 tensor"),
    "steps-0-dim": ("stats update", lambda bk: dict(steps=bk.steps[0]),
                    "`steps` must be a contiguous 1-D torch.float64 tensor"),
    "v_sums-float32": ("stats update v_sum", lambda bk: dict(v_sums=bk.v_sum_buf.float()),
                       "`v_sums` must be a contiguous 1-D torch.float64 tensor"),
    "slot-counts": ("stats update", lambda bk: dict(v_sums=torch.zeros(4, dtype=F64)),
                    "`steps` has 3 slots but `v_sums` has 4"),
    "state-device": ("update", lambda bk: dict(exp_avg_sq=torch.zeros(48, device="meta")),
                     "`exp_avg_sq` is on meta but the op runs on cpu"),
    "v_sums-device": ("stats update v_sum",
                      lambda bk: dict(v_sums=torch.zeros(3, dtype=F64, device="meta")),
                      "`v_sums` is on meta but the op runs on cpu"),
    "params-dtype": ("stats update", lambda bk: dict(
        params=[bk.params[0], bk.params[1].double(), bk.params[2]]),
        r"params\[1\] has dtype torch.float64 but params\[0\] has torch.float32"),
    "grads-shape": ("stats update", lambda bk: dict(
        grads=[torch.zeros(7), torch.zeros(5, 1), torch.zeros(3)]),
        r"grads\[1\] \(sizes \(5, 1\), strides \(1, 1\)\) must have the sizes and strides "
        r"of params\[1\]"),
    "params-int": ("stats update", lambda bk: dict(
        params=[p.int() for p in bk.params], grads=[p.int() for p in bk.params]),
        "params must be float32, bfloat16 or float16"),
    "params-overlapping": ("stats update", lambda bk: dict(
        params=[bk.params[0], torch.zeros(1).expand(5), bk.params[2]],
        grads=[torch.zeros(7), torch.zeros(1).expand(5), torch.zeros(3)]),
        r"params\[1\] must be non-overlapping and dense"),
    "list-lengths": ("stats update", lambda bk: dict(grads=[torch.zeros(7)]),
                     "`grads` has 1 tensors but `params` has 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUFFERS))
def test_bad_buffers_are_rejected(case):
    """The flat buffers, slot vectors and the params / grads lists, checked before anything
    is written."""
    names, changes, message = BAD_BUFFERS[case]
    for op in names.split():
        bk = Bucket(torch.float32, seed=4, shapes=_SHAPES3)
        before = bk.snapshot()
        with pytest.raises(RuntimeError, match=message):
            _call(bk, op, **changes(bk))
        assert_bitwise(before, bk.snapshot())


def test_opcheck():
    bk = Bucket(torch.float32, seed=4, shapes=[((7,), "c"), ((3, 5), "t")])
    grads = bk.grads()
    stats = torch.zeros(2, 7, dtype=torch.float64)
    stats[1] = OTHER
    gs = torch.tensor(2.0)
    states = (bk.buf["exp_avg"], bk.buf["exp_avg_sq"], bk.buf["beta1_prod"])
    for scale in (None, gs):
        torch.library.opcheck(ops.stats.default,
                              (bk.params, grads, bk.segments, bk.step_buf, bk.v_sum_buf, scale,
                               0.99, 0.1, stats[0]))
    torch.library.opcheck(ops.update.default,
                          (bk.params, grads, bk.segments, *states, bk.v_sum_buf, bk.step_buf,
                           stats, None, None, None, 0.1, 0.1, 0.99, 1e-3, 0.1, True, 0.5, 0.0,
                           False))
    torch.library.opcheck(ops.update.default,
                          (bk.params, grads, bk.segments, *states, bk.v_sum_buf, bk.step_buf,
                           stats, gs, torch.tensor(0.0), torch.tensor(0.05), 0.0, 0.1, 0.99,
                           1e-3, 0.1, False, 1.0, 1.0, True))
    torch.library.opcheck(ops.v_sum.default, (bk.buf["exp_avg_sq"], bk.segments, bk.v_sum_buf))


def _schemas(text):
    """op name -> schema (alias sets reduced to `!`), from m.def("...") calls or from
    FunctionSchema strings."""
    import re

    out = {}
    for schema in text:
        schema = re.sub(r"\(\w+!\)", "(!)", re.sub(r"\s+", " ", schema)).strip()
        name = re.match(r"(?:\w+::)?(\w+)", schema).group(1)
        out[name] = re.sub(r"^(?:\w+::)?", "", schema)
    return out


def test_schemas_are_the_native_ones():
    """adai_triton::* declare exactly csrc/op_schemas.h's schemas (no build needed)."""
    import pathlib
    import re

    src = (pathlib.Path(__file__).parents[1] / "csrc" / "op_schemas.h").read_text()
    decls = re.findall(r"constexpr const char\* k(?:Stats|Update|SumV) =(.*?);", src, re.S)
    native = _schemas("".join(re.findall(r'"([^"]*)"', d)) for d in decls)
    ours = _schemas(str(getattr(ops, name).default._schema) for name in native)
    assert set(native) == {"stats", "update", "v_sum"}
    assert ours == native


def test_unavailable_reasons():
    assert "not meta" in TRITON.unavailable(torch.device("meta"))
    if not torch.cuda.is_available():
        assert TRITON.unavailable(torch.device("cuda")) is not None


def test_import_is_lazy_and_cpu_needs_the_interpreter():
    """`import adai_kernels` imports no triton; without TRITON_INTERPRET the backend says
    why it cannot step CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, torch, adai_kernels\n"
            "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
            "from adai_kernels.backends.triton import TRITON\n"
            "assert 'triton' not in sys.modules\n"
            "print(TRITON.unavailable(torch.device('cpu')))\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Triton needs a GPU; CPU tensors run only under TRITON_INTERPRET=1" in res.stdout


def test_optimizer_matches_reference_backend():
    try:
        from adai_kernels import Adai
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"optimizer not importable: {e}")
    gen = torch.Generator().manual_seed(0)

    def model():
        return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in
                [(7,), (33, 17), (1025,)]]

    a = model()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = Adai([{"params": a[:2]}, {"params": a[2:], "dampening": 0.5}], lr=0.05,
                 weight_decay=0.01, backend="triton")
    opt_b = Adai([{"params": b[:2]}, {"params": b[2:], "dampening": 0.5}], lr=0.05,
                 weight_decay=0.01, backend="reference")
    assert opt_a.backend == "triton"
    for _ in range(3):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
