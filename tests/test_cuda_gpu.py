"""The CUDA kernels on a GPU: adai::stats / adai::update / adai::sum_v against a float64
oracle written here (the statistics row, gradient unscaling, clipping with and without L2
decay, skipped steps, tensor learning rates), bitwise determinism, many tensors and the
launch count, and the optimizer with backend="cuda" against backend="reference" (plain,
clipping, skip_nonfinite, GradScaler).

Marker `gpu`; skipped without a GPU (or when adai_kernels._C has no CUDA kernels, unless
ADAI_REQUIRE_CUDA=1, as bench/gpu_check.sh sets, makes that a failure). ADAI_TEST_LARGE=1 adds
a tensor of 2^31 + 3 elements (about 45 GB of GPU memory).

ADAI_GPU_TEST_DEVICE=cpu runs the op-level tests on CPU tensors instead (the C++ CPU kernels
share the schema), to check the tests themselves on a machine without a GPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import adai_kernels._native as native
from cases import DTYPES, PARAM_TOL, STATE_TOL, clone_groups  # one tolerance table

DEVICE = torch.device(os.environ.get("ADAI_GPU_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
BACKEND = "cuda" if ON_CUDA else "cpu"  # the optimizer tests' backend


def _skip_reason() -> str | None:
    if not ON_CUDA:
        return None
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not native.has_cuda_kernels() and os.environ.get("ADAI_REQUIRE_CUDA") != "1":
        return "adai_kernels._C was built without CUDA kernels"
    return None


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-specific")

ops = torch.ops.adai
HYPER = {
    "coupled": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=1e-2, decoupled=False,
                    dampening=1.0),
    "decoupled_d0.5": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.1, decoupled=True,
                           dampening=0.5),
    "plain": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0, decoupled=False,
                  dampening=1.0),
}
COLUMNS = 7  # csrc/adai_math.h StatsColumn: A, B, Bgg, Bgt, Btt, Gn, N
A, B, BGG, BGT, BTT, GN, N = range(COLUMNS)


# ---- tensors laid out as the optimizer lays them out ----------------------------------------


def _span(shape, stride) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def strided(shape, stride, dtype, offset=0, fill=0.0) -> torch.Tensor:
    """A tensor with these strides starting `offset` elements into a fresh buffer (offset 1:
    not 16-byte aligned)."""
    buf = torch.full((_span(shape, stride) + offset,), fill, dtype=dtype, device=DEVICE)
    return buf.as_strided(tuple(shape), tuple(stride), offset)


def make_param(shape, layout, dtype, gen, offset=0) -> torch.Tensor:
    if layout == "t":
        base = torch.randn(tuple(shape)[::-1], generator=gen).t()
    elif layout == "cl":
        base = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    else:
        base = torch.randn(shape, generator=gen)
    return strided(base.shape, base.stride(), dtype, offset).copy_(base)


def make_grads(params, gen, scale=1.0) -> list[torch.Tensor]:
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen) * scale
        out.append(strided(p.shape, p.stride(), p.dtype).copy_(g))
    return out


class Bucket:
    """Everything the ops take for one bucket: params, float32 states with the params' strides
    (starting `state_offset` elements into their buffers), and 0-dim views of a step vector
    and a v_sum vector."""

    def __init__(self, params, state_offset=0):
        n = len(params)
        self.params = params
        self.steps_vec = torch.zeros(n, dtype=torch.float32, device=DEVICE)
        self.vsum_vec = torch.zeros(n, dtype=torch.float64, device=DEVICE)
        self.steps = [self.steps_vec[i] for i in range(n)]
        self.v_sums = [self.vsum_vec[i] for i in range(n)]

        def state(fill):
            return [strided(p.shape, p.stride(), torch.float32, state_offset, fill)
                    for p in params]

        self.m, self.v, self.b = state(0.0), state(0.0), state(1.0)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def snapshot(self) -> dict:
        f64 = lambda ts: [t.detach().double().clone() for t in ts]  # noqa: E731
        return dict(params=f64(self.params), m=f64(self.m), v=f64(self.v), b=f64(self.b),
                    steps=self.steps_vec.double().tolist(), v_sums=self.vsum_vec.tolist())

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params, *self.m, *self.v, *self.b, self.steps_vec, self.vsum_vec]


def _l2(hp) -> float:
    return 0.0 if hp["decoupled"] else hp["weight_decay"]


def stats_op(bk, grads, hp, out, grad_scale=None):
    ops.stats(bk.params, grads, bk.steps, bk.v_sums, grad_scale, hp["betas"][1], _l2(hp), out)


def update_op(bk, grads, hp, stats, grad_scale=None, found_inf=None, lr_tensor=None,
              max_grad_norm=0.0, skip_nonfinite=False):
    lr = 0.0 if lr_tensor is not None else hp["lr"]
    ops.update(bk.params, grads, bk.m, bk.v, bk.b, bk.v_sums, bk.steps, stats, grad_scale,
               found_inf, lr_tensor, lr, hp["betas"][0], hp["betas"][1], hp["eps"],
               hp["weight_decay"], hp["decoupled"], hp["dampening"], max_grad_norm,
               skip_nonfinite)


def scalar(x) -> torch.Tensor | None:
    """A 0-dim float32 control tensor on DEVICE (None stays None)."""
    return None if x is None else torch.tensor(float(x), dtype=torch.float32, device=DEVICE)


def op_step(bk, grads, hp, extra=None, grad_scale=None, **control) -> torch.Tensor:
    """One step of one bucket; returns the statistics matrix (row 0: this bucket's, written by
    stats). `extra`: another bucket's row (a second row of the matrix). `control`: update's
    found_inf, lr_tensor, max_grad_norm, skip_nonfinite."""
    stats = torch.zeros(2 if extra else 1, COLUMNS, dtype=torch.float64, device=DEVICE)
    if extra:
        stats[1] = torch.tensor(extra, dtype=torch.float64)
    stats_op(bk, grads, hp, stats[0], grad_scale=grad_scale)
    update_op(bk, grads, hp, stats, grad_scale=grad_scale, **control)
    return stats


# Another bucket's row (consistent: B = Bgg + Bgt + Btt), for a second row of the matrix.
EXTRA = (123.0, 59.0, 60.0, -4.0, 3.0, 700.0, 4567.0)


# ---- the float64 oracle of one step (docs/design.md semantics) ------------------------------


def oracle_step(snap, grads, hp, extra=None, grad_scale=None, found_inf=None, lr=None,
                max_grad_norm=0.0, skip_nonfinite=False) -> dict:
    """The spec in float64: `row` (this bucket's statistics), `skip`, `clip` and the bucket's
    tensors after the step (unchanged, steps included, when skipped)."""
    beta0, beta2 = hp["betas"]
    lr = hp["lr"] if lr is None else lr
    wd, eps, d = hp["weight_decay"], hp["eps"], hp["dampening"]
    l2 = _l2(hp)
    row = [0.0] * COLUMNS
    phase1 = []
    for i, theta in enumerate(snap["params"]):
        k = snap["steps"][i] + 1
        bc2 = 1.0 - beta2**k
        w = (1.0 - beta2) / bc2
        g = grads[i].double()
        if grad_scale is not None:
            g = g / grad_scale
        gg = float((g * g).sum())
        if l2 != 0.0:
            ge = g + l2 * theta
            b, gt, tt = (float((ge * ge).sum()), 2 * l2 * float((g * theta).sum()),
                         l2 * l2 * float((theta * theta).sum()))
        else:
            b, gt, tt = gg, 0.0, 0.0
        for col, x in ((A, beta2 * snap["v_sums"][i] / bc2), (B, w * b), (BGG, w * gg),
                       (BGT, w * gt), (BTT, w * tt), (GN, gg), (N, theta.numel())):
            row[col] += x
        phase1.append((k, bc2, g))
    total = [x + (extra[c] if extra else 0.0) for c, x in enumerate(row)]
    finite = math.isfinite(total[GN])
    skip = bool(found_inf) or ((skip_nonfinite or max_grad_norm > 0) and not finite)
    clip = 1.0
    if max_grad_norm > 0 and finite:
        clip = min(1.0, max_grad_norm / (math.sqrt(total[GN]) + 1e-6))
    S = (total[A] + total[B] if clip == 1.0
         else total[A] + clip * clip * total[BGG] + clip * total[BGT] + total[BTT])
    inv_vbar = total[N] / S if S > 0 else 0.0
    out = dict(row=row, skip=skip, clip=clip, params=[], m=[], v=[], b=[], steps=[],
               v_sums=[])
    if skip:
        for key in ("params", "m", "v", "b", "steps", "v_sums"):
            out[key] = list(snap[key])
        return out
    for i, (k, bc2, g) in enumerate(phase1):
        theta = snap["params"][i]
        ge = g * clip + l2 * theta if l2 != 0.0 else g * clip
        v = beta2 * snap["v"][i] + (1.0 - beta2) * ge * ge
        ratio = v / bc2 * inv_vbar
        beta1 = (1.0 - beta0 * ratio ** (1.0 / (3.0 - 2.0 * d))).clamp(0.0, 1.0 - eps)
        beta3 = (1.0 - beta1) ** d
        b = snap["b"][i] * beta1
        m = beta1 * snap["m"][i] + beta3 * ge
        mhat = m / (1.0 - b) * beta0 ** (1.0 - d)
        decay = lr * wd * theta if hp["decoupled"] else 0.0
        out["params"].append(theta - decay - lr * mhat)
        out["m"].append(m)
        out["v"].append(v)
        out["b"].append(b)
        out["steps"].append(k)
        out["v_sums"].append(float(v.sum()))
    return out


def check_row(row, expected, what=""):
    """The kernel's statistics row against the oracle's: N exact, the rest to float32
    accumulation accuracy (Bgt, a sum of both signs, relative to Bgg + Btt >= |Bgt|)."""
    got = row.tolist()
    assert got[N] == expected[N], f"{what}: N {got[N]} vs {expected[N]}"
    for col, name in enumerate(("A", "B", "Bgg", "Bgt", "Btt", "Gn")):
        scale = abs(expected[col]) + (abs(expected[BGG]) + abs(expected[BTT])
                                      if col == BGT else 0.0)
        assert abs(got[col] - expected[col]) <= 1e-5 * scale + 1e-300, \
            f"{what}: stats column {name}: {got[col]!r} vs {expected[col]!r}"


def check_against_oracle(bk, grads_before, grads, stats, expected, what=""):
    check_row(stats[0], expected["row"], what)
    assert bk.steps_vec.tolist() == expected["steps"], what
    for i, p in enumerate(bk.params):
        where = f"{what} tensor {i} {tuple(p.shape)} {p.dtype} stride {p.stride()}"
        exp_p = expected["params"][i].to(p.dtype).double()
        torch.testing.assert_close(p.double(), exp_p, **PARAM_TOL[p.dtype],
                                   msg=lambda m: f"{where}: params: {m}")
        for name in ("m", "v", "b"):
            torch.testing.assert_close(getattr(bk, name)[i].double(), expected[name][i],
                                       **STATE_TOL, msg=lambda m: f"{where}: {name}: {m}")
        # v_sums: the kernel's reduction of its own new v (tight), and the oracle's (loose)
        own = float(bk.v[i].double().sum())
        assert math.isclose(bk.vsum_vec[i].item(), own, rel_tol=1e-5, abs_tol=1e-30), where
        assert math.isclose(bk.vsum_vec[i].item(), expected["v_sums"][i], rel_tol=2e-4,
                            abs_tol=1e-30), where
        assert torch.equal(grads[i], grads_before[i]), f"{where}: the gradient was written"


def assert_unchanged(bk, snap, what=""):
    """Bitwise: every tensor of the bucket as in `snap` (a skipped step)."""
    now = bk.snapshot()
    assert now["steps"] == snap["steps"], f"{what}: steps {now['steps']} vs {snap['steps']}"
    assert now["v_sums"] == snap["v_sums"], f"{what}: v_sums were written"
    for key in ("params", "m", "v", "b"):
        for i, (x, y) in enumerate(zip(now[key], snap[key])):
            assert torch.equal(_bits(x), _bits(y)), f"{what}: {key}[{i}] was written"


# ---- the test matrix ---------------------------------------------------------------------

# (shape, layout, param offset in elements): odd sizes, empty tensors, transposed,
# channels_last, misaligned views (start at an odd element of a larger buffer).
SHAPES = [
    ((0,), "c", 0), ((1,), "c", 0), ((3,), "c", 0), ((4099,), "c", 0),
    ((1_048_576 + 3,), "c", 0), ((29, 31), "t", 0), ((2, 3, 5, 5), "cl", 0),
    ((4099,), "c", 1), ((1000,), "c", 3), ((0, 5), "c", 0), ((64, 65), "t", 1),
    ((16384,), "c", 0), ((16385,), "c", 0), ((8, 16, 3, 3), "cl", 0),
]


def make_bucket(dtype, seed, state_offset=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params = [make_param(s, layout, dtype, gen, off) for s, layout, off in shapes]
    return Bucket(params, state_offset), gen


@pytest.mark.parametrize("state_offset", [0, 1])
@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_match_oracle(dtype, hyper, state_offset):
    hp = dict(HYPER[hyper], lr=1e-2 if dtype == torch.float32 else 5e-2)
    bk, gen = make_bucket(dtype, seed=1, state_offset=state_offset)
    for step in range(3):
        grads = make_grads(bk.params, gen)
        grads_before = [g.clone() for g in grads]
        extra = EXTRA if step == 1 else None
        snap = bk.snapshot()
        stats = op_step(bk, grads, hp, extra)
        expected = oracle_step(snap, grads, hp, extra)
        check_against_oracle(bk, grads_before, grads, stats, expected,
                             f"{dtype} {hyper} state_offset={state_offset} step {step}")


# Gradient norms here: about sqrt(numel of SHAPES) ~ 1060 (plus EXTRA's sqrt(700)).
CONTROLS = {
    "grad_scale": dict(grad_scale=3000.0),
    "clip": dict(max_grad_norm=100.0),
    "clip_inactive": dict(max_grad_norm=1e7),
    "clip_scale_extra": dict(grad_scale=0.37, max_grad_norm=300.0, extra=True),
    "lr_tensor": dict(lr_tensor=True),
    "found_inf_zero": dict(found_inf=0.0, skip_nonfinite=True),
}


@pytest.mark.parametrize("control", list(CONTROLS))
@pytest.mark.parametrize("hyper", ["coupled", "decoupled_d0.5", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_with_controls_match_oracle(dtype, hyper, control):
    """grad_scale (gradients scaled by it, unscaled in both ops), clipping (active and not,
    with and without L2 decay, with another bucket's row), lr from a tensor, found_inf = 0."""
    ctl = CONTROLS[control]
    hp = dict(HYPER[hyper], lr=1e-2 if dtype == torch.float32 else 5e-2)
    bk, gen = make_bucket(dtype, seed=11)
    scale = ctl.get("grad_scale")
    extra = EXTRA if ctl.get("extra") else None
    for step in range(2):
        grads = make_grads(bk.params, gen)
        if scale is not None:
            grads = [(g.float() * scale).to(dtype) for g in grads]
        grads_before = [g.clone() for g in grads]
        snap = bk.snapshot()
        kwargs = dict(max_grad_norm=ctl.get("max_grad_norm", 0.0),
                      skip_nonfinite=ctl.get("skip_nonfinite", False))
        if "found_inf" in ctl:
            kwargs["found_inf"] = scalar(ctl["found_inf"])
        if ctl.get("lr_tensor"):
            kwargs["lr_tensor"] = scalar(hp["lr"])
        stats = op_step(bk, grads, hp, extra, grad_scale=scalar(scale), **kwargs)
        expected = oracle_step(snap, grads, hp, extra, grad_scale=scale,
                               lr=float(torch.tensor(hp["lr"], dtype=torch.float32))
                               if ctl.get("lr_tensor") else None,
                               max_grad_norm=kwargs["max_grad_norm"],
                               skip_nonfinite=kwargs["skip_nonfinite"])
        assert not expected["skip"]
        if control == "clip" or control == "clip_scale_extra":
            assert expected["clip"] < 0.5, expected["clip"]  # the test clips
        if control == "clip_inactive":
            assert expected["clip"] == 1.0
        check_against_oracle(bk, grads_before, grads, stats, expected,
                             f"{dtype} {hyper} {control} step {step}")


@pytest.mark.parametrize("hyper", ["coupled", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_power_of_two_grad_scale_is_bitwise_unscaled(dtype, hyper):
    """Gradients scaled by 2^10 with grad_scale = 2^10 step bitwise like the unscaled ones
    (float(1 / 1024.0) is exact), stats rows included."""
    hp = dict(HYPER[hyper], lr=1e-2)
    plain, gen = make_bucket(dtype, seed=12)
    scaled, _ = make_bucket(dtype, seed=12)
    for _ in range(2):
        grads = make_grads(plain.params, gen)
        rows_plain = op_step(plain, grads, hp)
        rows_scaled = op_step(scaled, [(g * 1024).to(dtype) for g in grads], hp,
                              grad_scale=scalar(1024.0))
        assert torch.equal(rows_plain, rows_scaled)
    for i, (x, y) in enumerate(zip(plain.tensors(), scaled.tensors())):
        assert torch.equal(x, y), f"output tensor {i}"


@pytest.mark.parametrize("hyper", ["coupled", "decoupled_d0.5"])
def test_lr_tensor_is_read_on_the_device(hyper):
    """lr_tensor (with lr = 0.0 in the call) steps bitwise like the same float lr (2^-7 and
    2^-6: exact in float32), also after the tensor changed in place between steps."""
    hp = dict(HYPER[hyper], lr=2.0**-7)
    a, gen = make_bucket(torch.float32, seed=13)
    b, _ = make_bucket(torch.float32, seed=13)
    lr = scalar(hp["lr"])
    for step in range(3):
        if step == 2:
            hp["lr"] = 2.0**-6
            lr.fill_(hp["lr"])
        grads = make_grads(a.params, gen)
        op_step(a, grads, hp)
        op_step(b, grads, hp, lr_tensor=lr)
    for i, (x, y) in enumerate(zip(a.tensors(), b.tensors())):
        assert torch.equal(x, y), f"output tensor {i}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers (NaN-safe bitwise comparison)."""
    return t.contiguous().view(-1).view({2: torch.int16, 4: torch.int32,
                                         8: torch.int64}[t.element_size()])


def _poison(grads, value, which=3, where=5):
    grads = [g.clone() for g in grads]
    grads[which].view(-1)[where] = value
    return grads


SKIPS = {
    "found_inf": dict(found_inf=1.0),
    "found_inf_nan": dict(found_inf=float("nan")),
    "inf_skip_nonfinite": dict(bad=float("inf"), skip_nonfinite=True),
    "nan_skip_nonfinite": dict(bad=float("nan"), skip_nonfinite=True),
    "inf_clip": dict(bad=float("inf"), max_grad_norm=1.0),
    "nan_clip_scaled": dict(bad=float("nan"), max_grad_norm=1.0, grad_scale=256.0),
    "inf_other_bucket": dict(other_bad=float("inf"), skip_nonfinite=True),
}


@pytest.mark.parametrize("skip", list(SKIPS))
@pytest.mark.parametrize("hyper", ["coupled", "decoupled_d0.5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_skipped_step_changes_nothing(dtype, hyper, skip):
    """A skipped step (found_inf != 0, or a non-finite gradient norm with skip_nonfinite or
    clipping, also when the non-finite gradient is in another bucket's row) leaves params,
    states and v_sums bitwise as they were and takes back the step increments; the next
    step is a normal step from there."""
    sk = SKIPS[skip]
    hp = dict(HYPER[hyper], lr=1e-2 if dtype == torch.float32 else 5e-2)
    bk, gen = make_bucket(dtype, seed=14)
    other, _ = make_bucket(dtype, seed=15, shapes=SHAPES[:4])
    op_step(bk, make_grads(bk.params, gen), hp)  # a normal first step: nonzero states
    snap = bk.snapshot()
    grads = make_grads(bk.params, gen)
    if "bad" in sk:
        grads = _poison(grads, sk["bad"])
    grads_before = [g.clone() for g in grads]
    scale = sk.get("grad_scale")
    control = dict(max_grad_norm=sk.get("max_grad_norm", 0.0),
                   skip_nonfinite=sk.get("skip_nonfinite", False))
    if "found_inf" in sk:
        control["found_inf"] = scalar(sk["found_inf"])

    stats = torch.zeros(2, COLUMNS, dtype=torch.float64, device=DEVICE)
    other_grads = make_grads(other.params, gen)
    if "other_bad" in sk:
        other_grads = _poison(other_grads, sk["other_bad"])
    stats_op(other, other_grads, hp, stats[1])
    stats_op(bk, grads, hp, stats[0], grad_scale=scalar(scale))
    assert bk.steps_vec.tolist() == [k + 1 for k in snap["steps"]]  # stats incremented them
    update_op(bk, grads, hp, stats, grad_scale=scalar(scale), **control)
    update_op(other, other_grads, hp, stats, **control)

    assert_unchanged(bk, snap, f"{dtype} {hyper} {skip}")
    assert other.steps_vec.tolist() == [0.0] * len(other.params)
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(_bits(g), _bits(g0)), "a gradient was written"
    if "bad" in sk or "other_bad" in sk:
        assert not math.isfinite(stats[:, GN].sum().item())
    # The step after the skipped one is a normal step from the unchanged state.
    grads = make_grads(bk.params, gen)
    expected = oracle_step(snap, grads, hp)
    stats = op_step(bk, grads, hp)
    check_against_oracle(bk, grads, grads, stats, expected, f"{dtype} {hyper} after {skip}")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_nonfinite_gradient_without_skip(bad):
    """Neither skip_nonfinite nor clipping: nothing is skipped; the tensor with the bad
    gradient becomes non-finite, the others step with vhat / vbar := 0 (vbar is not finite)
    and stay finite."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=16)
    grads = _poison(make_grads(bk.params, gen), bad, which=3)
    snap = bk.snapshot()
    stats = op_step(bk, grads, hp)
    assert not math.isfinite(stats[0, GN].item())
    assert bk.steps_vec.tolist() == [k + 1 for k in snap["steps"]]
    assert not torch.isfinite(bk.params[3]).all()
    for i, p in enumerate(bk.params):
        if i != 3:
            assert torch.isfinite(p).all() and torch.isfinite(bk.m[i]).all(), i
            # beta1 = 1 - eps everywhere: m = eps * g, b = 1 - eps
            torch.testing.assert_close(bk.b[i], torch.full_like(bk.b[i], 1 - 1e-3))


def test_nonfinite_param_without_l2_does_not_reach_the_state():
    """Without L2 decay the kernels never compute l2 * theta: an inf parameter stays
    non-finite (inf, or NaN from the decoupled-decay term 0 * inf) but its v, m, b and v_sum
    (and every other tensor) stay finite."""
    hp = dict(HYPER["plain"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=17)
    bk.params[3].view(-1)[7] = float("inf")
    for _ in range(2):
        stats = op_step(bk, make_grads(bk.params, gen), hp)
        assert math.isfinite(stats[0].sum().item())
    for i in range(len(bk.params)):
        for t in (bk.v[i], bk.m[i], bk.b[i]):
            assert torch.isfinite(t).all(), i
    assert math.isfinite(bk.vsum_vec.sum().item())
    assert not torch.isfinite(bk.params[3].view(-1)[7])
    assert torch.isfinite(bk.params[3].view(-1)[8:]).all()


def test_zero_gradients_leave_params_unchanged():
    hp = dict(HYPER["plain"], lr=1e-2)
    bk, _ = make_bucket(torch.float32, seed=2)
    before = [p.clone() for p in bk.params]
    grads = [torch.zeros_like(p) for p in bk.params]
    stats = op_step(bk, grads, hp)
    assert stats[0].tolist() == [0.0] * 6 + [float(bk.numel)]
    for p, p0, m, v, b in zip(bk.params, before, bk.m, bk.v, bk.b):
        assert torch.equal(p, p0)
        assert torch.count_nonzero(m) == 0 and torch.count_nonzero(v) == 0
        assert torch.all(b == torch.tensor(1.0 - 1e-3, dtype=torch.float32))
    assert bk.steps_vec.tolist() == [1.0] * len(bk.params)
    assert bk.vsum_vec.tolist() == [0.0] * len(bk.params)


def _run(dtype, seed, hyper, steps=3, stream=None, **control):
    hp = dict(HYPER[hyper], lr=1e-2)
    bk, gen = make_bucket(dtype, seed)
    outs = []
    for _ in range(steps):
        grads = make_grads(bk.params, gen)
        if stream is None:
            outs.append(op_step(bk, grads, hp, **control).clone())
        else:
            with torch.cuda.stream(stream):
                outs.append(op_step(bk, grads, hp, **control).clone())
            torch.cuda.current_stream().wait_stream(stream)
    return bk.tensors() + outs


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "scaled_clipped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(dtype, clip):
    control = dict(grad_scale=scalar(3.0), max_grad_norm=100.0) if clip else {}
    a = _run(dtype, 3, "coupled", **control)
    b = _run(dtype, 3, "coupled", **control)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"run-to-run difference in output tensor {i}"


@cuda_only
def test_bitwise_deterministic_on_a_side_stream():
    a = _run(torch.float32, 4, "decoupled_d0.5")
    b = _run(torch.float32, 4, "decoupled_d0.5", stream=torch.cuda.Stream())
    torch.cuda.synchronize()
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"side-stream difference in output tensor {i}"


@pytest.mark.parametrize("state_offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_v_reproduces_update_bitwise(dtype, state_offset):
    bk, gen = make_bucket(dtype, seed=5, state_offset=state_offset)
    hp = dict(HYPER["coupled"], lr=1e-2)
    for _ in range(2):
        op_step(bk, make_grads(bk.params, gen), hp, grad_scale=scalar(7.0),
                max_grad_norm=200.0)
    # The bucket's own views, and fresh (16-byte aligned) copies with the same strides.
    for v_list in (bk.v, [v.clone(memory_format=torch.preserve_format) for v in bk.v]):
        assert all(c.stride() == v.stride() for c, v in zip(v_list, bk.v))
        out = torch.full((len(bk.v),), float("nan"), dtype=torch.float64, device=DEVICE)
        ops.sum_v(v_list, [out[i] for i in range(len(bk.v))])
        assert torch.equal(out, bk.vsum_vec), (out - bk.vsum_vec).abs().max()


def test_empty_lists():
    out = torch.full((COLUMNS,), float("nan"), dtype=torch.float64, device=DEVICE)
    ops.stats([], [], [], [], None, 0.99, 0.0, out)
    assert out.tolist() == [0.0] * COLUMNS
    stats = torch.ones(1, COLUMNS, dtype=torch.float64, device=DEVICE)
    ops.update([], [], [], [], [], [], [], stats, None, None, None, 1e-2, 0.1, 0.99, 1e-3, 0.0,
               False, 1.0, 0.0, False)
    ops.update([], [], [], [], [], [], [], stats, scalar(2.0), scalar(1.0), scalar(1e-2), 0.0,
               0.1, 0.99, 1e-3, 0.0, False, 1.0, 1.0, True)


def test_all_tensors_empty():
    bk = Bucket([strided((0,), (1,), torch.float32), strided((0, 3), (3, 1), torch.float32)])
    grads = [torch.empty_like(p) for p in bk.params]
    stats = op_step(bk, grads, dict(HYPER["coupled"], lr=1e-2))
    assert stats[0].tolist() == [0.0] * COLUMNS
    assert bk.steps_vec.tolist() == [1.0, 1.0]
    assert bk.vsum_vec.tolist() == [0.0, 0.0]
    # skipped: the increments are taken back
    op_step(bk, grads, dict(HYPER["coupled"], lr=1e-2), found_inf=scalar(1.0))
    assert bk.steps_vec.tolist() == [1.0, 1.0]


def test_stats_row_layout_and_strided_rows():
    """`out` may be a strided row (a column of a transposed matrix); update reads a
    transposed (column-major) stats matrix the same way."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    a, gen = make_bucket(torch.float32, seed=18, shapes=SHAPES[:6])
    b, _ = make_bucket(torch.float32, seed=18, shapes=SHAPES[:6])
    grads = make_grads(a.params, gen)
    rows = torch.zeros(2, COLUMNS, dtype=torch.float64, device=DEVICE)
    rows[1] = torch.tensor(EXTRA, dtype=torch.float64)
    cols = torch.zeros(COLUMNS, 2, dtype=torch.float64, device=DEVICE)
    cols[:, 1] = torch.tensor(EXTRA, dtype=torch.float64)
    stats_op(a, grads, hp, rows[0])
    stats_op(b, grads, hp, cols[:, 0])
    assert torch.equal(rows, cols.t())
    update_op(a, grads, hp, rows)
    update_op(b, grads, hp, cols.t())
    for i, (x, y) in enumerate(zip(a.tensors(), b.tensors())):
        assert torch.equal(x, y), f"output tensor {i}"


@cuda_only
def test_validation_messages():
    p = torch.zeros(4, device=DEVICE)
    g = torch.zeros(4, device=DEVICE)
    step = torch.zeros((), device=DEVICE)
    vs = torch.zeros((), dtype=torch.float64, device=DEVICE)
    out = torch.zeros(COLUMNS, dtype=torch.float64, device=DEVICE)
    one = scalar(1.0)
    with pytest.raises(RuntimeError, match="grads has 0 tensors"):
        ops.stats([p], [], [step], [vs], None, 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on cpu"):
        ops.stats([p], [g.cpu()], [step], [vs], None, 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype"):
        ops.stats([p], [g.half()], [step], [vs], None, 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a 0-dim"):
        ops.stats([p], [g], [vs], [vs], None, 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match="out must be a 1-D float64 tensor of 7"):
        ops.stats([p], [g], [step], [vs], None, 0.99, 0.0, out.float())
    with pytest.raises(RuntimeError, match="out must be a 1-D float64 tensor of 7"):
        ops.stats([p], [g], [step], [vs], None, 0.99, 0.0, out[:6])
    with pytest.raises(RuntimeError, match="out must be a 1-D float64 tensor of 7"):
        ops.stats([p], [g], [step], [vs], None, 0.99, 0.0, vs)
    with pytest.raises(RuntimeError, match="grad_scale must be a 0-dim float32"):
        ops.stats([p], [g], [step], [vs], vs, 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match="grad_scale is on cpu"):
        ops.stats([p], [g], [step], [vs], one.cpu(), 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match="non-overlapping and dense"):
        q = torch.zeros(8, device=DEVICE)[::2]
        ops.stats([q], [q], [step], [vs], None, 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match=r"params must be float32, float16 or bfloat16"):
        ops.stats([p.double()], [g.double()], [step], [vs], None, 0.99, 0.0, out)
    stats = torch.zeros(1, COLUMNS, dtype=torch.float64, device=DEVICE)
    tail = (1e-2, 0.1, 0.99, 1e-3, 0.0, False, 1.0, 0.0, False)

    def up(states=(p, p, p), stats=stats, grad_scale=None, found_inf=None, lr_tensor=None):
        ops.update([p], [g], [states[0]], [states[1]], [states[2]], [vs], [step], stats,
                   grad_scale, found_inf, lr_tensor, *tail)

    with pytest.raises(RuntimeError, match=r"exp_avg\[0\] has dtype"):
        up(states=(p.double(), p, p))
    with pytest.raises(RuntimeError, match=r"exp_avg_sq\[0\] has shape"):
        up(states=(p, p.view(2, 2), p))
    with pytest.raises(RuntimeError, match="stats must be a 2-D float64 tensor of 7"):
        up(stats=stats.float())
    with pytest.raises(RuntimeError, match="stats must be a 2-D float64 tensor of 7"):
        up(stats=stats[0])
    with pytest.raises(RuntimeError, match="stats must be a 2-D float64 tensor of 7"):
        up(stats=stats[:, :6])
    with pytest.raises(RuntimeError, match="found_inf must be a 0-dim float32"):
        up(found_inf=torch.ones(2, device=DEVICE))
    with pytest.raises(RuntimeError, match="found_inf is on cpu"):
        up(found_inf=one.cpu())
    with pytest.raises(RuntimeError, match="lr_tensor must be a 0-dim float32"):
        up(lr_tensor=vs)
    with pytest.raises(RuntimeError, match="grad_scale must be a 0-dim float32"):
        up(grad_scale=one.half())
    with pytest.raises(RuntimeError, match=r"v_sums has 2 tensors"):
        ops.sum_v([p], [vs, vs])


# ---- many tensors: parity and the number of kernel launches ---------------------------------


def _kernels_in(fn) -> tuple[list[str], list[str]]:
    """(kernel names, all GPU activity names) that `fn` puts on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if not n.startswith(("Memcpy", "Memset", "memcpy", "memset"))]
    return kernels, names


MANY = [((4096,), "c", 0)] * 1000


def test_many_tensors_match_oracle():
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=6, shapes=MANY)
    for step in range(2):
        grads = make_grads(bk.params, gen)
        grads_before = [g.clone() for g in grads]
        snap = bk.snapshot()
        control = dict(max_grad_norm=500.0) if step == 1 else {}
        stats = op_step(bk, grads, hp, **control)
        check_against_oracle(bk, grads_before, grads, stats,
                             oracle_step(snap, grads, hp, **control), f"1000 x 4096 step {step}")


@cuda_only
def test_many_tensors_launch_count():
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=7, shapes=MANY)
    grads = make_grads(bk.params, gen)
    stats = torch.zeros(1, COLUMNS, dtype=torch.float64, device=DEVICE)
    scale, found_inf, lr = scalar(2.0), scalar(0.0), scalar(1e-2)

    def step():
        stats_op(bk, grads, hp, stats[0], grad_scale=scale)
        update_op(bk, grads, hp, stats, grad_scale=scale, found_inf=found_inf, lr_tensor=lr,
                  max_grad_norm=1e3, skip_nonfinite=True)

    step()  # warm-up (pinned memory, allocator)
    kernels, names = _kernels_in(step)
    assert any("stats_kernel" in k for k in kernels) and any("update_kernel" in k for k in
                                                             kernels), names
    assert len(kernels) <= 4, kernels


@cuda_only
def test_ops_do_not_synchronise_with_the_host():
    """A step (table upload from pinned memory, both kernels; the skip decision, clipping,
    unscaling and the learning rate on the device) never waits for the GPU."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=10)
    grads = make_grads(bk.params, gen)
    stats = torch.zeros(1, COLUMNS, dtype=torch.float64, device=DEVICE)
    scale, found_inf, lr = scalar(2.0), scalar(0.0), scalar(1e-2)
    op_step(bk, grads, hp)  # warm-up: pinned memory, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(3):
            stats_op(bk, grads, hp, stats[0], grad_scale=scale)
            update_op(bk, grads, hp, stats, grad_scale=scale, found_inf=found_inf,
                      lr_tensor=lr, max_grad_norm=10.0 if k else 0.0, skip_nonfinite=k == 2)
            ops.sum_v(bk.v, bk.v_sums)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ---- the optimizer ------------------------------------------------------------------------


def _optimizer_groups(dtype, seed):
    from cases import make_groups

    groups = make_groups(dtype, seed=seed)
    for g in groups:
        g["params"] = [torch.nn.Parameter(p.detach().to(DEVICE)) for p in g["params"]]
    return groups


def _set_grads(groups, step, seed=1):
    from cases import make_grads as case_grads

    for g, row in zip(groups, case_grads(groups, step, seed)):
        for p, grad in zip(g["params"], row):
            p.grad = None if grad is None else grad.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_cuda_matches_reference_and_oracle(dtype):
    from adai_kernels import Adai
    from oracle import Oracle

    groups = _optimizer_groups(dtype, seed=0)
    ref_groups = clone_groups(groups)
    oracle = Oracle([dict(g, params=[p.detach().cpu() for p in g["params"]]) for g in groups])
    opt = Adai(groups, lr=1e-2, backend=BACKEND)
    ref = Adai(ref_groups, lr=1e-2, backend="reference")
    assert opt.backend == BACKEND
    for step in range(5):
        _set_grads(groups, step)
        _set_grads(ref_groups, step)
        oracle.step([[None if p.grad is None else p.grad.cpu() for p in g["params"]]
                     for g in groups])
        opt.step()
        ref.step()
    for gi, (g, rg) in enumerate(zip(groups, ref_groups)):
        for pi, (p, rp) in enumerate(zip(g["params"], rg["params"])):
            where = f"param {gi}.{pi} {tuple(p.shape)} {dtype}"
            torch.testing.assert_close(p.detach().double(), rp.detach().double(),
                                       **PARAM_TOL[dtype], msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(p.detach().double().cpu(), oracle.params(gi)[pi],
                                       **PARAM_TOL[dtype], msg=lambda m: f"{where}: {m}")
            st, rst = opt.state.get(p), ref.state.get(rp)
            assert (st is None) == (rst is None), where
            if st is not None:
                for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                    torch.testing.assert_close(st[k].double(), rst[k].double(), **STATE_TOL,
                                               msg=lambda m: f"{where} {k}: {m}")


def _compare_optimizers(opt, ref, groups, ref_groups, dtype, what=""):
    for gi, (g, rg) in enumerate(zip(groups, ref_groups)):
        for pi, (p, rp) in enumerate(zip(g["params"], rg["params"])):
            where = f"{what} param {gi}.{pi} {tuple(p.shape)} {dtype}"
            torch.testing.assert_close(p.detach().double(), rp.detach().double(),
                                       **PARAM_TOL[dtype], msg=lambda m: f"{where}: {m}")
            st, rst = opt.state.get(p), ref.state.get(rp)
            assert (st is None) == (rst is None), where
            if st is not None:
                assert float(st["step"]) == float(rst["step"]), where
                for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                    torch.testing.assert_close(st[k].double(), rst[k].double(), **STATE_TOL,
                                               msg=lambda m: f"{where} {k}: {m}")


def _snapshot(opt, groups):
    params = [p.detach().clone() for g in groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    return params, state


def _assert_same(a, b, what=""):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(_bits(x), _bits(y)), what
    assert a[1].keys() == b[1].keys(), what
    for k in a[1]:
        for n in a[1][k]:
            assert torch.equal(_bits(a[1][k][n]), _bits(b[1][k][n])), f"{what}: {n}"


OPT_MODES = {
    "clip": dict(max_grad_norm=1.0),
    "clip_loose": dict(max_grad_norm=1e4),
    "skip_nonfinite": dict(skip_nonfinite=True),
    "clip_nonfinite": dict(max_grad_norm=5.0, skip_nonfinite=True),
}


@pytest.mark.parametrize("mode", list(OPT_MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_clipping_and_skipping_match_reference(dtype, mode):
    """Adai(backend=cuda, max_grad_norm=..., skip_nonfinite=...) against the reference
    backend: parameters, states, step counters and grad_norm; step 2 has an inf gradient
    (skipped by both: nothing changes), step 3 steps again."""
    from adai_kernels import Adai

    kwargs = OPT_MODES[mode]
    groups = _optimizer_groups(dtype, seed=20)
    ref_groups = clone_groups(groups)
    opt = Adai(groups, lr=1e-2, backend=BACKEND, **kwargs)
    ref = Adai(ref_groups, lr=1e-2, backend="reference", **kwargs)
    for step in range(4):
        _set_grads(groups, step)
        _set_grads(ref_groups, step)
        if step == 2:
            for gs in (groups, ref_groups):
                gs[1]["params"][2].grad.view(-1)[3] = float("inf")
            before = _snapshot(opt, groups)
        opt.step()
        ref.step()
        norm, ref_norm = opt.grad_norm, ref.grad_norm
        if step == 2:
            _assert_same(before, _snapshot(opt, groups), f"{mode}: skipped step")
            assert not math.isfinite(norm.item()) and not math.isfinite(ref_norm.item())
        else:
            assert math.isclose(norm.item(), ref_norm.item(), rel_tol=1e-5), (norm, ref_norm)
        _compare_optimizers(opt, ref, groups, ref_groups, dtype, f"{mode} step {step}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_grad_scaler(dtype):
    """torch.amp.GradScaler on the device: scaled gradients are unscaled inside the step
    (as the reference backend does); a step with an inf gradient changes nothing and the
    scale backs off; the scaler's attributes are gone after the step."""
    from adai_kernels import Adai

    groups = _optimizer_groups(dtype, seed=21)
    ref_groups = clone_groups(groups)
    opt = Adai(groups, lr=1e-2, backend=BACKEND)
    ref = Adai(ref_groups, lr=1e-2, backend="reference")
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=1024.0, growth_interval=1000)
               for _ in range(2)]
    for step in range(4):
        for o, gs, scaler in ((opt, groups, scalers[0]), (ref, ref_groups, scalers[1])):
            _set_grads(gs, step)
            scale = float(scaler.scale(torch.ones((), device=DEVICE)))
            for g in gs:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad = (p.grad.float() * scale).to(dtype)
            if step == 2:
                gs[0]["params"][3].grad.view(-1)[1] = float("inf")
                if o is opt:
                    before = _snapshot(opt, groups)
            scaler.step(o)
            scaler.update()
            if step == 2:
                assert scaler.get_scale() < scale
        if step == 2:
            _assert_same(before, _snapshot(opt, groups), "GradScaler skipped step")
        _compare_optimizers(opt, ref, groups, ref_groups, dtype, f"GradScaler step {step}")
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")


def test_optimizer_checkpoint_resume_is_bitwise():
    """A run restored from a state dict (v_sums recomputed by adai::sum_v) continues exactly
    as the uninterrupted run."""
    from adai_kernels import Adai

    base = _optimizer_groups(torch.float32, seed=3)
    straight, resumed = clone_groups(base), clone_groups(base)
    opt = Adai(straight, lr=1e-2, backend=BACKEND)
    first = Adai(resumed, lr=1e-2, backend=BACKEND)
    for step in range(3):
        _set_grads(straight, step)
        opt.step()
        _set_grads(resumed, step)
        first.step()
    second = Adai(resumed, lr=1e-2, backend=BACKEND)
    second.load_state_dict(first.state_dict())
    for step in range(3, 6):
        _set_grads(straight, step)
        opt.step()
        _set_grads(resumed, step)
        second.step()
    for g, r in zip(straight, resumed):
        for p, q in zip(g["params"], r["params"]):
            assert torch.equal(p, q), tuple(p.shape)


@cuda_only
def test_optimizer_launch_count_1000_tensors():
    from adai_kernels import Adai

    gen = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.randn(4096, generator=gen).to(DEVICE))
              for _ in range(1000)]
    opt = Adai(params, lr=1e-2, backend=BACKEND)
    for p in params:
        p.grad = torch.randn(4096, generator=gen).to(DEVICE)
    opt.step()  # lazy state creation
    kernels, names = _kernels_in(opt.step)
    assert len(kernels) <= 4, kernels


@cuda_only
def test_optimizer_step_does_not_synchronise_with_the_host():
    from adai_kernels import Adai

    groups = _optimizer_groups(torch.float32, seed=11)
    opt = Adai(groups, lr=1e-2, backend=BACKEND)
    for step in range(2):
        _set_grads(groups, step)
        opt.step()
    _set_grads(groups, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # clipping, skip_nonfinite, a tensor learning rate and GradScaler's inputs: still none
    groups = [dict(g, lr=torch.tensor(g["lr"], dtype=torch.float32, device=DEVICE))
              for g in groups]
    opt = Adai(groups, lr=1.0, backend=BACKEND, max_grad_norm=1.0, skip_nonfinite=True)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.grad_scale = torch.tensor(4.0, device=DEVICE)
        opt.found_inf = torch.zeros((), device=DEVICE)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        del opt.grad_scale, opt.found_inf


# ---- 64-bit indexing ----------------------------------------------------------------------


@cuda_only
@pytest.mark.skipif(os.environ.get("ADAI_TEST_LARGE") != "1", reason="set ADAI_TEST_LARGE=1")
def test_tensor_of_2_pow_31_plus_3_elements():
    """First step of a 2^31 + 3 element tensor followed by a small one, in one launch: the
    global sum, both ends of the big tensor, the small tensor, and the v sums."""
    n, piece = 2**31 + 3, 1 << 28
    hp = dict(HYPER["plain"], lr=1e-2)
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    bk = Bucket([torch.randn(n, generator=gen, device=DEVICE),
                 torch.randn(5, generator=gen, device=DEVICE)])
    grads = [torch.randn(n, generator=gen, device=DEVICE),
             torch.randn(5, generator=gen, device=DEVICE)]
    # First step from fresh state (V = 0, k = 1, bc2 = 1 - beta2): S = sum g^2.
    S = sum(float(grads[0][i:i + piece].double().pow(2).sum()) for i in range(0, n, piece))
    S += float(grads[1].double().pow(2).sum())
    spans = [(0, 0, 1 << 20), (0, n - (1 << 20), n), (1, 0, 5)]
    before = {sp: bk.params[sp[0]][sp[1]:sp[2]].double().clone() for sp in spans}

    stats = op_step(bk, grads, hp)

    row = stats[0].tolist()
    assert row[A] == 0.0 and row[BGT] == 0.0 and row[BTT] == 0.0 and row[N] == n + 5, row
    for col in (B, BGG, GN):  # w = (1 - beta2) / bc2 = 1 at k = 1
        assert math.isclose(row[col], S, rel_tol=1e-5), (col, row[col], S)
    beta0, beta2 = hp["betas"]
    bc2, inv_vbar = 1.0 - beta2, (n + 5) / S
    for (t, a, e), theta in before.items():
        g = grads[t][a:e].double()
        v = (1.0 - beta2) * g * g
        beta1 = (1.0 - beta0 * (v / bc2 * inv_vbar)).clamp(0.0, 1.0 - hp["eps"])
        m = (1.0 - beta1) * g
        where = f"tensor {t} [{a}:{e}]"
        torch.testing.assert_close(bk.params[t][a:e].double(), theta - hp["lr"] * m / (1 - beta1),
                                   **PARAM_TOL[torch.float32], msg=lambda x: f"{where}: {x}")
        torch.testing.assert_close(bk.v[t][a:e].double(), v, **STATE_TOL)
        torch.testing.assert_close(bk.m[t][a:e].double(), m, **STATE_TOL)
        torch.testing.assert_close(bk.b[t][a:e].double(), beta1, **STATE_TOL)
    v_total = sum(float(bk.v[0][i:i + piece].double().sum()) for i in range(0, n, piece))
    assert math.isclose(bk.vsum_vec[0].item(), v_total, rel_tol=1e-5)
    assert math.isclose(bk.vsum_vec[1].item(), float(bk.v[1].double().sum()), rel_tol=1e-6)
    assert bk.steps_vec.tolist() == [1.0, 1.0]
