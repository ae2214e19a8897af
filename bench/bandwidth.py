"""The machine's copy bandwidth, measured in the same run as the optimizers, counting the
bytes read plus the bytes written, median of repeats. Effective GB/s of an optimizer step
divided by this number is the "% of copy bandwidth" column.

GPU: a 1 GiB device-to-device `dst.copy_(src)`. CPU: a 256 MiB `dst.copy_(src)`, and the
same buffers copied by glibc's memcpy split over as many threads as torch uses (ctypes
releases the GIL); the higher median is used (torch's CPU copy kernel reaches only about half
of the parallel memcpy's bandwidth on some machines, which would flatter every contender)."""
from __future__ import annotations

import ctypes
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .timing import sync


def _median_gbps(fn, nbytes: int, repeats: int, device: torch.device) -> list[float]:
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        samples.append(nbytes / dt / 1e9)
    return samples


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 11) -> dict:
    """{'gbps': GB/s (1e9 bytes/s, read + write), 'samples': {...}, 'method': ...}"""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    moved = 2 * n * 4
    methods = {"torch copy_": lambda: dst.copy_(src)}
    pool = None
    if device.type != "cuda":
        threads = max(1, torch.get_num_threads())
        pool = ThreadPoolExecutor(threads)
        step = (n * 4 // threads) // 64 * 64
        spans = [(i * step, (n * 4 - i * step) if i == threads - 1 else step)
                 for i in range(threads)]
        d0, s0 = dst.data_ptr(), src.data_ptr()

        def memcpy_chunk(span):  # ctypes releases the GIL around the foreign call
            ctypes.memmove(d0 + span[0], s0 + span[0], span[1])

        def parallel_memcpy():
            list(pool.map(memcpy_chunk, spans))

        methods[f"memcpy x {threads} threads"] = parallel_memcpy
    for fn in methods.values():  # fault the pages in, warm up
        fn()
        fn()
    sync(device)
    samples = {name: _median_gbps(fn, moved, repeats, device) for name, fn in methods.items()}
    if pool is not None:
        pool.shutdown()
    del src, dst
    medians = {name: statistics.median(s) for name, s in samples.items()}
    best = max(medians, key=medians.get)
    where = "device-to-device" if device.type == "cuda" else "CPU"
    return {"gbps": medians[best], "best_method": best, "medians": medians,
            "samples": samples, "bytes": moved,
            "method": f"{where} copy of {n * 4 >> 20} MiB fp32, bytes read + written, the "
                      f"higher median of {' and '.join(methods)}"}


def combine(first: dict, second: dict) -> dict:
    """One figure from the measurements before and after the cases: per method the median of
    all samples, then the best method."""
    samples = {k: first["samples"][k] + second["samples"][k] for k in first["samples"]}
    medians = {k: statistics.median(v) for k, v in samples.items()}
    best = max(medians, key=medians.get)
    n = len(next(iter(samples.values())))
    return dict(first, gbps=medians[best], best_method=best, medians=medians, samples=samples,
                gbps_start=first["gbps"], gbps_end=second["gbps"],
                method=first["method"] + f" ({n} repeats each, before and after the cases)")
