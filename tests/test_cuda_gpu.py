"""The CUDA kernels on a GPU: adai::stats / adai::update / adai::v_sum against a float64
oracle written here (the statistics row, gradient unscaling, clipping with and without L2
decay, skipped steps, tensor learning rates), bitwise determinism, many tensors and the
launch count, and the optimizer with backend="cuda" against backend="reference" (plain,
clipping, skip_nonfinite, GradScaler). States are passed as flat buffers plus a `segments`
table (csrc/op_schemas.h); the test buckets scramble segment order, offsets and slots, and check
that nothing outside a call's segments and slots is written; the table's checks
(csrc/op_checks.h) are tested on every op.

Marker `gpu`; skipped without a GPU (or when adai_kernels._C has no CUDA kernels, unless
ADAI_REQUIRE_CUDA=1, as bench/gpu_check.sh sets, makes that a failure). ADAI_TEST_LARGE=1 adds
a tensor of 2^31 + 3 elements (about 45 GB of GPU memory).

ADAI_GPU_TEST_DEVICE selects what runs the op-level tests (the optimizer tests use the
matching backend):
- `cuda` (default): the CUDA kernels on a GPU;
- `emu`: the same CUDA kernels and host launch code on CPU tensors, executed by the emulator
  of csrc/emu/ (`torch.ops.adai_emu`, built from the current tree by tests/emu_build.py; with
  ADAI_EMU_ASAN=1 its AddressSanitizer build, in a process with libasan preloaded). Runs in
  CI (`make test-emu`), with smaller tensors: every GPU thread is a fiber;
- `cpu`: the C++ CPU kernels, which share the schema (a check of the tests themselves).
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import adai_kernels._native as native
from cases import DTYPES, PARAM_TOL, STATE_TOL, clone_groups  # one tolerance table

MODE = os.environ.get("ADAI_GPU_TEST_DEVICE", "cuda")
if MODE not in ("cuda", "emu", "cpu"):
    raise ValueError(f"ADAI_GPU_TEST_DEVICE must be cuda, emu or cpu, got {MODE!r}")
EMU = MODE == "emu"
DEVICE = torch.device("cpu" if EMU else MODE)
ON_CUDA = DEVICE.type == "cuda"
BACKEND = {"cuda": "cuda", "emu": "cuda_emu", "cpu": "cpu"}[MODE]  # the optimizer tests'
if EMU:
    import emu_build

    emu_build.load(asan=os.environ.get("ADAI_EMU_ASAN") == "1")


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
# The CUDA kernels (on a GPU or emulated), not the CPU kernels.
cuda_kernels = pytest.mark.skipif(MODE == "cpu", reason="tests the CUDA kernels")

ops = torch.ops.adai_emu if EMU else torch.ops.adai
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


def _align16(x: int) -> int:
    return (x + 15) // 16 * 16


class Bucket:
    """Everything the ops take for one bucket, laid out as the optimizer lays it out but
    scrambled: flat float32 state buffers (`exp_avg`, `exp_avg_sq`, `beta1_prod`) holding each
    tensor's states in its memory order (views with the params' strides in `m`, `v`, `b`),
    segments placed in reverse tensor order with a gap after each, and slots a permutation of
    the step / v_sum vectors' slots with SPARE unused ones. `state_offset` != 0: segments start
    1 to 3 elements past a multiple of 16 (never 16-byte aligned). Gaps and unused slots hold
    NaN; the ops must leave them as they are (`outside`)."""

    SPARE = 2

    def __init__(self, params, state_offset=0):
        n = len(params)
        self.params = list(params)
        offsets, cursor = [0] * n, 0
        for i in reversed(range(n)):
            offsets[i] = cursor + (state_offset * (1 + i % 3) if state_offset else 0)
            cursor = _align16(offsets[i] + params[i].numel() + 1)
        self.n_slots = n + self.SPARE
        perm = torch.randperm(self.n_slots, generator=torch.Generator().manual_seed(n))
        self.slots = perm[:n].tolist()
        self.segments = torch.tensor(
            [(o, p.numel(), s) for o, p, s in zip(offsets, params, self.slots)],
            dtype=torch.int64).reshape(-1, 3)

        def buffer(fill):
            buf = torch.full((cursor,), float("nan"), dtype=torch.float32, device=DEVICE)
            views = [buf.as_strided(p.shape, p.stride(), o) for p, o in zip(params, offsets)]
            for v in views:
                v.fill_(fill)
            return buf, views

        self.exp_avg, self.m = buffer(0.0)
        self.exp_avg_sq, self.v = buffer(0.0)
        self.beta1_prod, self.b = buffer(1.0)
        self.steps_vec = torch.full((self.n_slots,), float("nan"), dtype=torch.float64,
                                    device=DEVICE)
        self.v_sum_vec = torch.full((self.n_slots,), float("nan"), dtype=torch.float64,
                                   device=DEVICE)
        self.steps_vec[self._slot_index()] = 0.0
        self.v_sum_vec[self._slot_index()] = 0.0

    def _slot_index(self) -> torch.Tensor:
        return torch.tensor(self.slots, dtype=torch.int64, device=DEVICE)

    def select(self, idx) -> "Bucket":
        """Tensors `idx` of this bucket (in that order), sharing its buffers and slots, as the
        optimizer passes the tensors of a bucket that have gradients."""
        sub = copy.copy(self)
        sub.params = [self.params[i] for i in idx]
        sub.m, sub.v, sub.b = ([x[i] for i in idx] for x in (self.m, self.v, self.b))
        sub.slots = [self.slots[i] for i in idx]
        sub.segments = self.segments[list(idx)].reshape(-1, 3)
        return sub

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def step_list(self) -> list[float]:
        """Step counters in tensor order."""
        return self.steps_vec[self._slot_index()].double().tolist()

    def v_sum_list(self) -> list[float]:
        """v_sums in tensor order."""
        return self.v_sum_vec[self._slot_index()].tolist()

    def v_sum(self, i: int) -> float:
        return self.v_sum_vec[self.slots[i]].item()

    def outside(self) -> list[torch.Tensor]:
        """The bits of what a call over these tensors must not touch: the state buffers
        outside their segments, and the slots they do not use."""
        parts, pos, end = [], 0, self.exp_avg.numel()
        spans = sorted((o, o + k) for o, k, _ in self.segments.tolist() if k > 0)
        for a, e in spans + [(end, end)]:
            if a > pos:
                parts += [buf[pos:a] for buf in (self.exp_avg, self.exp_avg_sq, self.beta1_prod)]
            pos = max(pos, e)
        unused = torch.tensor(sorted(set(range(self.n_slots)) - set(self.slots)),
                              dtype=torch.int64, device=DEVICE)
        parts += [self.steps_vec[unused], self.v_sum_vec[unused]]
        return [_bits(t).clone() for t in parts]

    def snapshot(self) -> dict:
        f64 = lambda ts: [t.detach().double().clone() for t in ts]  # noqa: E731
        return dict(params=f64(self.params), m=f64(self.m), v=f64(self.v), b=f64(self.b),
                    steps=self.step_list(), v_sums=self.v_sum_list(), outside=self.outside())

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params, self.exp_avg, self.exp_avg_sq, self.beta1_prod, self.steps_vec,
                self.v_sum_vec]


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe: the buckets' gaps and unused slots hold NaN)."""
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))


