"""The input contract of the ops stats / update / v_sum (csrc/op_schemas.h; docs/design.md,
"Native op schemas"), written once in Python: the rules of csrc/op_checks.h and of the
compiled ops' parameter checks, with equivalent messages that name the argument and say
what is wrong. Every check raises RuntimeError (as TORCH_CHECK does), prefixed by the op.

The fake kernels (adai_kernels/ops.py) and the Triton ops (backends/triton.py) run the same
check_stats / check_update / check_v_sum; the Triton ops then read `segments` and check its
rows (check_rows), which a fake tensor has no values for.

`float64`: whether the op steps float64 params with float64 state (the compiled CPU op does;
the CUDA and Triton ops do not). A float64 call has only float64 params."""
from __future__ import annotations

import operator
from itertools import islice

import torch

from .backends.base import STATS_COLUMNS

# The parameter (and gradient) dtypes the ops step; the state is float32 (state_dtype). An op
# with `float64` also steps float64 params, with float64 state.
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WITH_FLOAT64 = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)  # the dtypes that may have a master copy


def state_dtype(param_dtype: torch.dtype | None, float64: bool = True) -> torch.dtype:
    """The dtype of the optimizer state of parameters of `param_dtype` (float32 for every
    dtype an op without `float64` steps)."""
    return torch.float64 if float64 and param_dtype is torch.float64 else torch.float32


