"""backend="triton": the fused Adai step as Triton kernels, behind the custom ops
`adai_triton::stats`, `adai_triton::update` and `adai_triton::v_sum`, which have exactly the
schemas and semantics of `adai::*` (docs/design.md, "Native op schemas").

Nothing here imports triton until the backend is asked for (`TRITON.unavailable(device)` or
a first op call): `import adai_kernels` stays cheap and works without triton. The kernels
run compiled on CUDA (and ROCm) devices, and on CPU tensors only when triton was imported
under `TRITON_INTERPRET=1` (the test suite's way of running them without a GPU).

The states come as a bucket's flat buffers plus `segments` (csrc/op_schemas.h): tensor i's
state pointer is buffer.data_ptr() + 4 * offset_i, its step and v_sum pointers
steps.data_ptr() + 8 * slot_i and v_sums.data_ptr() + 8 * slot_i (both float64), so the
kernels see one pointer per tensor and column as before. The inputs are checked by
adai_kernels/op_checks.py, the checks the fake kernels run too (and the rows of `segments`,
which only a real call can read), before anything is written.

A launch never synchronises with the host: per-launch tables (data_ptr values, numel, the
chunk map, float64 constants) are built on the host from shapes, pointers and the CPU
`segments` table only, staged in pinned memory and copied with `non_blocking=True` (while a
CUDA graph is captured, copied as kernel arguments by the CUDA extension's `adai::_upload`
instead); scalars that live on the device (steps, v_sums, stats, grad_scale, found_inf,
lr_tensor) are read by the kernels, and a skipped step is decided by the kernels themselves
(no Python branch on a tensor's value). Per op: stats = 3 launches, update = 2, v_sum = 2,
whatever the number of tensors.
"""
import contextlib
import math
import operator
import os
import struct
import threading
from dataclasses import dataclass
from functools import reduce
from itertools import accumulate
from typing import Optional

import torch

from .. import op_checks as checks
from .. import ops
from .base import FEATURES, STATS_COLUMNS, OpsBackend

NAMESPACE = "adai_triton"

_lock = threading.Lock()
_state: dict = {"done": False, "reason": None, "interpret": False, "kernels": None,
                "specs": None}

# the kernels' CODE of each dtype of op_checks.PARAM_DTYPES (triton_kernels._load_param)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# --------------------------------------------------------------------------- host helpers
def _f32(x: float) -> float:
    """x rounded to float32 (as static_cast<float> does), as a Python float."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _ln(x: float) -> float:
    return math.log(x) if x > 0.0 else -math.inf


def _table(consts, columns, numels, device, block):
    """The launch table of triton_kernels (see its docstring) on `device`, and the number
    of chunks. `columns` are lists of ints (data_ptr values, numel), one entry per tensor."""
    counts = [(n + block - 1) // block for n in numels]
    cs = list(accumulate(counts, initial=0))
    n_chunks = cs[-1]
    head = [_f64_bits(c) for c in consts]
    for col in columns:
        head.extend(col)
    head.extend(cs)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    pin = device.type == "cuda" and not capturing
    if n_chunks <= 16384:
        head.extend((t << 32) | j for t, c in enumerate(counts) for j in range(c))
        host = torch.tensor(head, dtype=torch.int64, pin_memory=pin)
    else:  # large models: build the chunk map with vectorised ops
        counts_t = torch.tensor(counts, dtype=torch.int64)
        tensor_of = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int64),
                                            counts_t)
        first = torch.repeat_interleave(torch.tensor(cs[:-1], dtype=torch.int64), counts_t)
        local = torch.arange(n_chunks, dtype=torch.int64) - first
        host = torch.empty(len(head) + n_chunks, dtype=torch.int64, pin_memory=pin)
        host[:len(head)] = torch.tensor(head, dtype=torch.int64)
        torch.bitwise_or(tensor_of << 32, local, out=host[len(head):])
    if device.type == "cpu":
        return host, n_chunks
    if capturing:
        return _upload_captured(host, device), n_chunks
    return host.to(device, non_blocking=True), n_chunks


def _upload_captured(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device` while the current stream is captured into a CUDA graph. A captured
    copy from pinned memory would read that memory again at every replay, after it has been
    reused; adai's CUDA extension copies the table as kernel arguments, which the graph
    keeps (csrc/cuda/upload.cu)."""
    from .native import load_cuda

    reason = load_cuda()
    if reason:
        raise RuntimeError(f"backend 'triton' cannot be captured in a CUDA graph without "
                           f"adai_kernels' CUDA extension, which uploads its launch tables: "
                           f"{reason}")
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    torch.ops.adai._upload(host, out)
    return out


