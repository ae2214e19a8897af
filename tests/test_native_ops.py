"""The compiled ops: schemas and fake kernels (torch.library.opcheck), dispatch registrations,
and the choice of the per-ISA CPU kernel module. Numerics: tests/test_cpu_kernel.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from adai_kernels import _native
from adai_kernels.backends import native

F64 = torch.float64
COLS = 7  # the stats row: A, B, Bgg, Bgt, Btt, Gn, N
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _ops_loaded():
    assert _native.load_error() is None, _native.load_error()


# ---- sample inputs --------------------------------------------------------------------------

def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(0, generator=g).to(dtype),
        torch.randn(1, generator=g).to(dtype),
        torch.randn(7, generator=g).to(dtype),
        torch.randn(37, generator=g).to(dtype),
        torch.randn(9, 13, generator=g).to(dtype).t(),   # transposed
        torch.randn(2, 3, 4, 5, generator=g).to(dtype).contiguous(
            memory_format=torch.channels_last),
    ]


def _f32(x):
    return None if x is None else torch.tensor(x, dtype=torch.float32)


def sample(dtype, weight_decay=0.0, decoupled=False, dampening=1.0, grad_scale=None,
           found_inf=None, lr_tensor=None, max_grad_norm=0.0, skip_nonfinite=False):
    """(stats_args, update_args) for one bucket, its states after one earlier step."""
    params = _params(dtype)
    grads = [torch.randn_like(p) for p in params]         # the parameter's strides
    exp_avg = [torch.randn_like(p, dtype=torch.float32) * 0.1 for p in params]
    exp_avg_sq = [torch.rand_like(p, dtype=torch.float32) * 0.1 for p in params]
    beta1_prod = [torch.full_like(p, 0.9, dtype=torch.float32) for p in params]
    step_vec = torch.ones(len(params), dtype=torch.float32)
    vsum_vec = torch.tensor([v.double().sum().item() for v in exp_avg_sq], dtype=F64)
    steps = [step_vec[i] for i in range(len(params))]
    v_sums = [vsum_vec[i] for i in range(len(params))]
    stats = torch.zeros(2, COLS, dtype=F64)
    l2 = 0.0 if decoupled else weight_decay
    stats_args = (params, grads, steps, v_sums, _f32(grad_scale), 0.99, l2, stats[0])
    torch.ops.adai.stats(*stats_args)  # a real row for update ...
    step_vec.sub_(1.0)                 # ... and the counters as before that call
    stats[1] = torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0, 3.0, 100.0])  # another bucket's row
    update_args = (params, grads, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats,
                   _f32(grad_scale), _f32(found_inf), _f32(lr_tensor), 0.1, 0.1, 0.99, 1e-3,
                   weight_decay, decoupled, dampening, max_grad_norm, skip_nonfinite)
    return stats_args, update_args


SAMPLES = [
    dict(dtype=torch.float32),
    dict(dtype=torch.bfloat16, weight_decay=0.01, grad_scale=1024.0, found_inf=0.0),
    dict(dtype=torch.float16, weight_decay=0.01, decoupled=True, dampening=0.5,
         lr_tensor=0.05, max_grad_norm=1.0, skip_nonfinite=True),
    dict(dtype=torch.float32, weight_decay=0.01, grad_scale=3.0, found_inf=1.0),  # skips
]
SAMPLE_IDS = ["fp32", "bf16-scaled", "fp16-clip-lr_tensor", "fp32-found_inf"]


@pytest.mark.parametrize("kw", SAMPLES, ids=SAMPLE_IDS)
def test_opcheck_stats(kw):
    args, _ = sample(**kw)
    torch.library.opcheck(torch.ops.adai.stats.default, args)


@pytest.mark.parametrize("kw", SAMPLES, ids=SAMPLE_IDS)
def test_opcheck_update(kw):
    _, args = sample(**kw)
    torch.library.opcheck(torch.ops.adai.update.default, args)


def test_opcheck_sum_v():
    _, args = sample(torch.float32)
    exp_avg_sq, v_sums = args[3], args[5]
    torch.library.opcheck(torch.ops.adai.sum_v.default, (exp_avg_sq, v_sums))


def _fake(mode, args):
    return [[mode.from_tensor(t) for t in a] if isinstance(a, list) else
            mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]


def test_fake_kernels_check_inputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, uargs = sample(torch.float32, grad_scale=2.0, found_inf=0.0, lr_tensor=0.1)
    with FakeTensorMode() as mode:
        fa, fu = _fake(mode, args), _fake(mode, uargs)
        torch.ops.adai.stats(*fa)  # fine
        torch.ops.adai.update(*fu)
        bad = list(fa)
        bad[1] = bad[1][:-1]  # one gradient short
        with pytest.raises(Exception, match="grads"):
            torch.ops.adai.stats(*bad)
        bad = list(fa)
        bad[7] = mode.from_tensor(torch.zeros(6, dtype=F64))
        with pytest.raises(Exception, match="`out` must be a 1-D float64 tensor of 7"):
            torch.ops.adai.stats(*bad)
        bad = list(fa)
        bad[4] = mode.from_tensor(torch.ones(1))
        with pytest.raises(Exception, match="`grad_scale` must be a 0-dim float32"):
            torch.ops.adai.stats(*bad)
        bad = list(fu)
        bad[7] = mode.from_tensor(torch.zeros(COLS, dtype=F64))
        with pytest.raises(Exception, match="`stats` must be a 2-D float64 tensor with 7"):
            torch.ops.adai.update(*bad)
        for j, name in ((8, "grad_scale"), (9, "found_inf"), (10, "lr_tensor")):
            bad = list(fu)
            bad[j] = mode.from_tensor(torch.zeros((), dtype=F64))
            with pytest.raises(Exception, match=f"`{name}` must be a 0-dim float32"):
                torch.ops.adai.update(*bad)


# ---- eager input validation (messages name the argument) -----------------------------------

def _expect(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_stats_validation():
    args, _ = sample(torch.float32)
    params, grads, steps, v_sums, scale, beta2, l2, out = args
    st = torch.ops.adai.stats
    _expect("`grads` has 5 tensors", st, params, grads[:-1], steps, v_sums, scale, beta2, l2,
            out)
    _expect("`steps`", st, params, grads, steps[:-1], v_sums, scale, beta2, l2, out)
    _expect(r"grads\[2\] has dtype", st, params,
            grads[:2] + [grads[2].double()] + grads[3:], steps, v_sums, scale, beta2, l2, out)
    _expect(r"grads\[4\].*strides", st, params,
            grads[:4] + [grads[4].contiguous()] + grads[5:], steps, v_sums, scale, beta2, l2,
            out)
    _expect(r"params\[3\] must be non-overlapping and dense", st,
            params[:3] + [torch.randn(74)[::2]] + params[4:],
            grads[:3] + [torch.randn(74)[::2]] + grads[4:], steps, v_sums, scale, beta2, l2,
            out)
    _expect(r"params\[0\] has dtype", st, [p.double() for p in params],
            [g.double() for g in grads], steps, v_sums, scale, beta2, l2, out)
    _expect(r"steps\[1\] must be a 0-dim", st, params, grads,
            steps[:1] + [torch.ones(1)] + steps[2:], v_sums, scale, beta2, l2, out)
    _expect(r"v_sums\[0\] has dtype", st, params, grads, steps,
            [v_sums[0].float()] + v_sums[1:], scale, beta2, l2, out)
    for bad_out in (torch.zeros((), dtype=F64), torch.zeros(COLS), torch.zeros(COLS - 1,
                                                                              dtype=F64),
                    torch.zeros(1, COLS, dtype=F64)):
        _expect("`out` must be a 1-D float64 tensor of 7 elements", st, params, grads, steps,
                v_sums, scale, beta2, l2, bad_out)
    for bad_scale in (torch.ones(1), torch.ones((), dtype=F64)):
        _expect("`grad_scale` must be a 0-dim float32", st, params, grads, steps, v_sums,
                bad_scale, beta2, l2, out)


def test_update_validation():
    _, args = sample(torch.bfloat16)
    up = torch.ops.adai.update
    a = list(args)
    a[2] = a[2][:-1]
    _expect("`exp_avg` has 5 tensors", up, *a)
    a = list(args)
    a[3] = [a[3][0].double()] + a[3][1:]
    _expect(r"exp_avg_sq\[0\] has dtype", up, *a)
    a = list(args)
    a[4] = a[4][:4] + [a[4][4].contiguous()] + a[4][5:]
    _expect(r"beta1_prod\[4\].*strides", up, *a)
    for bad in (a[7].float(), a[7][0], a[7][:, :6]):
        a = list(args)
        a[7] = bad
        _expect("`stats` must be a 2-D float64 tensor with 7 columns", up, *a)
    for j, name in ((8, "grad_scale"), (9, "found_inf"), (10, "lr_tensor")):
        a = list(args)
        a[j] = torch.ones(1)
        _expect(f"`{name}` must be a 0-dim float32", up, *a)


def test_update_skip_writes_only_steps():
    """found_inf != 0: update only takes back stats' increments."""
    _, args = sample(torch.float32, found_inf=1.0)
    before = [[t.clone() for t in a] if isinstance(a, list) else a for a in args[:7]]
    torch.ops.adai.update(*args)
    for i, (xs, ys) in enumerate(zip(args[:7], before)):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y - 1.0 if i == 6 else y), i