def assert_outside_untouched(bk, before, what=""):
    now = bk.outside()
    assert len(now) == len(before), what
    for k, (x, y) in enumerate(zip(now, before)):
        assert torch.equal(x, y), f"{what}: written outside the call's segments / slots ({k})"


def _l2(hp) -> float:
    return 0.0 if hp["decoupled"] else hp["weight_decay"]


def stats_op(bk, grads, hp, out, grad_scale=None):
    ops.stats(bk.params, grads, bk.segments, bk.steps_vec, bk.v_sum_vec, grad_scale,
              hp["betas"][1], _l2(hp), out)


def update_op(bk, grads, hp, stats, grad_scale=None, found_inf=None, lr_tensor=None,
              max_grad_norm=0.0, skip_nonfinite=False):
    lr = 0.0 if lr_tensor is not None else hp["lr"]
    ops.update(bk.params, grads, bk.segments, bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod,
               bk.v_sum_vec, bk.steps_vec, stats, grad_scale, found_inf, lr_tensor, lr,
               hp["betas"][0], hp["betas"][1], hp["eps"], hp["weight_decay"], hp["decoupled"],
               hp["dampening"], max_grad_norm, skip_nonfinite)


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
    tensors after the step (unchanged, steps included, when skipped); `outside` (what lies
    outside the call's segments and slots) is never written."""
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
               v_sums=[], outside=snap["outside"])
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
    assert bk.step_list() == expected["steps"], what
    assert_outside_untouched(bk, expected["outside"], what)
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
        assert math.isclose(bk.v_sum(i), own, rel_tol=1e-5, abs_tol=1e-30), where
        assert math.isclose(bk.v_sum(i), expected["v_sums"][i], rel_tol=2e-4,
                            abs_tol=1e-30), where
        assert torch.equal(grads[i], grads_before[i]), f"{where}: the gradient was written"


