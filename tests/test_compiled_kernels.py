"""The compiled CUDA kernels (csrc/cuda), checked without a GPU (they run in CI on a CPU
machine) from the cubins of the built adai_kernels._C (bench/cubin.py): no stats, update or
sum_v kernel spills, for sm_80 and sm_90 and every dtype, and the update kernel moves an
aligned group with 128-bit global loads and stores.

Without a CUDA build these checks skip; with one, a missing tool skips too, except in CI
(CI=true), where it fails: there these checks must run.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from adai_kernels import _native
from bench import cubin

ROOT = Path(__file__).resolve().parents[1]
CUDA_DTYPES = {"float": 4, "c10::Half": 2, "c10::BFloat16": 2}  # -> bytes per element


def _missing(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true") and _native.has_cuda_kernels():
        pytest.fail(f"{reason}: CI has the CUDA build, so this check must run")
    pytest.skip(reason)


# ---- CUDA: the built module's cubins ------------------------------------------------------


@pytest.fixture(scope="module")
def so() -> Path:
    if not _native.has_cuda_kernels():
        pytest.skip("adai_kernels._C was built without CUDA kernels")
    if cubin.find_tool("cuobjdump") is None:
        _missing("no cuobjdump in $CUDA_HOME/bin, on PATH or in triton")
    if cubin.demangler() is None:
        _missing("no cu++filt or c++filt to demangle kernel names")
    return Path(_native._C.__file__)


@pytest.fixture(scope="module")
def usage(so) -> list[cubin.Usage]:
    return cubin.resource_usage(so)


def test_cuda_kernels_do_not_spill(usage):
    names = {arch: {u.name for u in usage if u.arch == arch} for arch in (80, 90)}
    for arch, have in names.items():
        want = {f"stats_kernel<{t}, {l2}>" for t in CUDA_DTYPES for l2 in ("false", "true")}
        want |= {f"update_kernel<{t}>" for t in CUDA_DTYPES} | {"sum_v_kernel"}
        assert want <= have, f"sm_{arch}: missing {sorted(want - have)}"
    spills = [f"sm_{u.arch} {u.name}: stack {u.stack} B, local {u.local} B" for u in usage
              if u.name.startswith(("stats_", "update_", "sum_v_")) and (u.stack or u.local)]
    assert not spills, spills


def _group_size() -> int:
    """kGroup of csrc/cuda/elementwise.h: the elements an aligned group moves as vectors."""
    header = (ROOT / "csrc" / "cuda" / "elementwise.h").read_text()
    return int(re.search(r"constexpr int kGroup = (\d+);", header).group(1))


@pytest.mark.parametrize("arch", (80, 90))
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_update_moves_aligned_groups_in_128_bit_accesses(so, usage, arch, dtype):
    """load16 / store16 (csrc/cuda/elementwise.h) must stay single 128-bit instructions: per
    aligned group, params and grads in 16-byte pieces (2 per fp32 group, 1 per bf16 / fp16
    group: 8 elements) and each state in 2."""
    (u,) = [u for u in usage if u.arch == arch and u.name == f"update_kernel<{dtype}>"]
    accesses = cubin.global_accesses(cubin.sass(so, arch, u.mangled))
    wide = Counter()
    for mnemonic, n in accesses.items():
        assert cubin.width(mnemonic) <= 128, mnemonic
        if cubin.width(mnemonic) == 128:
            wide[mnemonic[:3]] += n
    param, state = _group_size() * CUDA_DTYPES[dtype] // 16, _group_size() * 4 // 16
    assert wide["LDG"] >= 2 * param + 3 * state, dict(accesses)
    assert wide["STG"] >= param + 3 * state, dict(accesses)
