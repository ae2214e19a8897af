"""The benchmark machinery (bench/): the CLI on a minuscule profile (so that the directory does
not rot), the byte counts and the roofline of the reports, the model profiles; and the
pytest-benchmark suite, one benchmark per (case, contender) with the same parameter lists and
contenders as `python -m bench` at the sizes of `--quick`, which runs only when asked for:

    pytest tests/test_bench.py --benchmark-only --benchmark-group-by=param:case

(needs pytest-benchmark; `--benchmark-json out.json` keeps the numbers). For side-by-side
interleaved numbers with GB/s and % of copy bandwidth, use `python -m bench` instead; the
suite is for pytest-benchmark's own comparison tooling (`--benchmark-compare`).
"""
import json
import os

import pytest
import torch

bench_main = pytest.importorskip("bench.__main__")


def test_cli_micro_profile(tmp_path, capsys):
    rc = bench_main.main(["--device", "cpu", "--profiles", "micro", "--quick",
                          "--out", str(tmp_path), "--name", "smoke", "--budget-s", "0.5",
                          "--copy-mib", "4", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| contender |" in out and "copy bandwidth" in out
    assert "adai_kernels[reference]" in out
    for name in ("smoke.md", "smoke.json", "smoke-steptime.png", "smoke-bandwidth.png",
                 "smoke-profiles.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    data = json.loads((tmp_path / "smoke.json").read_text())
    meta = data["meta"]
    for key in ("device_name", "date", "git_commit", "torch_version", "command",
                "torch_threads"):
        assert key in meta
    assert data["copy_bandwidth"]["gbps"] > 0
    results = {(r["case"], r["contender"]): r for r in data["results"]}
    ref = results[("micro/fp32", "adai_kernels[reference]")]
    assert ref["error"] is None and ref["median_s"] > 0 and len(ref["times_s"]) >= 3
    assert ref["bytes_per_element"] == 40
    assert results[("micro/bf16", "adai_kernels[reference]")]["bytes_per_element"] == 32
    adam = results[("micro/fp32", "torch Adam(fused)")]
    assert adam["bytes_per_element"] == 28 and adam["vs_fused_adam"] == pytest.approx(1.0)
    # the interpreted Triton backend is never benchmarked on CPU
    assert not any("triton" in c for _, c in results)


def test_plain_adai_matches_reference_backend():
    """The unfused baseline computes Adai (so its timings are for the same algorithm)."""
    from adai_kernels import Adai
    from bench.contenders import PlainAdai

    torch.manual_seed(0)
    a = [torch.randn(5, 3), torch.randn(7)]
    b = [p.clone() for p in a]
    oa, ob = PlainAdai(a, lr=0.1), Adai(b, lr=0.1, backend="reference")
    for _ in range(3):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_byte_counts():
    from bench.contenders import bytes_per_element

    f32, bf16 = torch.float32, torch.bfloat16
    assert bytes_per_element("adai", f32, f32) == 40
    assert bytes_per_element("adai", bf16, f32) == 32
    assert bytes_per_element("adam", f32, f32) == 28
    assert bytes_per_element("adam", bf16, bf16) == 14


def test_roofline_of_gpu_profiles():
    """GPU reports model each case's step at the nominal bandwidth, labelled as a model."""
    from bench import profiles, report

    cases = profiles.build(profiles.DEFAULT_PROFILES, "cuda", False)
    lines = report.roofline(cases)
    assert "not a measurement" in lines[0] and "4.8 TB/s nominal" in lines[2]
    cells = [[x.strip() for x in line.strip("|").split("|")] for line in lines[6:-1]]
    rows = {row[0]: row[1:] for row in cells}
    assert set(rows) == {c.name for c in cases}
    # ResNet-50: 25,557,032 elements x 40 B / 4.8 TB/s; bf16 params: 32 B (Adam 14 B)
    assert rows["resnet50/fp32"] == ["25,557,032", "40", "0.213", "28", "0.149"]
    assert rows["resnet50/bf16"][1:] == ["32", "0.17", "14", "0.0745"]


def test_resnet50_shapes():
    import math

    from bench.profiles import gpt2_shapes, resnet50_shapes

    shapes = resnet50_shapes()
    assert len(shapes) == 161 and sum(math.prod(s) for s in shapes) == 25_557_032
    shapes = gpt2_shapes()
    assert len(shapes) == 148 and sum(math.prod(s) for s in shapes) == 124_439_808


# ---- the pytest-benchmark suite ---------------------------------------------------------------

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    """test_step's cases and contenders, built only for a --benchmark-only run (building them
    imports every contender and costs seconds)."""
    if "contender" not in metafunc.fixturenames:
        return
    if not metafunc.config.getoption("benchmark_only", default=False):
        metafunc.parametrize("case, contender", [pytest.param(
            None, None, id="suite", marks=pytest.mark.skip(
                reason="the pytest-benchmark suite: pytest tests/test_bench.py "
                       "--benchmark-only (needs pytest-benchmark)"))])
        return
    from bench import contenders as cmod
    from bench import profiles

    cases = profiles.build(["resnet50", "tiny", "gpt2"], DEVICE.type, quick=True)
    contenders, _ = cmod.contenders(DEVICE)
    metafunc.parametrize("case", cases, ids=[c.name for c in cases])
    metafunc.parametrize("contender", contenders, ids=[c.name for c in contenders])


def _setup(case):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = []
    for shape in case.shapes:
        p = torch.randn(shape, generator=gen, device=DEVICE).to(case.dtype)
        p.grad = torch.randn(shape, generator=gen, device=DEVICE).to(case.dtype)
        params.append(p)
    return params


def test_step(benchmark, case, contender):
    from bench import contenders as cmod

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