def assert_unchanged(bk, snap, what="", outside=True):
    """Bitwise: every tensor of the bucket as in `snap` (a skipped step); `outside`: and what
    lies outside its segments and slots."""
    now = bk.snapshot()
    assert now["steps"] == snap["steps"], f"{what}: steps {now['steps']} vs {snap['steps']}"
    assert now["v_sums"] == snap["v_sums"], f"{what}: v_sums were written"
    if outside:
        assert_outside_untouched(bk, snap["outside"], what)
    for key in ("params", "m", "v", "b"):
        for i, (x, y) in enumerate(zip(now[key], snap[key])):
            assert torch.equal(_bits(x), _bits(y)), f"{what}: {key}[{i}] was written"


# ---- the test matrix ---------------------------------------------------------------------

# (shape, layout, param offset in elements): odd sizes, empty tensors, transposed,
# channels_last, misaligned views (start at an odd element of a larger buffer).
SHAPES = [
    ((0,), "c", 0), ((1,), "c", 0), ((3,), "c", 0), ((4099,), "c", 0),
    ((2 * 16384 + 5,) if EMU else (1_048_576 + 3,), "c", 0), ((29, 31), "t", 0),
    ((2, 3, 5, 5), "cl", 0), ((4099,), "c", 1), ((1000,), "c", 3), ((0, 5), "c", 0),
    ((64, 65), "t", 1), ((16384,), "c", 0), ((16385,), "c", 0), ((8, 16, 3, 3), "cl", 0),
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


# The gradient norm of one step of make_grads: about sqrt(numel of SHAPES) (1,060 on a GPU,
# 320 emulated), plus sqrt(700) from EXTRA's row when that is added.
NORM = math.sqrt(sum(math.prod(shape) for shape, _, _ in SHAPES))
CONTROLS = {
    "grad_scale": dict(grad_scale=3000.0),
    "clip": dict(max_grad_norm=NORM / 10),
    "clip_inactive": dict(max_grad_norm=1e4 * NORM),
    "clip_scale_extra": dict(grad_scale=0.37, max_grad_norm=0.28 * NORM, extra=True),
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
        assert same_bits(x, y), f"output tensor {i}"


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
        assert same_bits(x, y), f"output tensor {i}"


@pytest.mark.parametrize("start", [2.0**24, 2.0**31 - 1, 2.0**40], ids=["2^24", "2^31-1", "2^40"])
def test_step_counters_are_exact_far_past_float32(start):
    """Step counters are float64: stats increments them exactly past 2^24 (where a float32
    counter stops) and 2^31, the step is the oracle's (bc2 = 1 - beta2^k in double), and a
    skipped update takes the increment back exactly."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=23, shapes=SHAPES[:4] + SHAPES[11:13])
    bk.steps_vec[bk._slot_index()] = start
    grads = make_grads(bk.params, gen)
    snap = bk.snapshot()
    stats = op_step(bk, grads, hp)
    check_against_oracle(bk, [g.clone() for g in grads], grads, stats,
                         oracle_step(snap, grads, hp), f"from step {start}")
    assert bk.step_list() == [start + 1] * len(bk.params)
    snap = bk.snapshot()
    op_step(bk, make_grads(bk.params, gen), hp, found_inf=scalar(1.0))
    assert_unchanged(bk, snap, f"skipped at step {start + 1}")


def test_control_tensors_of_shape_1():
    """grad_scale, found_inf and lr_tensor of shape (1,) (as GradScaler may hold them) step
    bitwise like 0-dim ones (one rule: csrc/op_checks.h, check_control)."""
    hp = dict(HYPER["coupled"], lr=2.0**-7)
    results = []
    for shape in ((), (1,)):
        bk, gen = make_bucket(torch.float32, seed=24, shapes=SHAPES[:6])

        def full(x):
            return torch.full(shape, x, dtype=torch.float32, device=DEVICE)

        for _ in range(2):
            grads = [g * 64 for g in make_grads(bk.params, gen)]
            op_step(bk, grads, hp, grad_scale=full(64.0), found_inf=full(0.0),
                    lr_tensor=full(hp["lr"]))
        results.append(bk.tensors())
    for i, (x, y) in enumerate(zip(*results)):
        assert same_bits(x, y), f"output tensor {i}"


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
    assert bk.step_list() == [k + 1 for k in snap["steps"]]  # stats incremented them
    update_op(bk, grads, hp, stats, grad_scale=scalar(scale), **control)
    update_op(other, other_grads, hp, stats, **control)

    assert_unchanged(bk, snap, f"{dtype} {hyper} {skip}")
    assert other.step_list() == [0.0] * len(other.params)
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
    assert bk.step_list() == [k + 1 for k in snap["steps"]]
    assert_outside_untouched(bk, snap["outside"])
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
    assert all(math.isfinite(x) for x in bk.v_sum_list())
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
    assert bk.step_list() == [1.0] * len(bk.params)
    assert bk.v_sum_list() == [0.0] * len(bk.params)


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
        assert same_bits(x, y), f"run-to-run difference in output tensor {i}"


@cuda_only
def test_bitwise_deterministic_on_a_side_stream():
    a = _run(torch.float32, 4, "decoupled_d0.5")
    b = _run(torch.float32, 4, "decoupled_d0.5", stream=torch.cuda.Stream())
    torch.cuda.synchronize()
    for i, (x, y) in enumerate(zip(a, b)):
        assert same_bits(x, y), f"side-stream difference in output tensor {i}"


def _relocated(v_views, shift):
    """The tensors `v_views` copied into a fresh flat buffer, each at `shift` elements past a
    multiple of 16 (shift 0: 16-byte aligned), with their strides; slots in order."""
    offsets, cursor = [], 0
    for v in v_views:
        offsets.append(cursor + shift)
        cursor = _align16(cursor + shift + v.numel())
    buf = torch.full((cursor,), float("nan"), dtype=torch.float32, device=DEVICE)
    for v, o in zip(v_views, offsets):
        buf.as_strided(v.shape, v.stride(), o).copy_(v)
    segments = torch.tensor([(o, v.numel(), i) for i, (v, o) in enumerate(zip(v_views, offsets))],
                            dtype=torch.int64).reshape(-1, 3)
    return buf, segments, list(range(len(v_views)))


@pytest.mark.parametrize("state_offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_v_sum_reproduces_update_bitwise(dtype, state_offset):
    """v_sum gives bitwise update's v_sums: on the bucket's own buffer (scrambled segments and
    slots), on copies of v at 16-byte aligned and at misaligned offsets, and on a subset of
    the rows (only their slots are written)."""
    bk, gen = make_bucket(dtype, seed=5, state_offset=state_offset)
    hp = dict(HYPER["coupled"], lr=1e-2)
    for _ in range(2):
        op_step(bk, make_grads(bk.params, gen), hp, grad_scale=scalar(7.0),
                max_grad_norm=200.0)
    expected = bk.v_sum_vec[bk._slot_index()]
    n = len(bk.v)
    layouts = {"own": (bk.exp_avg_sq, bk.segments, bk.slots),
               "aligned copy": _relocated(bk.v, 0), "misaligned copy": _relocated(bk.v, 3)}
    for what, (buf, segments, slots) in layouts.items():
        before = _bits(buf).clone()
        out = torch.full((max(slots, default=-1) + 2,), float("nan"), dtype=torch.float64,
                         device=DEVICE)
        ops.v_sum(buf, segments, out)
        idx = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
        assert same_bits(out[idx], expected), (what, (out[idx] - expected).abs().max())
        assert math.isnan(out[-1].item()), f"{what}: an unused slot was written"
        assert torch.equal(_bits(buf), before), f"{what}: exp_avg_sq was written"
    rows = list(range(0, n, 2))
    out = torch.full((bk.n_slots,), float("nan"), dtype=torch.float64, device=DEVICE)
    ops.v_sum(bk.exp_avg_sq, bk.segments[rows], out)
    for i in range(n):
        got = out[bk.slots[i]]
        if i in rows:
            assert same_bits(got, expected[i]), i
        else:
            assert math.isnan(got.item()), f"tensor {i} is not in the call but its slot was written"


def test_empty_lists():
    """No tensors: stats writes a zero row, update and v_sum do nothing; state buffers and
    slots that exist are not touched."""
    segments = torch.zeros(0, 3, dtype=torch.int64)
    for length, n_slots in ((0, 0), (40, 3)):
        bufs = [torch.full((length,), x, dtype=torch.float32, device=DEVICE)
                for x in (1.0, 2.0, 3.0)]
        steps = torch.full((n_slots,), 5.0, dtype=torch.float64, device=DEVICE)
        v_sums = torch.full((n_slots,), 6.0, dtype=torch.float64, device=DEVICE)
        before = [t.clone() for t in (*bufs, steps, v_sums)]
        out = torch.full((COLUMNS,), float("nan"), dtype=torch.float64, device=DEVICE)
        ops.stats([], [], segments, steps, v_sums, None, 0.99, 0.0, out)
        assert out.tolist() == [0.0] * COLUMNS
        stats = torch.ones(1, COLUMNS, dtype=torch.float64, device=DEVICE)
        ops.update([], [], segments, *bufs, v_sums, steps, stats, None, None, None, 1e-2, 0.1,
                   0.99, 1e-3, 0.0, False, 1.0, 0.0, False)
        ops.update([], [], segments, *bufs, v_sums, steps, stats, scalar(2.0), scalar(1.0),
                   scalar(1e-2), 0.0, 0.1, 0.99, 1e-3, 0.0, False, 1.0, 1.0, True)
        ops.v_sum(bufs[1], segments, v_sums)
        for t, t0 in zip((*bufs, steps, v_sums), before):
            assert torch.equal(t, t0)


def test_all_tensors_empty():
    bk = Bucket([strided((0,), (1,), torch.float32), strided((0, 3), (3, 1), torch.float32)])
    grads = [torch.empty_like(p) for p in bk.params]
    outside = bk.outside()
    stats = op_step(bk, grads, dict(HYPER["coupled"], lr=1e-2))
    assert stats[0].tolist() == [0.0] * COLUMNS
    assert bk.step_list() == [1.0, 1.0]
    assert bk.v_sum_list() == [0.0, 0.0]
    # skipped: the increments are taken back
    op_step(bk, grads, dict(HYPER["coupled"], lr=1e-2), found_inf=scalar(1.0))
    assert bk.step_list() == [1.0, 1.0]
    assert_outside_untouched(bk, outside)


def test_a_subset_of_the_bucket():
    """The optimizer passes the tensors of a bucket that have gradients: a call over some of
    them (their segments and slots, in another order) steps exactly those and leaves every
    other tensor's states, step and v_sum bitwise as they were."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=19, state_offset=1)
    op_step(bk, make_grads(bk.params, gen), hp)  # nonzero states everywhere
    chosen = [9, 2, 5, 0, 13, 4]
    sub = bk.select(chosen)
    rest = bk.select([i for i in range(len(bk.params)) if i not in chosen])
    for step in range(2):
        grads = make_grads(sub.params, gen)
        snap, rest_snap = sub.snapshot(), rest.snapshot()
        stats = op_step(sub, grads, hp, EXTRA if step else None)
        check_against_oracle(sub, grads, grads, stats,
                             oracle_step(snap, grads, hp, EXTRA if step else None),
                             f"subset step {step}")
        # (the stepped tensors lie outside `rest`: checked above as outside `sub`)
        assert_unchanged(rest, rest_snap, f"the other tensors, step {step}", outside=False)


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
        assert same_bits(x, y), f"output tensor {i}"


def _valid_call():
    """Valid arguments for the three ops on DEVICE: params of 4, 3 and 0 elements whose
    segments lie in buffers of 19 elements (the empty one inside another's span), slots
    permuted."""
    p = [torch.zeros(4, device=DEVICE), torch.zeros(3, device=DEVICE),
         torch.zeros(0, device=DEVICE)]
    return dict(
        params=p, grads=[torch.zeros_like(x) for x in p],
        segments=torch.tensor([[0, 4, 2], [16, 3, 0], [2, 0, 1]], dtype=torch.int64),
        bufs=[torch.zeros(19, device=DEVICE) for _ in range(3)],
        steps=torch.zeros(3, dtype=torch.float64, device=DEVICE),
        v_sums=torch.zeros(3, dtype=torch.float64, device=DEVICE),
        out=torch.zeros(COLUMNS, dtype=torch.float64, device=DEVICE),
        stats=torch.zeros(1, COLUMNS, dtype=torch.float64, device=DEVICE),
        grad_scale=None, found_inf=None, lr_tensor=None)


def _call(op, **changes):
    a = dict(_valid_call(), **changes)
    if op == "stats":
        ops.stats(a["params"], a["grads"], a["segments"], a["steps"], a["v_sums"],
                  a["grad_scale"], 0.99, 0.0, a["out"])
    elif op == "update":
        ops.update(a["params"], a["grads"], a["segments"], *a["bufs"], a["v_sums"], a["steps"],
                   a["stats"], a["grad_scale"], a["found_inf"], a["lr_tensor"], 1e-2, 0.1, 0.99,
                   1e-3, 0.0, False, 1.0, 0.0, False)
    else:
        ops.v_sum(a["bufs"][1], a["segments"], a["v_sums"])


def _segs(*rows):
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


_TABLE = r"`segments` must be a contiguous int64 CPU tensor of shape \(n, 3\)"
SEGMENT_CASES = {
    # name: (ops, changes or a function of the valid arguments giving them, message)
    "int32": ("stats update v_sum", dict(segments=_segs([0, 4, 2], [16, 3, 0], [2, 0, 1]).int()),
              _TABLE),
    "float64": ("stats update v_sum",
                dict(segments=_segs([0, 4, 2], [16, 3, 0], [2, 0, 1]).double()), _TABLE),
    "two_columns": ("stats update v_sum", dict(segments=torch.zeros(3, 2, dtype=torch.int64)),
                    _TABLE),
    "1d": ("stats update v_sum", dict(segments=torch.zeros(9, dtype=torch.int64)), _TABLE),
    "3d": ("stats update v_sum", dict(segments=torch.zeros(1, 3, 3, dtype=torch.int64)), _TABLE),
    "non_contiguous": ("stats update v_sum",
                       dict(segments=_segs([0, 16, 2], [4, 3, 0], [2, 0, 1]).t()), _TABLE),
    "rows": ("stats update", dict(segments=_segs([0, 4, 2], [16, 3, 0])),
             r"`segments` has 2 rows but `params` has 3 tensors"),
    "grads": ("stats update", lambda a: dict(grads=a["grads"][:1]),
              r"`grads` has 1 tensors but `params` has 3"),
    "numel": ("stats update", dict(segments=_segs([0, 4, 2], [15, 4, 0], [2, 0, 1])),
              r"segments\[1\] has numel 4 but params\[1\] has 3 elements"),
    "numel_empty": ("stats update", dict(segments=_segs([0, 4, 2], [16, 3, 0], [2, 1, 1])),
                    r"segments\[2\] has numel 1 but params\[2\] has 0 elements"),
    "past_the_end": ("update v_sum", dict(segments=_segs([0, 4, 2], [17, 3, 0], [2, 0, 1])),
                     r"segments\[1\] = \(offset 17, numel 3\) is outside the state buffers of "
                     r"19 elements"),
    "empty_past_the_end": ("update v_sum",
                           dict(segments=_segs([0, 4, 2], [16, 3, 0], [20, 0, 1])),
                           r"segments\[2\] = \(offset 20, numel 0\) is outside"),
    "negative_offset": ("update v_sum", dict(segments=_segs([-1, 4, 2], [16, 3, 0], [2, 0, 1])),
                        r"segments\[0\] = \(offset -1, numel 4\) has a negative entry"),
    "huge_offset": ("update v_sum", dict(segments=_segs([0, 4, 2], [2**62, 3, 0], [2, 0, 1])),
                    r"segments\[1\] = \(offset 4611686018427387904, numel 3\) is outside"),
    "negative_numel": ("v_sum", dict(segments=_segs([0, 4, 2], [16, -3, 0])),
                       r"segments\[1\] = \(offset 16, numel -3\) has a negative entry"),
    "slot_too_big": ("stats update v_sum", dict(segments=_segs([0, 4, 3], [16, 3, 0], [2, 0, 1])),
                     r"segments\[0\] has slot 3 but steps and v_sums have 3 slots"),
    "negative_slot": ("stats update v_sum",
                      dict(segments=_segs([0, 4, 2], [16, 3, -1], [2, 0, 1])),
                      r"segments\[1\] has slot -1 but steps and v_sums have 3 slots"),
    "duplicate_slot": ("stats update v_sum",
                       dict(segments=_segs([0, 4, 2], [16, 3, 0], [2, 0, 2])),
                       r"segments\[2\] uses slot 2, which an earlier tensor of this call uses"),
    "overlap": ("update v_sum", dict(segments=_segs([0, 4, 2], [3, 3, 0], [2, 0, 1])),
                r"segments\[0\] and segments\[1\] overlap in the state buffers"),
    "overlap_reversed": ("update v_sum", dict(segments=_segs([3, 4, 2], [1, 3, 0], [2, 0, 1])),
                         r"segments\[1\] and segments\[0\] overlap in the state buffers"),
    "same_start": ("update v_sum", dict(segments=_segs([15, 4, 2], [15, 3, 0], [2, 0, 1])),
                  r"segments\[\d\] and segments\[\d\] overlap in the state buffers"),
}
STATE_CASES = {
    "exp_avg_dtype": ("update", lambda a: dict(bufs=[a["bufs"][0].double(), *a["bufs"][1:]]),
                      r"`exp_avg` must be a contiguous 1-D Float tensor"),
    "exp_avg_sq_2d": ("update v_sum",
                      lambda a: dict(bufs=[a["bufs"][0], a["bufs"][1].view(1, 19), a["bufs"][2]]),
                      r"`exp_avg_sq` must be a contiguous 1-D Float tensor"),
    "beta1_prod_strided": ("update", lambda a: dict(bufs=[
        *a["bufs"][:2], torch.zeros(38, device=DEVICE)[::2]]),
        r"`beta1_prod` must be a contiguous 1-D Float tensor"),
    "lengths": ("update", lambda a: dict(bufs=[a["bufs"][0], a["bufs"][1][:18], a["bufs"][2]]),
                r"`exp_avg_sq` has 18 elements but `exp_avg` has 19"),
    "steps_dtype": ("stats update", lambda a: dict(steps=a["steps"].float()),
                    r"`steps` must be a contiguous 1-D Double tensor"),
    "steps_0d": ("stats update", lambda a: dict(steps=a["steps"][0]),
                 r"`steps` must be a contiguous 1-D Double tensor"),
    "v_sums_dtype": ("stats update v_sum", lambda a: dict(v_sums=a["v_sums"].float()),
                     r"`v_sums` must be a contiguous 1-D Double tensor"),
    "slot_counts": ("stats update", lambda a: dict(steps=torch.zeros(4, dtype=torch.float64,
                                                                      device=DEVICE)),
                    r"`steps` has 4 slots but `v_sums` has 3"),
}


@pytest.mark.parametrize("case", list(SEGMENT_CASES) + list(STATE_CASES))
def test_segment_and_buffer_validation(case):
    """The checks of csrc/op_checks.h (CPU and CUDA ops alike): the segments table, the flat
    state buffers and the slot vectors, on each op that takes them. Nothing is written when a
    call is refused."""
    names, changes, message = {**SEGMENT_CASES, **STATE_CASES}[case]
    if callable(changes):
        changes = changes(_valid_call())
    for op in ("stats", "update", "v_sum"):
        _call(op)  # the valid call is accepted
    for op in names.split():
        a = dict(_valid_call(), **changes)
        for t in (*a["bufs"], a["steps"], a["v_sums"]):
            t.fill_(7.0)
        before = [t.clone() for t in (*a["bufs"], a["steps"], a["v_sums"])]
        with pytest.raises(RuntimeError, match=message):
            _call(op, **a)
        for t, t0 in zip((*a["bufs"], a["steps"], a["v_sums"]), before):
            assert torch.equal(t, t0), f"{op}: written by a refused call"


@cuda_only
def test_validation_messages():
    """CUDA-specific checks: devices, dtypes and layouts of params and grads, `out`, `stats`
    and the control tensors."""
    p = torch.zeros(4, device=DEVICE)
    g = torch.zeros(4, device=DEVICE)
    segs = _segs([0, 4, 0])
    steps = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    vs = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    out = torch.zeros(COLUMNS, dtype=torch.float64, device=DEVICE)
    one = scalar(1.0)

    def st(params=(p,), grads=(g,), segments=segs, steps=steps, v_sums=vs, grad_scale=None,
           out=out):
        ops.stats(list(params), list(grads), segments, steps, v_sums, grad_scale, 0.99, 0.0, out)

    with pytest.raises(RuntimeError, match=r"`grads` has 0 tensors"):
        st(grads=())
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on cpu"):
        st(grads=(g.cpu(),))
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype"):
        st(grads=(g.half(),))
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        st(grads=(g.view(2, 2),))
    with pytest.raises(RuntimeError, match=r"params\[0\] is on cpu"):
        st(params=(p.cpu(),))
    with pytest.raises(RuntimeError, match="`segments` must be a contiguous int64 CPU tensor"):
        st(segments=segs.to(DEVICE))
    with pytest.raises(RuntimeError, match="`steps` is on cpu but the op runs on cuda"):
        st(steps=steps.cpu())
    with pytest.raises(RuntimeError, match="`v_sums` is on cpu but the op runs on cuda"):
        st(v_sums=vs.cpu())
    with pytest.raises(RuntimeError, match="`out` must be a CUDA tensor"):
        st(out=out.cpu())
    with pytest.raises(RuntimeError, match="`out` must be a 1-D float64 tensor of 7"):
        st(out=out.float())
    with pytest.raises(RuntimeError, match="`out` must be a 1-D float64 tensor of 7"):
        st(out=out[:6])
    with pytest.raises(RuntimeError, match="`out` must be a 1-D float64 tensor of 7"):
        st(out=vs[0])
    with pytest.raises(RuntimeError, match="grad_scale` must be a float32 tensor of one"):
        st(grad_scale=vs[0])
    with pytest.raises(RuntimeError, match="grad_scale` is on cpu"):
        st(grad_scale=one.cpu())
    with pytest.raises(RuntimeError, match="non-overlapping and dense"):
        q = torch.zeros(8, device=DEVICE)[::2]
        st(params=(q,), grads=(q,))
    with pytest.raises(RuntimeError,
                       match=r"params\[0\] has dtype \w+; expected float32, bfloat16 or float16"):
        st(params=(p.double(),), grads=(g.double(),))
    stats = torch.zeros(1, COLUMNS, dtype=torch.float64, device=DEVICE)
    tail = (1e-2, 0.1, 0.99, 1e-3, 0.0, False, 1.0, 0.0, False)
    bufs = [torch.zeros(4, device=DEVICE) for _ in range(3)]

    def up(bufs=bufs, stats=stats, steps=steps, v_sums=vs, grad_scale=None, found_inf=None,
           lr_tensor=None):
        ops.update([p], [g], segs, *bufs, v_sums, steps, stats, grad_scale, found_inf,
                   lr_tensor, *tail)

    with pytest.raises(RuntimeError, match="`exp_avg` is on cpu but the op runs on cuda"):
        up(bufs=(bufs[0].cpu(), *bufs[1:]))
    with pytest.raises(RuntimeError, match="`beta1_prod` is on cpu but the op runs on cuda"):
        up(bufs=(*bufs[:2], bufs[2].cpu()))
    with pytest.raises(RuntimeError, match="`steps` is on cpu but the op runs on cuda"):
        up(steps=steps.cpu())
    with pytest.raises(RuntimeError, match="`stats` must be a CUDA tensor"):
        up(stats=stats.cpu())
    with pytest.raises(RuntimeError, match="`stats` must be a 2-D float64 tensor with 7"):
        up(stats=stats.float())
    with pytest.raises(RuntimeError, match="`stats` must be a 2-D float64 tensor with 7"):
        up(stats=stats[0])
    with pytest.raises(RuntimeError, match="`stats` must be a 2-D float64 tensor with 7"):
        up(stats=stats[:, :6])
    with pytest.raises(RuntimeError, match="found_inf` must be a float32 tensor of one"):
        up(found_inf=torch.ones(2, device=DEVICE))
    with pytest.raises(RuntimeError, match="found_inf` is on cpu"):
        up(found_inf=one.cpu())
    with pytest.raises(RuntimeError, match="lr_tensor` must be a float32 tensor of one"):
        up(lr_tensor=vs[0])
    with pytest.raises(RuntimeError, match="grad_scale` must be a float32 tensor of one"):
        up(grad_scale=one.half())
    with pytest.raises(RuntimeError, match="`exp_avg_sq` must be a CUDA tensor"):
        ops.v_sum(bufs[1].cpu(), segs, vs)
    with pytest.raises(RuntimeError, match="`v_sums` is on cpu but the op runs on cuda"):
        ops.v_sum(bufs[1], segs, vs.cpu())


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


# More tensors than threads in a block (the last block loops over them); smaller when
# emulated.
MANY = [((100,), "c", 0)] * 300 if EMU else [((4096,), "c", 0)] * 1000


def test_many_tensors_match_oracle():
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=6, shapes=MANY)
    for step in range(2):
        grads = make_grads(bk.params, gen)
        grads_before = [g.clone() for g in grads]
        snap = bk.snapshot()
        control = dict(max_grad_norm=math.sqrt(bk.numel) / 4) if step == 1 else {}  # clips
        stats = op_step(bk, grads, hp, **control)
        check_against_oracle(bk, grads_before, grads, stats,
                             oracle_step(snap, grads, hp, **control), f"{len(MANY)} tensors, step {step}")


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
            ops.v_sum(bk.exp_avg_sq, bk.segments, bk.v_sum_vec)
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
    """A run restored from a state dict (v_sums recomputed by adai::v_sum) continues exactly
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
    assert math.isclose(bk.v_sum(0), v_total, rel_tol=1e-5)
    assert math.isclose(bk.v_sum(1), float(bk.v[1].double().sum()), rel_tol=1e-6)
    assert bk.step_list() == [1.0, 1.0]
