"""backend="triton": the fused Adai step as Triton kernels, behind the custom ops
`adai_triton::stats`, `adai_triton::update` and `adai_triton::sum_v`, which have exactly the
schemas and semantics of `adai::*` (docs/design.md, "Native op schemas").

Nothing here imports triton until the backend is asked for (`TRITON.unavailable(device)` or
a first op call): `import adai_kernels` stays cheap and works without triton. The kernels
run compiled on CUDA (and ROCm) devices, and on CPU tensors only when triton was imported
under `TRITON_INTERPRET=1` (the test suite's way of running them without a GPU).

A launch never synchronises with the host: per-launch tables (data_ptr values, numel, the
chunk map, float64 constants) are built on the host from shapes and pointers only, staged in
pinned memory and copied with `non_blocking=True` (while a CUDA graph is captured, copied as
kernel arguments by the CUDA extension's `adai::_upload` instead); scalars that live on the device (steps,
v_sums, stats, grad_scale, found_inf, lr_tensor) are read by the kernels, and a skipped step
is decided by the kernels themselves (no Python branch on a tensor's value). Per op:
stats = 3 launches, update = 2, sum_v = 2, whatever the number of tensors.
"""
import contextlib
import math
import os
import struct
import threading
from itertools import accumulate
from typing import Optional

import torch

from .base import STATS_COLUMNS, OpsBackend

NAMESPACE = "adai_triton"

_lock = threading.Lock()
_state: dict = {"done": False, "reason": None, "interpret": False, "kernels": None}

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


