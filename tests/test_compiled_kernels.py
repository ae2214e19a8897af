"""The compiled GPU kernels, checked without a GPU (they run in CI on a CPU machine):

- CUDA (csrc/cuda), read from the cubins of the built adai_kernels._C (bench/cubin.py):
  no stats, update or v_sum kernel spills, for sm_80 and sm_90 and every dtype, and the
  update kernel moves an aligned group with 128-bit global loads and stores.
- Triton: every kernel compiled ahead of time for sm_80, sm_90 and gfx942 from the
  backend's own launch table (bench/triton_aot.py): no spills; update's aligned chunks use
  vector accesses as wide as its layout allows; IEEE division and square roots; update and
  v_sum reduce the chunk sums of v in one register layout (so v_sum restores update's sums
  bitwise).
- bench/results/cuda-resources.md is what `python -m bench.cuda_resources` writes now.

Without a CUDA build the CUDA checks skip. A missing tool or Triton backend skips too,
except in CI (CI=true) with the CUDA build, where a missing tool, or Triton failing to
compile for CUDA, fails: there these checks must run.
"""
from __future__ import annotations

import importlib.util
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from adai_kernels import _native
from bench import cubin, cuda_resources, triton_aot

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "bench" / "results" / "cuda-resources.md"
CUDA_DTYPES = {"float": 4, "c10::Half": 2, "c10::BFloat16": 2}  # -> bytes per element
TRITON_DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}


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
        want |= {f"update_kernel<{t}>" for t in CUDA_DTYPES} | {"v_sum_kernel"}
        assert want <= have, f"sm_{arch}: missing {sorted(want - have)}"
    spills = [f"sm_{u.arch} {u.name}: stack {u.stack} B, local {u.local} B" for u in usage
              if u.name.startswith(("stats_", "update_", "v_sum_")) and (u.stack or u.local)]
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
    want = {"LDG": 2 * param + 3 * state, "STG": param + 3 * state}
    assert all(wide[op] >= n for op, n in want.items()), (
        f"128-bit accesses {dict(wide)}, want at least {want}; all: {dict(accesses)}")


# ---- Triton, compiled ahead of time -------------------------------------------------------


def _triton_backend(name: str) -> bool:
    spec = importlib.util.find_spec("triton")  # without importing triton
    return spec is not None and bool(spec.submodule_search_locations) and (
        Path(spec.submodule_search_locations[0]) / "backends" / name / "compiler.py").exists()


@pytest.fixture(scope="module")
def aot() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    return triton_aot.compile_all()


def _target(aot: dict, target: str) -> list[dict]:
    """The compiled launches for `target`; skips (or fails) with the reason it did not."""
    result = aot[target]
    if "error" not in result:
        return result["kernels"]
    backend = triton_aot.TARGETS[target][0]
    if not _triton_backend({"cuda": "nvidia", "hip": "amd"}[backend]):
        pytest.skip(f"triton has no {backend} backend here")
    if backend == "cuda":
        _missing(f"Triton cannot compile for {target} here: {result['error']}")
    pytest.skip(f"Triton cannot compile for {target} here: {result['error']}")


def _kernel_names() -> set[str]:
    """The kernels of triton_kernels.py (its public @triton.jit functions)."""
    src = (ROOT / "adai_kernels" / "backends" / "triton_kernels.py").read_text()
    return set(re.findall(r"^@triton\.jit\ndef ([a-z]\w*)\(", src, re.M))


@pytest.mark.parametrize("target", triton_aot.TARGETS)
def test_triton_kernels_compile_and_do_not_spill(aot, target):
    kernels = _target(aot, target)
    assert {e["kernel"] for e in kernels} == _kernel_names()
    spills = [(e["kernel"], e["variant"], e["dtype"]) for e in kernels
              if e.get("spill_bytes") or e.get("spills")]
    assert not spills, spills


