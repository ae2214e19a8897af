"""The CUDA kernels (csrc/cuda/): the op matrix of tests/test_op_matrix.py (stats / update /
v_sum against the float64 oracle, skipped steps, bitwise equalities, opcheck), collected here
for them; what only they have (control tensors of shape (1,), the segments table's checks as
csrc/op_checks.h words them, devices, the number of kernel launches, no host
synchronisation, side streams, 64-bit indexing); and the optimizer with backend="cuda"
against backend="reference" (plain, clipping, skip_nonfinite, GradScaler, a resumed
checkpoint).

Marker `gpu`; skipped without a GPU (or when adai_kernels._C has no CUDA kernels, unless
ADAI_REQUIRE_CUDA=1, as bench/gpu_check.sh sets, makes that a failure). ADAI_TEST_LARGE=1 adds
a tensor of 2^31 + 3 elements (about 45 GB of GPU memory).

ADAI_GPU_TEST_DEVICE selects the target of this file (the optimizer tests use the matching
backend):
- `cuda` (default): the CUDA kernels on a GPU;
- `emu`: the same CUDA kernels and host launch code on CPU tensors, executed by the emulator
  of csrc/emu/ (`torch.ops.adai_emu`, built from the current tree by tests/emu_build.py; with
  ADAI_EMU_ASAN=1 its AddressSanitizer build, in a process with libasan preloaded). Runs in
  CI (`make test-emu`), with smaller tensors (op_fixtures.SHAPES_EMU): every GPU thread is a
  fiber;
- `cpu`: the C++ CPU kernels, which share the schema (a check of the tests themselves).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import op_fixtures as fx
from cases import DTYPES, PARAM_TOL, STATE_TOL, clone_groups  # one tolerance table
from op_fixtures import EXTRA, HYPER, Bucket, same_bits  # noqa: F401 (EXTRA: test_cuda_emu.py)
from oracle import A, B, BGT, BTT, COLUMNS, GN, N

MODE = os.environ.get("ADAI_GPU_TEST_DEVICE", "cuda")
if MODE not in ("cuda", "emu", "cpu"):
    raise ValueError(f"ADAI_GPU_TEST_DEVICE must be cuda, emu or cpu, got {MODE!r}")
EMU = MODE == "emu"
if EMU:
    import emu_build

    emu_build.load(asan=os.environ.get("ADAI_EMU_ASAN") == "1")
TARGET = fx.TARGETS[MODE]
OP_TARGETS = (MODE,)  # the op matrix below runs on this target
DEVICE = TARGET.dev
ON_CUDA = DEVICE.type == "cuda"
BACKEND = TARGET.backend  # the optimizer tests'

_WHY = TARGET.unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-specific")

# The op matrix, collected here for TARGET (conftest.py: `op_target` from OP_TARGETS).
from test_op_matrix import (  # noqa: E402,F401
    run_steps, test_a_subset_of_the_bucket, test_all_tensors_empty, test_bitwise_deterministic,
    test_empty_and_one_element_tensors_at_buffer_ends, test_empty_lists,
    test_found_inf_zero_steps_like_none, test_lagging_tensor_counts_its_own_step,
    test_lr_tensor_is_read_on_the_device, test_many_tensors_match_oracle,
    test_nonfinite_gradient_without_skip, test_nonfinite_param_without_l2_does_not_reach_the_state,
    test_opcheck, test_ops_match_oracle, test_ops_with_controls_match_oracle,
    test_params_not_read_by_stats_without_l2, test_power_of_two_grad_scale_is_bitwise_unscaled,
    test_skipped_step_changes_nothing, test_stats_row_columns, test_stats_rows_may_be_strided,
    test_stats_v_sums_linearity, test_step_counters_are_exact_far_past_float32,
    test_v_sum_reproduces_update_bitwise, test_zero_gradients_leave_params_unchanged)

# ---- the op matrix's buckets, gradients and steps on TARGET (also tests/test_cuda_emu.py's) ---

ops = TARGET.ops
SHAPES = list(TARGET.shapes)
# The gradient norm of one step of make_grads: about sqrt(numel of SHAPES) (1,060 on a GPU,
# 320 emulated).
NORM = math.sqrt(sum(math.prod(shape) for shape, _, _ in SHAPES))
make_grads = fx.make_grads
_bits = fx.bits


def make_bucket(dtype, seed, shapes=None, states="shuffled"):
    return fx.make_bucket(TARGET, dtype, seed, shapes, states)


def scalar(x) -> torch.Tensor | None:
    return fx.scalar(TARGET, x)


def stats_op(bk, grads, hp, out, grad_scale=None):
    fx.stats_op(TARGET, bk, grads, hp, out, grad_scale)


def update_op(bk, grads, hp, stats, **control):
    fx.update_op(TARGET, bk, grads, hp, stats, **control)


def op_step(bk, grads, hp, extra=None, grad_scale=None, **control) -> torch.Tensor:
    return fx.op_step(TARGET, bk, grads, hp, extra, grad_scale, **control)


def strided(shape, stride, dtype, offset=0, fill=0.0) -> torch.Tensor:
    return fx.strided(shape, stride, dtype, DEVICE, offset, fill)


# ---- what only the CUDA kernels have --------------------------------------------------------

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


@cuda_only
def test_bitwise_deterministic_on_a_side_stream():
    a = run_steps(TARGET, torch.float32, 4, "decoupled_d0.5")
    b = run_steps(TARGET, torch.float32, 4, "decoupled_d0.5", stream=torch.cuda.Stream())
    torch.cuda.synchronize()
    for i, (x, y) in enumerate(zip(a, b)):
        assert same_bits(x, y), f"side-stream difference in output tensor {i}"


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
    with pytest.raises(RuntimeError, match=r"grads\[0\] \(sizes"):
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
@cuda_only
def test_many_tensors_launch_count():
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=7, shapes=TARGET.many)
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
