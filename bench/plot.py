"""PNG plots: step time vs size and % of copy bandwidth vs size (the size sweep), and % of
copy bandwidth per model-like case."""
from __future__ import annotations

import os

from .runners import Row


def _style(name: str) -> dict:
    if name.startswith("adai_kernels"):
        return dict(linewidth=2.2, marker="o")
    if "Adam" in name:
        return dict(linestyle="--", marker="s", linewidth=1.2)
    return dict(linestyle=":", marker="^", linewidth=1.2)


def plots(out_dir: str, stem: str, cases, rows: list[Row], title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweep = [c for c in cases if c.sweep_size is not None]
    by = {(r.case, r.contender): r for r in rows}
    contenders = list(dict.fromkeys(r.contender for r in rows))
    if sweep:
        for what, ylabel, fname, key in (
                ("time", "median step time (ms)", "steptime", lambda r: r.median_s * 1e3),
                ("bw", "% of measured copy bandwidth", "bandwidth", lambda r: r.pct_copy_bw)):
            fig, ax = plt.subplots(figsize=(8, 5))
            for name in contenders:
                pts = [(c.sweep_size, key(by[(c.name, name)])) for c in sweep
                       if (c.name, name) in by and by[(c.name, name)].median_s is not None
                       and key(by[(c.name, name)]) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, label=name, **_style(name))
            ax.set_xscale("log")
            if what == "time":
                ax.set_yscale("log")
            else:
                ax.axhline(100, color="grey", linewidth=0.8)
            ax.set_xlabel("parameters in one fp32 tensor")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: size sweep")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{stem}-{fname}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    others = [c for c in cases if c.sweep_size is None]
    if others:
        import numpy as np
        fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(others)), 5))
        width = 0.8 / max(1, len(contenders))
        for i, name in enumerate(contenders):
            ys = [(by[(c.name, name)].pct_copy_bw or 0) if (c.name, name) in by and
                  by[(c.name, name)].pct_copy_bw is not None else 0 for c in others]
            ax.bar(np.arange(len(others)) + i * width, ys, width, label=name)
        ax.set_xticks(np.arange(len(others)) + width * (len(contenders) - 1) / 2)
        ax.set_xticklabels([c.name for c in others], rotation=20, fontsize=8)
        ax.set_ylabel("% of measured copy bandwidth")
        ax.axhline(100, color="grey", linewidth=0.8)
        ax.set_title(f"{title}: effective bandwidth per profile")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-profiles.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
