"""`python -m adai_kernels`: what a bug report needs. Versions, which native modules loaded
(and why one did not), the CPU kernel variant, the CUDA architectures built, which backend
`auto` picks per device, and a short self-test of every backend that can run here against
the reference backend. Exits 1 when a self-test fails."""
from __future__ import annotations

import importlib.metadata
import platform
import sys
import time

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _native_lines() -> list[str]:
    from . import _native, fatbin

    lines = [f"native modules: {'loaded' if _native.load_error() is None else 'NOT loaded'}"]
    if _native.load_error() is not None:
        lines.append(f"  why: {_native.load_error()}")
    lines += [f"  note: {n}" for n in _native.notes()]
    lines.append(f"CPU kernel: {_native.cpu_isa()} ({_native.cpu_vec_size()} floats a vector; "
                 f"torch's own: {torch.backends.cpu.get_cpu_capability()})")
    if _native.built_with_cuda():
        archs = sorted(fatbin.cubin_archs(_native._C.__file__))
        lines.append(f"CUDA kernels: built, cubins for {', '.join(f'sm_{a}' for a in archs)}")
    else:
        lines.append("CUDA kernels: not built (torch without CUDA, no toolkit, or "
                     "ADAI_BUILD_CUDA=0)")
    return lines


def _self_test(backend: str, device: torch.device) -> str:
    """Five steps of a small model (two groups, clipping, L2 decay) with `backend`, against the
    reference backend on the same device."""
    from . import Adai

    def run(name):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device))
                  for s in ((64, 33), (33,), (7, 5, 3))]
        opt = Adai([{"params": params[:2]}, {"params": params[2:], "weight_decay": 1e-2}],
                   lr=0.1, backend=name, max_grad_norm=5.0)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        return [p.detach() for p in params]

    t0 = time.perf_counter()
    got, want = run(backend), run("reference")
    err = max(float(((a - b).abs() / (b.abs() + 1e-3)).max()) for a, b in zip(got, want))
    ok = err < 1e-4  # float32 kernels against the float32 reference: a few ulp per step
    return (f"{'ok' if ok else 'FAILED'}: max relative difference {err:.1e} "
            f"({time.perf_counter() - t0:.2f} s)")


def main() -> int:
    from . import backends

    print(f"adai-kernels {_version('adai-kernels')}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'}), triton {_version('triton')}, "
          f"Python {platform.python_version()}, {platform.machine()}")
    for line in _native_lines():
        print(line)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        print("GPU: none visible (CUDA parameters would use "
              f"{' / '.join(backends._AUTO['cuda'])}, the first that loads)")
    failed = False
    for device in devices:
        print(f"{device.type} parameters: backend='auto' picks "
              f"{backends.resolve('auto', device).name}")
        for name, why in backends.available(device).items():
            if why is not None:
                print(f"  {name}: unavailable ({why})")
                continue
            result = "the oracle" if name == "reference" else _self_test(name, device)
            failed = failed or result.startswith("FAILED")
            print(f"  {name}: {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
