"""Keeps the benchmark machinery (bench/) from rotting: the CLI on a minuscule profile."""
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
