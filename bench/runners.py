"""Runs the cases: every contender side by side on the same parameters and gradients,
interleaved (round-robin, the order rotated every round), warmed up, each step timed alone."""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from .contenders import Contender, build, contender_bytes
from .profiles import Case
from .timing import count_launches, peak_extra_bytes, state_bytes, sync, time_step

FUSED_ADAM = "torch Adam(fused)"
PYPI_ADAI = "pytorch_optimizer.Adai"


@dataclass
class Config:
    device: torch.device
    budget_s: float            # wall-clock budget of all the cases together (soft)
    min_rounds: int = 3
    max_rounds: int = 25
    warmup: int = 2            # warm-up steps (1 for a contender whose first step is slow)
    slow_step_s: float = 0.5   # a step slower than this gets a single warm-up step
    seed: int = 0


@dataclass
class Row:
    case: str
    contender: str
    kind: str
    algo: str
    bytes_per_element: int
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    vs_fused_adam: float | None = None      # our time / fused Adam's time (lower is better)
    speedup_vs_pypi_adai: float | None = None  # pytorch_optimizer.Adai's time / ours
    launches: dict | None = None
    state_bytes: int | None = None
    peak_extra_bytes: int | None = None
    error: str | None = None
    load_1min: float | None = None          # 1-minute load average when the case started
    other_cpu_pct: float | None = None      # CPU used by other processes during the case,
                                            # % of all logical CPUs (from /proc/stat)


def _alloc(case: Case, device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    params, grads = [], []
    for shape in case.shapes:
        p = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)
        g = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)
        p.grad = g
        params.append(p)
        grads.append(g)
    return params, grads


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_steady(opt) -> None:
    """After the warm-up of a steady-state case every tensor's b must be done (reported as
    0 in the state, docs/design.md): else the case would time the early step."""
    for st in opt.state.values():
        b = st.get("beta1_prod")
        if b is not None and b.numel() and float(b.abs().max()) > 2.0 ** -25:
            raise RuntimeError("the warm-up did not bring every beta1_prod below 2^-25")


