"""The machine's copy bandwidth, measured in the same run as the optimizers, counting the
bytes read plus the bytes written. Effective GB/s of an optimizer step divided by this number
is the "% of copy bandwidth" column.

GPU: a 1 GiB device-to-device `dst.copy_(src)`. CPU: a 256 MiB `dst.copy_(src)`, and the same
buffers copied by glibc's memcpy split over as many threads as torch uses (ctypes releases the
GIL); the higher median is used (torch's CPU copy kernel reaches only about half of the
parallel memcpy's bandwidth on some machines, which would flatter every contender).

The bandwidth a virtual machine gets from a shared host drifts over minutes, so the meter
keeps its buffers for the whole run and samples before, between and after the cases; the
figure is the median of all samples.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .timing import sync


class CopyMeter:
    def __init__(self, device: torch.device, nbytes: int | None = None):
        if nbytes is None:
            nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
        self.device = device
        n = nbytes // 4
        self.n = n
        self.src = torch.randn(n, device=device)
        self.dst = torch.empty_like(self.src)
        self.moved = 2 * n * 4
        self.methods = {"torch copy_": lambda: self.dst.copy_(self.src)}
        self.pool = None
        if device.type != "cuda":
            threads = max(1, torch.get_num_threads())
            self.pool = ThreadPoolExecutor(threads)
            step = (n * 4 // threads) // 64 * 64
            spans = [(i * step, (n * 4 - i * step) if i == threads - 1 else step)
                     for i in range(threads)]
            d0, s0 = self.dst.data_ptr(), self.src.data_ptr()

            def memcpy_chunk(span):  # ctypes releases the GIL around the foreign call
                ctypes.memmove(d0 + span[0], s0 + span[0], span[1])

            def parallel_memcpy():
                list(self.pool.map(memcpy_chunk, spans))

            self.methods[f"memcpy x {threads} threads"] = parallel_memcpy
        self.samples: dict[str, list[float]] = {k: [] for k in self.methods}
        self.phases: list[tuple[str, float]] = []  # (when, best median of that measurement)
        for fn in self.methods.values():  # fault the pages in, warm up
            fn()
            fn()
        sync(device)

    def _time(self, fn) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def measure(self, repeats: int, when: str = "") -> float:
        """Takes `repeats` samples per method (methods alternated); returns the best median
        of these samples."""
        fresh = {k: [] for k in self.methods}
        for _ in range(repeats):
            for name, fn in self.methods.items():
                fresh[name].append(self.moved / self._time(fn) / 1e9)
        for k, v in fresh.items():
            self.samples[k] += v
        best = max(statistics.median(v) for v in fresh.values())
        self.phases.append((when, best))
        return best

    def result(self) -> dict:
        """{'gbps': the higher per-method median over all samples, ...}"""
        medians = {k: statistics.median(v) for k, v in self.samples.items() if v}
        best = max(medians, key=medians.get)
        where = "device-to-device" if self.device.type == "cuda" else "CPU"
        n = len(self.samples[best])
        return {"gbps": medians[best], "best_method": best, "medians": medians,
                "samples": self.samples, "bytes": self.moved,
                "per_measurement": [{"when": w, "gbps": g} for w, g in self.phases],
                "min_max_per_measurement": [min(g for _, g in self.phases),
                                            max(g for _, g in self.phases)],
                "method": f"{where} copy of {self.n * 4 >> 20} MiB fp32, bytes read + "
                          f"written, the higher median of {' and '.join(self.methods)} "
                          f"({n} samples each, taken before, between and after the cases)"}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.src = self.dst = None
        self.methods = {}


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 11) -> dict:
    """One stand-alone measurement (see CopyMeter)."""
    meter = CopyMeter(device, nbytes)
    meter.measure(repeats, "stand-alone")
    out = meter.result()
    meter.close()
    return out