def _vector_accesses(entry: dict) -> Counter:
    """{(load or store, bytes): count} of the vector global accesses in entry's assembly."""
    out = Counter()
    if "ptx" in entry["asm"]:
        for op, n, bits in re.findall(r"\b(ld|st)\.global(?:\.[\w:]+?)*\.v(\d)\.[bfsu](\d+)\b",
                                      entry["asm"]["ptx"]):
            out[op, int(n) * int(bits) // 8] += 1
    else:
        for op, n in re.findall(r"\b(?:global|buffer)_(load|store)_dwordx(\d)\b",
                                entry["asm"]["amdgcn"]):
            out[{"load": "ld", "store": "st"}[op], 4 * int(n)] += 1
    return out


@pytest.mark.parametrize("target", triton_aot.TARGETS)
def test_triton_update_uses_vector_accesses(aot, target):
    """An aligned chunk: each thread moves its elements of every array in runs of VEC (the
    width `_offsets` declares): VEC params or grads (16 bytes of fp32, 8 of bf16 / fp16) and
    VEC fp32 states per access."""
    for e in _target(aot, target):
        if e["kernel"] != "update_kernel" or e["variant"] == "unaligned":
            continue
        c = e["constexprs"]
        per_thread = c["BLOCK"] // (e["warp_size"] * e["num_warps"]) // c["VEC"]
        param, state = c["VEC"] * TRITON_DTYPES[e["dtype"]], c["VEC"] * 4
        want = Counter({("ld", param): 2 * per_thread, ("st", param): per_thread})
        want += Counter({("ld", state): 3 * per_thread, ("st", state): 3 * per_thread})
        have = _vector_accesses(e)
        assert all(have[k] >= n for k, n in want.items()), (
            f"{e['variant']} {e['dtype']}: (op, bytes) of vector accesses {dict(have)}, want "
            f"at least {dict(want)}")


def _reduce_layouts(entry: dict) -> list[str]:
    """sizePerThread of the layout of every fp32 reduction over a chunk, from the TTGIR."""
    ttgir = entry["asm"]["ttgir"]
    spt = dict(re.findall(r"^(#blocked\d*) = #ttg.blocked<\{sizePerThread = \[(\d+)\]", ttgir,
                          re.M))
    block = entry["constexprs"]["BLOCK"]
    return [spt[m] for m in re.findall(
        rf'"tt.reduce"\(%[\w.]+\).*?\}}\) : \(tensor<{block}xf32, (#blocked\d*)>\)', ttgir,
        re.S)]


def test_triton_update_math_and_reductions_on_sm90(aot):
    """IEEE division and square roots (no div.full, no sqrt.approx; the clip coefficient in
    float64), and update's chunk sums of v in the layout of v_sum's for the same alignment."""
    kernels = _target(aot, "sm_90")
    v_sum = {e["chosen"]["S_ALIGNED"]: _reduce_layouts(e) for e in kernels
            if e["kernel"] == "v_sum_partials_kernel"}
    assert set(v_sum) == {True, False} and all(v_sum.values())
    updates = [e for e in kernels if e["kernel"] == "update_kernel"]
    assert {e["variant"] for e in updates} == {"usual", "options", "unaligned"}
    for e in updates:
        ptx, label = e["asm"]["ptx"], (e["variant"], e["dtype"])
        assert "div.full" not in ptx and "sqrt.approx" not in ptx, label
        if e["chosen"]["CLIP"]:
            assert "sqrt.rn.f64" in ptx and "div.rn.f64" in ptx, label
        assert _reduce_layouts(e) == v_sum[e["chosen"]["S_ALIGNED"]], label


# ---- the committed table ------------------------------------------------------------------


def test_resource_table_is_up_to_date(so, aot):
    for target in ("sm_80", "sm_90"):
        _target(aot, target)
    committed = TABLE.read_text()
    other = [line for line in cuda_resources.toolchain_lines(so, aot) if line not in committed]
    if other:
        pytest.skip(f"{TABLE.name} was made by other compilers than these: {other}")
    assert cuda_resources.markdown(so, aot) == committed, (
        f"{TABLE.relative_to(ROOT)} is out of date: run python -m bench.cuda_resources --out "
        f"{TABLE.relative_to(ROOT)}")
