"""backend="triton": the custom ops `adai_triton::stats / update / sum_v` against a float64
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


class Bucket:
    """Tensors as the optimizer hands them to the ops: params/grads in their own layout,
    float32 states with the same strides, 0-dim step (float32) and v_sum (float64) views."""

    def __init__(self, dtype, seed=0, shapes=SHAPES, fresh=False):
        gen = torch.Generator().manual_seed(seed)

        def randn(s):
            return torch.randn(s, generator=gen)

        def rand(s):
            return torch.rand(s, generator=gen)

        self.shapes, self.dtype, self.gen = shapes, dtype, gen
        self.params = [_like(s, lay, dtype, randn) for s, lay in shapes]
        n = len(shapes)
        if fresh:  # a new bucket: zeros, ones, step 0
            self.exp_avg = [_like(s, lay, torch.float32, torch.zeros) for s, lay in shapes]
            self.exp_avg_sq = [_like(s, lay, torch.float32, torch.zeros) for s, lay in shapes]
            self.beta1_prod = [_like(s, lay, torch.float32, torch.ones) for s, lay in shapes]
            self.step_buf = torch.zeros(n)
        else:  # mid-training, tensors at different steps (so bc2 differs between them)
            self.exp_avg = [_like(s, lay, torch.float32, lambda s: 0.1 * randn(s))
                            for s, lay in shapes]
            self.exp_avg_sq = [_like(s, lay, torch.float32, lambda s: 0.5 * rand(s))
                               for s, lay in shapes]
            self.beta1_prod = [_like(s, lay, torch.float32, lambda s: 0.05 + 0.9 * rand(s))
                               for s, lay in shapes]
            self.step_buf = torch.randint(1, 6, (n,), generator=gen).float()
        self.vsum_buf = torch.tensor([v.double().sum() for v in self.exp_avg_sq],
                                     dtype=torch.float64)
        self.steps = list(self.step_buf.unbind())
        self.v_sums = list(self.vsum_buf.unbind())

    def grads(self, scale=1.0):
        return [_like(s, lay, self.dtype, lambda s: scale * torch.randn(s, generator=self.gen))
                for s, lay in self.shapes]

    def snapshot(self):
        return {k: [t.clone(memory_format=torch.preserve_format) for t in getattr(self, k)]
                for k in ("params", "exp_avg", "exp_avg_sq", "beta1_prod")} | {
            "steps": self.step_buf.clone(), "v_sums": self.vsum_buf.clone()}


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
    ops.stats(bk.params, grads, bk.steps, bk.v_sums, grad_scale, beta2, l2, stats[0])
    return stats


def run_update(bk, grads, stats, hp, grad_scale=None, found_inf=None, lr_tensor=None,
               max_norm=0.0, skip_nonfinite=False):
    ops.update(bk.params, grads, bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod, bk.v_sums,
               bk.steps, stats, grad_scale, found_inf, lr_tensor,
               0.0 if lr_tensor is not None else hp["lr"], hp["beta0"], hp["beta2"],
               hp["eps"], hp["wd"], hp["decoupled"], hp["d"], max_norm, skip_nonfinite)


def hyper(decay, d, lr=0.05):
    wd = {"none": 0.0, "coupled": 0.1, "decoupled": 0.2}[decay]
    return dict(lr=lr, beta0=0.1, beta2=0.99, eps=1e-3, wd=wd, decoupled=decay == "decoupled",
                d=d)


def check_step(bk, grads, hp, others=1, scale=None, max_norm=0.0):
    """One step of both ops against the float64 spec, from the bucket's current state.
    Returns the clip coefficient the spec found."""
    snap = bk.snapshot()
    grads_before = [g.clone() for g in grads]
    l2 = 0.0 if hp["decoupled"] else hp["wd"]
    gs = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    inv_scale = 1.0 if scale is None else f32(1.0 / scale)

    stats = run_stats(bk, grads, hp["beta2"], l2, others, grad_scale=gs)
    k, row, mass = spec_row(snap, grads, hp["beta2"], l2, inv_scale)
    assert torch.equal(bk.step_buf, k.float())
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
    assert torch.equal(bk.step_buf, k.float())  # not skipped: the increment stays
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
    assert torch.equal(bk.step_buf, torch.full((len(SHAPES),), 2.0))


def test_stats_row_columns():
    """The row's seven columns against float64 sums, written through a strided `out` (a
    column of a 7 x rows matrix) and read by update as a non-contiguous rows x 7 matrix."""
    bk = Bucket(torch.float32, seed=21)
    hp = hyper("coupled", 1.0)
    snap = bk.snapshot()
    grads = bk.grads()
    buf = torch.full((7, 3), -1.0, dtype=torch.float64)
    buf[:, 1:] = (OTHER / 2).unsqueeze(1)
    ops.stats(bk.params, grads, bk.steps, bk.v_sums, None, hp["beta2"], hp["wd"], buf[:, 0])
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
    step increments back, decided on the device."""
    bk = Bucket(dtype, seed=50)
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
    assert torch.equal(bk.step_buf, before["steps"] + 1.0)
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
    assert torch.equal(b.step_buf, before["steps"] + 1.0)
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
    assert torch.equal(bk.vsum_buf, torch.zeros_like(bk.vsum_buf))
    assert torch.equal(bk.step_buf, torch.ones_like(bk.step_buf))


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


