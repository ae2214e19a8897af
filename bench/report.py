"""Run metadata, the markdown tables and the JSON file."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict

import torch

from .contenders import bytes_per_element
from .runners import FUSED_ADAM, PYPI_ADAI, Row

# The bandwidth of the roofline model of GPU reports: the H200's HBM3e, NVIDIA's nominal
# figure (a measured copy reaches less).
ROOFLINE_GBPS = 4800.0
ROOFLINE_WHAT = "H200 HBM3e, 4.8 TB/s nominal"


def _git(*args: str) -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def metadata(device: torch.device, argv: list[str]) -> dict:
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model()),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python", "-m", "bench", *argv]),
        "load_average_start": loadavg(),
    }
    try:
        from importlib.metadata import version
        meta["pytorch_optimizer_version"] = version("pytorch_optimizer")
    except Exception:
        meta["pytorch_optimizer_version"] = None
    try:
        from adai_kernels import _native
        meta["adai_cpu_isa"] = getattr(_native, "_cpu_isa", None)
    except Exception:
        meta["adai_cpu_isa"] = None
    return meta


# -- formatting -----------------------------------------------------------------------------
def _f(x, fmt: str, none: str = "") -> str:
    return none if x is None else format(x, fmt)


def _loads(x) -> str:
    return "n/a" if not x else ", ".join(f"{v:.2f}" for v in x)


def _ms(s: float | None) -> str:
    if s is None:
        return ""
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}" if b >= 2**20 else f"{b / 2**20:.2f}"


COLUMNS = ["contender", "step ms (median)", "rounds", "GB/s", "% copy BW", "B/elem",
           "time / fused Adam", "speed-up vs pytorch_optimizer.Adai", "launches/step",
           "state MB", "peak extra MB"]


def case_table(rows: list[Row], device_type: str) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.median_s is None:
            lines.append(f"| {r.contender} | {r.error or 'no result'} |" + " |" * (len(COLUMNS) - 2))
            continue
        launches = ("" if r.launches is None else
                    f"{r.launches['kernels']}" + (f" (+{r.launches['memcpy_memset']} mem)"
                                                  if r.launches['memcpy_memset'] else ""))
        if device_type != "cuda":
            launches = "n/a"
        lines.append("| " + " | ".join([
            r.contender, _ms(r.median_s), str(len(r.times_s)), _f(r.gbps, ".1f"),
            _f(r.pct_copy_bw, ".0f"), str(r.bytes_per_element),
            _f(r.vs_fused_adam, ".2f"), _f(r.speedup_vs_pypi_adai, ".1f"), launches,
            _mb(r.state_bytes), _mb(r.peak_extra_bytes)]) + " |")
    return "\n".join(lines)


def headline(rows: list[Row], ours: str, device_type: str) -> list[str]:
    """The issue's targets, read off the ResNet-50-like fp32 case."""
    by = {(r.case, r.contender): r for r in rows}
    r = by.get(("resnet50/fp32", ours))
    if r is None or r.median_s is None:
        return []
    out = [f"ResNet-50-like, fp32 (161 tensors, 25.6M parameters), {ours}: "
           f"{_ms(r.median_s)} ms/step, {r.gbps:.1f} GB/s, "
           f"{_f(r.pct_copy_bw, '.0f', 'n/a')}% of copy bandwidth."]
    if r.vs_fused_adam is not None:
        ok = r.vs_fused_adam <= 1.5
        out.append(f"- step time / torch Adam(fused) = **{r.vs_fused_adam:.2f}x**"
                   + (f" (CPU target <= 1.5x: {'met' if ok else 'NOT met'})"
                      if device_type == "cpu" else ""))
    if r.speedup_vs_pypi_adai is not None:
        ok = r.speedup_vs_pypi_adai >= 8
        out.append(f"- speed-up over pytorch_optimizer.Adai = **{r.speedup_vs_pypi_adai:.1f}x**"
                   + (f" (CPU target >= 8x: {'met' if ok else 'NOT met'})"
                      if device_type == "cpu" else ""))
    if r.pct_copy_bw and (r.vs_fused_adam is not None or r.speedup_vs_pypi_adai is not None):
        # what a step moving the minimal bytes at exactly the copy bandwidth would give
        f = r.pct_copy_bw / 100.0
        parts = []
        if r.vs_fused_adam is not None:
            parts.append(f"{r.vs_fused_adam * f:.2f}x fused Adam's time")
        if r.speedup_vs_pypi_adai is not None:
            parts.append(f"a {r.speedup_vs_pypi_adai / f:.1f}x speed-up over "
                         f"pytorch_optimizer.Adai")
        out.append(f"- for scale: an Adai step moving its {r.bytes_per_element} bytes per "
                   f"element at exactly the measured copy bandwidth would take "
                   f"{r.median_s * f * 1e3:.3g} ms: {' and '.join(parts)}.")
    return out