def dtype_names(dtypes=PARAM_DTYPES, last: str = "or") -> str:
    """The dtypes as a message names them: float32, bfloat16 or float16 (or, with
    last="and", float32, bfloat16 and float16)."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return f"{', '.join(names[:-1])} {last} {names[-1]}" if len(names) > 1 else names[0]


def fail(op: str, what: str):
    raise RuntimeError(f"{op}: {what}")


# --------------------------------------------------------------------------- layouts
def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one span of numel() slots, so a kernel can
    walk them in memory order."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same element -> memory mapping: the same sizes, and the same strides in every dim
    of size > 1 (the strides of size-1 dims move no element)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


# --------------------------------------------------------------------------- tensors
def check_len(op: str, params, grads) -> None:
    if len(grads) != len(params):
        fail(op, f"`grads` has {len(grads)} tensors but `params` has {len(params)}; the "
                 f"tensor lists must have the same length")


def check_tensors(op: str, params, grads, device: torch.device,
                  float64: bool = False) -> torch.dtype | None:
    """params[i] and grads[i]: one dtype of PARAM_DTYPES (with `float64`: WITH_FLOAT64) for
    all, on `device`, the same sizes and strides, non-overlapping and dense. A fast pass over
    plain attributes; the first bad tensor is looked for only on failure. Returns the dtype
    (None when there are none)."""
    if not params:
        return None
    dtype = params[0].dtype
    dtypes = WITH_FLOAT64 if float64 else PARAM_DTYPES
    if dtype not in dtypes:
        fail(op, f"params must be {dtype_names(dtypes)}; params[0] has dtype {dtype}")
    dev = -1 if device.index is None else device.index  # what get_device() says there
    for i, (p, g) in enumerate(zip(params, grads)):
        if not (p.dtype is dtype and g.dtype is dtype and p.get_device() == dev
                and g.get_device() == dev and g.shape == p.shape
                and ((p.is_contiguous() and g.is_contiguous())
                     or (is_dense(p) and same_layout(g, p)))):
            _tensor_error(op, i, p, g, dtype, device)
    return dtype


def _tensor_error(op: str, i: int, p, g, dtype, device) -> None:
    """Say what is wrong with params[i] / grads[i] (check_tensors' slow path)."""
    for name, t in (("params", p), ("grads", g)):
        if t.device != device:
            fail(op, f"{name}[{i}] is on {t.device} but the op runs on {device}")
    if p.dtype is not dtype:
        fail(op, f"params[{i}] has dtype {p.dtype} but params[0] has {dtype}; all params of "
                 f"one call must share a dtype")
    if g.dtype is not dtype:
        fail(op, f"grads[{i}] has dtype {g.dtype} but params[{i}] has {dtype}")
    if not is_dense(p):
        fail(op, f"params[{i}] must be non-overlapping and dense, got sizes {tuple(p.shape)} "
                 f"and strides {p.stride()}")
    fail(op, f"grads[{i}] (sizes {tuple(g.shape)}, strides {g.stride()}) must have the sizes "
             f"and strides of params[{i}] (sizes {tuple(p.shape)}, strides {p.stride()})")


def check_flat(op: str, name: str, t, dtype: torch.dtype, device) -> None:
    """A flat buffer: 1-D, contiguous, of `dtype`, on `device`."""
    if not (t.dtype is dtype and t.dim() == 1 and t.is_contiguous()):
        fail(op, f"`{name}` must be a contiguous 1-D {dtype} tensor, got {t.dtype} with "
                 f"shape {tuple(t.shape)}")
    if t.device != device:
        fail(op, f"`{name}` is on {t.device} but the op runs on {device}")


def check_slots(op: str, steps, v_sums, device) -> None:
    """steps and v_sums (float64): one slot per tensor of the bucket."""
    check_flat(op, "steps", steps, torch.float64, device)
    check_flat(op, "v_sums", v_sums, torch.float64, device)
    if steps.numel() != v_sums.numel():
        fail(op, f"`steps` has {steps.numel()} slots but `v_sums` has {v_sums.numel()}")


def check_states(op: str, states, device, dtype: torch.dtype = torch.float32) -> int:
    """The state buffers ((name, tensor) pairs) of `dtype`, all of one length; returns it."""
    first_name, first = states[0]
    for name, t in states:
        check_flat(op, name, t, dtype, device)
        if t.numel() != first.numel():
            fail(op, f"`{name}` has {t.numel()} elements but `{first_name}` has "
                     f"{first.numel()}; the state buffers must have one length")
    return first.numel()


def check_control(op: str, name: str, t, device) -> None:
    """An optional control tensor (grad_scale, found_inf, lr_tensor): float32 with one
    element, 0-dim or of shape (1,), on `device`."""
    if t is None:
        return
    if not (t.dtype is torch.float32 and t.dim() <= 1 and t.numel() == 1):
        fail(op, f"`{name}` must be a float32 tensor of one element (shape () or (1,)), got "
                 f"{t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        fail(op, f"`{name}` is on {t.device} but the op runs on {device}")


def check_stats_row(op: str, out) -> None:
    """stats' `out`: one statistics row."""
    if not (out.dtype is torch.float64 and out.dim() == 1 and out.size(0) == STATS_COLUMNS):
        fail(op, f"`out` must be a 1-D float64 tensor of {STATS_COLUMNS} elements (one "
                 f"statistics row), got {out.dtype} with shape {tuple(out.shape)}")


def check_stats_matrix(op: str, stats) -> None:
    """update's `stats`: one statistics row per bucket."""
    if not (stats.dtype is torch.float64 and stats.dim() == 2
            and stats.size(1) == STATS_COLUMNS):
        fail(op, f"`stats` must be a 2-D float64 tensor with {STATS_COLUMNS} columns (one "
                 f"statistics row per bucket), got {stats.dtype} with shape "
                 f"{tuple(stats.shape)}")


def check_segments(op: str, segments, n: int | None) -> None:
    """`segments`: an int64 CPU tensor of shape (n, 3) (n None: any number of rows)."""
    if not (segments.dtype is torch.int64 and segments.dim() == 2 and segments.size(1) == 3
            and segments.device.type == "cpu"):
        fail(op, f"`segments` must be an int64 CPU tensor of shape (n, 3) (offset, numel, "
                 f"slot per tensor), got {segments.dtype} on {segments.device} with shape "
                 f"{tuple(segments.shape)}")
    if n is not None and segments.size(0) != n:
        fail(op, f"`segments` has {segments.size(0)} rows but `params` has {n} tensors")


# --------------------------------------------------------------------------- the options
def check_master(op: str, master, dtype, state_len: int | None, device) -> None:
    """An optional fp32 master copy of bf16/fp16 params: a flat float32 buffer laid out as
    the state buffers (`state_len` None: stats, which has no state buffer to compare)."""
    if master is None:
        return
    check_flat(op, "master", master, torch.float32, device)
    if dtype is not None and dtype not in LOW_PRECISION:
        fail(op, f"`master` is given but params are {dtype}; a master copy is kept only for "
                 f"{dtype_names(LOW_PRECISION)} params")
    if state_len is not None and master.numel() != state_len:
        fail(op, f"`master` has {master.numel()} elements but `exp_avg` has {state_len}; "
                 f"the state buffers must have one length")


def check_beta1_prod(op: str, beta1_prod, beta1_prod_max, steps, state_len: int,
                     dtype: torch.dtype, device) -> None:
    """`beta1_prod`: the state buffers' length, or empty (freed: every tensor is done);
    `beta1_prod_max` (optional): float32, one slot per tensor."""
    check_flat(op, "beta1_prod", beta1_prod, dtype, device)
    if beta1_prod.numel() not in (0, state_len):
        fail(op, f"`beta1_prod` has {beta1_prod.numel()} elements but `exp_avg` has "
                 f"{state_len}; the state buffers must have one length (or `beta1_prod` none: "
                 f"freed)")
    if beta1_prod_max is not None:
        check_flat(op, "beta1_prod_max", beta1_prod_max, torch.float32, device)
        if beta1_prod_max.numel() != steps.numel():
            fail(op, f"`beta1_prod_max` has {beta1_prod_max.numel()} slots but `steps` has "
                     f"{steps.numel()}")


def check_rounding(op: str, rounding_seed, rounding_index, master, dtype, n: int,
                   device) -> None:
    """Stochastic rounding: `rounding_seed` (int64, one element, on the device) and
    `rounding_index` (int64 CPU, one entry per tensor) come together, for bf16 params
    without a master copy."""
    if rounding_seed is None and rounding_index is None:
        return
    if rounding_seed is None or rounding_index is None:
        fail(op, "`rounding_seed` and `rounding_index` must be given together")
    if not (rounding_seed.dtype is torch.int64 and rounding_seed.numel() == 1
            and rounding_seed.dim() <= 1):
        fail(op, f"`rounding_seed` must be an int64 tensor of one element, got "
                 f"{rounding_seed.dtype} of shape {tuple(rounding_seed.shape)}")
    if rounding_seed.device != device:
        fail(op, f"`rounding_seed` is on {rounding_seed.device} but the op runs on {device}")
    if not (rounding_index.dtype is torch.int64 and rounding_index.dim() == 1
            and rounding_index.device.type == "cpu" and rounding_index.numel() == n):
        fail(op, f"`rounding_index` must be an int64 CPU tensor of shape ({n},) (one first "
                 f"index per tensor), got {rounding_index.dtype} on {rounding_index.device} "
                 f"with shape {tuple(rounding_index.shape)}")
    if dtype is not None and dtype is not torch.bfloat16:
        fail(op, f"stochastic rounding (`rounding_seed`) is for bfloat16 params, not {dtype}")
    if master is not None:
        fail(op, "`rounding_seed` and `master` exclude each other: a master copy is rounded "
                 "to nearest")


# --------------------------------------------------------------------------- the ops
def check_stats(op: str, params, grads, segments, steps, v_sums, master, grad_scale, out,
                float64: bool = False):
    """Every argument of stats but the rows of `segments`; returns the params' dtype."""
    check_len(op, params, grads)
    check_stats_row(op, out)
    check_segments(op, segments, len(params))
    check_slots(op, steps, v_sums, out.device)
    check_control(op, "grad_scale", grad_scale, out.device)
    dtype = check_tensors(op, params, grads, out.device, float64)
    check_master(op, master, dtype, None, out.device)
    return dtype


def check_update(op: str, params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums,
                 steps, beta1_prod_max, master, stats, grad_scale, found_inf, lr_tensor,
                 rounding_seed, rounding_index, float64: bool = False):
    """Every tensor argument of update but the rows of `segments`; returns the params' dtype
    and the state buffers' length."""
    check_len(op, params, grads)
    check_stats_matrix(op, stats)
    device = stats.device
    check_segments(op, segments, len(params))
    sdtype = state_dtype(params[0].dtype if params else None, float64)
    state_len = check_states(op, (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)), device,
                             sdtype)
    check_beta1_prod(op, beta1_prod, beta1_prod_max, steps, state_len, sdtype, device)
    check_slots(op, steps, v_sums, device)
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf),
                    ("lr_tensor", lr_tensor)):
        check_control(op, name, t, device)
    dtype = check_tensors(op, params, grads, device, float64)
    check_master(op, master, dtype, state_len, device)
    check_rounding(op, rounding_seed, rounding_index, master, dtype, len(params), device)
    return dtype, state_len


