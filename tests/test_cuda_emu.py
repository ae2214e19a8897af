"""The emulator of the CUDA kernels (csrc/emu/) itself: that its checks catch the bugs they are
for (kernels with one deliberate bug each, csrc/emu/selftest.cpp), that the real kernels give
bitwise the same results whatever the block order and thread schedule, the capture-safe
upload (copy_as_arguments) around its payload size, and that the AddressSanitizer build runs
the op matrix without a report.

Runs with ADAI_GPU_TEST_DEVICE=emu (`make test-emu`), beside test_cuda_gpu.py's op matrix,
which then runs on the emulated kernels.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emu_build

EMU = os.environ.get("ADAI_GPU_TEST_DEVICE") == "emu"
pytestmark = pytest.mark.skipif(not EMU, reason="run by `make test-emu` "
                                               "(ADAI_GPU_TEST_DEVICE=emu)")
if EMU:
    import test_cuda_gpu as gpu  # the op matrix's buckets, grads and steps (emulated)

ops = torch.ops.adai_emu
THREADS = 64  # selftest.cpp's block size
PAYLOAD = 32 * 1024 - 64  # csrc/cuda/launchers.h, kPayloadBytes
DEFAULT = ("forward", "random", 0, 0.05)  # scheduler.h's Config


@pytest.fixture(autouse=True)
def default_schedule():
    yield
    if EMU:
        ops._configure(*DEFAULT)
        ops._set_capturing(False)


def _shuffle_sums(values):
    """What `x += __shfl_down_sync(full, x, offset)` for offset 16, 8, 4, 2, 1 leaves in each
    lane of a warp (a lane whose source is past the warp keeps its own value)."""
    x = list(values)
    for offset in (16, 8, 4, 2, 1):
        x = [x[l] + (x[l + offset] if l + offset < 32 else x[l]) for l in range(32)]
    return x


def test_selftest_correct_kernel():
    """Barrier and shuffles as on the device: lane sums of the fixed shuffle tree."""
    out = ops._selftest("ok", 3).view(3, THREADS).tolist()
    vals = [(t + 1) % THREADS + 1.0 for t in range(THREADS)]
    expected = _shuffle_sums(vals[:32]) + _shuffle_sums(vals[32:])
    assert out == [expected] * 3


BROKEN = {
    "divergent_barrier": r"__syncthreads: threads wait at different barriers",
    "exited_thread": r"__syncthreads at selftest.cpp:\d+ waits for thread 5 of block \d+, "
                     r"which has exited",
    "misaligned": r"misaligned address: __ldca of 16 bytes at 0x[0-9a-f]+ needs 16-byte "
                  r"alignment",
    "shuffle_divergence": r"__shfl_down_sync at selftest.cpp:\d+ .* which has exited",
    "illegal_address": r"illegal memory access: SIGSEGV at address 0x8 \(thread \d+ of block",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_checks_catch_broken_kernels(name):
    with pytest.raises(RuntimeError, match="emulated CUDA kernel failed: " + BROKEN[name]):
        ops._selftest(name, 2)


def test_shared_memory_is_garbage_before_every_block():
    """A __shared__ variable read before it is written holds garbage, new in every block."""
    out = ops._selftest("uninitialised_shared", 4).view(4, THREADS)
    assert torch.unique(out[:, 0]).numel() == 4, out[:, 0]
    assert all((row == row[0]).all() or torch.isnan(row).all() for row in out)


def test_random_schedule_exposes_a_missing_barrier():
    """Thread 0 sets a shared value the others read without a barrier: with threads picked at
    random, some read it before it is written (on every seed tried)."""
    expected = torch.arange(1, 9, dtype=torch.float64).repeat_interleave(THREADS)
    for seed in range(3):
        ops._configure("forward", "random", seed, 1.0)
        out = ops._selftest("missing_barrier", 8)
        assert not torch.equal(out, expected), seed
    ops._configure("forward", "round_robin", 0, 0.0)  # thread 0 first, never yields: hidden
    out = ops._selftest("missing_barrier", 8)
    assert torch.equal(out, expected)


def test_the_kernels_shared_variables_are_found():
    """The shared variables of every kernel: those of the skeleton (csrc/cuda/chunk_kernel.cuh)
    for each body, and so each kernel's."""
    names = ops._shared_variables()
    for body in ("9StatsBody", "10UpdateBody", "8VSumBody"):
        for var in ("5s_red", "7s_block", "6s_last"):
            assert any("16run_chunk_kernel" in n and body in n and var in n for n in names), \
                (body, var)


