"""backend="triton" (adai_kernels/backends/triton.py, triton_kernels.py) on CPU tensors under
Triton's interpreter: what only the Triton code has: launches that follow the table the kernels
are compiled from ahead of time, vector hints exactly where pointers are aligned, bf16 stores
rounded to nearest even, a launch count independent of the number of tensors, the argument
checks as the Triton ops word them, the schemas, and the lazy import. Its numerics against the
float64 oracle run in tests/test_op_matrix.py (target "triton").
"""
import os

import pytest
import torch  # only to see whether a GPU is here; triton is not imported yet

if torch.cuda.is_available():  # the compiled kernels are tested on the GPU instead
    pytest.skip("a GPU is present: tests/test_triton_gpu.py runs the compiled kernels",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import subprocess  # noqa: E402
import sys  # noqa: E402

pytest.importorskip("triton")

from adai_kernels.backends import triton as triton_backend  # noqa: E402
from adai_kernels.backends.triton import TRITON  # noqa: E402
from op_fixtures import (EXTRA, HYPER, TARGETS, assert_unchanged, make_bucket,  # noqa: E402
                         make_grads, op_step, stats_op, update_op)
from oracle import f32  # noqa: E402

_why = TRITON.unavailable(torch.device("cpu"))
if _why is not None:  # e.g. triton was imported without the interpreter by another module
    pytest.skip(f"triton backend unavailable on CPU: {_why}", allow_module_level=True)

ops = torch.ops.adai_triton
T = TARGETS["triton"]
STATE_LAYOUTS = ("aligned", "misaligned", "shuffled")


def bucket(dtype, seed, shapes=None, states="aligned", start="mid"):
    """A bucket of the interpreter's op-matrix tensors (or `shapes`), mid-training."""
    return make_bucket(T, dtype, seed, shapes, states, start)


def step(bk, grads, hp, **control):
    """One step with another bucket's row in the stats matrix (so row_sum_kernel runs)."""
    return op_step(T, bk, grads, hp, EXTRA, **control)


def _triton_type(x) -> str:
    """The type Triton's JIT gives a launch argument (its signature string)."""
    if isinstance(x, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64",
                      torch.int64: "i64"}[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2**31 <= x < 2**31 else "i64"
    return "fp32" if isinstance(x, float) else type(x).__name__


def _record_launches(monkeypatch, names) -> list:
    """Record (kernel name, args, kwargs) of every launch of the kernels `names`; the
    launches still run."""
    K = triton_backend._state["kernels"]
    seen = []

    class Recording:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.name, args, kwargs))
                return self.fn[grid](*args, **kwargs)
            return launch

    for name in names:
        monkeypatch.setattr(K, name, Recording(name, getattr(K, name)))
    return seen


def test_launches_follow_launch_specs(monkeypatch):
    """Every kernel is launched with the argument types and constexprs of launch_specs, the
    table the kernels are compiled from ahead of time (tests/test_compiled_kernels.py)."""
    specs = triton_backend._state["specs"]
    seen = _record_launches(monkeypatch, specs)
    bk, gen = bucket(torch.bfloat16, seed=3)
    hp = dict(HYPER["v2_l2"], lr=0.05)
    for extras in (dict(), dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0),
                               lr_tensor=torch.tensor(0.1), max_grad_norm=1.0,
                               skip_nonfinite=True)):
        step(bk, make_grads(bk.params, gen), hp, **extras)
    ops.v_sum(bk.exp_avg_sq, bk.segments, bk.v_sum_vec)
    assert {name for name, _, _ in seen} == set(specs)
    for name, args, kwargs in seen:
        spec = specs[name]
        assert [_triton_type(a) for a in args] == list(spec.signature.values()), name
        chosen = {k: v for k, v in kwargs.items() if k not in spec.fixed and k != "num_warps"}
        assert chosen.keys() == spec.choices.keys(), name
        assert all(v in spec.choices[k] for k, v in chosen.items()), (name, chosen)


