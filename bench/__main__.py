"""python -m bench --device {cpu,cuda} [--quick] [--out DIR] [--profiles ...]

Runs every available contender side by side (see bench/README.md) and writes a markdown
table to stdout, plus <device>-<date>[-quick].{md,json} and PNG plots into --out."""
from __future__ import annotations

import argparse
import gc
import datetime as _dt
import os
import sys
import time

import torch

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

def parse_args(argv):
    from .profiles import DEFAULT_PROFILES, PROFILES

    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true",
                    help="smaller profiles and a short time budget (a few minutes on 2 cores)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="directory for the .md, .json, .png (default: bench/out, git-ignored)")
    ap.add_argument("--profiles", nargs="+", default=list(DEFAULT_PROFILES),
                    choices=sorted(PROFILES), metavar="PROFILE",
                    help=f"some of {', '.join(PROFILES)} (default: "
                         f"{' '.join(DEFAULT_PROFILES)})")
    ap.add_argument("--contenders", nargs="+", default=None, metavar="SUBSTRING",
                    help="run only contenders whose name contains one of these")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="soft wall-clock budget for the timed cases (default: 100 with "
                         "--quick, 480 otherwise; warm-ups, memory steps and the bandwidth "
                         "measurement come on top)")
    ap.add_argument("--max-rounds", type=int, default=None)
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="file stem (default <device>-<date>[-quick])")
    ap.add_argument("--copy-mib", type=int, default=None,
                    help="size of the copy-bandwidth measurement (default 256 on CPU, "
                         "1024 on GPU)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    try:
        return _main(argv)
    finally:
        gc.unfreeze()


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from . import bandwidth, contenders as cmod, plot, profiles, report, runners

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meter = runners.OtherCpu()
    meta = report.metadata(device, argv)
    cases = profiles.build(args.profiles, device.type, args.quick)
    cons, skipped = cmod.contenders(device)
    if args.contenders:
        keep = [c for c in cons if any(s in c.name for s in args.contenders)]
        for c in cons:
            if c not in keep:
                skipped[c.name] = "not selected (--contenders)"
        cons = keep
    try:
        from adai_kernels import backends
        ours = f"adai_kernels[{backends.resolve('auto', device).name}]"
    except Exception:
        ours = next((c.name for c in cons if c.kind == "ours"), "")

    budget = args.budget_s if args.budget_s is not None else (100.0 if args.quick else 480.0)
    max_rounds = args.max_rounds or ((10 if args.quick else 25) if device.type == "cpu"
                                     else (30 if args.quick else 100))
    cfg = runners.Config(device=device, budget_s=budget, min_rounds=args.min_rounds,
                         max_rounds=max(max_rounds, args.min_rounds),
                         warmup=2 if device.type == "cpu" else 3, seed=args.seed)

    copy_bytes = args.copy_mib << 20 if args.copy_mib else None
    copy_meter = bandwidth.CopyMeter(device, copy_bytes)
    first = copy_meter.measure(11, "before the cases")
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=len(cases), desc=f"bench {device.type}", unit="case",
                        file=sys.stderr, dynamic_ncols=True)
    try:
        rows = runners.run_all(cases, cons, cfg, first, progress,
                               between=lambda name: copy_meter.measure(3, f"after {name}"))
    finally:
        if progress is not None:
            progress.close()
    copy_meter.measure(11, "after the cases")
    bw = copy_meter.result()
    copy_meter.close()
    # the bandwidth fractions use the median of all the copy samples of the run
    for r in rows:
        if r.gbps is not None:
            r.pct_copy_bw = 100.0 * r.gbps / bw["gbps"]
    meta["load_average_end"] = report.loadavg()
    meta["wall_s"] = time.perf_counter() - t0
    meta["other_cpu_pct"] = meter.pct()
    meta["budget_s"] = budget
    meta["quick"] = args.quick
    meta["peak_memory_method"] = (
        "torch.cuda.max_memory_allocated() delta over one step" if device.type == "cuda" else
        "VmHWM - VmRSS of the process over one step (after malloc_trim, VmHWM reset via "
        "/proc/self/clear_refs); n/a where that is not possible")

    md = report.markdown(meta, bw, cases, rows, skipped, ours)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or (f"{device.type}-{meta['date'][:10]}" + ("-quick" if args.quick else ""))
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md + "\n")
    report.write_json(os.path.join(args.out, stem + ".json"), meta, bw, cases, rows, skipped,
                      ours)
    written = [stem + ".md", stem + ".json"]
    if not args.no_plots:
        title = f"{meta['device_name']} ({device.type})"
        written += [os.path.basename(p) for p in plot.plots(args.out, stem, cases, rows, title)]
    print(f"\nwrote {', '.join(os.path.join(args.out, w) for w in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
