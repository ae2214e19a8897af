"""The compiled ops' module and their checks as C++ words them: fake kernels
(FakeTensorMode), eager input validation of the CPU kernel (messages name the argument),
dispatch registrations, and the choice of the per-ISA CPU kernel module. Numerics, opcheck
and the ops' contract on every target: tests/test_op_matrix.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from adai_kernels import _native
from adai_kernels.backends import native
from op_fixtures import (S_OUT, S_SCALE, S_SEG, S_STEPS, S_V_SUMS, TARGETS, U_B, U_INF, U_LR,
                         U_M, U_SCALE, U_SEG, U_STATS, U_STEPS, U_V, U_V_SUMS, same_bits,
                         sample_args)

F64 = torch.float64
COLS = 7  # the stats row: A, B, Bgg, Bgt, Btt, Gn, N
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _ops_loaded():
    assert _native.load_error() is None, _native.load_error()


def sample(dtype, **kw):
    """(stats_args, update_args) of the CPU kernel for one bucket (op_fixtures.sample_args)."""
    return sample_args(TARGETS["cpu"], dtype, **kw)


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
        torch.ops.adai.v_sum(fu[U_V], fu[U_SEG], fu[U_V_SUMS])
        bad = list(fa)
        bad[1] = bad[1][:-1]  # one gradient short
        with pytest.raises(Exception, match="grads"):
            torch.ops.adai.stats(*bad)
        bad = list(fa)
        bad[S_OUT] = mode.from_tensor(torch.zeros(6, dtype=F64))
        with pytest.raises(Exception, match="`out` must be a 1-D float64 tensor of 7"):
            torch.ops.adai.stats(*bad)
        bad = list(fa)
        bad[S_SCALE] = mode.from_tensor(torch.ones(2))
        with pytest.raises(Exception, match="`grad_scale` must be a float32 tensor of one"):
            torch.ops.adai.stats(*bad)
        for seg, message in ((torch.zeros(5, 3, dtype=torch.int64),
                              "`segments` has 5 rows but `params` has 6 tensors"),
                             (torch.zeros(6, 3, dtype=torch.int32),
                              "`segments` must be an int64 CPU tensor"),
                             (torch.zeros(18, dtype=torch.int64),
                              "`segments` must be an int64 CPU tensor")):
            bad = list(fa)
            bad[S_SEG] = mode.from_tensor(seg)
            with pytest.raises(Exception, match=message):
                torch.ops.adai.stats(*bad)
        bad = list(fa)
        bad[S_V_SUMS] = mode.from_tensor(torch.zeros(5, dtype=F64))
        with pytest.raises(Exception, match="`steps` has 6 slots but `v_sums` has 5"):
            torch.ops.adai.stats(*bad)
        bad = list(fu)
        bad[U_STATS] = mode.from_tensor(torch.zeros(COLS, dtype=F64))
        with pytest.raises(Exception, match="`stats` must be a 2-D float64 tensor with 7"):
            torch.ops.adai.update(*bad)
        bad = list(fu)
        bad[U_V] = mode.from_tensor(torch.zeros(uargs[U_M].numel() + 1))
        with pytest.raises(Exception, match="`exp_avg_sq` has .* elements but `exp_avg` has"):
            torch.ops.adai.update(*bad)
        bad = list(fu)
        bad[U_B] = mode.from_tensor(torch.zeros(uargs[U_M].numel(), dtype=F64))
        with pytest.raises(Exception, match="`beta1_prod` must be a contiguous 1-D torch.float32"):
            torch.ops.adai.update(*bad)
        for j, name in ((U_SCALE, "grad_scale"), (U_INF, "found_inf"), (U_LR, "lr_tensor")):
            bad = list(fu)
            bad[j] = mode.from_tensor(torch.zeros((), dtype=F64))
            with pytest.raises(Exception, match=f"`{name}` must be a float32 tensor of one"):
                torch.ops.adai.update(*bad)
        with pytest.raises(Exception, match="`segments` must be an int64 CPU tensor"):
            torch.ops.adai.v_sum(fu[U_V], mode.from_tensor(torch.zeros(6, 2, dtype=torch.int64)),
                                 fu[U_V_SUMS])


# ---- eager input validation (messages name the argument) -----------------------------------

def _expect(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def _with(args, changes):
    """`args` with the positions in `changes` replaced."""
    a = list(args)
    for j, v in changes.items():
        a[j] = v
    return a


def _seg_with(segments, i, col, value):
    s = segments.clone()
    s[i, col] = value
    return s


CPU_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _expect_cpu(match, op, args):
    """Calls the CPU kernel itself (another device's tensor would dispatch elsewhere)."""
    with pytest.raises(RuntimeError, match=match):
        op.default.redispatch(CPU_ONLY, *args)


def _segment_cases(segments, numels, state_len, n_slots):
    """(message, bad segments) for the checks of the segment table, given the state buffers'
    length (None: no state buffers)."""
    n = len(numels)
    shape = r"`segments` must be a contiguous int64 CPU tensor of shape \(n, 3\)"
    cases = [
        (shape, segments.int()),
        (shape, segments.double()),
        (shape, segments[:, :2].contiguous()),
        (shape, segments.reshape(-1)),
        (shape, segments.t().contiguous().t()),                       # not contiguous
        (f"`segments` has {n - 1} rows but `params` has {n} tensors", segments[:-1]),
        (r"segments\[2\] has numel 8 but params\[2\] has 7 elements",
         _seg_with(segments, 2, 1, 8)),
        (r"segments\[1\] = \(offset -1, numel 1\) has a negative entry",
         _seg_with(segments, 1, 0, -1)),
        (r"segments\[4\] has slot 6 but steps and v_sums have 6 slots",
         _seg_with(segments, 4, 2, n_slots)),
        (r"segments\[4\] has slot -1", _seg_with(segments, 4, 2, -1)),
        (r"segments\[3\] uses slot 5, which an earlier tensor of this call uses",
         _seg_with(segments, 3, 2, 5)),
    ]
    if state_len is not None:
        last = segments[-1].tolist()
        cases += [
            (rf"segments\[5\] = \(offset {state_len - last[1] + 1}, numel {last[1]}\) is "
             rf"outside the state buffers of {state_len} elements",
             _seg_with(segments, 5, 0, state_len - last[1] + 1)),
            (r"segments\[3\] = \(offset \d+, numel 37\) is outside",
             _seg_with(segments, 3, 0, 2 ** 62)),                     # no overflow
            (r"segments\[[12]\] and segments\[[12]\] overlap in the state buffers",
             _seg_with(segments, 2, 0, segments[1, 0].item())),
        ]
    return cases


def test_stats_validation():
    args, _ = sample(torch.float32)
    params, grads, segments, steps, v_sums, scale, beta2, l2, out = args
    st = torch.ops.adai.stats
    _expect("`grads` has 5 tensors", st, params, grads[:-1], *args[2:])
    _expect(r"grads\[2\] has dtype", st, params,
            grads[:2] + [grads[2].double()] + grads[3:], *args[2:])
    _expect(r"grads\[4\].*strides", st, params,
            grads[:4] + [grads[4].contiguous()] + grads[5:], *args[2:])
    _expect(r"params\[3\] must be non-overlapping and dense", st,
            params[:3] + [torch.randn(74)[::2]] + params[4:],
            grads[:3] + [torch.randn(74)[::2]] + grads[4:], *args[2:])
    _expect(r"params\[0\] has dtype Int; expected float32, float64, bfloat16 or float16", st,
            [p.int() for p in params], [g.int() for g in grads], *args[2:])
    # float64 takes float64 state, so it shares a call with no other dtype
    _expect(r"params\[1\] has dtype Double but params\[0\] has Float", st,
            params[:1] + [p.double() for p in params[1:]],
            grads[:1] + [g.double() for g in grads[1:]], *args[2:])
    for match, seg in _segment_cases(segments, [p.numel() for p in params], None, 6):
        _expect(match, st, *_with(args, {S_SEG: seg}))
    # steps and v_sums: flat, of their dtype, one length
    _expect("`steps` must be a contiguous 1-D Double tensor", st,
            *_with(args, {S_STEPS: steps.reshape(2, 3)}))
    _expect("`steps` must be a contiguous 1-D Double tensor", st,
            *_with(args, {S_STEPS: steps.float()}))
    _expect("`v_sums` must be a contiguous 1-D Double tensor", st,
            *_with(args, {S_V_SUMS: v_sums.float()}))
    _expect("`v_sums` must be a contiguous 1-D Double tensor", st,
            *_with(args, {S_V_SUMS: torch.zeros(12, dtype=F64)[::2]}))
    _expect("`steps` has 6 slots but `v_sums` has 7", st,
            *_with(args, {S_V_SUMS: torch.zeros(7, dtype=F64)}))
    _expect("`steps` has 5 slots but `v_sums` has 6", st,
            *_with(args, {S_STEPS: steps[:5]}))
    for bad_out in (torch.zeros((), dtype=F64), torch.zeros(COLS), torch.zeros(COLS - 1,
                                                                              dtype=F64),
                    torch.zeros(1, COLS, dtype=F64)):
        _expect("`out` must be a 1-D float64 tensor of 7 elements", st,
                *_with(args, {S_OUT: bad_out}))
    for bad_scale in (torch.ones(2), torch.ones(1, 1), torch.ones((), dtype=F64)):
        _expect("`grad_scale` must be a float32 tensor of one element", st,
                *_with(args, {S_SCALE: bad_scale}))
    # devices (the CPU kernel called directly)
    _expect_cpu(r"`segments` must be a contiguous int64 CPU tensor .* on meta", st,
                _with(args, {S_SEG: segments.to("meta")}))
    _expect_cpu("`steps` is on meta but the op runs on cpu", st,
                _with(args, {S_STEPS: steps.to("meta")}))
    _expect_cpu("`v_sums` is on meta but the op runs on cpu", st,
                _with(args, {S_V_SUMS: v_sums.to("meta")}))
    # more slots than tensors (a subset of a bucket's tensors) is fine
    torch.ops.adai.stats(*_with(args, {S_STEPS: torch.zeros(9, dtype=F64),
                                         S_V_SUMS: torch.zeros(9, dtype=F64)}))


def test_update_validation():
    _, args = sample(torch.bfloat16)
    params = args[0]
    up = torch.ops.adai.update
    _expect("`grads` has 5 tensors", up, *_with(args, {1: args[1][:-1]}))
    _expect(r"grads\[4\].*strides", up,
            *_with(args, {1: args[1][:4] + [args[1][4].contiguous()] + args[1][5:]}))
    state_len = args[U_M].numel()
    for match, seg in _segment_cases(args[U_SEG], [p.numel() for p in params], state_len, 6):
        _expect(match, up, *_with(args, {U_SEG: seg}))
    # the state buffers: flat float32, one length
    for j, name in ((U_M, "exp_avg"), (U_V, "exp_avg_sq"), (U_B, "beta1_prod")):
        buf = args[j]
        _expect(f"`{name}` must be a contiguous 1-D Float tensor", up,
                *_with(args, {j: buf.double()}))
        _expect(f"`{name}` must be a contiguous 1-D Float tensor", up,
                *_with(args, {j: buf[: state_len - state_len % 2].reshape(2, -1)}))
        _expect(f"`{name}` must be a contiguous 1-D Float tensor", up,
                *_with(args, {j: torch.zeros(2 * state_len)[::2]}))
        _expect_cpu(f"`{name}` is on meta but the op runs on cpu", up,
                    _with(args, {j: buf.to("meta")}))
    _expect(f"`exp_avg_sq` has {state_len + 1} elements but `exp_avg` has {state_len}; the "
            "state buffers must have one length", up,
            *_with(args, {U_V: torch.zeros(state_len + 1)}))
    _expect(f"`beta1_prod` has {state_len - 1} elements but `exp_avg` has {state_len}", up,
            *_with(args, {U_B: args[U_B][:-1]}))
    _expect("`steps` has 6 slots but `v_sums` has 5", up,
            *_with(args, {U_V_SUMS: args[U_V_SUMS][:5]}))
    _expect("`v_sums` must be a contiguous 1-D Double tensor", up,
            *_with(args, {U_V_SUMS: args[U_V_SUMS].float()}))
    _expect("`steps` must be a contiguous 1-D Double tensor", up,
            *_with(args, {U_STEPS: args[U_STEPS].float()}))
    _expect_cpu("`steps` is on meta but the op runs on cpu", up,
                _with(args, {U_STEPS: args[U_STEPS].to("meta")}))
    for bad in (args[U_STATS].float(), args[U_STATS][0], args[U_STATS][:, :6]):
        _expect("`stats` must be a 2-D float64 tensor with 7 columns", up,
                *_with(args, {U_STATS: bad}))
    for j, name in ((U_SCALE, "grad_scale"), (U_INF, "found_inf"), (U_LR, "lr_tensor")):
        _expect(f"`{name}` must be a float32 tensor of one element", up,
                *_with(args, {j: torch.ones(2)}))


def test_update_validation_writes_nothing():
    """A refused call leaves every tensor as it was (checks run before any write)."""
    _, args = sample(torch.float32)
    before = [[t.clone() for t in a] if isinstance(a, list) else
              a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    bad_segments = args[U_SEG].clone()
    bad_segments[5, 2] = bad_segments[0, 2]  # the last tensor reuses the first one's slot
    _expect("which an earlier tensor of this call uses", torch.ops.adai.update,
            *_with(args, {U_SEG: bad_segments}))
    for x, y in zip(args, before):
        for a, b in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
            if isinstance(a, torch.Tensor):
                assert same_bits(a, b)  # (NaN-safe: gaps between segments hold NaN)


def test_v_sum_validation():
    _, args = sample(torch.float32)
    v, segments, v_sums = args[U_V], args[U_SEG], args[U_V_SUMS]
    sv = torch.ops.adai.v_sum
    shape = r"`segments` must be a contiguous int64 CPU tensor of shape \(n, 3\)"
    for seg in (segments.int(), segments[:, :2].contiguous(), segments.reshape(-1),
                segments.t().contiguous().t()):
        _expect(shape, sv, v, seg, v_sums)
    _expect_cpu(shape + ".* on meta", sv, (v, segments.to("meta"), v_sums))
    # float32 state, or float64 (the float64 params' state on CPU): not half
    _expect("`exp_avg_sq` must be a contiguous 1-D Float tensor, got Half", sv, v.half(),
            segments, v_sums)
    _expect("`exp_avg_sq` must be a contiguous 1-D Float tensor", sv,
            torch.zeros(2 * v.numel())[::2], segments, v_sums)
    _expect("`v_sums` must be a contiguous 1-D Double tensor", sv, v, segments, v_sums.float())
    _expect("`v_sums` must be a contiguous 1-D Double tensor", sv, v, segments,
            v_sums.reshape(2, 3))
    _expect_cpu("`exp_avg_sq` is on meta but the op runs on cpu", sv,
                (v.to("meta"), segments, v_sums))
    _expect_cpu("`v_sums` is on meta but the op runs on cpu", sv, (v, segments,
                                                                  v_sums.to("meta")))
    # the rows: numel is the row's own; spans inside the buffer, disjoint; slots distinct
    n = v.numel()
    last = segments[-1].tolist()
    _expect(rf"segments\[5\] = \(offset {n - last[1] + 1}, numel {last[1]}\) is outside the "
            rf"state buffers of {n} elements", sv, v, _seg_with(segments, 5, 0, n - last[1] + 1),
            v_sums)
    _expect(r"segments\[2\] = \(offset \d+, numel -1\) has a negative entry", sv, v,
            _seg_with(segments, 2, 1, -1), v_sums)
    _expect(r"segments\[2\] = \(offset -3, numel 7\) has a negative entry", sv, v,
            _seg_with(segments, 2, 0, -3), v_sums)
    _expect(r"segments\[0\] has slot 6 but steps and v_sums have 6 slots", sv, v,
            _seg_with(segments, 0, 2, 6), v_sums)
    _expect(r"segments\[3\] uses slot 5, which an earlier tensor", sv, v,
            _seg_with(segments, 3, 2, 5), v_sums)
    _expect(r"segments\[[23]\] and segments\[[23]\] overlap", sv, v,
            _seg_with(segments, 3, 0, segments[2, 0].item() + 6), v_sums)
    _expect(r"segments\[0\] has slot 5 but steps and v_sums have 0 slots", sv, v, segments,
            torch.zeros(0, dtype=F64))
    # numel from the row: a longer span than the tensor had is summed as given
    vs = v_sums.clone()
    seg = segments[3:4].clone()
    seg[0, 1] = 20
    sv(v, seg, vs)
    o = seg[0, 0].item()
    assert vs[seg[0, 2]].item() == pytest.approx(v[o:o + 20].double().sum().item(), rel=1e-6)


# ---- dispatch table and the compiled modules --------------------------------------------

def test_dispatch_registrations():
    for op in ("adai::stats", "adai::update", "adai::v_sum"):
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
        "k = torch.zeros(1, dtype=torch.float64); vs = torch.zeros(1, dtype=torch.float64)\n"
        "seg = torch.tensor([[0, 1000, 0]])\n"
        "st = torch.zeros(1, 7, dtype=torch.float64)\n"
        "torch.ops.adai.stats([p], [gr], seg, k, vs, None, 0.99, 0.0, st[0])\n"
        "torch.ops.adai.update([p], [gr], seg, m, v, b, vs, k, st, None, None, None,\n"
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