def test_sum_v_matches_update_bitwise():
    """sum_v accumulates exactly as update does (a restored checkpoint continues bitwise)."""
    bk = Bucket(torch.float32, seed=2)
    grads = bk.grads()
    hp = hyper("none", 1.0)
    stats = run_stats(bk, grads, hp["beta2"], 0.0)
    run_update(bk, grads, stats, hp)
    fresh = torch.full_like(bk.vsum_buf, -1.0)
    ops.sum_v(bk.exp_avg_sq, list(fresh.unbind()))
    assert torch.equal(fresh, bk.vsum_buf)


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


def test_empty_lists():
    out = torch.full((7,), 7.0, dtype=torch.float64)
    ops.stats([], [], [], [], None, 0.99, 0.0, out)
    assert torch.equal(out, torch.zeros(7, dtype=torch.float64))
    ops.update([], [], [], [], [], [], [], torch.zeros(1, 7, dtype=torch.float64), None, None,
               None, 1.0, 0.1, 0.99, 1e-3, 0.0, False, 1.0, 0.0, False)
    ops.sum_v([], [])


def test_bad_shapes_are_rejected():
    bk = Bucket(torch.float32, seed=4, shapes=[((7,), "c")])
    grads = bk.grads()
    with pytest.raises(RuntimeError, match="out must be a 1-D float64"):
        ops.stats(bk.params, grads, bk.steps, bk.v_sums, None, 0.99, 0.0,
                  torch.zeros((), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="stats must be a 2-D float64"):
        run_update(bk, grads, torch.zeros(7, dtype=torch.float64), hyper("none", 1.0))
    with pytest.raises(RuntimeError, match="grad_scale must be a 0-dim float32"):
        ops.stats(bk.params, grads, bk.steps, bk.v_sums, torch.tensor(2.0, dtype=torch.float64),
                  0.99, 0.0, torch.zeros(7, dtype=torch.float64))


def test_opcheck():
    bk = Bucket(torch.float32, seed=4, shapes=[((7,), "c"), ((3, 5), "t")])
    grads = bk.grads()
    stats = torch.zeros(2, 7, dtype=torch.float64)
    stats[1] = OTHER
    gs = torch.tensor(2.0)
    for scale in (None, gs):
        torch.library.opcheck(ops.stats.default,
                              (bk.params, grads, bk.steps, bk.v_sums, scale, 0.99, 0.1,
                               stats[0]))
    torch.library.opcheck(ops.update.default,
                          (bk.params, grads, bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod,
                           bk.v_sums, bk.steps, stats, None, None, None, 0.1, 0.1, 0.99,
                           1e-3, 0.1, True, 0.5, 0.0, False))
    torch.library.opcheck(ops.update.default,
                          (bk.params, grads, bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod,
                           bk.v_sums, bk.steps, stats, gs, torch.tensor(0.0),
                           torch.tensor(0.05), 0.0, 0.1, 0.99, 1e-3, 0.1, False, 1.0, 1.0,
                           True))
    torch.library.opcheck(ops.sum_v.default, (bk.exp_avg_sq, bk.v_sums))


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


_XCOMPILE = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adai_kernels.backends import triton_kernels as K

F = ("lr beta0 beta2 one_minus_beta2 beta1_max l2 lr_wd dampening exponent mhat_scale").split()
TYPES = dict(meta="*i64", stats="*fp64", partials="*fp64", contrib="*fp64", x="*fp64",
             out="*fp64", gs_ptr="*fp32", fi_ptr="*fp32", lr_ptr="*fp32", n_rows="i32",
             P="i32", T="i32", n="i32", out_stride="i32", **{f: "fp32" for f in F})
EL = dict(BLOCK=K.BLOCK, VEC=K.VEC)
FLAGS = ("HAS_SCALE", "HAS_FOUND_INF", "HAS_LR", "CLIP", "SKIP_NONFINITE")


def compile(fn, **constexprs):
    sig = {a: "constexpr" if a in constexprs else TYPES[a] for a in fn.arg_names}
    try:
        return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=K.NUM_WARPS))
    except Exception as e:
        if "ptxas" in str(e).lower():
            print("no ptxas:", e)
            sys.exit(3)
        raise