# (block order, thread policy, seed, chance that a memory built-in yields)
SCHEDULES = [
    ("forward", "round_robin", 0, 0.0),
    ("reverse", "random", 1, 0.05),
    ("shuffled", "warp_first", 2, 0.3),
    ("shuffled", "random", 3, 1.0),
    ("reverse", "warp_first", 4, 0.02),
]


def _run_steps(dtype, schedule):
    ops._configure(*schedule)
    switches = ops._counters()[2]
    hp = dict(gpu.HYPER["coupled"], lr=5e-2)
    bk, gen = gpu.make_bucket(dtype, seed=21)
    rows = []
    for step in range(3):
        grads = gpu.make_grads(bk.params, gen)
        control = dict(max_grad_norm=gpu.NORM / 10) if step == 1 else {}
        rows.append(gpu.op_step(bk, grads, hp, gpu.EXTRA if step == 2 else None, **control))
    sums = torch.full((bk.n_slots,), float("nan"), dtype=torch.float64)
    ops.v_sum(bk.exp_avg_sq, bk.segments, sums)
    return [*bk.tensors(), *rows, sums], ops._counters()[2] - switches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bitwise_identical_across_block_orders_and_schedules(dtype):
    """stats, update (plain, clipped, with another bucket's row) and v_sum: every output
    bitwise the same under five block orders and thread schedules, which really differ."""
    results = [_run_steps(dtype, s) for s in SCHEDULES]
    first, _ = results[0]
    for schedule, (tensors, _) in zip(SCHEDULES[1:], results[1:]):
        for k, (x, y) in enumerate(zip(first, tensors)):
            assert gpu.same_bits(x, y), f"{schedule}: output {k}"
    assert len({switches for _, switches in results}) == len(SCHEDULES)


@pytest.mark.parametrize("size", [1, 17, PAYLOAD - 1, PAYLOAD, PAYLOAD + 1, 2 * PAYLOAD + 5,
                                  3 * PAYLOAD])
def test_copy_as_arguments_around_its_payload(size):
    """Under capture, _upload sends the bytes as the arguments of ceil(size / payload)
    kernels (upload.cu); they arrive whole."""
    src = torch.randint(0, 256, (size,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(size))
    dst = torch.zeros(size, dtype=torch.uint8)
    ops._set_capturing(True)
    launches = ops._counters()[0]
    ops._upload(src, dst)
    assert ops._counters()[0] - launches == -(-size // PAYLOAD)
    assert torch.equal(dst, src)


def test_captured_launch_tables_travel_as_arguments():
    """With the stream "captured", every launch table goes through copy_as_arguments (a table
    of 500 tensors needs two payloads): the step is bitwise the one without capture."""
    shapes = [((3,), "c", 0)] * 500
    hp = dict(gpu.HYPER["coupled"], lr=1e-2)
    results = []
    for capturing in (False, True):
        ops._set_capturing(capturing)
        bk, gen = gpu.make_bucket(torch.float32, seed=22, shapes=shapes)
        launches = ops._counters()[0]
        gpu.op_step(bk, gpu.make_grads(bk.params, gen), hp)
        results.append((bk.tensors(), ops._counters()[0] - launches))
    (plain, n_plain), (captured, n_captured) = results
    assert n_plain == 2 and n_captured == 2 + 2 * 2  # stats, update; + 2 uploads each
    for k, (x, y) in enumerate(zip(plain, captured)):
        assert gpu.same_bits(x, y), f"output {k}"


# A cross-section of the op matrix: every kernel, dtype and path (vector and scalar, skip,
# clipping, v_sum, empty tensors, many tensors, validation).
ASAN_SELECTION = ("test_ops_match_oracle or test_skipped_step_changes_nothing or "
                  "test_v_sum_reproduces or test_empty_lists or test_all_tensors_empty or "
                  "test_segment_and_buffer_validation or test_many_tensors_match_oracle or "
                  "test_selftest or test_copy_as_arguments")


def test_address_sanitizer_build_reports_nothing(tmp_path):
    """The ASan build of the emulator (kernels, host launch code, scheduler), built and run in a
    process with libasan preloaded, runs a cross-section of the op matrix: no report, every
    test passes."""
    log = tmp_path / "asan"
    env = dict(emu_build.asan_env(str(log)), ADAI_GPU_TEST_DEVICE="emu", ADAI_EMU_ASAN="1")
    tests = Path(__file__).resolve().parent
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(tests / "test_cuda_gpu.py"), str(tests / "test_cuda_emu.py"), "-k",
         f"({ASAN_SELECTION}) and not address_sanitizer"],
        env=env, capture_output=True, text=True, timeout=900)
    reports = [p.read_text() for p in sorted(tmp_path.glob("asan.*"))]
    assert not reports, reports[0][:8000]
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-20000:]
    assert " passed" in out and " failed" not in out, out[-3000:]
