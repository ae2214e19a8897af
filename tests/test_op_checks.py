"""One contract for the ops' inputs (csrc/op_checks.h, adai_kernels/op_checks.py): the compiled
CPU op, its fake kernel (what torch.compile and opcheck run) and the Triton op refuse the same
bad input, each with a message that names the argument and says what is wrong.

The patterns accept the spellings that differ between C++ and Python (c10's `Float`,
torch's `torch.float32`; C++ also wants `segments` contiguous) and nothing else."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import adai_kernels._native as native
from adai_kernels import backends

F32, F64 = r"(torch\.float32|Float)", r"(torch\.float64|Double)"  # torch's, c10's
SHAPES = ((7,), (5,), (3,))
ROWS = [[0, 7, 0], [16, 5, 1], [32, 3, 2]]  # offsets 0, 16, 32 in buffers of 48; slots 0..2


def _valid():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    return dict(params=params, grads=[torch.randn(s, generator=gen) for s in SHAPES],
                segments=torch.tensor(ROWS), exp_avg=torch.zeros(48),
                exp_avg_sq=torch.zeros(48), beta1_prod=torch.ones(48),
                steps=torch.ones(3, dtype=torch.float64),
                v_sums=torch.zeros(3, dtype=torch.float64),
                out=torch.zeros(7, dtype=torch.float64),
                stats=torch.zeros(1, 7, dtype=torch.float64), grad_scale=None)


def _call(ns, op, a):
    ops = getattr(torch.ops, ns)
    if op == "stats":
        ops.stats(a["params"], a["grads"], a["segments"], a["steps"], a["v_sums"],
                  a["grad_scale"], 0.99, 0.1, a["out"])
    elif op == "update":
        ops.update(a["params"], a["grads"], a["segments"], a["exp_avg"], a["exp_avg_sq"],
                   a["beta1_prod"], a["v_sums"], a["steps"], a["stats"], a["grad_scale"], None,
                   None, 0.1, 0.1, 0.99, 1e-3, 0.0, False, 1.0, 0.0, False)
    else:
        ops.v_sum(a["exp_avg_sq"], a["segments"], a["v_sums"])


def _fake(a):
    """`a` as fake tensors: the ops then run their fake kernels."""
    mode = FakeTensorMode()

    def conv(x):
        if isinstance(x, list):
            return [conv(t) for t in x]
        return mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
    return mode, {k: conv(v) for k, v in a.items()}


DOUBLE = torch.float64
# name: (ops, changes to the valid arguments, the message after "<namespace>::<op>: ")
CASES = {
    "list-lengths": ("stats update", lambda a: dict(grads=a["grads"][:2]),
                     r"`grads` has 2 tensors but `params` has 3"),
    "out": ("stats", lambda a: dict(out=torch.zeros(6, dtype=DOUBLE)),
            r"`out` must be a 1-D float64 tensor of 7 elements"),
    "stats": ("update", lambda a: dict(stats=torch.zeros(7, dtype=DOUBLE)),
              r"`stats` must be a 2-D float64 tensor with 7 columns"),
    "segments-int32": ("stats update v_sum", lambda a: dict(segments=a["segments"].int()),
                       r"`segments` must be an? (contiguous )?int64 CPU tensor of shape "
                       r"\(n, 3\)"),
    "segments-rows": ("stats update", lambda a: dict(segments=a["segments"][:2]),
                      r"`segments` has 2 rows but `params` has 3 tensors"),
    "state-strided": ("update", lambda a: dict(beta1_prod=torch.ones(96)[::2]),
                      rf"`beta1_prod` must be a contiguous 1-D {F32} tensor"),
    "state-dtype": ("update", lambda a: dict(exp_avg_sq=a["exp_avg_sq"].double()),
                    rf"`exp_avg_sq` must be a contiguous 1-D {F32} tensor, got {F64}"),
    # v_sum takes the state dtype from exp_avg_sq: float64 where the op steps it
    "state-dtype-half": ("update v_sum", lambda a: dict(exp_avg_sq=a["exp_avg_sq"].half()),
                         rf"`exp_avg_sq` must be a contiguous 1-D {F32} tensor, got "
                         rf"(torch\.float16|Half)"),
    "state-lengths": ("update", lambda a: dict(beta1_prod=torch.ones(64)),
                      r"`beta1_prod` has 64 elements but `exp_avg` has 48; the state buffers "
                      r"must have one length"),
    "steps-dtype": ("stats update", lambda a: dict(steps=a["steps"].float()),
                    rf"`steps` must be a contiguous 1-D {F64} tensor"),
    "slot-counts": ("stats update", lambda a: dict(v_sums=torch.zeros(4, dtype=DOUBLE)),
                    r"`steps` has 3 slots but `v_sums` has 4"),
    "control": ("stats update", lambda a: dict(grad_scale=torch.ones(2)),
                r"`grad_scale` must be a float32 tensor of one element"),
    "params-dtype": ("stats update", lambda a: dict(params=[p.int() for p in a["params"]],
                                                    grads=[g.int() for g in a["grads"]]),
                     r"params(\[0\] has dtype Int; expected| must be) float32, (float64, )?"
                     r"bfloat16 or float16"),
    "grads-dtype": ("stats update", lambda a: dict(grads=[a["grads"][0], a["grads"][1].double(),
                                                          a["grads"][2]]),
                    rf"grads\[1\] has dtype {F64} but params\[1\] has {F32}"),
    "params-overlapping": ("stats update", lambda a: dict(
        params=[a["params"][0], torch.zeros(1).expand(5), a["params"][2]],
        grads=[a["grads"][0], torch.zeros(1).expand(5), a["grads"][2]]),
        r"params\[1\] must be non-overlapping and dense"),
    "grads-layout": ("stats update", lambda a: dict(
        grads=[a["grads"][0], torch.zeros(5, 1), a["grads"][2]]),
        r"grads\[1\] \(sizes [\[(]5, 1[\])], strides [\[(]1, 1[\])]\) must have the sizes "
        r"and strides of params\[1\]"),
    "grads-strides": ("stats update", lambda a: dict(
        params=[a["params"][0], torch.zeros(2, 3), a["params"][2]],
        grads=[a["grads"][0], torch.zeros(3, 2).t(), a["grads"][2]]),
        r"grads\[1\] \(sizes [\[(]2, 3[\])], strides [\[(]1, 2[\])]\) must have the sizes "
        r"and strides of params\[1\]"),
}
# the rows of `segments`: only the real ops read them (a fake tensor has no values)
ROW_CASES = {
    "numel": ("stats update", [[0, 6, 0], [16, 5, 1], [32, 3, 2]],
              r"segments\[0\] has numel 6 but params\[0\] has 7 elements"),
    "negative": ("stats update v_sum", [[0, 7, 0], [-16, 5, 1], [32, 3, 2]],
                 r"segments\[1\] = \(offset -16, numel 5\) has a negative entry"),
    "outside": ("update v_sum", [[0, 7, 0], [16, 5, 1], [46, 3, 2]],
                r"segments\[2\] = \(offset 46, numel 3\) is outside the state buffers of 48 "
                r"elements"),
    "slot": ("stats update v_sum", [[0, 7, 0], [16, 5, 3], [32, 3, 2]],
             r"segments\[1\] has slot 3 but (steps and )?v_sums have 3 slots"),
    "slot-twice": ("stats update v_sum", [[0, 7, 0], [16, 5, 1], [32, 3, 0]],
                   r"segments\[2\] uses slot 0, which an earlier tensor of this call uses"),
    "overlap": ("update v_sum", [[0, 7, 0], [5, 5, 1], [32, 3, 2]],
                r"segments\[0\] and segments\[1\] overlap in the state buffers"),
}


def _namespaces():
    out = []
    if native.load_error() is None:
        out.append("adai")
    if backends.get("triton").unavailable(torch.device("cpu")) is None:
        out.append("adai_triton")
    return out


NAMESPACES = _namespaces()


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_op_and_fake_refuses_alike(case):
    names, changes, pattern = CASES[case]
    if not NAMESPACES:
        pytest.skip("neither the compiled nor the Triton ops are available")
    for op in names.split():
        for ns in NAMESPACES:
            a = _valid()
            a.update(changes(a))
            with pytest.raises(RuntimeError, match=rf"{ns}::{op}: {pattern}"):
                _call(ns, op, a)
            mode, fake = _fake(a)
            with mode, pytest.raises(RuntimeError, match=rf"{ns}::{op}: {pattern}"):
                _call(ns, op, fake)


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_every_op_refuses_bad_rows_alike(case):
    names, rows, pattern = ROW_CASES[case]
    if not NAMESPACES:
        pytest.skip("neither the compiled nor the Triton ops are available")
    for op in names.split():
        for ns in NAMESPACES:
            a = _valid()
            a["segments"] = torch.tensor(rows)
            with pytest.raises(RuntimeError, match=rf"{ns}::{op}: {pattern}"):
                _call(ns, op, a)


def test_one_dtype_per_call_in_the_fake_and_triton():
    """params of two dtypes in one call: refused by the fake kernels and the Triton op (one
    dtype per call, as the CUDA op and docs/design.md say)."""
    for ns in NAMESPACES:
        a = _valid()
        a["params"][1], a["grads"][1] = a["params"][1].double(), a["grads"][1].double()
        pattern = (rf"{ns}::stats: params\[1\] has dtype torch.float64 but params\[0\] has "
                   rf"torch.float32; all params of one call must share a dtype")
        mode, fake = _fake(a)
        with mode, pytest.raises(RuntimeError, match=pattern):
            _call(ns, "stats", fake)
        if ns == "adai_triton":
            with pytest.raises(RuntimeError, match=pattern):
                _call(ns, "stats", a)


def _float64(a):
    """`a` with float64 params, grads and state buffers."""
    for key in ("params", "grads"):
        a[key] = [t.double() for t in a[key]]
    for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
        a[key] = a[key].double()
    return a


def test_float64_is_stepped_by_the_compiled_cpu_op_alone():
    """The compiled CPU op (and its fake kernel) takes float64 params with float64 state; a
    float64 param shares a call with no other dtype (the state dtype is the call's); the
    Triton op refuses float64 with the dtypes it takes."""
    if "adai" in NAMESPACES:
        for op in ("stats", "update", "v_sum"):
            _call("adai", op, _float64(_valid()))
            mode, fake = _fake(_float64(_valid()))
            with mode:
                _call("adai", op, fake)
        a = _valid()
        a["params"][1], a["grads"][1] = a["params"][1].double(), a["grads"][1].double()
        with pytest.raises(RuntimeError, match=rf"adai::update: params\[1\] has dtype {F64} "
                                               rf"but params\[0\] has {F32}; all params of one "
                                               rf"call must share a dtype"):
            _call("adai", "update", a)
        a = _float64(_valid())
        a["exp_avg"] = a["exp_avg"].float()  # float64 params take float64 state
        with pytest.raises(RuntimeError, match=rf"adai::update: `exp_avg` must be a contiguous "
                                               rf"1-D {F64} tensor, got {F32}"):
            _call("adai", "update", a)
    if "adai_triton" in NAMESPACES:
        with pytest.raises(RuntimeError, match=r"adai_triton::stats: params must be float32, "
                                               r"bfloat16 or float16; params\[0\] has dtype "
                                               r"torch.float64"):
            _call("adai_triton", "stats", _float64(_valid()))


def test_the_triton_kernels_have_a_code_for_every_parameter_dtype():
    """op_checks.PARAM_DTYPES is the one list; the Triton launcher maps each to its kernels'
    dtype code (importing the backend module imports no triton)."""
    from adai_kernels import op_checks
    from adai_kernels.backends import triton as triton_backend

    assert set(triton_backend._DTYPE_CODES) == set(op_checks.PARAM_DTYPES)
    assert sorted(triton_backend._DTYPE_CODES.values()) == list(range(len(op_checks.PARAM_DTYPES)))