def test_sum_v_validation():
    _, args = sample(torch.float32)
    exp_avg_sq, v_sums = args[3], args[5]
    sv = torch.ops.adai.sum_v
    _expect("`v_sums` has 5 tensors but `exp_avg_sq` has 6", sv, exp_avg_sq, v_sums[:-1])
    _expect(r"exp_avg_sq\[1\] has dtype", sv,
            exp_avg_sq[:1] + [exp_avg_sq[1].double()] + exp_avg_sq[2:], v_sums)
    _expect(r"exp_avg_sq\[0\] must be non-overlapping and dense", sv,
            [torch.zeros(8)[::2]] + exp_avg_sq[1:], v_sums)
    _expect(r"v_sums\[2\] must be a 0-dim", sv, exp_avg_sq,
            v_sums[:2] + [torch.zeros(1, dtype=F64)] + v_sums[3:])


def test_empty_lists():
    out = torch.full((COLS,), 7.0, dtype=F64)
    torch.ops.adai.stats([], [], [], [], None, 0.99, 0.0, out)
    assert out.tolist() == [0.0] * COLS
    torch.ops.adai.update([], [], [], [], [], [], [], torch.zeros(1, COLS, dtype=F64), None,
                          None, None, 0.1, 0.1, 0.99, 1e-3, 0.0, False, 1.0, 0.0, False)
    # (sum_v has no tensor argument to dispatch on when its lists are empty: not callable)


