"""Train a small byte-level decoder-only transformer on the Python standard library's own
source with Adai on float32 and on bfloat16 parameters (round-to-nearest, fp32 master
weights, stochastic rounding) and with AdamW, and save the validation curves (CSV and PNG).

    python examples/train_transformer.py [--out transformer_out] [--device cpu] [--quick]

Why bfloat16 needs care: a bf16 parameter has 8 significant bits, so an update smaller than
half its ulp (|p| * 2**-9) rounds back to the same value. Late in a run, when lr * mhat gets
that small, round-to-nearest steps stop changing the weights. Every run sees the same
initial weights and the same batches in the same order; the runs whose Adai option this
installation lacks are skipped with a printed line.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from torch import nn

from adai_kernels import Adai

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

# Modules present, as these paths, in every CPython from 3.10 on (packages that replaced a
# module, such as re/ in 3.11 or pathlib/ in 3.13, are left out), sorted: the corpus is the
# same text on every machine with the same Python.
STDLIB_FILES = tuple(sorted(
    f"{name}.py" for name in """
    argparse ast base64 bisect calendar cmd code codecs colorsys configparser contextlib copy
    csv dataclasses datetime difflib dis enum filecmp fnmatch fractions functools getopt
    gettext glob gzip heapq hmac inspect ipaddress keyword linecache locale mimetypes numbers
    operator optparse os pickle platform pprint queue random reprlib sched secrets selectors
    shlex shutil signal socket statistics string struct subprocess tarfile tempfile textwrap
    threading timeit tokenize traceback types typing uuid warnings weakref
    collections/__init__ json/__init__ json/decoder json/encoder logging/__init__
    """.split()))
VAL_FRACTION = 0.1  # the last 10% of every file is validation text, the rest training text


def corpus_files(budget: int) -> list[Path]:
    """The fixed list of files, in order, until `budget` bytes are reached."""
    root, files, total = Path(sysconfig.get_paths()["stdlib"]), [], 0
    for name in STDLIB_FILES:
        path = root / name
        if not path.is_file():
            continue  # a Python that dropped the module: the rest of the list still holds
        files.append(path)
        total += path.stat().st_size
        if total >= budget:
            break
    return files


def corpus(budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens (0..255) of the training and validation text, split inside every file."""
    train, val, left = [], [], budget
    for path in corpus_files(budget):
        data = path.read_bytes()[:left]
        left -= len(data)
        cut = int(len(data) * (1 - VAL_FRACTION))
        train.append(data[:cut])
        val.append(data[cut:])
    as_tokens = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()
    return as_tokens(train), as_tokens(val)


@dataclass
class Config:
    layers: int = 3
    d_model: int = 128
    heads: int = 4
    context: int = 128
    batch: int = 16
    steps: int = 400
    eval_every: int = 25
    eval_batches: int = 6
    corpus_bytes: int = 2_000_000
    warmup: int = 30


QUICK = Config(layers=1, d_model=32, heads=2, context=32, batch=8, steps=40, eval_every=10,
               eval_batches=2, corpus_bytes=200_000, warmup=4)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.layers)))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256, bias=False)
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 layers).
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight",
                                                                          "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def loss_of(model, data, offsets, context):
    rows = offsets[:, None] + torch.arange(context + 1, device=offsets.device)
    chunk = data[rows]
    logits = model(chunk[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, val, eval_offsets, context):
    return sum(loss_of(model, val, o, context).item() for o in eval_offsets) / len(eval_offsets)


# Adai's lr is SGD-like (about 10x SGD-M's). Both lrs come from 150-step trials of the
# float32 runs (val loss at step 150): Adai 0.3: 2.61, 0.5: 2.58, 0.7: 2.57, 1: 2.61, 3: 2.86;
# AdamW 1e-3: 2.44, 3e-3: 2.39, 1e-2: 2.68. All Adai runs share one lr. eps = 1e-2 bounds the
# inertia at 0.99, a momentum horizon of ~100 steps that fits a run of a few hundred steps
# (1e-3 gave 2.56 at lr 0.5: no better). Without clipping Adai diverged at lr 1 (NaN by step
# 50); clipping at 5 instead of 1 gave 2.88.
ADAI_LR, ADAMW_LR = 0.5, 3e-3
MAX_GRAD_NORM = 1.0


def adai_option(name: str) -> bool:
    """Whether this adai_kernels accepts Adai(..., name=True) here: probed on a bf16 tensor.
    A RuntimeError: the option exists, but this device's backend does not implement it."""
    try:
        Adai([torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)], lr=0.1, **{name: True})
    except TypeError as err:
        if name in str(err):
            return False
        raise
    except RuntimeError as err:
        if name in str(err):
            return False
        raise
    return True