def _aligned(tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _check_lists(what, ref, *lists):
    for name, lst in lists:
        torch._check(len(lst) == len(ref),
                     lambda: f"adai_triton::{what}: {name} has {len(lst)} tensors, "
                             f"expected {len(ref)}")


def _fail(op: str, i: int, what: str):
    raise RuntimeError(f"adai_triton::{op}: tensor {i}: {what}")


def _check_update_inputs(params, grads, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats):
    """Host-side checks of the schema's contract that keep the kernels in bounds (dtypes,
    sizes, devices, dense layouts). A fast pass over plain attributes; details on failure."""
    _check_stats(stats)
    dtype = params[0].dtype
    if dtype not in _DTYPE_CODES:
        raise RuntimeError(f"adai_triton::update: params must be float32, bfloat16 or "
                           f"float16, not {dtype}")
    f32, f64, dev = torch.float32, torch.float64, stats.get_device()
    for i, (p, g, m, v, b, k, s) in enumerate(zip(params, grads, exp_avg, exp_avg_sq,
                                                  beta1_prod, steps, v_sums)):
        n = p.numel()
        if (p.dtype is dtype and g.dtype is dtype and m.dtype is f32 and v.dtype is f32
                and b.dtype is f32 and k.dtype is f32 and s.dtype is f64
                and g.numel() == n and m.numel() == n and v.numel() == n and b.numel() == n
                and k.dim() == 0 and s.dim() == 0
                and p.get_device() == dev and g.get_device() == dev and m.get_device() == dev
                and v.get_device() == dev and b.get_device() == dev
                and k.get_device() == dev and s.get_device() == dev
                and ((p.is_contiguous() and g.is_contiguous() and m.is_contiguous()
                      and v.is_contiguous() and b.is_contiguous())
                     or (_dense(p) and all(_same_layout(x, p) for x in (g, m, v, b))))):
            continue
        # the slow path: say what is wrong
        if p.dtype is not dtype or g.dtype is not dtype:
            _fail("update", i, f"params and grads must all have dtype {dtype}")
        for name, x in (("exp_avg", m), ("exp_avg_sq", v), ("beta1_prod", b)):
            if x.dtype is not f32:
                _fail("update", i, f"{name} must be float32")
        if k.dtype is not f32 or k.dim() != 0:
            _fail("update", i, "steps must be 0-dim float32")
        if s.dtype is not f64 or s.dim() != 0:
            _fail("update", i, "v_sums must be 0-dim float64")
        for x in (p, g, m, v, b, k, s):
            if x.get_device() != dev:
                _fail("update", i, f"a tensor is on {x.device}, stats on {stats.device}")
        if not _dense(p):
            _fail("update", i, "params must be non-overlapping and dense")
        for name, x in (("grads", g), ("exp_avg", m), ("exp_avg_sq", v), ("beta1_prod", b)):
            if not _same_layout(x, p):
                _fail("update", i, f"{name} must have the param's shape and strides")
        _fail("update", i, "invalid inputs")  # pragma: no cover


def _check_stats(stats: torch.Tensor) -> None:
    torch._check(stats.dtype == torch.float64 and stats.dim() == 2
                 and stats.size(1) == STATS_COLUMNS,
                 lambda: f"adai_triton::update: stats must be a 2-D float64 tensor of "
                         f"{STATS_COLUMNS} columns, got {stats.dtype} of sizes "
                         f"{tuple(stats.shape)}")


def _check_out(out: torch.Tensor) -> None:
    torch._check(out.dtype == torch.float64 and out.dim() == 1
                 and out.size(0) == STATS_COLUMNS,
                 lambda: f"adai_triton::stats: out must be a 1-D float64 tensor of "
                         f"{STATS_COLUMNS} elements, got {out.dtype} of sizes "
                         f"{tuple(out.shape)}")


def _check_scalar(op: str, name: str, t, dev) -> None:
    """An optional 0-dim float32 control tensor (grad_scale, found_inf, lr_tensor)."""
    if t is None:
        return
    if t.dtype is not torch.float32 or t.numel() != 1:
        raise RuntimeError(f"adai_triton::{op}: {name} must be a 0-dim float32 tensor, got "
                           f"{t.dtype} of sizes {tuple(t.shape)}")
    if t.get_device() != dev:
        raise RuntimeError(f"adai_triton::{op}: {name} is on {t.device}, not on the device "
                           f"of the other tensors")


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, and the same strides in every dim of size > 1."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _dense(t: torch.Tensor) -> bool:
    if t.numel() <= 1 or t.is_contiguous() or t.is_contiguous(
            memory_format=torch.channels_last):
        return True
    # dense and non-overlapping: some permutation of the dims is contiguous
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


# --------------------------------------------------------------------------- op bodies
def _stats_impl(params, grads, steps, v_sums, grad_scale, beta2, l2, out):
    K = _state["kernels"]
    _check_lists("stats", grads, ("params", params), ("steps", steps), ("v_sums", v_sums))
    _check_out(out)
    n = len(grads)
    if n == 0:
        out.zero_()
        return
    device = out.device
    dtype = grads[0].dtype
    if dtype not in _DTYPE_CODES:
        raise RuntimeError(f"adai_triton::stats: grads must be float32, bfloat16 or float16, "
                           f"not {dtype}")
    f32, f64, dev = torch.float32, torch.float64, out.get_device()
    _check_scalar("stats", "grad_scale", grad_scale, dev)
    for i, (p, g, k, s) in enumerate(zip(params, grads, steps, v_sums)):
        if (g.dtype is dtype and p.dtype is dtype and g.numel() == p.numel()
                and k.dtype is f32 and k.dim() == 0 and s.dtype is f64 and s.dim() == 0
                and g.get_device() == dev and p.get_device() == dev
                and k.get_device() == dev and s.get_device() == dev
                and ((g.is_contiguous() and p.is_contiguous())
                     or (_dense(g) and _same_layout(p, g)))):
            continue
        if g.dtype is not dtype or p.dtype is not dtype:
            _fail("stats", i, f"params and grads must all have dtype {dtype}")
        if k.dtype is not f32 or k.dim() != 0 or s.dtype is not f64 or s.dim() != 0:
            _fail("stats", i, "steps must be 0-dim float32 and v_sums 0-dim float64")
        for x in (p, g, k, s):
            if x.get_device() != dev:
                _fail("stats", i, f"a tensor is on {x.device}, out on {out.device}")
        if not _dense(g):
            _fail("stats", i, "grads must be non-overlapping and dense")
        _fail("stats", i, "params and grads must have the same shape and strides")
    l2f = _f32(l2)  # the per-element l2 (adai_math.h::Consts), exact in float64
    has_l2 = l2f != 0.0  # as adai_math.h::effective_grad: params are read only then
    has_scale = grad_scale is not None
    numels = [g.numel() for g in grads]
    columns = [
        [g.data_ptr() for g in grads],
        [p.data_ptr() for p in params] if has_l2 else [0] * n,
        [k.data_ptr() for k in steps],
        [s.data_ptr() for s in v_sums],
        numels,
    ]
    meta, n_chunks = _table([beta2, 1.0 - beta2, _ln(beta2), 2.0 * l2f, l2f * l2f], columns,
                            numels, device, K.BLOCK)
    P = max(n_chunks, 1)
    # per chunk: sum g^2 and, with L2, sum (g + l2 theta)^2, sum g theta, sum theta^2
    partials = torch.empty((4 if has_l2 else 1) * P, dtype=torch.float64, device=device)
    contrib = torch.empty(STATS_COLUMNS * n, dtype=torch.float64, device=device)
    with _on(device):
        if n_chunks:
            aligned = _aligned(grads) and (not has_l2 or _aligned(params))
            K.stats_partials_kernel[(n_chunks,)](
                meta, partials, P, n, grad_scale if has_scale else partials, l2f,
                CODE=_DTYPE_CODES[dtype], HAS_SCALE=has_scale, HAS_L2=has_l2,
                P_ALIGNED=aligned, BLOCK=K.BLOCK, VEC=K.VEC, num_warps=K.NUM_WARPS)
        K.stats_finalize_kernel[(n,)](meta, partials, P, contrib, n, HAS_L2=has_l2,
                                      FB=K.FBLOCK, num_warps=4)
        K.row_sum_kernel[(1,)](contrib, n, out, out.stride(0), FB=K.FBLOCK, num_warps=4)


def _update_impl(params, grads, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats,
                 grad_scale, found_inf, lr_tensor, lr, beta0, beta2, eps, weight_decay,
                 decoupled, dampening, max_grad_norm, skip_nonfinite):
    K = _state["kernels"]
    _check_lists("update", params, ("grads", grads), ("exp_avg", exp_avg),
                 ("exp_avg_sq", exp_avg_sq), ("beta1_prod", beta1_prod), ("v_sums", v_sums),
                 ("steps", steps))
    n = len(params)
    if n == 0:
        return
    _check_update_inputs(params, grads, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats)
    dev = stats.get_device()
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf),
                    ("lr_tensor", lr_tensor)):
        _check_scalar("update", name, t, dev)
    device = stats.device
    if not stats.is_contiguous():
        stats = stats.contiguous()
    numels = [p.numel() for p in params]
    columns = [
        [p.data_ptr() for p in params],
        [g.data_ptr() for g in grads],
        [m.data_ptr() for m in exp_avg],
        [v.data_ptr() for v in exp_avg_sq],
        [b.data_ptr() for b in beta1_prod],
        [k.data_ptr() for k in steps],
        [s.data_ptr() for s in v_sums],
        numels,
    ]
    clip = max_grad_norm > 0.0
    decay = float(weight_decay) if decoupled else 0.0
    meta, n_chunks = _table([_ln(beta2), max_grad_norm if clip else 0.0, decay, 1e-6],
                            columns, numels, device, K.BLOCK)
    partials = torch.empty(max(n_chunks, 1), dtype=torch.float64, device=device)
    flags = dict(HAS_FOUND_INF=found_inf is not None, CLIP=clip,
                 SKIP_NONFINITE=bool(skip_nonfinite))
    fi_ptr = found_inf if found_inf is not None else stats
    with _on(device):
        if n_chunks:
            # adai_math.h::make_consts: computed in double, rounded to float
            d = float(dampening)
            # alignment hints: vector accesses where every pointer allows them. Params count
            # only with aligned states, so that the chunk sums reduce in the same register
            # layout as sum_v's (which sees the states only).
            s_aligned = _aligned(exp_avg) and _aligned(exp_avg_sq) and _aligned(beta1_prod)
            p_aligned = s_aligned and _aligned(params) and _aligned(grads)
            K.update_kernel[(n_chunks,)](
                meta, stats, stats.size(0), partials, n,
                grad_scale if grad_scale is not None else stats, fi_ptr,
                lr_tensor if lr_tensor is not None else stats,
                _f32(lr), _f32(beta0), _f32(beta2), _f32(1.0 - beta2), _f32(1.0 - eps),
                0.0 if decoupled else _f32(weight_decay),
                _f32(lr * weight_decay) if decoupled else 0.0,
                _f32(d), _f32(1.0 / (3.0 - 2.0 * d)), _f32(math.pow(beta0, 1.0 - d)),
                CODE=_DTYPE_CODES[params[0].dtype], ADAI_V1=(d == 1.0),
                HAS_L2=not decoupled and _f32(weight_decay) != 0.0, P_ALIGNED=p_aligned,
                S_ALIGNED=s_aligned, HAS_SCALE=grad_scale is not None,
                HAS_LR=lr_tensor is not None, **flags,
                BLOCK=K.BLOCK, VEC=K.VEC, num_warps=K.NUM_WARPS)
        K.update_finalize_kernel[(n,)](meta, stats, stats.size(0), partials, n, fi_ptr,
                                       **flags, FB=K.FBLOCK, num_warps=4)


