"""Loads the compiled ops (torch.ops.adai.stats / .update / .v_sum) and registers their fake
kernels (adai_kernels/ops.py).

`adai_kernels._C` holds the op schemas (and the CUDA kernels when built with CUDA); the CPU
kernels are compiled once per ISA into `_cpu_avx512`, `_cpu_avx2` and `_cpu_default`, and
exactly one of them is imported: the widest the CPU supports (torch's own choice,
`torch.backends.cpu.get_cpu_capability()`, which honours ATEN_CPU_CAPABILITY), or the one
named by ADAI_CPU_ISA=avx512|avx2|default.

Importing this module never raises because of the native code: when something is missing,
`load_error()` says why, and the backends report it.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import ops

_ISA_ORDER = ("avx512", "avx2", "default")

_C = None
_cpu = None
_cpu_isa = "none"
_errors: list[str] = []  # why a module failed to import
_notes: list[str] = []   # ignored settings (not errors: the ops still load)


def _import(name: str):
    try:
        return importlib.import_module(f"adai_kernels.{name}"), None
    except (ImportError, OSError) as e:  # missing, or built against another torch / python
        return None, f"{type(e).__name__}: {e}"


# CPU features each variant is compiled for (setup.py), as torch.cpu.get_capabilities() names them
_ISA_NEEDS = {
    "avx512": ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "fma3"),
    "avx2": ("avx2", "fma3", "f16c"),
    "default": (),
}


def _hardware_allows(isa: str) -> bool:
    """Whether this CPU can run the variant (so that forcing one never means SIGILL)."""
    if isa == "default":
        return True
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # no cpuinfo: trust torch's own choice only
        return False
    return all(caps.get(flag, False) for flag in _ISA_NEEDS[isa])


def _wanted_isa() -> str:
    """The variant to try first: ADAI_CPU_ISA if set (and the CPU has it), else the one that
    matches torch's own kernels (get_cpu_capability honours ATEN_CPU_CAPABILITY)."""
    forced = os.environ.get("ADAI_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in _ISA_ORDER:
            _notes.append(f"ignoring ADAI_CPU_ISA={forced!r}: expected one of "
                          f"{', '.join(_ISA_ORDER)}")
        elif not _hardware_allows(forced):
            _notes.append(f"ignoring ADAI_CPU_ISA={forced}: this CPU lacks "
                          f"{'/'.join(_ISA_NEEDS[forced])}")
        else:
            return forced
    try:
        cap = torch.backends.cpu.get_cpu_capability().upper()
    except Exception:  # an unusual platform
        cap = "DEFAULT"
    if cap.startswith("AVX512"):
        return "avx512"
    if cap.startswith("AVX2"):
        return "avx2"
    return "default"


def _load() -> None:
    global _C, _cpu, _cpu_isa
    _C, err = _import("_C")
    if err is not None:
        _errors.append(f"adai_kernels._C: {err}")
        return
    isa = _wanted_isa()
    for cand in _ISA_ORDER[_ISA_ORDER.index(isa):]:
        mod, err = _import(f"_cpu_{cand}")
        if mod is not None:
            _cpu, _cpu_isa = mod, cand
            return
        _errors.append(f"adai_kernels._cpu_{cand}: {err}")


_load()


def load_error() -> str | None:
    """None when the ops and their CPU kernels are loaded, else why not (one line per failure)."""
    if _C is not None and _cpu is not None:
        return None
    if not _errors:
        return "adai_kernels native modules were not loaded"
    return "; ".join(_errors)


def cpu_isa() -> str:
    """The CPU kernel variant in use: "avx512", "avx2", "default", or "none"."""
    return _cpu_isa


def notes() -> list[str]:
    """Non-fatal problems: ignored settings (e.g. a bad ADAI_CPU_ISA) and fake kernels that
    could not be registered (eager calls still work then; torch.compile would not)."""
    return list(_notes) + list(_fake_errors)


def cpu_vec_size() -> int:
    """Floats per Vectorized<float> in the loaded CPU variant (0 when none is loaded)."""
    return int(getattr(_cpu, "vec_size", 0))


def built_with_cuda() -> bool:
    """Whether `_C` was compiled with the CUDA kernels (a build-time fact, no GPU needed)."""
    return bool(getattr(_C, "cuda", 0))


def has_cuda_kernels() -> bool:
    """Whether the CUDA dispatch key has a kernel for adai::update."""
    if _C is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("adai::update", "CUDA"))
    except RuntimeError:  # the op is not registered
        return False


# fake kernels that could not be registered (eager calls still work; torch.compile would not)
_fake_errors: list[str] = ops.register_fakes("adai") if _C is not None else []
