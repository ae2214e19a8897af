"""The fused CPU kernels (csrc/cpu/): what only they have. Their numerics against the float64
oracle, with the per-element float32 error bounds of their analysis (op_fixtures.fp32_bounds),
run in tests/test_op_matrix.py (target "cpu"); here: results independent of the number of
threads (fixed chunks, fixed summation order), and the vector pow of the AVX2 / AVX-512
variants.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sysconfig

import pytest
import torch

from adai_kernels import _native
from cases import DTYPES
from op_fixtures import HYPER, TARGETS, make_bucket, make_grads, op_step, same_bits, scalar

CPU = TARGETS["cpu"]


@pytest.fixture(autouse=True)
def _ops_loaded():
    assert _native.load_error() is None, _native.load_error()


def _threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


CONFIGS = {  # (hyper, grad_scale, max_grad_norm)
    "adai": ("plain", None, 0.0), "v2_l2": ("v2_l2", None, 0.0),
    "clip_v2_l2_scaled": ("v2_l2", 3.0, 1.0),
}
BIG = [((100_003,), "c", 0)]  # several chunks per thread


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_across_thread_counts(dtype, config):
    """Bitwise identical results with 1 and 2 threads (fixed chunks, fixed summation order)."""
    hyper, scale, mgn = CONFIGS[config]
    hp = dict(HYPER[hyper], lr=0.1)
    base, gen = make_bucket(CPU, dtype, 4, shapes=list(CPU.shapes) + BIG, states="aligned")
    grads = [make_grads(base.params, gen, spread=True) for _ in range(3)]

    def run():
        bk = base.clone()
        rows = [op_step(CPU, bk, g, hp, grad_scale=scalar(CPU, scale), max_grad_norm=mgn)
                for g in grads]
        return bk.tensors() + rows

    (first, *rest) = [_threads(n, run) for n in (1, 2, 1)]
    for other in rest:
        for i, (x, y) in enumerate(zip(first, other)):
            assert same_bits(x, y), f"output {i}"


@pytest.mark.parametrize("states", ["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_v_sum_is_the_same_with_1_and_2_threads(dtype, states):
    """v_sum recomputes update's v_sums bitwise with any thread count (tests/test_op_matrix.py
    checks the rest of its contract on every target)."""
    bk, gen = make_bucket(CPU, dtype, 6, shapes=list(CPU.shapes) + [((70_001,), "c", 0)],
                          states=states)
    for _ in range(3):
        op_step(CPU, bk, make_grads(bk.params, gen, spread=True), dict(HYPER["v2"], lr=0.1))
    expected = bk.v_sum_vec.clone()
    for threads in (1, 2):
        bk.v_sum_vec.fill_(float("nan"))
        _threads(threads, lambda: CPU.ops.v_sum(bk.exp_avg_sq, bk.segments, bk.v_sum_vec))
        assert same_bits(bk.v_sum_vec, expected), threads


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