def check_v_sum(op: str, exp_avg_sq, segments, v_sums, float64: bool = False) -> int:
    """Every argument of v_sum but the rows of `segments`; returns the buffer's length."""
    check_segments(op, segments, None)
    state_len = check_states(op, (("exp_avg_sq", exp_avg_sq),), exp_avg_sq.device,
                             state_dtype(exp_avg_sq.dtype, float64))
    check_flat(op, "v_sums", v_sums, torch.float64, exp_avg_sq.device)
    return state_len


# --------------------------------------------------------------------------- segments' rows
def check_rows(op: str, offsets, numels, slots, n_slots: int, state_len: int | None = None,
               expect=None, slot_names: str = "steps and v_sums") -> None:
    """The rows of `segments` (as lists of ints): numels[i] == expect[i]; offsets and numels
    >= 0 and, given the state buffers' length, every span inside them and no two non-empty
    spans overlapping; slots inside [0, n_slots) and distinct. A fast pass over whole lists;
    the first bad row is looked for only on failure."""
    n = len(offsets)
    if n == 0:
        return
    ok = ((expect is None or numels == expect) and min(offsets) >= 0 and min(numels) >= 0
          and min(slots) >= 0 and max(slots) < n_slots and len(set(slots)) == n)
    if ok and state_len is not None:
        ends = list(map(operator.add, offsets, numels))
        ok = max(ends) <= state_len and (
            all(map(operator.le, ends[:-1], islice(offsets, 1, None)))  # in order, disjoint
            or _overlap(offsets, numels) is None)
    if not ok:
        _row_error(op, offsets, numels, slots, n_slots, state_len, expect, slot_names)


