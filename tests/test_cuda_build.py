"""Checks of the CUDA kernels that need no GPU (they run in CI on a CPU machine).

- Every build declares every op schema of csrc/op_schemas.h (without CUDA, `_chunk_table`
  and `_upload` have no kernel).
- When `adai_kernels._C` was built with CUDA: the ops have CUDA kernels, the chunk table the
  kernels use (`adai::_chunk_table`, a CPU test hook) is right, and the module holds cubins
  for sm_80 and sm_90. Skipped when it was built without CUDA.
- Always (needs only a C++ compiler): tests/cuda_host_check.cpp runs the kernels' per-thread
  element loops (csrc/cuda/elementwise.h, __host__ __device__) on the CPU for every thread of
  a block and compares them bitwise with adai_math.h applied element by element (stats: the
  unscaled g^2, (g + l2 theta)^2, g theta, theta^2 sums; update: with the gradient multiplier,
  and a skipped step that writes nothing; v_sum against update), and checks a tensor's share
  of the statistics row and update's globals (rows summed in row order, adai::globals, skip,
  multiplier, lr_tensor).
- Always: the statistics columns of csrc/adai_math.h are the ones the Python side uses.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from adai_kernels import fatbin
from bench import cubin

ROOT = Path(__file__).resolve().parents[1]
OPS = ("stats", "update", "v_sum")


def _cuda_build_state() -> tuple[object | None, str | None]:
    """(the _C module, None) when _C has CUDA kernels, else (module or None, why not)."""
    try:
        import adai_kernels._C as C
    except ImportError as e:
        return None, f"adai_kernels._C is not importable: {e}"
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key("adai::update", "CUDA")
    except RuntimeError as e:
        return C, f"adai::update is not registered: {e}"
    if not has:
        return C, "adai_kernels._C was built without CUDA kernels"
    return C, None


_C, _WHY_NOT = _cuda_build_state()
needs_cuda_build = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


@needs_cuda_build
def test_ops_have_cuda_kernels():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adai::{op}", "CUDA"), op


@needs_cuda_build
def test_upload_op_is_cuda_only():
    """adai::_upload (the capture-safe copy of launch tables) runs on CUDA only, and says so on
    CPU tensors instead of doing something else."""
    assert str(torch.ops.adai._upload.default._schema) == \
        "adai::_upload(Tensor src, Tensor(a!) dst) -> ()"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("adai::_upload", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("adai::_upload", "CPU")
    with pytest.raises(NotImplementedError):
        torch.ops.adai._upload(torch.zeros(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8))


def _declared_schemas() -> list[str]:
    """Every schema of csrc/op_schemas.h (its string literals joined), read as text."""
    src = (ROOT / "csrc" / "op_schemas.h").read_text()
    decls = re.findall(r"constexpr const char\* k\w+ =(.*?);", src, re.S)
    return ["".join(re.findall(r'"([^"]*)"', d)) for d in decls]


@pytest.mark.skipif(_C is None, reason="adai_kernels._C is not importable")
def test_every_schema_is_declared_in_every_build():
    """csrc/ops.cpp declares all of op_schemas.h's schemas, with or without the CUDA kernels.
    Without them, _chunk_table and _upload are schemas without a kernel: a call says so."""
    schemas = _declared_schemas()
    names = [s.split("(", 1)[0] for s in schemas]
    assert set(OPS) | {"_chunk_table", "_upload"} <= set(names), names
    for name, schema in zip(names, schemas):
        declared = getattr(torch.ops.adai, name).default._schema
        assert str(declared) == str(torch._C.parse_schema(f"adai::{schema}")), name
    if _WHY_NOT is None:
        return  # the CUDA build: the tests above run the kernels of both
    for name in ("_chunk_table", "_upload"):
        for key in ("CPU", "CUDA", "CompositeImplicitAutograd"):
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"adai::{name}", key)
    with pytest.raises(NotImplementedError):
        torch.ops.adai._chunk_table([4, 1], 4)
    with pytest.raises(NotImplementedError):
        torch.ops.adai._upload(torch.zeros(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8))


def _expected_table(numels, chunk):
    rows = []
    for i, n in enumerate(numels):
        for j, begin in enumerate(range(0, n, chunk)):
            rows.append((i, j, begin, min(begin + chunk, n)))
    return rows


@needs_cuda_build
@pytest.mark.parametrize("numels,chunk", [
    ([], 4),
    ([0], 4),
    ([0, 0, 0], 1),
    ([1], 4),
    ([3, 0, 4, 5, 0, 8, 9], 4),
    ([7, 0, 1, 13], 1),
    ([1000] * 50 + [0] * 3 + [1], 64),
])
def test_chunk_table(numels, chunk):
    table = torch.ops.adai._chunk_table(numels, chunk)
    assert table.dtype == torch.int64 and table.shape == (len(_expected_table(numels, chunk)), 4)
    assert [tuple(r) for r in table.tolist()] == _expected_table(numels, chunk)


@needs_cuda_build
def test_chunk_table_default_chunk_and_many_tensors():
    gen = torch.Generator().manual_seed(0)
    numels = torch.randint(0, 70000, (1000,), generator=gen).tolist()
    numels[::7] = [0] * len(numels[::7])
    table = torch.ops.adai._chunk_table(numels)  # the kernels' own chunk size
    # The first chunk of a tensor with more elements than one chunk has the full chunk size.
    big = next(i for i, n in enumerate(numels) if n > 40000)
    first = table[table[:, 0] == big][0]
    chunk = int(first[3] - first[2])
    assert chunk >= 1024 and chunk % 8 == 0  # a multiple of every vector width
    assert [tuple(r) for r in table.tolist()] == _expected_table(numels, chunk)


@needs_cuda_build
def test_chunk_table_64bit():
    big = 2**31 + 5
    table = torch.ops.adai._chunk_table([3, big, 2], 2**20)
    n_big = -(-big // 2**20)
    assert table.shape == (1 + n_big + 1, 4)
    assert tuple(table[-2].tolist()) == (1, n_big - 1, (n_big - 1) * 2**20, big)
    assert tuple(table[-1].tolist()) == (2, 0, 0, 2)


@needs_cuda_build
def test_chunk_table_rejects_bad_input():
    with pytest.raises(RuntimeError, match="negative"):
        torch.ops.adai._chunk_table([4, -1], 4)
    with pytest.raises(RuntimeError, match="chunk must be positive"):
        torch.ops.adai._chunk_table([4], 0)


# ---- cubins ------------------------------------------------------------------------------


@needs_cuda_build
def test_cubins_for_sm80_and_sm90():
    so = Path(_C.__file__)
    tool = cubin.find_tool("cuobjdump")
    if tool is not None:
        out = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True,
                             check=True).stdout
        archs = {int(a) for a in re.findall(r"sm_(\d+)", out)}
    else:  # no cuobjdump anywhere: read the fat binary headers ourselves
        archs = fatbin.cubin_archs(so)
        assert archs, f"{so} has no cubins in an .nv_fatbin section"
    assert {80, 90} <= archs, f"cubins in {so.name}: sm_{sorted(archs)}"


# ---- the statistics row ------------------------------------------------------------------


def test_stats_columns_match_python():
    """adai_math.h's StatsColumn (what the kernels write) against backends/base.py (what the
    optimizer allocates and reads), and the kernels' row order against docs/design.md. Read
    as text: importing adai_kernels loads native modules this test does not need."""
    header = (ROOT / "csrc" / "adai_math.h").read_text()
    cols = {name: int(v) for name, v in re.findall(r"\bk(\w+)\s*=\s*(\d+),", header)}
    assert [cols[k] for k in ("A", "B", "Bgg", "Bgt", "Btt", "Gn", "N")] == list(range(7))
    base = (ROOT / "adai_kernels" / "backends" / "base.py").read_text()
    py = {name: int(v) for name, v in re.findall(r"^(\w+) = (\d+)", base, re.M)}
    assert py["STATS_COLUMNS"] == cols["StatsColumns"] == 7
    assert py["GRAD_NORM_SQ"] == cols["Gn"]
    schema = re.sub(r'"\s*"', "", (ROOT / "csrc" / "op_schemas.h").read_text())  # join literals
    assert "Tensor? grad_scale, float beta2, float l2, Tensor(b!) out" in schema
    assert "Tensor(f!) steps, Tensor stats, Tensor? grad_scale, Tensor? found_inf" in schema


# ---- the element loops on the CPU -------------------------------------------------------


def _cxx() -> str | None:
    for cand in (os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++",
                 "clang++"):
        if cand:
            exe = shutil.which(cand.split()[0])
            if exe:
                return exe
    return None


def test_element_loops_on_cpu(tmp_path):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import include_paths

    exe = tmp_path / "cuda_host_check"
    errors = []
    for std in ("c++20", "c++17"):  # torch's own standard, or what an older compiler has
        cmd = [cxx, f"-std={std}", "-O2", "-Wall", "-Wextra", "-Werror"]
        for inc in include_paths():
            cmd += ["-isystem", inc]
        cmd += ["-I", str(ROOT / "csrc"), str(ROOT / "tests" / "cuda_host_check.cpp"), "-o",
                str(exe)]
        build = subprocess.run(cmd, capture_output=True, text=True)
        if build.returncode == 0:
            break
        errors.append(f"{' '.join(cmd)}\n{build.stdout}{build.stderr}")
    else:
        pytest.fail("\n".join(errors))
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