def adai(params, lr, **options):
    return Adai(params, lr=lr, eps=1e-2, max_grad_norm=MAX_GRAD_NORM, **options)


# run name: (parameter dtype, optimizer family, the Adai option it needs or None, factory)
RUNS = {
    "fp32": (torch.float32, "Adai", None, lambda p, lr, s: adai(p, lr)),
    "bf16-nearest": (torch.bfloat16, "Adai", None, lambda p, lr, s: adai(p, lr)),
    "bf16-master": (torch.bfloat16, "Adai", "master_weights",
                    lambda p, lr, s: adai(p, lr, master_weights=True)),
    "bf16-stochastic": (torch.bfloat16, "Adai", "stochastic_rounding",
                        lambda p, lr, s: adai(p, lr, stochastic_rounding=True, seed=s)),
    "adamw-fp32": (torch.float32, "AdamW", None,
                   lambda p, lr, s: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.95),
                                                      weight_decay=0.01)),
}


def schedule(cfg: Config):
    """Linear warm-up, then a cosine decay to a tenth of the peak. A LambdaLR scales only
    the lr; OneCycleLR and CyclicLR would also cycle betas[0], Adai's inertia scale."""
    def factor(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    return factor


def build(name, lr, cfg, device, seed):
    """The run's model (the same float32 initialisation for every run, then cast to the
    run's dtype: bf16 runs compute in bf16) and its optimizer."""
    dtype, _, _, make_opt = RUNS[name]
    torch.manual_seed(seed)
    model = ByteGPT(cfg).to(device=device, dtype=dtype)
    return model, make_opt(model.parameters(), lr, seed)


def optimizer_step(name, model, opt, measure: bool):
    """opt.step(); with `measure`, also the fraction of parameter elements that it left
    unchanged. In float32 Adai leaves only the embedding rows of bytes that never occur (zero
    gradient, zero momentum); what bf16 adds to that are the updates that rounded away."""
    if RUNS[name][1] == "AdamW":  # Adai clips inside its step (max_grad_norm)
        nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    before = [p.detach().clone() for p in model.parameters()] if measure else []
    opt.step()
    if not measure:
        return None
    same = sum(int((p.detach() == b).sum()) for p, b in zip(model.parameters(), before))
    return same / sum(b.numel() for b in before)


def train(name, lr, cfg, data, device, seed):
    """One run: its rows (run, step, train_loss, val_loss, lr, seconds) and the fraction of
    parameter elements left unchanged by the last step."""
    train_data, val_data, batches, eval_offsets = data
    model, opt = build(name, lr, cfg, device, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg))
    rows, window, unchanged, start = [], [], None, time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = evaluate(model, val_data, eval_offsets, cfg.context)
            # The mean over the steps since the last row; at step 0 the first batch's loss.
            train_loss = (sum(window) / len(window) if window
                          else evaluate(model, train_data, batches[:1], cfg.context))
            rows.append(dict(run=name, step=step, train_loss=train_loss, val_loss=val,
                             lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - start))
            print(f"{name:16s} step {step:4d}  train {train_loss:.4f}  val {val:.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.3g}  {rows[-1]['seconds']:6.1f} s"
                  + (f"  last step left {unchanged:.1%} unchanged" if step else ""),
                  flush=True)
            window = []
        if step == cfg.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, train_data, batches[step], cfg.context)
        loss.backward()
        # Measured on the step before each row, which prints it.
        measure = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps
        fraction = optimizer_step(name, model, opt, measure)
        unchanged = unchanged if fraction is None else fraction
        sched.step()
        window.append(loss.item())
    return rows, unchanged