def run_case(case: Case, contenders: list[Contender], cfg: Config, budget_s: float,
             copy_gbps: float, progress=None) -> list[Row]:
    device = cfg.device
    t_case = time.perf_counter()
    params, grads = _alloc(case, device, cfg.seed)
    numel = case.numel
    psize = params[0].element_size()
    rows = {c.name: Row(case.name, c.name, c.kind, c.algo, contender_bytes(c, case.dtype, case.meta))
            for c in contenders}

    def note(text):
        if progress is not None:
            progress.set_postfix_str(f"{case.name}: {text}"[:70], refresh=True)

    # -- build, check the memory, warm up ----------------------------------------------------
    opts = {}
    est = {}
    avail = _available_bytes(device)
    committed = 0
    for c in contenders:
        row = rows[c.name]
        state_size = 4 if c.fp32_states else psize
        need = c.state_tensors * numel * state_size
        transient = int(c.temporaries * numel * psize) + (1 << 26)
        if committed + need + transient > 0.85 * avail:
            row.error = (f"skipped: needs ~{(need + transient) / 2**30:.1f} GiB, "
                         f"~{(0.85 * avail - committed) / 2**30:.1f} GiB left")
            continue
        note(f"warm-up {c.name}")
        try:
            opt = build(c, params, case.meta)
            ts = [time_step(opt, device)]
            n_warm = 1 if ts[0] > 4 * cfg.slow_step_s else cfg.warmup
            if c.kind == "ours":  # a steady-state case: every b done before the timing
                n_warm = max(n_warm, case.meta.get("warmup", 0))
            for _ in range(n_warm - 1):
                ts.append(time_step(opt, device))
            if case.meta.get("steady") and c.kind == "ours":
                _check_steady(opt)
        except Exception as e:  # a contender that cannot run this case is reported, not fatal
            row.error = "OOM" if _is_oom(e) else f"{type(e).__name__}: {e}"[:200]
            opt = None
            _free(device)
            continue
        opts[c.name] = opt
        est[c.name] = ts[-1]
        committed += need

    # -- interleaved timed rounds -------------------------------------------------------------
    if opts:
        share = max(0.0, budget_s - (time.perf_counter() - t_case)) / len(opts)
        # at least min_rounds; a fast contender also gets at least ~1 s of rounds
        n_rounds = {name: max(cfg.min_rounds,
                              min(cfg.max_rounds, int(max(share, 1.0) / max(t, 1e-6))))
                    for name, t in est.items()}
        total = max(n_rounds.values())
        # contender `name` steps in rounds floor(i * total / n) for i < n: spread evenly
        schedule = {name: {math.floor(i * total / n) for i in range(n)}
                    for name, n in n_rounds.items()}
        names = list(opts)
        for r in range(total):
            note(f"round {r + 1}/{total}")
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                if r not in schedule[name] or rows[name].error:
                    continue
                try:
                    rows[name].times_s.append(time_step(opts[name], device))
                except Exception as e:
                    rows[name].error = "OOM" if _is_oom(e) else f"{type(e).__name__}: {e}"[:200]
                    opts.pop(name, None)
                    _free(device)
                    names = [n for n in names if n != name]

    # -- memory and launches, one extra step each, not timed -----------------------------------
    for name, opt in opts.items():
        row = rows[name]
        note(f"memory {name}")
        try:
            row.state_bytes = state_bytes(opt)
            row.peak_extra_bytes = peak_extra_bytes(opt, device)
            row.launches = count_launches(opt, device)
        except Exception as e:
            row.error = f"while measuring memory/launches: {type(e).__name__}: {e}"[:200]
    sync(device)
    del opts, params, grads
    _free(device)

    # -- derived numbers ------------------------------------------------------------------------
    for row in rows.values():
        if row.times_s:
            row.median_s = statistics.median(row.times_s)
            row.gbps = numel * row.bytes_per_element / row.median_s / 1e9
            row.pct_copy_bw = 100.0 * row.gbps / copy_gbps if copy_gbps else None
    ref_adam = rows.get(FUSED_ADAM)
    ref_adai = rows.get(PYPI_ADAI)
    for row in rows.values():
        if row.median_s is None:
            continue
        if ref_adam is not None and ref_adam.median_s:
            row.vs_fused_adam = row.median_s / ref_adam.median_s
        if ref_adai is not None and ref_adai.median_s:
            row.speedup_vs_pypi_adai = ref_adai.median_s / row.median_s
    return list(rows.values())


class OtherCpu:
    """CPU time used by everything but this process since construction, as a % of all
    logical CPUs over the elapsed wall time: the noise other tenants put on a case."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # - idle, iowait
        t = os.times()
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system

    def pct(self) -> float | None:
        end = self._read()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        if wall <= 0:
            return None
        return max(0.0, 100.0 * other / (wall * (os.cpu_count() or 1)))


def case_weight(case: Case) -> float:
    """Relative cost of a case, for sharing the time budget: elements moved, plus a
    per-tensor overhead (Python loops of the unfused contenders)."""
    return case.numel * case.dtype.itemsize + 20_000 * case.n_tensors


def run_all(cases: list[Case], contenders: list[Contender], cfg: Config, copy_gbps: float,
            progress=None, between=None) -> list[Row]:
    """Runs the cases in order; `between(case_name)` (the copy-bandwidth meter) runs after
    each case, outside the case's timing."""
    rows: list[Row] = []
    t_start = time.perf_counter()
    weights = [case_weight(c) for c in cases]
    for i, case in enumerate(cases):
        left = cfg.budget_s - (time.perf_counter() - t_start)
        share = max(0.0, left) * weights[i] / sum(weights[i:])
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = None
        meter = OtherCpu()
        case_rows = run_case(case, contenders, cfg, share, copy_gbps, progress)
        other = meter.pct()
        for r in case_rows:
            r.load_1min = load
            r.other_cpu_pct = other
        rows += case_rows
        if between is not None:
            between(case.name)
        if progress is not None:
            progress.update(1)
    return rows