# ---- dispatch table and the compiled modules --------------------------------------------

def test_dispatch_registrations():
    for op in ("adai::stats", "adai::update", "adai::sum_v"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    # CUDA kernels are registered exactly when _C was compiled with them
    assert _native.has_cuda_kernels() == _native.built_with_cuda()


def test_backends():
    assert native.CPU.unavailable(torch.device("cpu")) is None
    assert "cuda" in native.CPU.unavailable(torch.device("cuda"))
    reason = native.CUDA.unavailable(torch.device("cuda"))
    if _native.built_with_cuda():
        assert reason is None
    else:
        assert "built without CUDA kernels" in reason


def _expected_isa() -> str:
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return "avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") \
        else "default"


def test_isa_matches_cpu():
    if "ADAI_CPU_ISA" in os.environ:
        pytest.skip("ADAI_CPU_ISA is set")
    assert _native.cpu_isa() == _expected_isa()
    # the wide builds really use wide vectors (the sources also static_assert this)
    assert _native.cpu_vec_size() == {"avx512": 16, "avx2": 8, "default": 8}[_native.cpu_isa()]


def _probe(env: dict) -> dict:
    """cpu_isa(), cpu_vec_size() and one step's result in a fresh interpreter with `env`."""
    code = (
        "import json, torch\n"
        "from adai_kernels import _native\n"
        "g = torch.Generator().manual_seed(0)\n"
        "p = torch.randn(1000, generator=g); gr = torch.randn(1000, generator=g)\n"
        "m, v, b = torch.zeros(1000), torch.zeros(1000), torch.ones(1000)\n"
        "k = torch.zeros((), dtype=torch.float32); vs = torch.zeros((), dtype=torch.float64)\n"
        "st = torch.zeros(1, 7, dtype=torch.float64)\n"
        "torch.ops.adai.stats([p], [gr], [k], [vs], None, 0.99, 0.0, st[0])\n"
        "torch.ops.adai.update([p], [gr], [m], [v], [b], [vs], [k], st, None, None, None,\n"
        "                      0.1, 0.1, 0.99, 1e-3, 0.0, False, 0.5, 0.0, False)\n"
        "print(json.dumps(dict(isa=_native.cpu_isa(), vec=_native.cpu_vec_size(),\n"
        "                      err=_native.load_error(), notes=_native.notes(),\n"
        "                      p=p.tolist())))\n")
    full_env = dict(os.environ)
    for key in ("ADAI_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        full_env.pop(key, None)
    full_env.update(env)
    res = subprocess.run([sys.executable, "-c", code], env=full_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_isa_overrides_in_subprocess():
    order = ["default", "avx2", "avx512"]
    supported = order[: order.index(_expected_isa()) + 1]
    results = {}
    for isa in supported:
        r = _probe({"ADAI_CPU_ISA": isa})
        assert r["err"] is None and r["isa"] == isa, r
        assert r["vec"] == {"avx512": 16, "avx2": 8, "default": 8}[isa]
        results[isa] = torch.tensor(r["p"])
    # torch's own override is honoured too
    r = _probe({"ATEN_CPU_CAPABILITY": "default"})
    assert r["isa"] == "default", r
    # a bad value is ignored (and said so), not fatal
    r = _probe({"ADAI_CPU_ISA": "sse9"})
    assert r["err"] is None and r["isa"] == _expected_isa(), r
    assert any("ADAI_CPU_ISA" in n for n in r["notes"]), r
    # every variant computes the same step (not bitwise: lane sums and pow differ by ISA)
    for isa in supported[1:]:
        torch.testing.assert_close(results[isa], results["default"], rtol=1e-5, atol=1e-6)


def test_import_without_compiled_modules():
    """A missing or broken _C must not break the import; the backends say why."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'adai_kernels._C':\n"
        "            raise ImportError('undefined symbol: _ZN3c10 (simulated)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from adai_kernels import _native\n"
        "from adai_kernels.backends import native\n"
        "assert _native.cpu_isa() == 'none' and not _native.has_cuda_kernels()\n"
        "print(native.CPU.unavailable(torch.device('cpu')))\n"
        "print(native.CUDA.unavailable(torch.device('cuda')))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("adai_kernels._C is not built") and "simulated" in lines[0]
    assert lines[1].startswith("adai_kernels._C is not built")
