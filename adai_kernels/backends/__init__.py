"""Backend registry and selection. Each backend module is imported only when asked for."""
from __future__ import annotations

import importlib
import os

import torch

from .base import Backend

NAMES = ("cuda", "triton", "cpu", "reference", "cuda_emu")
# module and attribute of each backend object
_WHERE = {
    "reference": ("reference", "REFERENCE"),
    "cpu": ("native", "CPU"),
    "cuda": ("native", "CUDA"),
    "triton": ("triton", "TRITON"),
    "cuda_emu": ("emulated", "EMULATED"),
}
# what "auto" tries, fastest first, per device type; anything else gets the reference
_AUTO = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def check_name(name: str) -> None:
    if name != "auto" and name not in NAMES:
        raise ValueError(f"Invalid backend: {name!r} (must be 'auto' or one of {NAMES})")


def get(name: str) -> Backend:
    check_name(name)
    module, attr = _WHERE[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def resolve(requested: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend that steps parameters on `device` (of `dtype`, when given). An explicit
    name (or ADAI_BACKEND, which overrides "auto") that cannot run there, or refuses the
    dtype, raises RuntimeError saying why; "auto" takes the fastest one that can."""
    check_name(requested)
    if requested == "auto":
        requested = os.environ.get("ADAI_BACKEND", "auto") or "auto"
        if requested != "auto" and requested not in NAMES:
            raise ValueError(f"Invalid ADAI_BACKEND: {requested!r} (must be 'auto' or one of "
                             f"{NAMES})")
    if requested != "auto":
        backend = get(requested)
        reason = backend.unavailable(device)
        if reason:
            raise RuntimeError(f"backend {requested!r} cannot step parameters on {device}: "
                               f"{reason}")
        reason = None if dtype is None else backend.unsupported(dtype)
        if reason:
            raise RuntimeError(f"{reason}, not {dtype}")
        return backend
    for name in _AUTO.get(device.type, ("reference",)):
        try:
            backend = get(name)
        except ImportError:
            continue
        if backend.unavailable(device) is None and (dtype is None
                                                    or backend.unsupported(dtype) is None):
            return backend
    raise AssertionError("the reference backend runs everywhere")  # pragma: no cover


def available(device: torch.device) -> dict[str, str | None]:
    """Every backend with None (it runs on `device`) or the reason it does not."""
    out = {}
    for name in NAMES:
        try:
            out[name] = get(name).unavailable(device)
        except ImportError as e:
            out[name] = f"not importable: {e}"
    return out