def roofline(cases) -> list[str]:
    """A model, not a measurement: the time of a step that moves exactly the spec's minimal
    bytes per element at ROOFLINE_GBPS (Adai with fp32 states; fused Adam with its states
    in the parameter dtype, as torch keeps them)."""
    lines = ["## Roofline model (a prediction, not a measurement)", "",
             f"time = bytes per element x elements / bandwidth, at {ROOFLINE_WHAT}, with the "
             f"spec's minimal bytes per element.", "",
             "| case | elements | Adai B/elem | Adai model ms | fused Adam B/elem "
             "| fused Adam model ms |", "|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        adai = bytes_per_element("adai", c.dtype, torch.float32)
        adam = bytes_per_element("adam", c.dtype, c.dtype)
        ms = [c.numel * b / (ROOFLINE_GBPS * 1e9) * 1e3 for b in (adai, adam)]
        lines.append(f"| {c.name} | {c.numel:,} | {adai} | {ms[0]:.3g} | {adam} | "
                     f"{ms[1]:.3g} |")
    return lines + [""]


def markdown(meta: dict, bw: dict, cases, rows: list[Row], skipped: dict[str, str],
             ours: str) -> str:
    dev = meta["device_type"]
    lines = [f"# adai-kernels benchmark: {dev}, {meta['date'][:10]}", "",
             f"- device: {meta['device_name']}"
             + (f" ({meta['torch_threads']} torch threads, {meta['logical_cpus']} logical CPUs)"
                if dev == "cpu" else ""),
             f"- torch {meta['torch_version']}, pytorch_optimizer "
             f"{meta['pytorch_optimizer_version']}, python {meta['python_version']}, "
             f"adai_kernels CPU ISA {meta.get('adai_cpu_isa')}",
             f"- git commit {meta['git_commit']}" + (" (+ uncommitted changes)"
                                                     if meta["git_dirty"] else ""),
             f"- command: `{meta['command']}`",
             f"- load average (1, 5, 15 min) at start / end: "
             f"{_loads(meta.get('load_average_start'))} / {_loads(meta.get('load_average_end'))}",
             f"- copy bandwidth: **{bw['gbps']:.1f} GB/s** ({bw['method']}; medians: "
             + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.get("medians", {}).items())
             + (f"; the single measurements ranged from {bw['min_max_per_measurement'][0]:.1f}"
                f" to {bw['min_max_per_measurement'][1]:.1f} GB/s"
                if bw.get("min_max_per_measurement") else "") + ")",
             f"- wall time of the run: {meta.get('wall_s', 0):.0f} s; CPU used by other "
             f"processes meanwhile: {_f(meta.get('other_cpu_pct'), '.0f', 'n/a')}% of the "
             f"machine (the noise; per case below)", ""]
    head = headline(rows, ours, dev)
    if head:
        lines += ["## Headline", ""] + head + [""]
    if dev == "cuda":
        lines += roofline(cases)
    lines += ["## Results", "",
              "Median time of one `opt.step()` (each step timed alone, contenders interleaved "
              "round-robin). GB/s = elements x minimal bytes per element (B/elem) / median "
              "time. `time / fused Adam` < 1 is faster than torch's fused Adam; "
              "`speed-up vs pytorch_optimizer.Adai` > 1 is faster than the PyPI Adai. "
              "See bench/README.md for every column.", ""]
    by_case: dict[str, list[Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, []).append(r)
    for case in cases:
        if case.name not in by_case:
            continue
        first = by_case[case.name][0]
        noise = []
        if first.load_1min is not None:
            noise.append(f"1-minute load average at the start: {first.load_1min:.2f}")
        if first.other_cpu_pct is not None:
            noise.append(f"CPU used by other processes during the case: "
                         f"{first.other_cpu_pct:.0f}% of the machine")
        lines += [f"### {case.name}: {case.n_tensors} tensors, {case.numel / 1e6:.3g}M "
                  f"elements, {case.dtype_name} params and grads ({case.note})", "",
                  *(["; ".join(noise) + ".", ""] if noise else []),
                  case_table(by_case[case.name], dev), ""]
    if skipped:
        lines += ["## Not benchmarked", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    return "\n".join(lines)


def write_json(path: str, meta: dict, bw: dict, cases, rows: list[Row],
               skipped: dict[str, str], ours: str) -> None:
    data = {
        "meta": meta,
        "copy_bandwidth": bw,
        "ours": ours,
        "cases": [{"name": c.name, "profile": c.profile, "dtype": c.dtype_name,
                   "n_tensors": c.n_tensors, "numel": c.numel, "note": c.note,
                   "sweep_size": c.sweep_size} for c in cases],
        "results": [asdict(r) for r in rows],
        "not_benchmarked": skipped,
        "fused_adam": FUSED_ADAM,
        "pypi_adai": PYPI_ADAI,
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def argv_string() -> list[str]:
    return sys.argv[1:]
