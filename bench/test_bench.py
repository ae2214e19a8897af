"""pytest-benchmark suite (not part of the main test run, which collects tests/ only):

    pytest bench/test_bench.py --benchmark-group-by=param:case [--benchmark-json out.json]

One benchmark per (case, contender): the same parameter lists and contenders as
`python -m bench`, at the sizes of `--quick`. For side-by-side interleaved numbers with GB/s
and % of copy bandwidth, use `python -m bench` instead; this suite is for pytest-benchmark's
own comparison tooling (`--benchmark-compare`).
"""
from __future__ import annotations

import pytest
import torch

from bench import contenders as cmod
from bench import profiles

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in profiles.build(["resnet50", "tiny", "gpt2"], DEVICE.type, quick=True)]
CONTENDERS, SKIPPED = cmod.contenders(DEVICE)


def _setup(case):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = []
    for shape in case.shapes:
        p = torch.randn(shape, generator=gen, device=DEVICE).to(case.dtype)
        p.grad = torch.randn(shape, generator=gen, device=DEVICE).to(case.dtype)
        params.append(p)
    return params


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("contender", CONTENDERS, ids=[c.name for c in CONTENDERS])
def test_step(benchmark, case, contender):
    params = _setup(case)
    opt = contender.make(params)
    opt.step()  # creates the state

    def step():
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = case.name
    benchmark.extra_info.update(
        case=case.name, contender=contender.name, numel=case.numel,
        bytes_per_element=cmod.contender_bytes(contender, case.dtype))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = (case.numel * benchmark.extra_info["bytes_per_element"]
                                    / t / 1e9)
