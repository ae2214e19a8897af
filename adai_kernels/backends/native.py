"""The compiled backends: torch.ops.adai.stats / .update with the fused C++ CPU kernels
(csrc/cpu/) and the CUDA kernels (csrc/cuda/). Both are `OpsBackend`s over the same schema."""
from __future__ import annotations

import torch

from ..ops import Ops
from .base import FEATURES, KERNEL_DTYPES, OpsBackend


def _native():
    from .. import _native  # imported lazily: loading the shared libraries costs time

    return _native


def load() -> str | None:
    """None when the CPU kernels are loaded, else why not."""
    n = _native()
    if n._C is None:
        return f"adai_kernels._C is not built: {n.load_error()}"
    if n._cpu is None:
        return f"no CPU kernel module of adai_kernels could be loaded: {n.load_error()}"
    return None


def load_cuda() -> str | None:
    """None when the CUDA kernels are loaded, else why not."""
    n = _native()
    if n._C is None:
        return f"adai_kernels._C is not built: {n.load_error()}"
    if not n.has_cuda_kernels():
        return ("adai_kernels._C was built without CUDA kernels (rebuild with a CUDA toolkit: "
                "CUDA_HOME=... ADAI_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
    return None


# The CPU kernel steps float64 params too, with float64 state (csrc/cpu/float64.h).
CPU = OpsBackend("cpu", Ops("adai"), ("cpu",), load, features=FEATURES, elides=True,
                 dtypes=KERNEL_DTYPES + (torch.float64,))
CUDA = OpsBackend("cuda", Ops("adai"), ("cuda",), load_cuda, features=FEATURES,
                  elides=True)