def fixed_batches(cfg, train_data, val_data, seed, device):
    """The training offsets of every step (one generator, drawn once: the same for every
    run) and the validation offsets, evenly spaced over the validation text."""
    gen = torch.Generator().manual_seed(seed)
    batches = torch.randint(0, len(train_data) - cfg.context - 1, (cfg.steps, cfg.batch),
                            generator=gen)
    span = len(val_data) - cfg.context - 1
    evals = torch.linspace(0, span, cfg.eval_batches * cfg.batch).long()
    return batches.to(device), evals.view(cfg.eval_batches, cfg.batch).to(device)


def write_csv(rows, path: Path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "step", "train_loss", "val_loss", "lr",
                                               "seconds"])
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, lrs, path: Path, steps: int):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        label = f"{name} ({RUNS[name][1]} lr {lrs[name]:g})"
        for ax in axes:
            ax.plot([r["step"] for r in mine], [r["val_loss"] for r in mine], label=label)
    late = [r["val_loss"] for r in rows
            if r["step"] >= steps // 2 and math.isfinite(r["val_loss"])]
    axes[0].set(title="Validation loss (stdlib source, bytes)", xlabel="step",
                ylabel="val loss (nats / byte)")
    axes[1].set(title="Second half", xlabel="step", xlim=(steps // 2, steps))
    if late:  # zoom on the finite losses (a diverged run would leave no limits)
        axes[1].set_ylim(min(late) - 0.02, max(late) + 0.02)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rows, lrs, skipped, unchanged):
    print(f"\n{'run':16s} {'optimizer':9s} {'lr':>6s} {'final val':>9s} {'bits/byte':>9s} "
          f"{'best val':>8s} {'seconds':>8s} {'unchanged by last step':>23s}")
    for name in RUNS:
        if name in skipped:
            print(f"{name:16s} skipped: {skipped[name]}")
            continue
        mine = [r for r in rows if r["run"] == name]
        if mine:
            last = mine[-1]
            print(f"{name:16s} {RUNS[name][1]:9s} {lrs[name]:6g} {last['val_loss']:9.4f} "
                  f"{last['val_loss'] / math.log(2):9.4f} "
                  f"{min(r['val_loss'] for r in mine):8.4f} {last['seconds']:8.1f} "
                  f"{unchanged[name]:23.1%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("transformer_out"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a tiny model and 40 steps (seconds)")
    ap.add_argument("--steps", type=int, help="override the number of training steps")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--adai-lr", type=float, default=ADAI_LR)
    ap.add_argument("--adamw-lr", type=float, default=ADAMW_LR)
    ap.add_argument("--seed", type=int, default=0)
    # One thread by default: the same numbers on every machine, and on a shared 2-core
    # machine two threads ran 3x slower than one whenever another process was busy.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.steps:
        cfg = Config(**{**cfg.__dict__, "steps": args.steps})
    torch.set_num_threads(args.threads)
    # cuBLAS is deterministic only with a fixed workspace (set before CUDA starts); some
    # attention backward kernels have no deterministic variant, so on a GPU a warning.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=not args.device.startswith("cpu"))
    args.out.mkdir(parents=True, exist_ok=True)

    train_data, val_data = corpus(cfg.corpus_bytes)
    print(f"corpus: {len(corpus_files(cfg.corpus_bytes))} stdlib files, {len(train_data)} "
          f"training and {len(val_data)} validation bytes; {cfg}")
    train_data, val_data = train_data.to(args.device), val_data.to(args.device)
    data = (train_data, val_data, *fixed_batches(cfg, train_data, val_data, args.seed,
                                                 args.device))
    lrs = {name: args.adai_lr if RUNS[name][1] == "Adai" else args.adamw_lr for name in RUNS}
    rows, skipped, unchanged = [], {}, {}
    for name in args.runs:
        option = RUNS[name][2]
        if option and not adai_option(option):
            skipped[name] = f"this adai_kernels cannot run Adai({option}=True) here"
            print(f"{name:16s} skipped: {skipped[name]}", flush=True)
            continue
        run_rows, unchanged[name] = train(name, lrs[name], cfg, data, args.device, args.seed)
        rows += run_rows

    write_csv(rows, args.out / "transformer_curves.csv")
    plot(rows, lrs, args.out / "transformer_curves.png", cfg.steps)
    summary(rows, lrs, skipped, unchanged)
    print(f"curves: {args.out / 'transformer_curves.csv'}, {args.out / 'transformer_curves.png'}")
    return rows, skipped


if __name__ == "__main__":
    main()
