"""Loads the compiled ops (torch.ops.adai.stats / .update / .sum_v) and registers their fake
kernels.

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

from .backends.base import STATS_COLUMNS  # csrc/adai_math.h, StatsColumn

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


# ---- fake (meta) kernels: shape/dtype checks only; the ops return nothing -------------------

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_grads(op: str, params, grads) -> None:
    torch._check(len(grads) == len(params),
                 lambda: f"{op}: `grads` has {len(grads)} tensors but `params` has {len(params)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        torch._check(p.dtype in _PARAM_DTYPES,
                     lambda: f"{op}: params[{i}] has dtype {p.dtype}; expected float32, "
                             f"bfloat16 or float16")
        torch._check(g.dtype == p.dtype,
                     lambda: f"{op}: grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype}")
        torch._check(g.shape == p.shape,
                     lambda: f"{op}: grads[{i}] has shape {tuple(g.shape)} but params[{i}] has "
                             f"{tuple(p.shape)}")


def _check_segments(op: str, segments, n: int) -> None:
    torch._check(segments.dtype == torch.int64 and segments.dim() == 2
                 and segments.shape[0] == n and segments.shape[1] == 3,
                 lambda: f"{op}: `segments` must be an int64 tensor of shape ({n}, 3), got "
                         f"{segments.dtype} of shape {tuple(segments.shape)}")


def _check_flat(op: str, name: str, t, dtype: torch.dtype) -> None:
    torch._check(t.dim() == 1 and t.dtype == dtype,
                 lambda: f"{op}: `{name}` must be a 1-D {dtype} tensor, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")


def _check_slots(op: str, steps, v_sums) -> None:
    _check_flat(op, "steps", steps, torch.float32)
    _check_flat(op, "v_sums", v_sums, torch.float64)
    torch._check(steps.shape[0] == v_sums.shape[0],
                 lambda: f"{op}: `steps` has {steps.shape[0]} slots but `v_sums` has "
                         f"{v_sums.shape[0]}")


def _check_control(op: str, name: str, t) -> None:
    """An optional 0-dim float32 control tensor (grad_scale, found_inf, lr_tensor)."""
    if t is not None:
        torch._check(t.dim() == 0 and t.dtype == torch.float32,
                     lambda: f"{op}: `{name}` must be a 0-dim float32 tensor, got {t.dtype} "
                             f"of shape {tuple(t.shape)}")


def _stats_fake(params, grads, segments, steps, v_sums, grad_scale, beta2, l2, out):
    op = "adai::stats"
    _check_grads(op, params, grads)
    _check_segments(op, segments, len(params))
    _check_slots(op, steps, v_sums)
    _check_control(op, "grad_scale", grad_scale)
    torch._check(out.dim() == 1 and out.shape[0] == STATS_COLUMNS
                 and out.dtype == torch.float64,
                 lambda: f"{op}: `out` must be a 1-D float64 tensor of {STATS_COLUMNS} "
                         f"elements, got {out.dtype} of shape {tuple(out.shape)}")
    return None


def _update_fake(params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps,
                 stats, grad_scale, found_inf, lr_tensor, lr, beta0, beta2, eps, weight_decay,
                 decoupled, dampening, max_grad_norm, skip_nonfinite):
    op = "adai::update"
    _check_grads(op, params, grads)
    _check_segments(op, segments, len(params))
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("beta1_prod", beta1_prod)):
        _check_flat(op, name, t, torch.float32)
        torch._check(t.shape[0] == exp_avg.shape[0],
                     lambda: f"{op}: `{name}` has {t.shape[0]} elements but `exp_avg` has "
                             f"{exp_avg.shape[0]}")
    _check_slots(op, steps, v_sums)
    torch._check(stats.dim() == 2 and stats.shape[1] == STATS_COLUMNS
                 and stats.dtype == torch.float64,
                 lambda: f"{op}: `stats` must be a 2-D float64 tensor with {STATS_COLUMNS} "
                         f"columns, got {stats.dtype} of shape {tuple(stats.shape)}")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf),
                    ("lr_tensor", lr_tensor)):
        _check_control(op, name, t)
    return None


def _sum_v_fake(exp_avg_sq, segments, v_sums):
    op = "adai::sum_v"
    _check_flat(op, "exp_avg_sq", exp_avg_sq, torch.float32)
    _check_flat(op, "v_sums", v_sums, torch.float64)
    torch._check(segments.dtype == torch.int64 and segments.dim() == 2
                 and segments.shape[1] == 3,
                 lambda: f"{op}: `segments` must be an int64 tensor of shape (n, 3), got "
                         f"{segments.dtype} of shape {tuple(segments.shape)}")
    return None


_fake_errors: list[str] = []  # fake kernels that could not be registered
if _C is not None:
    for _name, _fn in (("stats", _stats_fake), ("update", _update_fake), ("sum_v", _sum_v_fake)):
        try:
            torch.library.register_fake(f"adai::{_name}")(_fn)
        except Exception as e:  # eager calls still work; torch.compile / opcheck would not
            _fake_errors.append(f"registering the fake kernel of adai::{_name} failed: "
                                f"{type(e).__name__}: {e}")
