"""examples/train_transformer.py: its corpus is a fixed, deterministic slice of the standard
library, and its --quick mode trains every run it can and writes the CSV and PNG."""
import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_transformer.py"


def load_script():
    """The script as a module (examples/ is no package); dataclasses need it registered."""
    if "train_transformer" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_transformer", SCRIPT)
        sys.modules["train_transformer"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["train_transformer"])
    return sys.modules["train_transformer"]


def test_corpus_is_a_fixed_slice_of_the_stdlib():
    tt = load_script()
    files = tt.corpus_files(tt.QUICK.corpus_bytes)
    names = [str(p.relative_to(files[0].parent)) for p in files]
    assert names == sorted(names) and names == list(tt.STDLIB_FILES[:len(names)])
    assert sum(p.stat().st_size for p in files) >= tt.QUICK.corpus_bytes
    train, val = tt.corpus(tt.QUICK.corpus_bytes)
    again = tt.corpus(tt.QUICK.corpus_bytes)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert len(train) + len(val) == tt.QUICK.corpus_bytes
    assert abs(len(val) / tt.QUICK.corpus_bytes - tt.VAL_FRACTION) < 0.01
    assert train.dtype == torch.long and 0 <= int(train.min()) and int(train.max()) < 256
    first = files[0].read_bytes()
    cut = int(len(first) * (1 - tt.VAL_FRACTION))
    assert bytes(train[:cut].to(torch.uint8).tolist()) == first[:cut]


def test_runs_share_initial_weights_and_bf16_runs_compute_in_bf16():
    tt = load_script()
    weights = {}
    for name, (dtype, *_rest) in tt.RUNS.items():
        if name in ("bf16-master", "bf16-stochastic"):
            continue  # their optimizer options may not exist in this build
        model, _ = tt.build(name, 0.1, tt.QUICK, "cpu", seed=0)
        assert {p.dtype for p in model.parameters()} == {dtype}
        weights[name] = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    assert torch.equal(weights["fp32"], weights["adamw-fp32"])
    assert torch.equal(weights["bf16-nearest"], weights["fp32"].bfloat16().float())


def test_quick_mode_writes_curves(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "transformer_curves.png").stat().st_size > 10_000
    with open(tmp_path / "transformer_curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "step", "train_loss", "val_loss", "lr", "seconds"]
    tt = load_script()
    ran = list(dict.fromkeys(r["run"] for r in rows))
    for name, (_, _, option, _) in tt.RUNS.items():
        # A run is skipped, with its line, exactly when its Adai option is missing.
        if option and not tt.adai_option(option):
            assert name not in ran and f"{name:16s} skipped: " in done.stdout
        else:
            assert name in ran
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("train_loss", "val_loss", "lr"))
    fp32 = [r for r in rows if r["run"] == "fp32"]
    assert [int(r["step"]) for r in fp32] == list(range(0, tt.QUICK.steps + 1,
                                                          tt.QUICK.eval_every))
    assert float(fp32[-1]["val_loss"]) < float(fp32[0]["val_loss"]) - 1.0
    assert float(fp32[-1]["train_loss"]) < float(fp32[0]["train_loss"]) - 1.0
