"""Timing one optimizer step, the memory it needs and the kernels it launches."""
from __future__ import annotations

import ctypes
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(opt, device: torch.device) -> float:
    """Seconds of one `opt.step()`, timed alone: CPU wall clock (perf_counter); on CUDA the
    time between two CUDA events around the step, synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


# -- memory ---------------------------------------------------------------------------------
def state_bytes(opt) -> int:
    """Bytes of the tensors an optimizer keeps in `opt.state`, each storage counted once (our
    optimizer's per-parameter state entries are views into flat buckets)."""
    seen = {}
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                s = v.untyped_storage()
                seen[(s.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_method_available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmHWM") is not None
    except OSError:
        return False


def peak_extra_bytes(opt, device: torch.device) -> int | None:
    """Extra memory one (warmed-up) step needs on top of what is allocated before it.
    CUDA: torch.cuda.max_memory_allocated() delta. CPU: the process's resident set high-water
    mark (VmHWM, reset through /proc/self/clear_refs) minus VmRSS before the step, after
    returning free heap pages to the OS with malloc_trim; None where that is not possible."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        opt.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _proc_status("VmRSS")
    opt.step()
    peak = _proc_status("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before)


# -- kernel launches ------------------------------------------------------------------------
def count_launches(opt, device: torch.device) -> dict | None:
    """Device activity of one step (torch.profiler): kernels, and memcpy/memset operations.
    None on CPU."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize(device)
    kernels = memops = 0
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        name = e.name.lower()
        if name.startswith("memcpy") or name.startswith("memset"):
            memops += 1
        else:
            kernels += 1
    return {"kernels": kernels, "memcpy_memset": memops}
