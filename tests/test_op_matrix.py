"""The op matrix: stats / update / v_sum (docs/design.md "Native op schemas") against the
float64 oracle (tests/oracle.py), on every op_target: the CPU kernel (adai::) and Triton under
its interpreter (adai_triton::) here; the CUDA kernels on a GPU (adai::) and emulated
(adai_emu::) in tests/test_cuda_gpu.py, which collects these tests for them. States are a
bucket's flat buffers plus `segments` (op_fixtures.Bucket: the optimizer's layout,
misaligned, or scrambled with spare slots); nothing outside a call's segments and slots may be
written, and the caller's gradients never are.

A case limited with `op_targets` runs where it is affordable: the interpreter costs ~0.1 s
per tensor and launch, the emulator runs every GPU thread as a fiber. Each op_target keeps at
least the cases it had before the matrix was shared; the CPU kernel runs nearly all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from cases import DTYPES
from op_fixtures import (EXTRA, F64, HYPER, STATES, U32, U_SEG, U_V, U_V_SUMS, Bucket,
                         assert_outside_untouched, assert_unchanged, assert_within, bits,
                         check_row, check_step, l2_of, lr_for, make_bucket, make_grads,
                         make_param, op_step, oracle_input, run_step, same_bits, sample_args,
                         scalar, seed_of, stats_op, step_and_check, update_op)
from oracle import A, B, BGG, BGT, BTT, COLUMNS, GN, N, oracle_step

OP_TARGETS = ("cpu", "triton")
COMPILED = ("cpu", "emu", "cuda")  # cheap per tensor: the full matrices


def on(*targets):
    return pytest.mark.op_targets(*targets)


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- steps against the oracle ----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """How a case steps: `steps` steps of fresh gradients (`spread`: see make_grads), another
    bucket's row (EXTRA) in the matrix at the steps `extra_at`, a second bucket (float32, 300
    elements) stepping along when `other`, states `start` ("fresh" or "mid"), learning rate
    `lr` (by dtype when None)."""

    name: str
    steps: int
    extra_at: tuple = ()
    other: bool = False
    start: str = "fresh"
    spread: bool = False
    lr: float | None = None


CUDA_RUN = Run("fresh3", 3, extra_at=(1,))                           # the CUDA kernels' matrix
# the CPU kernel's float64 path: no float32 bucket beside it (its float32 v would move vbar
# by more than float64's tolerance)
F64_RUN = Run("f64_4", 4, extra_at=(1,), spread=True, lr=0.1)
F64_MID = Run("f64_mid2", 2, extra_at=(0,), start="mid", lr=0.05)
CONTROL_RUN = Run("fresh2", 2)
CPU_RUN = Run("two4", 4, other=True, spread=True, lr=0.1)           # the CPU kernel's
TRITON_RUN = Run("mid2", 2, extra_at=(0, 1), start="mid", lr=0.05)  # the interpreter's
TRITON_FRESH = Run("fresh2", 2, lr=0.05)

CONTROLS = {  # clip: max_grad_norm relative to the step's gradient norm
    None: {},
    "grad_scale": dict(grad_scale=3000.0),
    "scaled": dict(grad_scale=3.0),  # not a power of two: one more rounding of g
    "clip": dict(clip=0.1),
    "clip_quarter": dict(clip=0.25),
    "clip_inactive": dict(clip=1e4),
    "clip_twice": dict(clip=2.0),
    "clip_scaled": dict(clip=0.1, grad_scale=3.0),
    "clip_half_scaled": dict(clip=0.5, grad_scale=3.0),
    "clip_scale_extra": dict(grad_scale=0.37, clip=0.28, extra=True),
    "lr_tensor": dict(lr_tensor=True),
    "found_inf_zero": dict(found_inf=0.0, skip_nonfinite=True),
}


def cases(targets, run, dtypes, pairs, states):
    """Parameters (dtype, hyper, control, states, run) for every dtype, (hyper, control) pair
    and states layout, run only on `targets`."""
    return [pytest.param(dtype, h, c, s, run, id="-".join(
        x for x in (_name(dtype), h, c, s, run.name) if x), marks=on(*targets))
        for dtype in dtypes for h, c in pairs for s in states]


def grid(hypers, controls=(None,)):
    return [(h, c) for h in hypers for c in controls]


def run_case(op_target, dtype, hyper, control, states, run):
    """Steps a bucket of the op_target's tensors (and the second bucket) through the ops and the
    oracle, checking every step (op_fixtures.check_step) and that clipping is active exactly
    when the case means it to be."""
    ctl = CONTROLS[control]
    hp = dict(HYPER[hyper], lr=run.lr or lr_for(dtype))
    seed = seed_of(dtype, hyper, control, states, run.name)
    bk, gen = make_bucket(op_target, dtype, seed, states=states, start=run.start)
    buckets = [bk]
    if run.other:
        buckets.append(make_bucket(op_target, torch.float32, seed + 1, shapes=[((300,), "c", 0)],
                                   states=states, start=run.start)[0])
    scale = ctl.get("grad_scale")
    for step in range(run.steps):
        grads = [make_grads(b.params, gen, spread=run.spread) for b in buckets]
        if scale is not None:  # as GradScaler's backward makes them
            grads = [[(g.float() * scale).to(g.dtype) for g in gs] for gs in grads]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for gs in grads
                             for g in gs)) / (scale or 1.0)
        extra = [EXTRA] if step in run.extra_at or ctl.get("extra") else []
        _, expected = step_and_check(
            op_target, list(zip(buckets, grads)), hp, extra, grad_scale=scale,
            found_inf=ctl.get("found_inf"), lr_tensor=hp["lr"] if ctl.get("lr_tensor") else None,
            max_grad_norm=ctl["clip"] * norm if "clip" in ctl else 0.0,
            skip_nonfinite=ctl.get("skip_nonfinite", False), what=f"step {step}")
        if "clip" in ctl:
            if ctl["clip"] < 1.0:
                assert expected["clip"] <= ctl["clip"], expected["clip"]  # the test clips
            else:
                assert expected["clip"] == 1.0, expected["clip"]


MATCH_CASES = (
    cases(COMPILED, CUDA_RUN, DTYPES, grid(("coupled", "decoupled_d0.5", "plain")),
          ("shuffled", "shuffled_misaligned"))
    + cases(("cpu",), CPU_RUN, DTYPES,
            grid(("plain", "coupled", "decoupled", "v2", "v2_l2", "v2_d0")), ("aligned",))
    + cases(("cpu",), CPU_RUN, DTYPES, grid(("plain", "v2_l2")), ("misaligned",))
    + cases(("cpu", "triton"), TRITON_RUN, DTYPES,
            grid(("coupled", "v2_l2", "decoupled", "decoupled_d0.5")), ("aligned",))
    + cases(("cpu", "triton"), TRITON_RUN, DTYPES, grid(("v2_l2",)), ("misaligned", "shuffled"))
    + cases(("cpu", "triton"), TRITON_FRESH, DTYPES, grid(("plain",)), ("aligned",))
    + cases(("cpu",), F64_RUN, (F64,),
            grid(("plain", "coupled", "decoupled", "v2", "v2_l2", "v2_d0")),
            ("aligned", "shuffled_misaligned"))
    + cases(("cpu",), F64_MID, (F64,), grid(("coupled", "decoupled_d0.5")), ("shuffled",)))


@pytest.mark.parametrize("dtype, hyper, control, states, run", MATCH_CASES)
def test_ops_match_oracle(op_target, dtype, hyper, control, states, run):
    """Both ops against the oracle step after step: L2 and decoupled decay, AdaiV2's
    dampening (0.5 and 0), fresh and mid-training states (tensors at different steps), with
    other buckets' rows or a second bucket in the same step."""
    run_case(op_target, dtype, hyper, control, states, run)