def _sum_v_impl(exp_avg_sq, v_sums):
    K = _state["kernels"]
    _check_lists("sum_v", exp_avg_sq, ("v_sums", v_sums))
    n = len(exp_avg_sq)
    if n == 0:
        return
    device = exp_avg_sq[0].device
    f32, f64, dev = torch.float32, torch.float64, exp_avg_sq[0].get_device()
    for i, (v, s) in enumerate(zip(exp_avg_sq, v_sums)):
        if not (v.dtype is f32 and s.dtype is f64 and s.dim() == 0 and v.get_device() == dev
                and s.get_device() == dev and (v.is_contiguous() or _dense(v))):
            _fail("sum_v", i, f"exp_avg_sq must be dense float32 and v_sums 0-dim float64, "
                              f"all on {exp_avg_sq[0].device}")
    numels = [v.numel() for v in exp_avg_sq]
    zeros = [0] * n
    columns = [zeros, zeros, zeros, [v.data_ptr() for v in exp_avg_sq], zeros, zeros,
               [s.data_ptr() for s in v_sums], numels]
    meta, n_chunks = _table([0.0] * 4, columns, numels, device, K.BLOCK)
    partials = torch.empty(max(n_chunks, 1), dtype=torch.float64, device=device)
    with _on(device):
        if n_chunks:
            K.vsum_partials_kernel[(n_chunks,)](
                meta, partials, n, S_ALIGNED=_aligned(exp_avg_sq), BLOCK=K.BLOCK, VEC=K.VEC,
                num_warps=K.NUM_WARPS)
        K.vsum_finalize_kernel[(n,)](meta, partials, n, FB=K.FBLOCK, num_warps=4)