def _row_error(op, offsets, numels, slots, n_slots, state_len, expect, slot_names) -> None:
    """Say which row of `segments` is wrong, in csrc/op_checks.h's order (check_rows' slow
    path)."""
    seen = set()
    for i, (o, k, s) in enumerate(zip(offsets, numels, slots)):
        if expect is not None and k != expect[i]:
            fail(op, f"segments[{i}] has numel {k} but params[{i}] has {expect[i]} elements")
        if o < 0 or k < 0:
            fail(op, f"segments[{i}] = (offset {o}, numel {k}) has a negative entry")
        if state_len is not None and k > state_len - o:
            fail(op, f"segments[{i}] = (offset {o}, numel {k}) is outside the state buffers "
                     f"of {state_len} elements")
        if not 0 <= s < n_slots:
            fail(op, f"segments[{i}] has slot {s} but {slot_names} have {n_slots} slots")
        if s in seen:
            fail(op, f"segments[{i}] uses slot {s}, which an earlier tensor of this call uses")
        seen.add(s)
    pair = _overlap(offsets, numels)
    if pair is not None:
        fail(op, f"segments[{pair[0]}] and segments[{pair[1]}] overlap in the state buffers")
    fail(op, "invalid segments")  # pragma: no cover


def _overlap(offsets, numels):
    """A pair of rows whose non-empty spans overlap, or None."""
    order = sorted((o, i) for i, (o, k) in enumerate(zip(offsets, numels)) if k)
    for (o0, i0), (o1, i1) in zip(order, order[1:]):
        if o0 + numels[i0] > o1:
            return i0, i1
    return None