def _launch_flags(seen) -> list:
    """The constexpr alignment flags of recorded launches."""
    return [(name, {k: v for k, v in kwargs.items() if k.endswith("_ALIGNED")})
            for name, _, kwargs in seen]


@pytest.mark.parametrize("states", STATE_LAYOUTS)
def test_alignment_hints_follow_the_pointers(monkeypatch, states):
    """Vector hints only where every state pointer (buffer + 4 * offset) of a non-empty
    tensor is 16-byte aligned: the optimizer's padded layout gets them, misaligned offsets
    do not."""
    seen = _record_launches(monkeypatch,
                            ("stats_partials_kernel", "update_kernel", "v_sum_partials_kernel"))
    bk, gen = bucket(torch.float32, seed=1, states=states)
    assert all(t.data_ptr() % 16 == 0 for t in bk.params)
    step(bk, make_grads(bk.params, gen), dict(HYPER["coupled"], lr=0.05))
    ops.v_sum(bk.exp_avg_sq, bk.segments, bk.v_sum_vec)
    aligned = states != "misaligned"
    assert _launch_flags(seen) == [
        ("stats_partials_kernel", dict(P_ALIGNED=True)),
        ("update_kernel", dict(P_ALIGNED=aligned, S_ALIGNED=aligned)),
        ("v_sum_partials_kernel", dict(S_ALIGNED=aligned))]


def test_alignment_of_state_pointers():
    """_states_aligned decides from base + 4 * offset, for non-empty tensors only."""
    sa = triton_backend._states_aligned
    assert sa((64, 128), [0, 4, 16], [3, 1, 9])
    assert not sa((64, 128), [0, 5], [3, 1])
    assert sa((64, 128), [0, 5], [3, 0])  # an empty tensor's pointer is never used
    assert not sa((64, 132), [0, 4], [3, 1])  # one base off
    assert sa((52, 4), [3, 7, 11], [1, 1, 1])  # bases off, offsets put every pointer right
    assert not sa((52, 4), [3, 6], [1, 1])
    assert sa((4,), [1], [0])
    al = triton_backend._aligned
    assert al([16, 32], [1, 1]) and not al([16, 36], [1, 1]) and al([16, 36], [1, 0])


def test_bf16_store_rounds_to_nearest_even():
    """theta is computed in fp32 and stored rounded to nearest even (not truncated): the
    kernel's bf16 result equals torch's RNE cast of the same fp32 arithmetic, bitwise.
    (Exact only without FMA contraction, as under the interpreter.)"""
    bk, gen = bucket(torch.bfloat16, seed=9, shapes=[((4099,), "c", 0), ((33, 17), "t", 0)])
    hp = dict(HYPER["decoupled"], weight_decay=0.2, lr=0.01)
    theta32 = [p.float() for p in bk.params]
    step(bk, make_grads(bk.params, gen), hp)
    lr_wd, lr = f32(hp["lr"] * hp["weight_decay"]), f32(hp["lr"])
    differs = 0
    for p, t32, m, b in zip(bk.params, theta32, bk.m, bk.b):
        new32 = (t32 - t32 * lr_wd) - (m / (1.0 - b)) * lr  # adai_math.h's order
        assert torch.equal(p.view(torch.int16), new32.to(torch.bfloat16).view(torch.int16))
        truncated = (new32.view(torch.int32) >> 16).to(torch.int16)
        differs += int((truncated != p.view(torch.int16)).sum())
    assert differs > 0  # the rounding mattered somewhere


def test_launch_count_does_not_grow_with_tensors(monkeypatch):
    K = triton_backend._state["kernels"]
    launches = []

    class Counting:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.fn[grid]

    for name in ("stats_partials_kernel", "stats_finalize_kernel", "row_sum_kernel",
                 "update_kernel", "update_finalize_kernel"):
        monkeypatch.setattr(K, name, Counting(name, getattr(K, name)))

    def count(n_tensors):
        launches.clear()
        bk, gen = bucket(torch.float32, seed=1, shapes=[((5,), "c", 0)] * n_tensors)
        step(bk, make_grads(bk.params, gen), dict(HYPER["coupled"], lr=0.05),
             grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0),
             lr_tensor=torch.tensor(0.1), max_grad_norm=1.0, skip_nonfinite=True)
        return list(launches)

    assert count(2) == count(12) and len(count(2)) == 5