# --------------------------------------------------------------------------- registration
def _register() -> None:
    """Define the three custom ops and their fake (meta) kernels."""
    Tensor = torch.Tensor

    @torch.library.custom_op(f"{NAMESPACE}::stats", mutates_args=("steps", "out"))
    def stats(params: list[Tensor], grads: list[Tensor], steps: list[Tensor],
              v_sums: list[Tensor], grad_scale: Optional[Tensor], beta2: float, l2: float,
              out: Tensor) -> None:
        _stats_impl(params, grads, steps, v_sums, grad_scale, beta2, l2, out)

    @stats.register_fake
    def _(params, grads, steps, v_sums, grad_scale, beta2, l2, out):
        _check_lists("stats", grads, ("params", params), ("steps", steps), ("v_sums", v_sums))
        _check_out(out)
        return None

    @torch.library.custom_op(
        f"{NAMESPACE}::update",
        mutates_args=("params", "exp_avg", "exp_avg_sq", "beta1_prod", "v_sums", "steps"))
    def update(params: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor],
               exp_avg_sq: list[Tensor], beta1_prod: list[Tensor], v_sums: list[Tensor],
               steps: list[Tensor], stats: Tensor, grad_scale: Optional[Tensor],
               found_inf: Optional[Tensor], lr_tensor: Optional[Tensor], lr: float,
               beta0: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
               dampening: float, max_grad_norm: float, skip_nonfinite: bool) -> None:
        _update_impl(params, grads, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats,
                     grad_scale, found_inf, lr_tensor, lr, beta0, beta2, eps, weight_decay,
                     decoupled, dampening, max_grad_norm, skip_nonfinite)

    @update.register_fake
    def _(params, grads, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats, grad_scale,
          found_inf, lr_tensor, lr, beta0, beta2, eps, weight_decay, decoupled, dampening,
          max_grad_norm, skip_nonfinite):
        _check_lists("update", params, ("grads", grads), ("exp_avg", exp_avg),
                     ("exp_avg_sq", exp_avg_sq), ("beta1_prod", beta1_prod),
                     ("v_sums", v_sums), ("steps", steps))
        _check_stats(stats)
        return None

    @torch.library.custom_op(f"{NAMESPACE}::sum_v", mutates_args=("v_sums",))
    def sum_v(exp_avg_sq: list[Tensor], v_sums: list[Tensor]) -> None:
        _sum_v_impl(exp_avg_sq, v_sums)

    @sum_v.register_fake
    def _(exp_avg_sq, v_sums):
        _check_lists("sum_v", exp_avg_sq, ("v_sums", v_sums))
        return None


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
        return getattr(torch.ops, self._namespace)


TRITON = TritonBackend("triton", NAMESPACE, ("cuda", "cpu"), load)
