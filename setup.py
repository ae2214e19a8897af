"""Build of the adai_kernels native modules (metadata lives in pyproject.toml).

Modules:
  adai_kernels._C            csrc/ops.cpp (the op schemas) + csrc/cuda/*.cu, *.cpp (CUDA kernels)
  adai_kernels._cpu_default  csrc/cpu/ (fused CPU kernels), no ISA flags
  adai_kernels._cpu_avx2     the same source for AVX2 + FMA + F16C    (x86-64 only)
  adai_kernels._cpu_avx512   the same source for AVX-512 F/BW/VL/DQ   (x86-64 only)
adai_kernels/_native.py imports _C and the one CPU variant the machine supports.

Environment:
  ADAI_BUILD_CUDA=0/1     force the CUDA part off / on (default: on when torch has CUDA and a
                          CUDA toolkit is found; no GPU is needed to build)
  CUDA_HOME               the toolkit (checked; /usr/local/cuda is tried when unset or wrong)
  TORCH_CUDA_ARCH_LIST    default "8.0;9.0" (there may be no GPU to query)
  MAX_JOBS                parallel compile jobs (ninja)

Several people build in this tree: build under a lock,
  flock /tmp/adai_build.lock pip install --no-build-isolation --no-deps -e .
"""
from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import find_namespace_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) \
        and os.path.exists(os.path.join(path, "bin", "nvcc"))


def _find_cuda_home() -> str | None:
    """A directory with include/cuda_runtime.h and bin/nvcc, or None. Must run before
    torch.utils.cpp_extension is imported (it reads CUDA_HOME once, and its own guess from
    `which nvcc` can be a wrapper script's folder)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if _is_toolkit(path):
                return path
            print(f"adai setup: {var}={path} is not a CUDA toolkit (no include/cuda_runtime.h "
                  f"or bin/nvcc); looking elsewhere", file=sys.stderr)
    for path in ("/usr/local/cuda",):
        if _is_toolkit(path):
            return path
    return None


def _want_cuda(torch, cuda_home: str | None) -> bool:
    flag = os.environ.get("ADAI_BUILD_CUDA", "").strip()
    available = bool(torch.version.cuda) and cuda_home is not None
    if flag in ("0", "1"):
        if flag == "1" and not available:
            raise RuntimeError(
                "ADAI_BUILD_CUDA=1 but CUDA cannot be built: "
                + ("this torch has no CUDA" if not torch.version.cuda else
                   "no CUDA toolkit found (set CUDA_HOME)"))
        return flag == "1"
    if flag:
        raise RuntimeError(f"ADAI_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return available


def _nvidia_include_dirs() -> list[str]:
    """Header folders of the pip-installed nvidia-* packages (cuBLAS, cuSPARSE, ... which
    ATen/cuda/CUDAContext.h includes and a bare toolkit may lack)."""
    dirs = []
    try:
        import nvidia  # namespace package shipped by the nvidia-* wheels
    except ImportError:
        return dirs
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h))
                   for h in ("cusparse.h", "cublas_v2.h", "cublasLt.h")):
                dirs.append(inc)
    return dirs


cuda_home = _find_cuda_home()
if cuda_home is not None:
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# -O3, no debug info (Python's own CFLAGS carry -g; the last flag wins).
OPT = ["-O3", "-g0"]
SHIM = os.path.join(CSRC, "cpu", "pymodule.cpp")


def _module_flags(name: str) -> list[str]:
    return [f"-DADAI_MODULE_NAME={name}"]


def _c_extension():
    sources = [os.path.join(CSRC, "ops.cpp"), SHIM]
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, CSRC, "cuda", "*.cu"))
                        + glob.glob(os.path.join(ROOT, CSRC, "cuda", "*.cpp")))
    include_dirs = [os.path.join(ROOT, CSRC)]
    cxx = OPT + _module_flags("_C")
    if _want_cuda(torch, cuda_home) and cuda_sources:
        # -isystem: searched after the toolkit's own -I folders, so the toolkit's headers win
        # where both have a file; only the missing library headers come from pip.
        sys_inc = []
        for d in _nvidia_include_dirs():
            sys_inc += ["-isystem", d]
        cxx += ["-DADAI_WITH_CUDA"] + sys_inc
        nvcc = ["-O3", "-DADAI_WITH_CUDA"] + sys_inc
        print(f"adai setup: building CUDA kernels {cuda_sources} with CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
        return CUDAExtension("adai_kernels._C", sources + cuda_sources,
                             include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    if cuda_sources:
        print("adai setup: not building the CUDA kernels (ADAI_BUILD_CUDA=0, no CUDA torch or "
              "no CUDA toolkit)", file=sys.stderr)
    return CppExtension("adai_kernels._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx})


# name -> ISA flags. CPU_CAPABILITY names ATen's inline namespace (at::vec::AVX512, ...) and
# CPU_CAPABILITY_<ISA> selects its Vectorized<> implementation, as in ATen's own kernels.
CPU_VARIANTS = {"default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_VARIANTS["avx2"] = ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                            "-mavx2", "-mfma", "-mf16c"]
    CPU_VARIANTS["avx512"] = ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                              "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]


def _cpu_extension(isa: str, isa_flags: list[str]):
    name = f"_cpu_{isa}"
    cxx = (OPT + isa_flags + _module_flags(name)
           + ["-DADAI_CPU_VARIANT", "-fopenmp",  # at::parallel_for is OpenMP in ATen headers
              # Keep the per-ISA copies of inline ATen code private to this module.
              "-fvisibility=hidden", "-fvisibility-inlines-hidden",
              # Noise from the ATen / GCC intrinsics headers.
              "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"])
    return CppExtension(f"adai_kernels.{name}",
                        [os.path.join(CSRC, "cpu", "adai_cpu.cpp"), SHIM],
                        include_dirs=[os.path.join(ROOT, CSRC)],
                        extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"])


class Build(BuildExtension):
    """BuildExtension with one object folder per extension: the CPU variants compile the same
    sources with different flags, and must not share (and overwrite) object files."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    packages=find_namespace_packages(include=["adai_kernels", "adai_kernels.*"],
                                     exclude=["*.__pycache__"]),
    ext_modules=[_c_extension()] + [_cpu_extension(k, v) for k, v in CPU_VARIANTS.items()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