CONTROL_CASES = (
    cases(COMPILED, CONTROL_RUN, DTYPES,
          grid(("coupled", "decoupled_d0.5", "plain"),
               ("grad_scale", "clip", "clip_inactive", "clip_scale_extra", "lr_tensor",
                "found_inf_zero")), ("shuffled",))
    + cases(("cpu",), CPU_RUN, DTYPES,
            [("plain", "scaled"), ("plain", "clip"), ("coupled", "clip"),
             ("v2_l2", "clip_scaled"), ("plain", "clip_inactive"), ("coupled", "clip_inactive")],
            ("aligned",))
    + cases(("cpu",), CPU_RUN, DTYPES, [("v2_l2", "clip_scaled")], ("misaligned",))
    + cases(("cpu", "triton"), TRITON_RUN, (torch.float32,),
            grid(("plain", "coupled"), ("clip_quarter", "clip_twice"))
            + [("v2_l2", "clip_half_scaled")], ("aligned",))
    + cases(("cpu", "triton"), TRITON_RUN, (torch.float32, torch.float16),
            [("coupled", "scaled")], ("aligned",))
    + cases(("cpu",), F64_RUN, (F64,),
            grid(("plain", "coupled"), ("grad_scale", "clip", "clip_scale_extra", "lr_tensor",
                                        "found_inf_zero")), ("shuffled",)))


@pytest.mark.parametrize("dtype, hyper, control, states, run", CONTROL_CASES)
def test_ops_with_controls_match_oracle(op_target, dtype, hyper, control, states, run):
    """grad_scale (gradients scaled by it, unscaled in both ops), clipping (active and not,
    with and without L2 decay, with another bucket's row), lr from a tensor, found_inf = 0."""
    run_case(op_target, dtype, hyper, control, states, run)


@pytest.mark.op_targets(*COMPILED)
def test_many_tensors_match_oracle(op_target):
    """More tensors than threads in a CUDA block (the last block loops over them)."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(op_target, torch.float32, seed=6, shapes=op_target.many)
    for step in range(2):
        mgn = math.sqrt(bk.numel) / 4 if step == 1 else 0.0  # clips
        step_and_check(op_target, [(bk, make_grads(bk.params, gen))], hp, max_grad_norm=mgn,
                       what=f"{len(bk.params)} tensors, step {step}")


def test_a_subset_of_the_bucket(op_target):
    """The optimizer passes the tensors of a bucket that have gradients: a call over some of
    them (their segments and slots, in another order, an empty one among them) steps exactly
    those, every element of their states, and leaves every other tensor's states, step and
    v_sum bitwise as they were."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(op_target, torch.float32, seed=19, states="shuffled_misaligned",
                          start="mid")  # nonzero states everywhere, b in (0, 1)
    n = len(bk.params)
    chosen = [n - 5, 2, 5, 0, n - 1, 4]
    assert bk.params[0].numel() == 0
    sub = bk.select(chosen)
    rest = bk.select([i for i in range(n) if i not in chosen])
    for step in range(2):
        rest_snap = rest.snapshot()
        before = [t.clone() for t in (bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod)]
        step_and_check(op_target, [(sub, make_grads(sub.params, gen))], hp,
                       [EXTRA] if step else [], what=f"subset step {step}")
        # (the stepped tensors lie outside `rest`: checked above as outside `sub`)
        assert_unchanged(rest, rest_snap, f"the other tensors, step {step}", outside=False)
        for buf, old in zip((bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod), before):
            for o, k, _ in sub.segments.tolist():  # (later, beta1 = 0 may have left b at 0)
                assert step or (buf[o:o + k] != old[o:o + k]).all(), f"({o}, {k})"


