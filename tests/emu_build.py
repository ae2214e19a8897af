"""Builds the CPU emulator of the CUDA kernels (csrc/emu/) from the current tree and loads it:
the real csrc/cuda/*.cu kernels and host launch code compiled as C++ against the emulator's
built-ins, registered as the ops `torch.ops.adai_emu.*` on CPU tensors.

    python tests/emu_build.py [--asan]    # builds, prints the library's path

Builds are incremental (ninja) under build/emu or build/emu-asan. The ASan build can only be
loaded into a process started with libasan preloaded (`asan_env()`), so it is built there.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = [CSRC / "cuda" / "ops_host.cpp"] + sorted((CSRC / "emu").glob("*.cpp"))
FLAGS = ["-g0", "-DADAI_CUDA_EMU", "-fvisibility=hidden",
         "-fvisibility-inlines-hidden", "-Wall", "-Wno-unknown-pragmas"]
# device.h is included first in every file, as nvcc includes the CUDA runtime's built-ins.
FLAGS += ["-include", str(CSRC / "emu" / "device.h")]
ASAN_FLAGS = ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer"]


def build(asan: bool = False, verbose: bool = False) -> Path:
    """Builds the emulator's shared library if anything changed, and loads it into this
    process (torch's JIT builder always does). The ASan build needs libasan preloaded
    (`asan_env()`)."""
    from torch.utils.cpp_extension import load

    if asan and not _asan_loaded():
        raise RuntimeError("the ASan build of the emulator must be built and loaded in a process "
                           "started with libasan preloaded (tests/emu_build.py asan_env())")
    name = "adai_cuda_emu_asan" if asan else "adai_cuda_emu"
    out = ROOT / "build" / ("emu-asan" if asan else "emu")
    out.mkdir(parents=True, exist_ok=True)
    preload = os.environ.pop("LD_PRELOAD", None)  # the compilers need no sanitizer runtime
    try:
        load(name=name, sources=[str(s) for s in SOURCES],
             extra_include_paths=[str(CSRC / "emu" / "include"), str(CSRC)],
             extra_cflags=FLAGS + (ASAN_FLAGS if asan else ["-O2"]),
             extra_ldflags=ASAN_FLAGS if asan else [], build_directory=str(out),
             is_python_module=False, verbose=verbose)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return out / f"{name}.so"


def _asan_loaded() -> bool:
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def _runtime(cxx: str, lib: str) -> str:
    path = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"{cxx} has no {lib} (got {path!r})")
    return path


def asan_env(log_path: str | None = None) -> dict[str, str]:
    """Environment for a process that loads the ASan build: libasan preloaded, and libstdc++
    after it (Python does not link libstdc++, and ASan must find the real __cxa_throw when it
    starts); leaks are not reported (Python and torch keep memory until exit by design).
    `log_path`: reports go to files `log_path.<pid>` (a test runner that captures stderr
    would lose a report, since ASan ends the process right after it)."""
    cxx = os.environ.get("CXX", "c++")
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{_runtime(cxx, 'libasan.so')} {_runtime(cxx, 'libstdc++.so')}"
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1" + (
        f":log_path={log_path}" if log_path else "")
    return env


def load(asan: bool = False) -> Path:
    """Builds (if needed) and loads the emulator into this process, with its fake kernels."""
    from adai_kernels import ops
    from adai_kernels.backends import emulated

    if emulated.load() is None:  # loaded already
        return ROOT / "build" / ("emu-asan" if asan else "emu")
    path = build(asan)
    for name, fn in ops.fake_kernels("adai_emu").items():  # for torch.compile and opcheck
        torch.library.register_fake(f"adai_emu::{name}")(fn)
    return path


if __name__ == "__main__":
    asan = "--asan" in sys.argv[1:]
    if asan and not _asan_loaded():  # run again with the sanitizer's runtime preloaded
        os.execve(sys.executable, [sys.executable, *sys.argv], asan_env())
    print(build(asan=asan, verbose="-v" in sys.argv[1:]))