def _on(device: torch.device):
    """Triton launches on the current device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _aligned(ptrs, numels) -> bool:
    """Whether every pointer of a non-empty tensor is 16-byte aligned (empty tensors have no
    chunks: their pointers are never dereferenced)."""
    if not reduce(operator.or_, ptrs, 0) & 15:
        return True
    return not any(q & 15 for q, k in zip(ptrs, numels) if k)


def _states_aligned(bases, offsets, numels) -> bool:
    """Whether base + 4 * offset is 16-byte aligned for every base and non-empty segment."""
    if not reduce(operator.or_, offsets, 0) & 3:
        return not reduce(operator.or_, bases, 0) & 15
    rests = {(4 * o) & 15 for o, k in zip(offsets, numels) if k}
    if not rests:
        return True
    if len(rests) > 1:
        return False
    r = rests.pop()
    return all(not (b + r) & 15 for b in bases)


def _rows(segments):
    """The columns of `segments` (offsets, numels, slots) as lists of ints: one host read."""
    if segments.size(0) == 0:
        return [], [], []
    return segments.t().tolist()


_ABSENT: dict = {}  # (device, dtype) -> tensor passed for an absent optional pointer


def _absent(device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """What a kernel gets for an absent grad_scale / found_inf / lr_tensor (float32) or
    rounding_seed (int64), never read: its flag is off. One tensor per device and dtype, so
    the argument types do not depend on the flags."""
    t = _ABSENT.get((device, dtype))
    if t is None:
        t = _ABSENT[(device, dtype)] = torch.zeros(1, dtype=dtype, device=device)
    return t


def _slot_columns(steps, v_sums, slots):
    """The step and v_sum pointers of each tensor (float64 slots)."""
    k0, s0 = steps.data_ptr(), v_sums.data_ptr()
    return [k0 + 8 * s for s in slots], [s0 + 8 * s for s in slots]


# --------------------------------------------------------------------------- launches
@dataclass(frozen=True)
class LaunchSpec:
    """How the op bodies below launch one kernel of triton_kernels: the Triton type of each
    runtime argument as they pass it (absent optional tensors are stood in for by a float32
    tensor that is never read, so the types do not depend on the flags), the constexprs and
    num_warps of every launch, and the constexprs a launch chooses with the values each can
    take (the usual one first)."""
    signature: dict
    fixed: dict
    num_warps: int
    choices: dict


def _signature(text: str) -> dict:
    """{name: type} from "name:type ...", in argument order."""
    return dict(item.split(":") for item in text.split())


def launch_specs(K) -> dict:
    """The launches of the kernels module K (triton_kernels), by kernel name. The op bodies
    launch from this table, and bench/triton_aot.py compiles the kernels ahead of time from
    it (tests/test_triton.py checks it against the arguments of real launches)."""
    elementwise = dict(BLOCK=K.BLOCK, VEC=K.VEC)
    finalize = dict(FB=K.FBLOCK)
    flag = (False, True)
    aligned = (True, False)
    codes = tuple(_DTYPE_CODES.values())
    # the per-tensor flags last: bench/triton_aot.py compiles the last choice of each option
    b_modes = (K.B_FULL, K.B_DONE, K.B_FLAGS)
    thetas = (K.TH_PARAM, K.TH_MASTER, K.TH_STOCHASTIC)
    scalars = " ".join(f"{f}:fp32" for f in ("lr beta0 beta2 one_minus_beta2 beta1_max l2 "
                                             "lr_wd dampening exponent mhat_scale").split())
    return {
        "stats_partials_kernel": LaunchSpec(
            _signature("meta:*i64 partials:*fp64 P:i32 T:i32 gs_ptr:*fp32 l2:fp32"),
            elementwise, K.NUM_WARPS,
            dict(CODE=codes, HAS_SCALE=flag, HAS_L2=flag, THETA_F32=flag, P_ALIGNED=aligned)),
        "stats_finalize_kernel": LaunchSpec(
            _signature("meta:*i64 partials:*fp64 P:i32 contrib:*fp64 T:i32"), finalize, 4,
            dict(HAS_L2=flag)),
        "row_sum_kernel": LaunchSpec(
            _signature("contrib:*fp64 T:i32 out:*fp64 out_stride:i32"), finalize, 4, {}),
        "update_kernel": LaunchSpec(
            _signature("meta:*i64 stats:*fp64 n_rows:i32 partials:*fp64 P:i32 T:i32 "
                       "gs_ptr:*fp32 fi_ptr:*fp32 lr_ptr:*fp32 seed_ptr:*i64 " + scalars),
            elementwise, K.NUM_WARPS,
            dict(CODE=codes, ADAI_V1=(True, False), HAS_L2=flag, P_ALIGNED=aligned,
                 S_ALIGNED=aligned, HAS_SCALE=flag, HAS_FOUND_INF=flag, HAS_LR=flag,
                 CLIP=flag, SKIP_NONFINITE=flag, B_MODE=b_modes, THETA=thetas)),
        "update_finalize_kernel": LaunchSpec(
            _signature("meta:*i64 stats:*fp64 n_rows:i32 partials:*fp64 P:i32 T:i32 "
                       "fi_ptr:*fp32"),
            finalize, 4, dict(HAS_FOUND_INF=flag, CLIP=flag, SKIP_NONFINITE=flag,
                              B_MODE=b_modes)),
        "v_sum_partials_kernel": LaunchSpec(
            _signature("meta:*i64 partials:*fp64 T:i32"), elementwise, K.NUM_WARPS,
            dict(S_ALIGNED=aligned)),
        "v_sum_finalize_kernel": LaunchSpec(
            _signature("meta:*i64 partials:*fp64 T:i32"), finalize, 4, {}),
    }


def _launch(name: str, grid: tuple, *args, **chosen) -> None:
    """Kernel `name` on `grid` with its launch_specs constexprs and num_warps."""
    spec = _state["specs"][name]
    getattr(_state["kernels"], name)[grid](*args, **spec.fixed, **chosen,
                                           num_warps=spec.num_warps)


# --------------------------------------------------------------------------- op bodies
def _refuse(op: str, dtype) -> None:
    """What the Triton kernels do not implement: say so rather than ignore it."""
    if dtype is torch.float64:
        checks.fail(op, "the Triton kernels step float32, bfloat16 and float16 params, not "
                        "float64")


def _stats_impl(params, grads, segments, steps, v_sums, grad_scale, beta2, l2, out, master):
    op = f"{NAMESPACE}::stats"
    dtype = checks.check_stats(op, params, grads, segments, steps, v_sums, master, grad_scale,
                               out)
    _refuse(op, dtype)
    n = len(params)
    if n == 0:
        out.zero_()
        return
    offsets, numels, slots = _rows(segments)
    checks.check_rows(op, offsets, numels, slots, steps.numel(),
                      expect=[p.numel() for p in params])
    K, device = _state["kernels"], out.device
    l2f = _f32(l2)  # the per-element l2 (adai_math.h::Consts), exact in float64
    has_l2 = l2f != 0.0  # as adai_math.h::effective_grad: params are read only then
    has_scale = grad_scale is not None
    g_col = [g.data_ptr() for g in grads]
    if not has_l2:
        p_col = [0] * n
    elif master is not None:  # theta from the fp32 master copy
        p_col = [master.data_ptr() + 4 * o for o in offsets]
    else:
        p_col = [p.data_ptr() for p in params]
    k_col, s_col = _slot_columns(steps, v_sums, slots)
    meta, n_chunks = _table([beta2, 1.0 - beta2, _ln(beta2), 2.0 * l2f, l2f * l2f],
                            [g_col, p_col, k_col, s_col, numels], numels, device, K.BLOCK)
    P = max(n_chunks, 1)
    # per chunk: sum g^2 and, with L2, sum (g + l2 theta)^2, sum g theta, sum theta^2
    partials = torch.empty((4 if has_l2 else 1) * P, dtype=torch.float64, device=device)
    contrib = torch.empty(STATS_COLUMNS * n, dtype=torch.float64, device=device)
    with _on(device):
        if n_chunks:
            aligned = _aligned(g_col, numels) and (not has_l2 or _aligned(p_col, numels))
            _launch("stats_partials_kernel", (n_chunks,), meta, partials, P, n,
                    grad_scale if has_scale else _absent(device), l2f, CODE=_DTYPE_CODES[dtype],
                    HAS_SCALE=has_scale, HAS_L2=has_l2, THETA_F32=master is not None,
                    P_ALIGNED=aligned)
        _launch("stats_finalize_kernel", (n,), meta, partials, P, contrib, n, HAS_L2=has_l2)
        _launch("row_sum_kernel", (1,), contrib, n, out, out.stride(0))


def _update_impl(params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps,
                 stats, grad_scale, found_inf, lr_tensor, lr, beta0, beta2, eps, weight_decay,
                 decoupled, dampening, max_grad_norm, skip_nonfinite, beta1_prod_max, master,
                 rounding_seed, rounding_index):
    # One launch, read top to bottom: the checks, the kernel's modes, its table of pointer
    # columns and the two launches. Split, its helpers would pass most of these two dozen
    # values to each other.
    op = f"{NAMESPACE}::update"
    dtype, state_len = checks.check_update(op, params, grads, segments, exp_avg, exp_avg_sq,
                                           beta1_prod, v_sums, steps, beta1_prod_max, master,
                                           stats, grad_scale, found_inf, lr_tensor,
                                           rounding_seed, rounding_index)
    _refuse(op, dtype)
    n = len(params)
    if n == 0:
        return
    offsets, numels, slots = _rows(segments)
    checks.check_rows(op, offsets, numels, slots, steps.numel(), state_len,
                      expect=[p.numel() for p in params])
    K, device = _state["kernels"], stats.device
    if not stats.is_contiguous():
        stats = stats.contiguous()
    # b: everywhere; per tensor by its flag; or nowhere (a freed, empty beta1_prod)
    if beta1_prod.numel() != state_len:
        b_mode = K.B_DONE
    else:
        b_mode = K.B_FULL if beta1_prod_max is None else K.B_FLAGS
    if master is not None:
        theta = K.TH_MASTER
    else:
        theta = K.TH_PARAM if rounding_seed is None else K.TH_STOCHASTIC
    bases = [exp_avg.data_ptr(), exp_avg_sq.data_ptr()]
    b_base = beta1_prod.data_ptr() if b_mode != K.B_DONE else None
    w_base = master.data_ptr() if master is not None else None
    zeros = [0] * n
    p_col = [p.data_ptr() for p in params]
    g_col = [g.data_ptr() for g in grads]

    def span(base):
        return zeros if base is None else [base + 4 * o for o in offsets]

    b_max_col = (zeros if b_mode != K.B_FLAGS
                 else [beta1_prod_max.data_ptr() + 4 * s for s in slots])
    first_index = zeros if rounding_index is None else rounding_index.tolist()
    columns = [p_col, g_col, *(span(b) for b in bases), span(b_base),
               *_slot_columns(steps, v_sums, slots), numels, b_max_col, span(w_base),
               first_index]
    clip = max_grad_norm > 0.0
    decay = float(weight_decay) if decoupled else 0.0
    meta, n_chunks = _table([_ln(beta2), max_grad_norm if clip else 0.0, decay, 1e-6],
                            columns, numels, device, K.BLOCK)
    P = max(n_chunks, 1)
    # per chunk: the sum of v and, under B_FLAGS, the max |b'|
    partials = torch.empty((2 if b_mode == K.B_FLAGS else 1) * P, dtype=torch.float64,
                           device=device)
    flags = dict(HAS_FOUND_INF=found_inf is not None, CLIP=clip,
                 SKIP_NONFINITE=bool(skip_nonfinite), B_MODE=b_mode)
    fi_ptr = found_inf if found_inf is not None else _absent(device)
    with _on(device):
        if n_chunks:
            # alignment hints: vector accesses where every pointer allows them. Params count
            # only with aligned states, so that the chunk sums reduce in the same register
            # layout as v_sum's (which sees the states only).
            state_bases = bases + [x for x in (b_base, w_base) if x is not None]
            s_aligned = _states_aligned(state_bases, offsets, numels)
            p_aligned = s_aligned and _aligned(p_col, numels) and _aligned(g_col, numels)
            _launch(
                "update_kernel", (n_chunks,), meta, stats, stats.size(0), partials, P, n,
                grad_scale if grad_scale is not None else _absent(device), fi_ptr,
                lr_tensor if lr_tensor is not None else _absent(device),
                rounding_seed if rounding_seed is not None else _absent(device, torch.int64),
                *_update_scalars(lr, beta0, beta2, eps, weight_decay, decoupled, dampening),
                CODE=_DTYPE_CODES[dtype], ADAI_V1=(float(dampening) == 1.0),
                HAS_L2=not decoupled and _f32(weight_decay) != 0.0, P_ALIGNED=p_aligned,
                S_ALIGNED=s_aligned, HAS_SCALE=grad_scale is not None,
                HAS_LR=lr_tensor is not None, THETA=theta, **flags)
        _launch("update_finalize_kernel", (n,), meta, stats, stats.size(0), partials, P, n,
                fi_ptr, **flags)


def _update_scalars(lr, beta0, beta2, eps, weight_decay, decoupled, dampening) -> tuple:
    """update_kernel's float32 scalars, from lr to mhat_scale (launch_specs), as
    adai_math.h::make_consts computes them: in double, rounded to float."""
    d = float(dampening)
    return (_f32(lr), _f32(beta0), _f32(beta2), _f32(1.0 - beta2), _f32(1.0 - eps),
            0.0 if decoupled else _f32(weight_decay),
            _f32(lr * weight_decay) if decoupled else 0.0,
            _f32(d), _f32(1.0 / (3.0 - 2.0 * d)), _f32(math.pow(beta0, 1.0 - d)))


def _v_sum_impl(exp_avg_sq, segments, v_sums):
    op = f"{NAMESPACE}::v_sum"
    state_len = checks.check_v_sum(op, exp_avg_sq, segments, v_sums)
    offsets, numels, slots = _rows(segments)
    checks.check_rows(op, offsets, numels, slots, v_sums.numel(), state_len,
                      slot_names="v_sums")
    n = len(offsets)
    if n == 0:
        return
    K, device = _state["kernels"], exp_avg_sq.device
    base = exp_avg_sq.data_ptr()
    zeros = [0] * n
    v0 = v_sums.data_ptr()
    columns = [zeros, zeros, zeros, [base + 4 * o for o in offsets], zeros, zeros,
               [v0 + 8 * s for s in slots], numels, zeros, zeros, zeros]
    meta, n_chunks = _table([0.0] * 4, columns, numels, device, K.BLOCK)
    partials = torch.empty(max(n_chunks, 1), dtype=torch.float64, device=device)
    with _on(device):
        if n_chunks:
            _launch("v_sum_partials_kernel", (n_chunks,), meta, partials, n,
                    S_ALIGNED=_states_aligned((base,), offsets, numels))
        _launch("v_sum_finalize_kernel", (n,), meta, partials, n)


# --------------------------------------------------------------------------- registration
def _register() -> None:
    """Define the three custom ops, then attach their fake kernels (adai_kernels/ops.py)."""
    Tensor = torch.Tensor

    @torch.library.custom_op(f"{NAMESPACE}::stats", mutates_args=("steps", "out"))
    def stats(params: list[Tensor], grads: list[Tensor], segments: Tensor, steps: Tensor,
              v_sums: Tensor, grad_scale: Optional[Tensor], beta2: float, l2: float,
              out: Tensor, master: Optional[Tensor] = None) -> None:
        _stats_impl(params, grads, segments, steps, v_sums, grad_scale, beta2, l2, out, master)

    @torch.library.custom_op(
        f"{NAMESPACE}::update",
        mutates_args=("params", "exp_avg", "exp_avg_sq", "beta1_prod", "v_sums", "steps",
                      "beta1_prod_max", "master"))
    def update(params: list[Tensor], grads: list[Tensor], segments: Tensor, exp_avg: Tensor,
               exp_avg_sq: Tensor, beta1_prod: Tensor, v_sums: Tensor, steps: Tensor,
               stats: Tensor, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
               lr_tensor: Optional[Tensor], lr: float, beta0: float, beta2: float, eps: float,
               weight_decay: float, decoupled: bool, dampening: float, max_grad_norm: float,
               skip_nonfinite: bool, beta1_prod_max: Optional[Tensor] = None,
               master: Optional[Tensor] = None, rounding_seed: Optional[Tensor] = None,
               rounding_index: Optional[Tensor] = None) -> None:
        _update_impl(params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps,
                     stats, grad_scale, found_inf, lr_tensor, lr, beta0, beta2, eps,
                     weight_decay, decoupled, dampening, max_grad_norm, skip_nonfinite,
                     beta1_prod_max, master, rounding_seed, rounding_index)

    @torch.library.custom_op(f"{NAMESPACE}::v_sum", mutates_args=("v_sums",))
    def v_sum(exp_avg_sq: Tensor, segments: Tensor, v_sums: Tensor) -> None:
        _v_sum_impl(exp_avg_sq, segments, v_sums)

    errors = ops.register_fakes(NAMESPACE)
    if errors:
        raise RuntimeError("; ".join(errors))


def _interpreting(kernels) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - a triton without the interpreter
        return False
    return isinstance(kernels.update_kernel, InterpretedFunction)


def load() -> str | None:
    """Import triton and the kernels and register the ops (once); None, or why not."""
    if _state["done"]:
        return _state["reason"]
    with _lock:
        if _state["done"]:
            return _state["reason"]
        reason = None
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except ImportError as e:
            reason = f"triton is not installed: {e}"
        except Exception as e:  # a broken install fails in many ways
            reason = f"triton failed to import: {type(e).__name__}: {e}"
        if reason is None:
            try:
                from . import triton_kernels
                _register()
                _state["kernels"] = triton_kernels
                _state["specs"] = launch_specs(triton_kernels)
                _state["interpret"] = _interpreting(triton_kernels)
            except Exception as e:
                reason = f"the Triton kernels failed to load: {type(e).__name__}: {e}"
        _state["reason"] = reason
        _state["done"] = True
        return reason


class TritonBackend(OpsBackend):
    """OpsBackend over `torch.ops.adai_triton`, with Triton's device rules."""

    def unavailable(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type not in ("cuda", "cpu"):
            return (f"backend 'triton' runs on cuda tensors (and on cpu tensors under "
                    f"TRITON_INTERPRET=1), not {device.type}")
        if (device.type == "cpu" and not _state["done"]
                and os.environ.get("TRITON_INTERPRET", "0") != "1"):
            return "Triton needs a GPU; CPU tensors run only under TRITON_INTERPRET=1"
        reason = self._load()
        if reason:
            return reason
        if device.type == "cpu" and not _state["interpret"]:
            return ("Triton needs a GPU; CPU tensors run only under TRITON_INTERPRET=1, set "
                    "before triton is imported")
        if device.type == "cuda":
            if _state["interpret"]:
                return ("triton was imported under TRITON_INTERPRET=1: its interpreter runs "
                        "CPU tensors only")
            if not torch.cuda.is_available():
                return "no CUDA or ROCm device is available"
        return None

    @property
    def _ops(self):
        reason = self._load()
        if reason:
            raise RuntimeError(f"backend 'triton' is unavailable: {reason}")
        return self._calls


TRITON = TritonBackend("triton", ops.Ops(NAMESPACE), ("cuda", "cpu"), load, features=FEATURES,
                       elides=True)