def test_lagging_tensor_counts_its_own_step(op_target):
    """A tensor that skipped steps keeps its own (smaller) k and bias correction."""
    gen = torch.Generator().manual_seed(1)
    hp = dict(HYPER["plain"], lr=0.1)
    a = Bucket([make_param((100,), "c", torch.float32, gen, op_target.dev)], states="aligned")
    b = Bucket([make_param((50,), "c", torch.float32, gen, op_target.dev)], states="aligned")
    for _ in range(3):
        op_step(op_target, a, make_grads(a.params, gen, spread=True), hp)
    for step in range(2):
        pairs = [(x, make_grads(x.params, gen, spread=True)) for x in (a, b)]
        step_and_check(op_target, pairs, hp, what=f"together, step {step}")
    assert a.step_list() == [5.0] and b.step_list() == [2.0]


# chunk edges of the CUDA kernels (the interpreter skips them: 33K elements are 2 s there)
_FAR_SHAPES = [((0,), "c", 0), ((1,), "c", 0), ((3,), "c", 0), ((4099,), "c", 0),
               ((16384,), "c", 0), ((16385,), "c", 0)]


@pytest.mark.parametrize("start", [2.0**24, 2.0**31 - 1, 2.0**40], ids=["2^24", "2^31-1", "2^40"])
def test_step_counters_are_exact_far_past_float32(op_target, start):
    """Step counters are float64: stats increments them exactly past 2^24 (where a float32
    counter stops) and 2^31, the step is the oracle's (bc2 = 1 - beta2^k in double), and a
    skipped update takes the increment back exactly."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    shapes = _FAR_SHAPES[:4] if op_target.interpreted else _FAR_SHAPES
    bk, gen = make_bucket(op_target, torch.float32, seed=23, shapes=shapes)
    bk.set_steps([start] * len(bk.params))
    step_and_check(op_target, [(bk, make_grads(bk.params, gen))], hp, what=f"from step {start}")
    assert bk.step_list() == [start + 1] * len(bk.params)
    snap = bk.snapshot()
    op_step(op_target, bk, make_grads(bk.params, gen), hp, found_inf=scalar(op_target, 1.0))
    assert_unchanged(bk, snap, f"skipped at step {start + 1}")


# ---- steps that change nothing, or exactly something -----------------------------------------


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
    "inf_scaled_skip_nonfinite": dict(bad=float("inf"), skip_nonfinite=True,
                                      grad_scale=2.0**16),
    "inf_other_bucket": dict(other_bad=float("inf"), skip_nonfinite=True),
}
_INTERPRETED_SKIPS = ("found_inf", "nan_skip_nonfinite", "inf_clip", "inf_scaled_skip_nonfinite")
SKIP_CASES = [
    pytest.param(dtype, hyper, skip, id=f"{_name(dtype)}-{hyper}-{skip}", marks=on(
        *(COMPILED if skip != "inf_scaled_skip_nonfinite" else ("cpu",)),
        *(("triton",) if dtype != torch.float16 and hyper == "coupled"
          and skip in _INTERPRETED_SKIPS else ())))
    for dtype in DTYPES for hyper in ("coupled", "decoupled_d0.5") for skip in SKIPS]


@pytest.mark.parametrize("dtype, hyper, skip", SKIP_CASES)
def test_skipped_step_changes_nothing(op_target, dtype, hyper, skip):
    """A skipped step (found_inf != 0, or a non-finite gradient norm with skip_nonfinite or
    clipping, also when the non-finite gradient is in another bucket's row) leaves params,
    states and v_sums of every bucket bitwise as they were and takes back the step increments
    stats made; the next step is a normal step from there."""
    sk = SKIPS[skip]
    hp = dict(HYPER[hyper], lr=lr_for(dtype))
    bk, gen = make_bucket(op_target, dtype, seed=14, start="mid")
    other, _ = make_bucket(op_target, dtype, seed=15, shapes=op_target.shapes[:4], start="mid")
    snap, other_snap = bk.snapshot(), other.snapshot()
    grads = make_grads(bk.params, gen)
    if "bad" in sk:
        grads = _poison(grads, sk["bad"])
    grads_before = [g.clone() for g in grads]
    scale = scalar(op_target, sk.get("grad_scale"))
    control = dict(max_grad_norm=sk.get("max_grad_norm", 0.0),
                   skip_nonfinite=sk.get("skip_nonfinite", False),
                   found_inf=scalar(op_target, sk.get("found_inf")))

    stats = torch.zeros(2, COLUMNS, dtype=F64, device=op_target.dev)
    other_grads = make_grads(other.params, gen)
    if "other_bad" in sk:
        other_grads = _poison(other_grads, sk["other_bad"])
    stats_op(op_target, other, other_grads, hp, stats[1])
    stats_op(op_target, bk, grads, hp, stats[0], grad_scale=scale)
    assert bk.step_list() == [k + 1 for k in snap["steps"]]  # stats incremented them
    if "found_inf" in sk:
        assert torch.isfinite(stats).all()  # stats ran as usual; update decides
    update_op(op_target, bk, grads, hp, stats, grad_scale=scale, **control)
    update_op(op_target, other, other_grads, hp, stats, **control)

    assert_unchanged(bk, snap, f"{dtype} {hyper} {skip}")
    assert_unchanged(other, other_snap, f"{dtype} {hyper} {skip}: the other bucket")
    for g, g0 in zip(grads, grads_before):
        assert same_bits(g, g0), "a gradient was written"
    if "bad" in sk or "other_bad" in sk:
        assert not math.isfinite(stats[:, GN].sum().item())
    # The step after the skipped one is a normal step from the unchanged state.
    step_and_check(op_target, [(bk, make_grads(bk.params, gen))], hp,
                   what=f"{dtype} {hyper} after {skip}")


@pytest.mark.parametrize("dampening", [1.0, 0.5])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_nonfinite_gradient_without_skip(op_target, bad, dampening):
    """Neither skip_nonfinite nor clipping: nothing is skipped; exactly the elements with a
    non-finite gradient become NaN (their v NaN or inf), every other element of every bucket
    steps with vhat / vbar := 0 (vbar is not finite): beta1 = 1 - eps, beta3 = eps^d."""
    hp = dict(HYPER["plain"], dampening=dampening, lr=1e-2)
    eps = hp["eps"]
    a, gen = make_bucket(op_target, torch.float32, seed=16, start="mid")
    b, _ = make_bucket(op_target, torch.bfloat16, seed=10, shapes=op_target.shapes[:4], start="mid")
    pairs = [(a, _poison(make_grads(a.params, gen, spread=True), bad)),
             (b, make_grads(b.params, gen, spread=True))]
    snaps = [a.snapshot(), b.snapshot()]
    rows = run_step(op_target, pairs, hp)
    assert not math.isfinite(rows[:, GN].sum().item())
    assert not torch.isfinite(a.params[3]).all()
    for (bk, grads), snap in zip(pairs, snaps):
        assert bk.step_list() == [k + 1 for k in snap["steps"]]
        assert_outside_untouched(bk, snap["outside"])
        for i, g in enumerate(grads):
            where = f"{bk.params[i].dtype} tensor {i}"
            nonfinite = ~torch.isfinite(g)
            assert torch.equal(torch.isnan(bk.params[i]), nonfinite), where
            assert torch.equal(torch.isnan(bk.v[i]) | torch.isinf(bk.v[i]), nonfinite), where
            # finite elements: float(1 - eps) is 2^-24 from the real value, so beta3 is within
            # d 2^-24 / eps relative, plus pow's error
            ok = ~nonfinite
            beta3 = eps ** dampening
            m_old = snap["m"][i].double()
            m = (1.0 - eps) * m_old + beta3 * g.double()
            tol = 4 * U32 * m_old.abs() + (dampening * U32 / eps + 12 * U32) * beta3 * (
                g.double().abs())
            assert_within((bk.m[i].double() - m)[ok], tol[ok], f"{where}: m")
            if not nonfinite.any():
                assert torch.isfinite(bk.params[i]).all() and torch.isfinite(bk.m[i]).all()
                torch.testing.assert_close(bk.b[i].double(), snap["b"][i].double() * (1 - eps),
                                           rtol=1.3e-6, atol=1e-5)
                if bk.params[i].numel() and bk.params[i].dtype == torch.float32:  # moved
                    assert not torch.equal(bk.params[i], snap["params"][i]), where


def test_nonfinite_param_without_l2_does_not_reach_the_state(op_target):
    """Without L2 decay the kernels never compute l2 * theta: an inf parameter stays
    non-finite (inf, or NaN from the decoupled-decay term 0 * inf) but its v, m, b and v_sum
    (and every other tensor) stay finite."""
    hp = dict(HYPER["plain"], lr=1e-2)
    bk, gen = make_bucket(op_target, torch.float32, seed=17)
    bk.params[3].view(-1)[7] = float("inf")
    for _ in range(2):
        stats = op_step(op_target, bk, make_grads(bk.params, gen), hp)
        assert math.isfinite(stats[0].sum().item())
    for i in range(len(bk.params)):
        for t in (bk.v[i], bk.m[i], bk.b[i]):
            assert torch.isfinite(t).all(), i
    assert all(math.isfinite(x) for x in bk.v_sum_list())
    assert not torch.isfinite(bk.params[3].view(-1)[7])
    assert torch.isfinite(bk.params[3].view(-1)[8:]).all()


def test_params_not_read_by_stats_without_l2(op_target):
    """stats reads params only for L2 decay (l2 as the kernels' float: 1e-50 is 0): NaN params
    do not reach its row then. A step with L2 does not write the gradients."""
    bk, gen = make_bucket(op_target, torch.float32, seed=3, states="aligned")
    grads = make_grads(bk.params, gen, spread=True)
    grads_before = [g.clone() for g in grads]
    saved = [p.clone() for p in bk.params]
    for p in bk.params:
        p.fill_(float("nan"))
    for l2 in (0.0, 1e-50):
        out = torch.zeros(COLUMNS, dtype=F64, device=op_target.dev)
        hp = dict(HYPER["coupled"], weight_decay=l2)
        stats_op(op_target, bk, grads, hp, out)
        assert torch.isfinite(out).all() and out[B] > 0 and out[BGT] == 0 and out[BTT] == 0
        assert out[B] == out[BGG]
    for p, s in zip(bk.params, saved):
        p.copy_(s)
    op_step(op_target, bk, grads, dict(HYPER["coupled"], lr=0.1))
    for g, g0 in zip(grads, grads_before):
        assert same_bits(g, g0)


@pytest.mark.parametrize("dampening", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [pytest.param(d, id=_name(d), marks=on(*COMPILED, *(
    ("triton",) if d == torch.float32 else ()))) for d in DTYPES])
def test_zero_gradients_leave_params_unchanged(op_target, dtype, dampening):
    """vbar == 0: vhat / vbar := 0, beta1 = 1 - eps (b is its float32 power), m and v stay 0,
    theta does not move, v_sums are 0."""
    hp = dict(HYPER["plain"], dampening=dampening, lr=lr_for(dtype))
    bk, _ = make_bucket(op_target, dtype, seed=2)
    before = [p.clone() for p in bk.params]
    beta1 = torch.tensor(1.0 - hp["eps"], dtype=torch.float32)
    for step in (1, 2):
        stats = op_step(op_target, bk, [torch.zeros_like(p) for p in bk.params], hp)
        assert stats[0].tolist() == [0.0] * 6 + [float(bk.numel)]
        b = beta1 if step == 1 else beta1 * beta1
        for p, p0, m, v, bb in zip(bk.params, before, bk.m, bk.v, bk.b):
            assert torch.equal(p, p0)
            assert torch.count_nonzero(m) == 0 and torch.count_nonzero(v) == 0
            assert torch.all(bb.cpu() == b), step
        assert bk.step_list() == [float(step)] * len(bk.params)
        assert bk.v_sum_list() == [0.0] * len(bk.params)


# ---- steps that must be bitwise alike ---------------------------------------------------------


POW2_CONFIGS = {"coupled": ("coupled", 0.0), "plain": ("plain", 0.0), "v2_l2": ("v2_l2", 0.0),
                "clip_l2": ("coupled", 1.0)}


@pytest.mark.parametrize("dtype, config", [
    pytest.param(d, c, id=f"{_name(d)}-{c}", marks=on(
        *(COMPILED if c in ("coupled", "plain") else ("cpu",)),
        *(("triton",) if c == "coupled" and d != torch.bfloat16 else ())))
    for d in DTYPES for c in POW2_CONFIGS])
def test_power_of_two_grad_scale_is_bitwise_unscaled(op_target, dtype, config):
    """Gradients scaled by 2^10 with grad_scale = 2^10 step bitwise like the unscaled ones
    (float(1 / 1024.0) is exact), stats rows included, with and without clipping and L2; the
    caller's (scaled) gradients are not unscaled in place."""
    hyper, mgn = POW2_CONFIGS[config]
    hp = dict(HYPER[hyper], lr=1e-2)
    plain, gen = make_bucket(op_target, dtype, seed=12, start="mid")
    scaled = plain.clone()
    for _ in range(2):
        grads = make_grads(plain.params, gen)
        big = [(g * 1024).to(dtype) for g in grads]
        big_before = [g.clone() for g in big]
        rows_plain = op_step(op_target, plain, grads, hp, max_grad_norm=mgn)
        rows_scaled = op_step(op_target, scaled, big, hp, grad_scale=scalar(op_target, 1024.0),
                              max_grad_norm=mgn)
        assert torch.equal(rows_plain, rows_scaled)
        assert all(same_bits(g, g0) for g, g0 in zip(big, big_before))
    for i, (x, y) in enumerate(zip(plain.tensors(), scaled.tensors())):
        assert same_bits(x, y), f"output tensor {i}"


@pytest.mark.parametrize("hyper", [
    pytest.param(h, marks=on(*(COMPILED if h != "decoupled" else ("cpu",)),
                             *(("triton",) if h != "decoupled_d0.5" else ())))
    for h in ("coupled", "decoupled_d0.5", "decoupled")])
def test_lr_tensor_is_read_on_the_device(op_target, hyper):
    """lr_tensor (the float lr is then ignored) steps bitwise like the same float lr (2^-7 and
    2^-6: exact in float32), also after the tensor changed in place between steps."""
    hp = dict(HYPER[hyper], lr=2.0**-7)
    a, gen = make_bucket(op_target, torch.float32, seed=13, start="mid")
    b = a.clone()
    lr = scalar(op_target, hp["lr"])
    steps = 2 if op_target.interpreted else 3
    for step in range(steps):
        if step == steps - 1:
            hp["lr"] = 2.0**-6
            lr.fill_(hp["lr"])
        grads = make_grads(a.params, gen)
        op_step(op_target, a, grads, hp)
        op_step(op_target, b, grads, hp, lr_tensor=lr, lr=1e9)
    for i, (x, y) in enumerate(zip(a.tensors(), b.tensors())):
        assert same_bits(x, y), f"output tensor {i}"


def test_found_inf_zero_steps_like_none(op_target):
    hp = dict(HYPER["plain"], lr=1e-2)
    a, gen = make_bucket(op_target, torch.float32, seed=60, start="mid")
    b = a.clone()
    grads = make_grads(a.params, gen)
    op_step(op_target, a, grads, hp)
    op_step(op_target, b, grads, hp, found_inf=scalar(op_target, 0.0))
    for i, (x, y) in enumerate(zip(a.tensors(), b.tensors())):
        assert same_bits(x, y), f"output tensor {i}"


def test_stats_rows_may_be_strided(op_target):
    """`out` may be a strided row (a column of a column-major matrix: only that column is
    written); update reads a non-contiguous stats matrix as the contiguous one, and the step
    is the oracle's."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    a, gen = make_bucket(op_target, torch.float32, seed=18, shapes=op_target.shapes[:6])
    b = a.clone()
    grads = make_grads(a.params, gen)
    snap = a.snapshot()
    rows = torch.zeros(2, COLUMNS, dtype=F64, device=op_target.dev)
    rows[1] = torch.tensor(EXTRA, dtype=F64)
    cols = torch.full((COLUMNS, 3), -2.0, dtype=F64, device=op_target.dev)
    cols[:, 1] = torch.tensor(EXTRA, dtype=F64)
    stats_op(op_target, a, grads, hp, rows[0])
    stats_op(op_target, b, grads, hp, cols[:, 0])
    assert torch.equal(rows, cols[:, :2].t())
    assert (cols[:, 2] == -2.0).all()  # only its column
    # the expansion: B = Bgg + Bgt + Btt up to rounding
    torch.testing.assert_close(cols[B, 0], cols[BGG:BTT + 1, 0].sum(), rtol=1e-6, atol=0)
    assert not cols[:, :2].t().is_contiguous()
    update_op(op_target, a, grads, hp, rows)
    update_op(op_target, b, grads, hp, cols[:, :2].t())
    for i, (x, y) in enumerate(zip(a.tensors(), b.tensors())):
        assert same_bits(x, y), f"output tensor {i}"
    expected = oracle_step([oracle_input(snap, grads, hp)], [EXTRA])
    check_step(op_target, [(a, grads)], [snap], [grads], rows, expected, hp)


LAYOUT_CONFIGS = {  # (hyper, grad_scale, max_grad_norm)
    "adai": ("plain", None, 0.0), "l2": ("coupled", None, 0.0),
    "decoupled": ("decoupled", None, 0.0), "v2": ("v2", None, 0.0),
    "v2_l2": ("v2_l2", None, 0.0), "v2_d0": ("v2_d0", None, 0.0),
    "scaled": ("plain", 3.0, 0.0),
    # clipping (max_grad_norm = 1 is far below these gradients' norm), and on but inactive
    "clip": ("plain", None, 1.0), "clip_l2": ("coupled", None, 1.0),
    "clip_v2_l2_scaled": ("v2_l2", 3.0, 1.0),
    "clip_off": ("plain", None, 1e6), "clip_off_l2": ("coupled", None, 1e6),
}


@pytest.mark.op_targets("cpu", "triton")
@pytest.mark.parametrize("dtype, config", [
    pytest.param(d, c, id=f"{_name(d)}-{c}", marks=on(
        "cpu", *(("triton",) if d == torch.float32 and c == "decoupled" else ())))
    for d in DTYPES for c in LAYOUT_CONFIGS])
def test_state_layouts_step_alike(op_target, dtype, config):
    """Where a tensor's states sit in the buffers changes nothing: the four layouts (aligned,
    misaligned, scrambled with spare slots) step bitwise alike, rows included, and nothing
    outside a segment or slot is written."""
    hyper, scale, mgn = LAYOUT_CONFIGS[config]
    hp = dict(HYPER[hyper], lr=0.1)
    base, gen = make_bucket(op_target, dtype, seed_of("placement", dtype, config), states="aligned")
    buckets = [base] + [Bucket([p.clone() for p in base.params], states=s) for s in STATES[1:]]
    assert all(o % 4 for o in buckets[1].offsets)
    for _ in range(2 if op_target.interpreted else 3):
        grads = make_grads(base.params, gen, spread=True)
        if scale is not None:
            grads = [(g.float() * scale).to(dtype) for g in grads]
        snaps = [bk.snapshot() for bk in buckets]
        rows = [op_step(op_target, bk, grads, hp, grad_scale=scalar(op_target, scale),
                        max_grad_norm=mgn) for bk in buckets]
        for bk, r, snap in zip(buckets[1:], rows[1:], snaps[1:]):
            assert torch.equal(rows[0], r)
            for name in ("params", "m", "v", "b"):
                for x, y in zip(getattr(base, name), getattr(bk, name)):
                    assert same_bits(x, y), name
            assert base.step_list() == bk.step_list()
            assert base.v_sum_list() == bk.v_sum_list()
            assert_outside_untouched(bk, snap["outside"])


def run_steps(op_target, dtype, seed, hyper, control=None, stream=None):
    """Everything a few steps of one bucket write (tensors and rows), for comparing runs."""
    hp = dict(HYPER[hyper], lr=1e-2)
    bk, gen = make_bucket(op_target, dtype, seed)
    outs = []
    ctl = (dict(grad_scale=scalar(op_target, 3.0), max_grad_norm=100.0)
           if control == "scaled_clipped" else {})
    for _ in range(2 if op_target.interpreted else 3):
        grads = make_grads(bk.params, gen)
        if stream is None:
            outs.append(op_step(op_target, bk, grads, hp, **ctl).clone())
        else:
            with torch.cuda.stream(stream):
                outs.append(op_step(op_target, bk, grads, hp, **ctl).clone())
            torch.cuda.current_stream().wait_stream(stream)
    return bk.tensors() + outs


@pytest.mark.parametrize("dtype, hyper, control", [
    pytest.param(d, "coupled", c, id=f"{_name(d)}-coupled-{c}", marks=on(*COMPILED, *(
        ("triton",) if d == torch.bfloat16 and c == "scaled_clipped" else ())))
    for d in DTYPES for c in ("plain", "scaled_clipped")] + [
    pytest.param(torch.float32, "decoupled_d0.5", "scaled_clipped",
                 id="float32-decoupled_d0.5-scaled_clipped", marks=on("cpu", "triton"))])
def test_bitwise_deterministic(op_target, dtype, hyper, control):
    a = run_steps(op_target, dtype, 3, hyper, control)
    b = run_steps(op_target, dtype, 3, hyper, control)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert same_bits(x, y), f"run-to-run difference in output tensor {i}"


def _relocated(v_views, shift, device):
    """The tensors `v_views` copied into a fresh flat buffer, each at `shift` elements past a
    multiple of 16 (shift 0: 16-byte aligned), with their strides; slots in order."""
    offsets, cursor = [], 0
    for v in v_views:
        offsets.append(cursor + shift)
        cursor = (cursor + shift + v.numel() + 15) // 16 * 16
    buf = torch.full((cursor,), float("nan"), dtype=torch.float32, device=device)
    for v, o in zip(v_views, offsets):
        buf.as_strided(v.shape, v.stride(), o).copy_(v)
    segments = torch.tensor([(o, v.numel(), i) for i, (v, o) in enumerate(zip(v_views, offsets))],
                            dtype=torch.int64).reshape(-1, 3)
    return buf, segments, list(range(len(v_views)))


V_SUM_CASES = (
    [pytest.param(d, s, id=f"{_name(d)}-{s}", marks=on(*COMPILED))
     for d in DTYPES for s in ("shuffled", "shuffled_misaligned")]
    + [pytest.param(d, s, id=f"{_name(d)}-{s}", marks=on("cpu", *(
        ("triton",) if d == torch.float32 else ()))) for d in DTYPES
       for s in ("aligned", "misaligned")]
    + [pytest.param(torch.float32, "shuffled", id="float32-shuffled-interpreted",
                    marks=on("triton"))])


@pytest.mark.parametrize("dtype, states", V_SUM_CASES)
def test_v_sum_reproduces_update_bitwise(op_target, dtype, states):
    """v_sum (run when state is loaded) gives bitwise update's v_sums, so a restored run
    continues bitwise: on the bucket's own buffer, on copies of v at 16-byte aligned and at
    misaligned offsets, and on a subset of the rows in another order (only their slots are
    written); the sums are the sums of v."""
    bk, gen = make_bucket(op_target, dtype, seed=5, states=states)
    hp = dict(HYPER["coupled"], lr=1e-2)
    for _ in range(1 if op_target.interpreted else 2):
        op_step(op_target, bk, make_grads(bk.params, gen), hp, grad_scale=scalar(op_target, 7.0),
                max_grad_norm=200.0)
    expected = bk.v_sum_vec[bk.slot_index()]
    for i, v in enumerate(bk.v):
        assert math.isclose(expected[i].item(), v.double().sum().item(),
                            rel_tol=op_target.tol.v_sum_own, abs_tol=1e-30), i
    n = len(bk.v)
    layouts = {"own": (bk.exp_avg_sq, bk.segments, bk.slots),
               "aligned copy": _relocated(bk.v, 0, op_target.dev),
               "misaligned copy": _relocated(bk.v, 3, op_target.dev)}
    for what, (buf, segments, slots) in layouts.items():
        before = bits(buf).clone()
        out = torch.full((max(slots, default=-1) + 2,), float("nan"), dtype=F64,
                         device=op_target.dev)
        op_target.ops.v_sum(buf, segments, out)
        idx = torch.tensor(slots, dtype=torch.int64, device=op_target.dev)
        assert same_bits(out[idx], expected), (what, (out[idx] - expected).abs().max())
        assert math.isnan(out[-1].item()), f"{what}: an unused slot was written"
        assert torch.equal(bits(buf), before), f"{what}: exp_avg_sq was written"
    rows = list(range(0, n, 2))[::-1]
    out = torch.full((bk.n_slots,), float("nan"), dtype=F64, device=op_target.dev)
    op_target.ops.v_sum(bk.exp_avg_sq, bk.segments[rows], out)
    for i in range(n):
        got = out[bk.slots[i]]
        if i in rows:
            assert same_bits(got, expected[i]), i
        else:
            assert math.isnan(got.item()), f"tensor {i} is not in the call but its slot was written"


def test_stats_row_columns(op_target):
    """The row's columns as design.md defines them (the oracle's), with L2 and a gradient
    scale, over tensors with different step counts and v_sums."""
    gen = torch.Generator().manual_seed(12)
    bk = Bucket([make_param((n,), "c", torch.float32, gen, op_target.dev) for n in (5, 100, 40000)],
                states="aligned")
    grads = make_grads(bk.params, gen, spread=True)
    bk.set_steps([0.0, 3.0, 10.0])
    bk.set_v_sums([0.5, 2.0, 30.0])
    hp = dict(HYPER["coupled"], weight_decay=0.03, lr=0.1)
    snap = bk.snapshot()
    out = torch.zeros(COLUMNS, dtype=F64, device=op_target.dev)
    stats_op(op_target, bk, grads, hp, out, grad_scale=scalar(op_target, 3.0))
    assert bk.step_list() == [1.0, 4.0, 11.0]
    expected = oracle_step([oracle_input(snap, grads, hp)], grad_scale=3.0)
    check_row(op_target.tol, out, expected["rows"][0], expected["abs_rows"][0], l2_of(hp))
    torch.testing.assert_close(out.cpu(), torch.tensor(expected["rows"][0], dtype=F64),
                               rtol=1e-5, atol=1e-9)
    assert out[N].item() == 40105


def test_stats_v_sums_linearity(op_target):
    """stats uses V_i = v_sums[i] instead of reading exp_avg_sq: feeding a V_i changes column
    A by beta2 * V_i / bc2, and nothing else."""
    gen = torch.Generator().manual_seed(5)
    b1 = Bucket([make_param((1000,), "c", torch.float32, gen, op_target.dev)], states="aligned")
    grads = make_grads(b1.params, gen, spread=True)
    b2 = b1.clone()
    b2.v_sum_vec.fill_(123.0)
    o1, o2 = (torch.zeros(COLUMNS, dtype=F64, device=op_target.dev) for _ in range(2))
    for b, o in ((b1, o1), (b2, o2)):
        stats_op(op_target, b, grads, HYPER["plain"], o)
    torch.testing.assert_close(o2[A] - o1[A], torch.tensor(0.99 * 123.0 / (1 - 0.99), dtype=F64,
                                                           device=op_target.dev))
    assert torch.equal(o1[1:], o2[1:])


# ---- no tensors, empty and one-element ones --------------------------------------------------


def test_empty_lists(op_target):
    """No tensors: stats writes a zero row, update and v_sum do nothing; state buffers and
    slots that exist (a bucket whose tensors all sit out the step) are not touched."""
    ops, dev = op_target.ops, op_target.dev
    segments = torch.zeros(0, 3, dtype=torch.int64)
    for length, n_slots in ((0, 0), (40, 3)):
        bufs = [torch.full((length,), x, dtype=torch.float32, device=dev) for x in (1.0, 2.0, 3.0)]
        steps = torch.full((n_slots,), 5.0, dtype=F64, device=dev)
        v_sums = torch.full((n_slots,), 6.0, dtype=F64, device=dev)
        before = [t.clone() for t in (*bufs, steps, v_sums)]
        out = torch.full((COLUMNS,), float("nan"), dtype=F64, device=dev)
        ops.stats([], [], segments, steps, v_sums, None, 0.99, 0.0, out)
        assert out.tolist() == [0.0] * COLUMNS
        stats = torch.ones(1, COLUMNS, dtype=F64, device=dev)
        ops.update([], [], segments, *bufs, v_sums, steps, stats, None, None, None, 1e-2, 0.1,
                   0.99, 1e-3, 0.0, False, 1.0, 0.0, False)
        ops.update([], [], segments, *bufs, v_sums, steps, stats, scalar(op_target, 2.0),
                   scalar(op_target, 1.0), scalar(op_target, 1e-2), 0.0, 0.1, 0.99, 1e-3, 0.0,
                   False, 1.0, 1.0, True)
        ops.v_sum(bufs[1], segments, v_sums)
        for t, t0 in zip((*bufs, steps, v_sums), before):
            assert torch.equal(t, t0)


def test_all_tensors_empty(op_target):
    dev = op_target.dev
    bk = Bucket([torch.zeros(0, device=dev), torch.zeros(0, 3, device=dev)])
    grads = [torch.empty_like(p) for p in bk.params]
    outside = bk.outside()
    stats = op_step(op_target, bk, grads, dict(HYPER["coupled"], lr=1e-2))
    assert stats[0].tolist() == [0.0] * COLUMNS
    assert bk.step_list() == [1.0, 1.0]
    assert bk.v_sum_list() == [0.0, 0.0]
    # skipped: the increments are taken back
    op_step(op_target, bk, grads, dict(HYPER["coupled"], lr=1e-2), found_inf=scalar(op_target, 1.0))
    assert bk.step_list() == [1.0, 1.0]
    assert_outside_untouched(bk, outside)


def test_empty_and_one_element_tensors_at_buffer_ends(op_target):
    """An empty tensor's span may start at the buffers' end or inside another span; a
    one-element tensor may fill a buffer of one element."""
    ops, dev = op_target.ops, op_target.dev
    p, g = torch.ones(1, device=dev), torch.full((1,), 0.5, device=dev)
    e = torch.zeros(0, device=dev)
    seg = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.int64)
    m, v, b = (torch.full((1,), x, device=dev) for x in (0.0, 0.0, 1.0))
    steps, vs = (torch.zeros(2, dtype=F64, device=dev) for _ in range(2))
    row = torch.zeros(1, COLUMNS, dtype=F64, device=dev)
    ops.stats([p, e], [g, e], seg, steps, vs, None, 0.99, 0.0, row[0])
    ops.update([p, e], [g, e], seg, m, v, b, vs, steps, row, None, None, None, 0.1, 0.1, 0.99,
               1e-3, 0.0, False, 1.0, 0.0, False)
    assert steps.tolist() == [1.0, 1.0]
    assert vs[0].item() == 0.0 and vs[1].item() == pytest.approx(0.01 * 0.25, rel=1e-6)
    assert v.item() == pytest.approx(0.01 * 0.25, rel=1e-6) and p.item() < 1.0
    vs.fill_(-1.0)
    ops.v_sum(v, seg, vs)
    assert vs.tolist() == [0.0, v.item()]

    bk, gen = make_bucket(op_target, torch.float32, seed=6, states="aligned",
                          shapes=[((5,), "c", 0), ((0,), "c", 0), ((0, 3), "c", 0)])
    bk.segments[1, 0] = bk.exp_avg.numel()
    bk.segments[2, 0] = 3
    step_and_check(op_target, [(bk, make_grads(bk.params, gen))], dict(HYPER["coupled"], lr=0.05))
    ops.v_sum(bk.exp_avg_sq, bk.segments, bk.v_sum_vec)
    assert bk.v_sum_list()[1:] == [0.0, 0.0]


# ---- schemas and fake kernels ---------------------------------------------------------------

SAMPLES = {
    "fp32": dict(dtype=torch.float32),
    "bf16-scaled-misaligned": dict(dtype=torch.bfloat16, weight_decay=0.01, grad_scale=1024.0,
                                   found_inf=0.0, misaligned=True),
    "fp16-clip-lr_tensor": dict(dtype=torch.float16, weight_decay=0.01, decoupled=True,
                                dampening=0.5, lr_tensor=0.05, max_grad_norm=1.0,
                                skip_nonfinite=True),
    "fp32-found_inf": dict(dtype=torch.float32, weight_decay=0.01, grad_scale=3.0,
                           found_inf=1.0),  # skips
}
_INTERPRETED_OPCHECKS = {("stats", "fp32"), ("stats", "bf16-scaled-misaligned"),
                         ("update", "bf16-scaled-misaligned"), ("update", "fp16-clip-lr_tensor")}
OPCHECK_CASES = [pytest.param(op, name, id=f"{op}-{name}", marks=on(*COMPILED, *(
    ("triton",) if (op, name) in _INTERPRETED_OPCHECKS else ())))
    for op in ("stats", "update") for name in SAMPLES] + [
    pytest.param("v_sum", name, id=f"v_sum-{name}", marks=on(*COMPILED, *(
        ("triton",) if name == "fp32" else ()))) for name in ("fp32", "bf16-scaled-misaligned")]


@pytest.mark.parametrize("op, sample", OPCHECK_CASES)
def test_opcheck(op_target, op, sample):
    """torch.library.opcheck: the schema (aliasing, mutation), the fake kernel against the real
    one, and dispatch, of which each runs the op several times: the interpreter and the
    emulator get two tensors."""
    shapes = [((7,), "c", 0), ((3, 5), "t", 0)] if op_target.name in ("triton", "emu") else None
    kw = dict(SAMPLES[sample], **({"shapes": shapes} if shapes else {}))
    stats_args, update_args = sample_args(op_target, **kw)
    if op == "stats":
        args = stats_args
    elif op == "update":
        args = update_args
    else:
        args = (update_args[U_V], update_args[U_SEG], update_args[U_V_SUMS])
    torch.library.opcheck(getattr(op_target.ops, op).default, args)