def reduce_layouts(k):
    ttgir = k.asm["ttgir"]
    spt = dict(re.findall(r"^(#blocked\d*) = #ttg.blocked<\{sizePerThread = \[(\d+)\]", ttgir,
                          re.M))
    return [spt[m] for m in re.findall(
        r'"tt.reduce"\(%[\w.]+\).*?\}\) : \(tensor<1024xf32, (#blocked\d*)>\)', ttgir, re.S)]


for s_al in (True, False):
    vsum = reduce_layouts(compile(K.vsum_partials_kernel, S_ALIGNED=s_al, **EL))
    cases = [(K.F32, True, False), (K.F16, True, True), (K.BF16, True, False),
             (K.BF16, False, True)] if s_al else [(K.BF16, True, True)]
    for code, v1, flags in cases:
        k = compile(K.update_kernel, CODE=code, ADAI_V1=v1, HAS_L2=flags, P_ALIGNED=s_al,
                    S_ALIGNED=s_al, **{f: flags for f in FLAGS}, **EL)
        assert reduce_layouts(k) == vsum, (code, v1, s_al, reduce_layouts(k), vsum)
        ptx = k.asm["ptx"]
        if s_al:
            assert "ld.global.v4.b32" in ptx, "no vector loads"
        assert "div.full" not in ptx and "sqrt.approx" not in ptx
        if flags:  # the clip coefficient in IEEE float64
            assert "sqrt.rn.f64" in ptx and "div.rn.f64" in ptx
for flags in (True, False):
    compile(K.stats_partials_kernel, CODE=K.BF16, HAS_SCALE=flags, HAS_L2=flags,
            P_ALIGNED=True, **EL)
    compile(K.stats_finalize_kernel, HAS_L2=flags, FB=K.FBLOCK)
    compile(K.update_finalize_kernel, HAS_FOUND_INF=flags, CLIP=flags,
            SKIP_NONFINITE=flags, FB=K.FBLOCK)
compile(K.row_sum_kernel, FB=K.FBLOCK)
compile(K.vsum_finalize_kernel, FB=K.FBLOCK)
print("ok")
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The GPU path, without a GPU: every kernel compiles to sm_90 PTX (fp64 exp and sqrt,
    pointer tables, bit casts, div_rn, the device-side skip branch...), aligned chunks use
    vector accesses, and update's chunk sums of v reduce in the same register layout as
    sum_v's (so they are bitwise equal)."""
    from triton.backends import backends as triton_backends
    if "nvidia" not in triton_backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _XCOMPILE], env=env, capture_output=True,
                         text=True, timeout=600)
    if res.returncode == 3:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("ok")


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
