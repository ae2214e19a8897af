"""The machine's copy bandwidth, measured in the same run as the optimizers: a large
`dst.copy_(src)` (256 MiB on CPU, 1 GiB device-to-device on GPU), counting the bytes read plus
the bytes written, median of repeats. Effective GB/s of an optimizer step divided by this
number is the "% of copy bandwidth" column."""
from __future__ import annotations

import statistics
import time

import torch

from .timing import sync


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 11) -> dict:
    """{'gbps': median GB/s (1e9 bytes/s, read + write), 'samples': [...], 'bytes': ...}"""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in, warm up
    dst.copy_(src)
    sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        samples.append(2 * n * 4 / dt / 1e9)
    del src, dst
    return {"gbps": statistics.median(samples), "samples": samples, "bytes": 2 * n * 4,
            "method": ("device-to-device" if device.type == "cuda" else "CPU")
            + f" dst.copy_(src) of {n * 4 >> 20} MiB fp32, bytes read + written, "
              f"median of {repeats}"}
