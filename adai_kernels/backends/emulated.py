"""backend="cuda_emu": the CUDA kernels (csrc/cuda/) and their host launch code executed on CPU
tensors by the emulator of csrc/emu/, as the ops `torch.ops.adai_emu.*`. For checking the
CUDA code without a GPU; slow (every GPU thread is a fiber). Never chosen by "auto".

The emulator is a development build from a source tree (`make test-emu`, or
tests/emu_build.py), loaded with `torch.ops.load_library`; until then the backend says it
is unavailable."""
from __future__ import annotations

import torch

from ..ops import Ops
from .base import FEATURES, OpsBackend


def load() -> str | None:
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key("adai_emu::update", "CPU"):
            return None
    except RuntimeError:  # adai_emu::update is not registered
        pass
    return ("the CUDA emulator is not loaded (build it from a source tree with `make test-emu` "
            "or `python tests/emu_build.py`, then torch.ops.load_library(path))")


EMULATED = OpsBackend("cuda_emu", Ops("adai_emu"), ("cpu",), load, features=FEATURES,
                      elides=True)
