"""`python -m adai_kernels`, the report for bug reports: it runs on a fresh interpreter, says
what loaded and what `auto` picks, and its self-test fails when a backend is wrong."""
from __future__ import annotations

import subprocess
import sys

import torch

from adai_kernels import __main__ as diagnostic
from adai_kernels import backends


def test_report_on_this_machine():
    run = subprocess.run([sys.executable, "-m", "adai_kernels"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.startswith(f"adai-kernels 0.1.0, torch {torch.__version__}")
    for line in ("native modules: loaded", "CPU kernel: ", "cpu parameters: backend='auto' "
                 "picks cpu", "  cpu: ok: max relative difference", "  reference: the oracle"):
        assert line in out, out


def test_self_test_catches_a_wrong_backend(monkeypatch):
    cpu = backends.get("cpu")
    right = cpu.update

    def off_by_a_little(work, stats, ctl):
        right(work, stats, ctl)
        torch._foreach_mul_(work.params, 1.001)

    monkeypatch.setattr(cpu, "update", off_by_a_little)
    assert diagnostic._self_test("cpu", torch.device("cpu")).startswith("FAILED")
    monkeypatch.setattr(cpu, "update", right)
    assert diagnostic._self_test("cpu", torch.device("cpu")).startswith("ok")