def test_bad_shapes_are_rejected():
    bk, gen = bucket(torch.float32, seed=4, shapes=[((7,), "c", 0)])
    grads = make_grads(bk.params, gen)
    hp = dict(HYPER["plain"], lr=0.05)
    with pytest.raises(RuntimeError, match="`out` must be a 1-D float64"):
        stats_op(T, bk, grads, hp, torch.zeros((), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="`stats` must be a 2-D float64"):
        update_op(T, bk, grads, hp, torch.zeros(7, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_scale` must be a float32 tensor of one element"):
        ops.stats(bk.params, grads, bk.segments, bk.steps_vec, bk.v_sum_vec,
                  torch.tensor(2.0, dtype=torch.float64), 0.99, 0.0,
                  torch.zeros(7, dtype=torch.float64))


def _call(bk, op, **changes):
    """Call `op` ("stats", "update" or "v_sum") on the bucket with some arguments replaced
    (`segments` may be given as a list of rows)."""
    a = dict(params=bk.params, grads=[torch.ones_like(p) for p in bk.params],
             segments=bk.segments, steps=bk.steps_vec, v_sums=bk.v_sum_vec,
             exp_avg=bk.exp_avg, exp_avg_sq=bk.exp_avg_sq, beta1_prod=bk.beta1_prod)
    a.update(changes)
    if isinstance(a["segments"], list):
        a["segments"] = torch.tensor(a["segments"], dtype=torch.int64)
    if op == "stats":
        ops.stats(a["params"], a["grads"], a["segments"], a["steps"], a["v_sums"], None, 0.99,
                  0.1, torch.zeros(7, dtype=torch.float64))
    elif op == "update":
        ops.update(a["params"], a["grads"], a["segments"], a["exp_avg"], a["exp_avg_sq"],
                   a["beta1_prod"], a["v_sums"], a["steps"], torch.zeros(1, 7,
                                                                        dtype=torch.float64),
                   None, None, None, 0.1, 0.1, 0.99, 1e-3, 0.1, False, 1.0, 0.0, False)
    else:
        ops.v_sum(a["exp_avg_sq"], a["segments"], a["v_sums"])


# Three tensors of 7, 5 and 3 elements at offsets 0, 16, 32 of buffers of 48, slots 0, 1, 2.
_ROWS = [[0, 7, 0], [16, 5, 1], [32, 3, 2]]
_SHAPES3 = [((7,), "c", 0), ((5,), "c", 0), ((3,), "c", 0)]


def _rows(**at):
    """_ROWS with entries replaced: at = {"r1c2": value} sets row 1, column 2."""
    rows = [list(r) for r in _ROWS]
    for key, value in at.items():
        rows[int(key[1])][int(key[3])] = value
    return rows


F64 = torch.float64
BAD_SEGMENTS = {
    # name: (ops it applies to, segments or a tensor builder, message)
    "int32": ("stats update v_sum", lambda: torch.tensor(_ROWS, dtype=torch.int32),
              r"`segments` must be an int64 CPU tensor of shape \(n, 3\)"),
    "two-columns": ("stats update v_sum", lambda: torch.tensor(_ROWS)[:, :2],
                    r"`segments` must be an int64 CPU tensor of shape \(n, 3\)"),
    "1-D": ("stats update v_sum", lambda: torch.tensor(_ROWS).reshape(-1),
            r"`segments` must be an int64 CPU tensor of shape \(n, 3\)"),
    "meta": ("stats update v_sum", lambda: torch.tensor(_ROWS).to("meta"),
             r"`segments` must be an int64 CPU tensor .* on meta"),
    "rows": ("stats update", lambda: torch.tensor(_ROWS[:2]),
             "`segments` has 2 rows but `params` has 3 tensors"),
    "numel": ("stats update", _rows(r1c1=4), r"segments\[1\] has numel 4 but params\[1\] "
                                               r"has 5 elements"),
    "negative-offset": ("stats update v_sum", _rows(r0c0=-1),
                        r"segments\[0\] = \(offset -1, numel 7\) has a negative entry"),
    "past-the-end": ("update v_sum", _rows(r2c0=46),
                     r"segments\[2\] = \(offset 46, numel 3\) is outside the state "
                     r"buffers of 48 elements"),
    "far-past-the-end": ("update v_sum", _rows(r2c0=2**62),
                         r"segments\[2\] = \(offset 4611686018427387904, numel 3\) is "
                         r"outside"),
    "slot-range": ("stats update v_sum", _rows(r1c2=3),
                   r"segments\[1\] has slot 3 but (steps and )?v_sums have 3 slots"),
    "negative-slot": ("stats update v_sum", _rows(r0c2=-1), r"segments\[0\] has slot -1"),
    "slot-twice": ("stats update v_sum", _rows(r2c2=0),
                   r"segments\[2\] uses slot 0, which an earlier tensor of this call uses"),
    "overlap": ("update v_sum", _rows(r1c0=5),
                r"segments\[0\] and segments\[1\] overlap in the state buffers"),
    "overlap-unordered": ("update v_sum", _rows(r0c0=33, r2c0=20),
                          r"segments\[1\] and segments\[2\] overlap"),
}


@pytest.mark.parametrize("case", sorted(BAD_SEGMENTS))
def test_bad_segments_are_rejected(case):
    """Every row of `segments` is checked before anything is written."""
    names, segments, message = BAD_SEGMENTS[case]
    for op in names.split():
        bk, _ = bucket(torch.float32, seed=4, shapes=_SHAPES3)
        assert bk.segments.tolist() == _ROWS and bk.exp_avg.numel() == 48
        before = bk.snapshot()
        with pytest.raises(RuntimeError, match=message):
            _call(bk, op, segments=segments() if callable(segments) else segments)
        assert_unchanged(bk, before, f"{op}: written by a refused call")


def test_valid_unusual_segments_are_accepted():
    """Spans in any order, touching spans, slots in any order: all valid."""
    bk, _ = bucket(torch.float32, seed=4, shapes=_SHAPES3)
    for rows in ([[41, 7, 2], [36, 5, 0], [0, 3, 1]], [[0, 7, 1], [7, 5, 2], [12, 3, 0]]):
        for op in ("stats", "update", "v_sum"):
            _call(bk, op, segments=rows)


BAD_BUFFERS = {
    # name: (ops, replaced arguments (a function of the bucket), message)
    "exp_avg-float64": ("update", lambda bk: dict(exp_avg=bk.exp_avg.double()),
                        "`exp_avg` must be a contiguous 1-D torch.float32 tensor, got "
                        "torch.float64"),
    "exp_avg_sq-2-D": ("update v_sum",
                       lambda bk: dict(exp_avg_sq=bk.exp_avg_sq.view(6, 8)),
                       r"`exp_avg_sq` must be a contiguous 1-D torch.float32 tensor, got "
                       r"torch.float32 with shape \(6, 8\)"),
    "beta1_prod-strided": ("update", lambda bk: dict(
        beta1_prod=torch.zeros(96)[::2]), "`beta1_prod` must be a contiguous 1-D"),
    "lengths": ("update", lambda bk: dict(beta1_prod=torch.zeros(64)),
                "`beta1_prod` has 64 elements but `exp_avg` has 48; the state buffers must have "
                "one length"),
    "steps-float32": ("stats update", lambda bk: dict(steps=bk.steps_vec.float()),
                      "`steps` must be a contiguous 1-D torch.float64 tensor"),
    "steps-0-dim": ("stats update", lambda bk: dict(steps=bk.steps_vec[0]),
                    "`steps` must be a contiguous 1-D torch.float64 tensor"),
    "v_sums-float32": ("stats update v_sum", lambda bk: dict(v_sums=bk.v_sum_vec.float()),
                       "`v_sums` must be a contiguous 1-D torch.float64 tensor"),
    "slot-counts": ("stats update", lambda bk: dict(v_sums=torch.zeros(4, dtype=F64)),
                    "`steps` has 3 slots but `v_sums` has 4"),
    "state-device": ("update", lambda bk: dict(exp_avg_sq=torch.zeros(48, device="meta")),
                     "`exp_avg_sq` is on meta but the op runs on cpu"),
    "v_sums-device": ("stats update v_sum",
                      lambda bk: dict(v_sums=torch.zeros(3, dtype=F64, device="meta")),
                      "`v_sums` is on meta but the op runs on cpu"),
    "params-dtype": ("stats update", lambda bk: dict(
        params=[bk.params[0], bk.params[1].double(), bk.params[2]]),
        r"params\[1\] has dtype torch.float64 but params\[0\] has torch.float32"),
    "grads-shape": ("stats update", lambda bk: dict(
        grads=[torch.zeros(7), torch.zeros(5, 1), torch.zeros(3)]),
        r"grads\[1\] \(sizes \(5, 1\), strides \(1, 1\)\) must have the sizes and strides "
        r"of params\[1\]"),
    "params-int": ("stats update", lambda bk: dict(
        params=[p.int() for p in bk.params], grads=[p.int() for p in bk.params]),
        "params must be float32, bfloat16 or float16"),
    "params-overlapping": ("stats update", lambda bk: dict(
        params=[bk.params[0], torch.zeros(1).expand(5), bk.params[2]],
        grads=[torch.zeros(7), torch.zeros(1).expand(5), torch.zeros(3)]),
        r"params\[1\] must be non-overlapping and dense"),
    "list-lengths": ("stats update", lambda bk: dict(grads=[torch.zeros(7)]),
                     "`grads` has 1 tensors but `params` has 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUFFERS))
def test_bad_buffers_are_rejected(case):
    """The flat buffers, slot vectors and the params / grads lists, checked before anything
    is written."""
    names, changes, message = BAD_BUFFERS[case]
    for op in names.split():
        bk, _ = bucket(torch.float32, seed=4, shapes=_SHAPES3)
        before = bk.snapshot()
        with pytest.raises(RuntimeError, match=message):
            _call(bk, op, **changes(bk))
        assert_unchanged(bk, before, f"{op}: written by a refused call")


def _schemas(text):
    """op name -> schema (alias sets reduced to `!`), from m.def("...") calls or from
    FunctionSchema strings."""
    import re

    out = {}
    for schema in text:
        schema = re.sub(r"\(\w+!\)", "(!)", re.sub(r"\s+", " ", schema)).strip()
        name = re.match(r"(?:\w+::)?(\w+)", schema).group(1)
        out[name] = re.sub(r"^(?:\w+::)?", "", schema)
    return out


def test_schemas_are_the_native_ones():
    """adai_triton::* declare exactly csrc/op_schemas.h's schemas (no build needed)."""
    import pathlib
    import re

    src = (pathlib.Path(__file__).parents[1] / "csrc" / "op_schemas.h").read_text()
    decls = re.findall(r"constexpr const char\* k(?:Stats|Update|SumV) =(.*?);", src, re.S)
    native = _schemas("".join(re.findall(r'"([^"]*)"', d)) for d in decls)
    ours = _schemas(str(getattr(ops, name).default._schema) for name in native)
    assert set(native) == {"stats", "update", "v_sum"}
    assert ours == native


def test_unavailable_reasons():
    assert "not meta" in TRITON.unavailable(torch.device("meta"))
    if not torch.cuda.is_available():
        assert TRITON.unavailable(torch.device("cuda")) is not None


def test_import_is_lazy_and_cpu_needs_the_interpreter():
    """`import adai_kernels` imports no triton; without TRITON_INTERPRET the backend says
    why it cannot step CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, torch, adai_kernels\n"
            "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
            "from adai_kernels.backends.triton import TRITON\n"
            "assert 'triton' not in sys.modules\n"
            "print(TRITON.unavailable(torch.device('cpu')))\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Triton needs a GPU; CPU tensors run only under TRITON_INTERPRET=1" in res.stdout
