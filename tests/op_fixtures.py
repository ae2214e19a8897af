"""What the op-level tests share: the targets that run the ops (a namespace of
docs/design.md's "Native op schemas" on a device), one bucket builder (params, grads and the
flat state buffers laid out as the optimizer lays them out, or scrambled), the op calls, and
the check of a step against the float64 oracle (tests/oracle.py) with each target's
tolerances.

Which targets a test module runs is its `OP_TARGETS` (conftest.py parametrises `op_target`); a
test or one of its cases may be limited to some targets with `pytest.mark.op_targets(...)`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import zlib
from dataclasses import dataclass, field

import pytest
import torch

from cases import PARAM_TOL, STATE_TOL
from oracle import BGG, BTT, COLUMNS, N, f32, oracle_step

F64 = torch.float64
U32 = 2.0 ** -24  # float32 rounding

# ---- tensors in the op matrix ---------------------------------------------------------------

# (shape, layout, param offset in elements): odd sizes, empty tensors, transposed ("t"),
# channels_last ("cl"), misaligned params (starting 1 or 3 elements into their buffer), and
# the CUDA kernels' chunk edges (16384 elements).
_COMMON = [((0,), "c", 0), ((1,), "c", 0), ((3,), "c", 0), ((4099,), "c", 0)]
_EDGES = [((29, 31), "t", 0), ((2, 3, 5, 5), "cl", 0), ((4099,), "c", 1), ((1000,), "c", 3),
          ((0, 5), "c", 0), ((64, 65), "t", 1), ((16384,), "c", 0), ((16385,), "c", 0),
          ((8, 16, 3, 3), "cl", 0)]
SHAPES_CUDA = _COMMON + [((1_048_576 + 3,), "c", 0)] + _EDGES
SHAPES_EMU = _COMMON + [((2 * 16384 + 5,), "c", 0)] + _EDGES  # every GPU thread is a fiber
# the CPU kernel's own: more than two of its 16K-element chunks, 3-D, wider transposes
SHAPES_CPU = SHAPES_EMU + [((1023,), "c", 0), ((3, 5, 7), "c", 0), ((33, 65), "t", 0),
                           ((2, 3, 5, 7), "cl", 0), ((40000,), "c", 0)]
# The interpreter costs ~0.1 s per tensor and launch: fewer, smaller tensors.
SHAPES_TRITON = [((0,), "c", 0), ((1,), "c", 0), ((7,), "c", 0), ((1023,), "c", 0),
                 ((4099,), "c", 0), ((3, 5, 7), "c", 0), ((33, 17), "t", 0),
                 ((2, 3, 5, 4), "cl", 0)]
# More tensors than threads in a CUDA block (the last block loops over them).
MANY_CUDA = [((4096,), "c", 0)] * 1000
MANY_SMALL = [((100,), "c", 0)] * 300

HYPER = {  # param-group hyper-parameters (lr is set per test)
    "coupled": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=1e-2, decoupled=False,
                    dampening=1.0),
    "decoupled_d0.5": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.1, decoupled=True,
                           dampening=0.5),
    "plain": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0, decoupled=False,
                  dampening=1.0),
    "decoupled": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.05, decoupled=True,
                      dampening=1.0),
    "v2": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0, decoupled=False,
               dampening=0.5),
    "v2_l2": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=1e-2, decoupled=False,
                  dampening=0.5),
    "v2_d0": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0, decoupled=False,
                  dampening=0.0),
}
# Another bucket's row (consistent: B = Bgg + Bgt + Btt), for a second row of the matrix.
EXTRA = (123.0, 59.0, 60.0, -4.0, 3.0, 700.0, 4567.0)


def lr_for(dtype) -> float:
    """A step that moves reduced-precision params by more than their rounding."""
    return 1e-2 if dtype == torch.float32 else 5e-2


# ---- tolerances -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How close a target's results are to the oracle's.

    Row: |got - expected| <= row_rel |expected| + row_mass * (sum of the column's |terms|),
    with `bgt_by_squares` the cross column Bgt (a sum of both signs) relative to
    Bgg + Btt >= |Bgt| instead; N exact. Tensors: either `bounds` (first-order float32 error
    bounds per element, `fp32_bounds`), or rtol / atol tables: `params` per dtype against the
    oracle's value rounded to the dtype, `states` per state. v_sums: within `v_sum_own` of the
    sum of the kernel's own new v, and (tables) within `v_sum_oracle` of the oracle's."""

    row_rel: float
    row_mass: float
    bgt_by_squares: bool = False
    bounds: bool = False
    params: dict = field(default_factory=dict)
    states: dict = field(default_factory=dict)
    v_sum_own: float = 1e-5
    v_sum_oracle: float = 0.0


# The CUDA kernels: fp32 math (the GPU may contract into FMAs), block sums in float64; the
# table of tests/cases.py (one ulp of a bf16 / fp16 param, 1e-5 of an fp32 step).
CUDA_TOL = Tolerance(row_rel=1e-5, row_mass=0.0, bgt_by_squares=True, params=PARAM_TOL,
                     states=dict(m=STATE_TOL, v=STATE_TOL, b=STATE_TOL), v_sum_own=1e-5,
                     v_sum_oracle=2e-4)
# Triton: float32 chunk sums (2e-6 of the terms' mass), float64 beyond; a few fp32 roundings
# amplified by up to 1 / eps in m / (1 - b) for theta; reduced-precision params at most one
# ulp apart (2^-7 bf16, 2^-10 fp16 relative) where fp32 and fp64 straddle a midpoint.
TRITON_TOL = Tolerance(
    row_rel=0.0, row_mass=2e-6,
    params={torch.float32: dict(rtol=2e-5, atol=2e-5),
            torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
            torch.float16: dict(rtol=2**-10, atol=1e-5)},
    states=dict(m=dict(rtol=2e-5, atol=1e-6), v=dict(rtol=2e-6, atol=1e-9),
                b=dict(rtol=2e-5, atol=1e-7)),
    v_sum_own=2e-6, v_sum_oracle=2e-6)
# The CPU kernel: per-element bounds from its error analysis (fp32_bounds); the row's lane
# sums of <= 32 terms added in double.
CPU_TOL = Tolerance(row_rel=1e-5, row_mass=4e-6, bounds=True, v_sum_own=1e-6)
# Its float64 path (float64 params and state): double math throughout, sums of up to 16K
# terms per chunk in one double (n * 2^-53 ~ 2e-12 of the mass); a few roundings amplified by
# up to 1 / eps (1000) in m / (1 - b) and by pow's condition in AdaiV2. beta1 = 1 - beta0
# vhat / vbar cancels near 0, so b and m get absolute bounds (b <= 1; |m| ~ |g| <= 50 with
# the spread gradients).
F64_TOL = Tolerance(row_rel=1e-13, row_mass=1e-11, params={F64: dict(rtol=1e-11, atol=1e-12)},
                    states=dict(m=dict(rtol=1e-11, atol=1e-12), v=dict(rtol=1e-12, atol=1e-16),
                                b=dict(rtol=1e-12, atol=1e-13)),
                    v_sum_own=1e-12, v_sum_oracle=1e-11)


# ---- targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Who runs the ops: `namespace` (torch.ops.<namespace>) on `device`, the op matrix's
    tensors there (`shapes`, `many`) and the tolerances of its arithmetic."""

    name: str
    namespace: str
    device: str
    backend: str  # the optimizer's backend of the same kernels
    shapes: tuple
    many: tuple
    tol: Tolerance

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    @property
    def interpreted(self) -> bool:
        return self.name == "triton"

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        """The tolerance of the target's results for params of `dtype` (float64: the CPU
        kernel's float64 path)."""
        return F64_TOL if dtype == F64 else self.tol

    def unavailable(self) -> str | None:
        from adai_kernels import backends

        if self.device == "cuda":
            if not torch.cuda.is_available():
                return "needs a CUDA GPU"
            why = backends.get(self.backend).unavailable(self.dev)
            # bench/gpu_check.sh: missing kernels fail rather than skip
            return None if os.environ.get("ADAI_REQUIRE_CUDA") == "1" else why
        return backends.get(self.backend).unavailable(self.dev)

    def __repr__(self) -> str:
        return self.name


TARGETS = {
    "cpu": Target("cpu", "adai", "cpu", "cpu", tuple(SHAPES_CPU), tuple(MANY_SMALL), CPU_TOL),
    "triton": Target("triton", "adai_triton", "cpu", "triton", tuple(SHAPES_TRITON), (),
                     TRITON_TOL),
    "emu": Target("emu", "adai_emu", "cpu", "cuda_emu", tuple(SHAPES_EMU), tuple(MANY_SMALL),
                  CUDA_TOL),
    "cuda": Target("cuda", "adai", "cuda", "cuda", tuple(SHAPES_CUDA), tuple(MANY_CUDA),
                   CUDA_TOL),
}


@functools.lru_cache(maxsize=None)
def target_param(name: str):
    """`op_target` as a pytest parameter: skipped where it cannot run; the CUDA one marked gpu."""
    t = TARGETS[name]
    why = t.unavailable()
    marks = [pytest.mark.skipif(why is not None, reason=str(why))]
    if t.device == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(t, id=name, marks=marks)


# ---- tensors and buckets --------------------------------------------------------------------


def _span(shape, stride) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def strided(shape, stride, dtype, device, offset=0, fill=0.0) -> torch.Tensor:
    """A tensor with these strides starting `offset` elements into a fresh buffer (offset 1:
    not 16-byte aligned)."""
    buf = torch.full((_span(shape, stride) + offset,), fill, dtype=dtype, device=device)
    return buf.as_strided(tuple(shape), tuple(stride), offset)


def make_param(shape, layout, dtype, gen, device, offset=0) -> torch.Tensor:
    if layout == "t":
        base = torch.randn(tuple(shape)[::-1], generator=gen).t()
    elif layout == "cl":
        base = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    else:
        base = torch.randn(shape, generator=gen)
    return strided(base.shape, base.stride(), dtype, device, offset).copy_(base)


def make_grads(params, gen, scale=1.0, spread=False) -> list[torch.Tensor]:
    """Fresh random gradients in the params' strides. `spread`: a scale from 0.01 to 10 per
    tensor and a tenth of the elements exactly zero (vhat / vbar far from 1 both ways)."""
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen) * scale
        if spread and p.numel():
            g *= 10.0 ** (torch.rand((), generator=gen).item() * 3 - 2)
            g[torch.rand(p.shape, generator=gen) < 0.1] = 0.0
        out.append(strided(p.shape, p.stride(), p.dtype, p.device).copy_(g))
    return out


def _align16(x: int) -> int:
    return (x + 15) // 16 * 16


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers (NaN-safe bitwise comparison)."""
    return t.contiguous().view(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                         8: torch.int64}[t.element_size()])


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe: the buckets' gaps and unused slots hold NaN)."""
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))


STATES = ("aligned", "misaligned", "shuffled", "shuffled_misaligned")


class Bucket:
    """Everything the ops take for one bucket: `params`, three flat state buffers (float32,
    or float64 for float64 params: `exp_avg`, `exp_avg_sq`, `beta1_prod`) holding each
    tensor's states in its memory order
    (views with the params' strides in `m`, `v`, `b`), `segments` and the float64 slot vectors
    `steps_vec` and `v_sum_vec`. `states` lays the buffers out:
      "aligned"      in tensor order, starts padded to 16 elements, slot i (the optimizer's);
      "misaligned"   in tensor order, no start a multiple of 4 floats, slots reversed;
      "shuffled"     reverse tensor order with a gap after each span, slots a permutation
                     of the slot vectors with SPARE unused ones;
      "shuffled_misaligned"  shuffled, starts 1 to 3 elements past a multiple of 16.
    What no tensor owns holds NaN; the ops must leave it as it is (`outside`). `start`:
    "fresh" (zeros, ones, step 0) or "mid" (random states, steps 1 to 5, exact v_sums).
    `reversed_slots`: slot n - 1 - i for tensor i in the unshuffled layouts."""

    SPARE = 2

    def __init__(self, params, states="shuffled", start="fresh", gen=None,
                 reversed_slots=None):
        n = len(params)
        self.params = list(params)
        self.device = params[0].device if params else torch.device("cpu")
        numels = [p.numel() for p in params]
        offsets, cursor = [0] * n, 0
        order = reversed(range(n)) if states.startswith("shuffled") else range(n)
        for i in order:
            if states == "aligned":
                offsets[i] = _align16(cursor)
                cursor = offsets[i] + numels[i]
            elif states == "misaligned":
                offsets[i] = _align16(cursor) + (1, 2, 3, 5, 6, 7)[i % 6]
                cursor = offsets[i] + numels[i]
            else:
                offsets[i] = cursor + (1 + i % 3 if states == "shuffled_misaligned" else 0)
                cursor = _align16(offsets[i] + numels[i] + 1)
        length = _align16(cursor) if states == "aligned" else cursor + (
            3 if states == "misaligned" else 0)
        if states.startswith("shuffled"):
            self.n_slots = n + self.SPARE
            perm = torch.randperm(self.n_slots, generator=torch.Generator().manual_seed(n))
            self.slots = perm[:n].tolist()
        else:
            self.n_slots = n
            if reversed_slots is None:
                reversed_slots = states == "misaligned"
            self.slots = list(range(n))[::-1] if reversed_slots else list(range(n))
        self.offsets = offsets
        self.segments = torch.tensor(list(zip(offsets, numels, self.slots)),
                                     dtype=torch.int64).reshape(-1, 3)

        state_dtype = F64 if params and params[0].dtype == F64 else torch.float32

        def buffer():
            return torch.full((length,), float("nan"), dtype=state_dtype, device=self.device)

        self.exp_avg, self.exp_avg_sq, self.beta1_prod = buffer(), buffer(), buffer()
        self.steps_vec, self.v_sum_vec = (torch.full((self.n_slots,), float("nan"), dtype=F64,
                                                     device=self.device) for _ in range(2))
        self._views()
        for i, p in enumerate(self.params):
            if start == "fresh":  # (filled in place: a tensor may have 2^31 elements)
                self.m[i].fill_(0.0)
                self.v[i].fill_(0.0)
                self.b[i].fill_(1.0)
                self.steps_vec[self.slots[i]] = 0.0
                self.v_sum_vec[self.slots[i]] = 0.0
                continue
            # mid-training, tensors at different steps (so bc2 differs between them)
            self.m[i].copy_(0.1 * torch.randn(p.shape, generator=gen))
            self.v[i].copy_(0.5 * torch.rand(p.shape, generator=gen))
            self.b[i].copy_(0.05 + 0.9 * torch.rand(p.shape, generator=gen))
            self.steps_vec[self.slots[i]] = float(torch.randint(1, 6, (), generator=gen))
            self.v_sum_vec[self.slots[i]] = self.v[i].double().sum()

    def _views(self):
        def views(buf):
            return [buf.as_strided(p.shape, p.stride(), o)
                    for p, o in zip(self.params, self.offsets)]
        self.m, self.v, self.b = (views(buf) for buf in (self.exp_avg, self.exp_avg_sq,
                                                         self.beta1_prod))

    def slot_index(self) -> torch.Tensor:
        """The tensors' slots, in tensor order."""
        return torch.tensor(self.slots, dtype=torch.int64, device=self.device)

    def set_steps(self, values):
        self.steps_vec[self.slot_index()] = torch.tensor(values, dtype=F64, device=self.device)

    def set_v_sums(self, values):
        self.v_sum_vec[self.slot_index()] = torch.tensor(values, dtype=F64, device=self.device)

    def select(self, idx) -> "Bucket":
        """Tensors `idx` of this bucket (in that order), sharing its buffers and slots, as the
        optimizer passes the tensors of a bucket that have gradients."""
        sub = copy.copy(self)
        sub.params = [self.params[i] for i in idx]
        sub.offsets = [self.offsets[i] for i in idx]
        sub.m, sub.v, sub.b = ([x[i] for i in idx] for x in (self.m, self.v, self.b))
        sub.slots = [self.slots[i] for i in idx]
        sub.segments = self.segments[list(idx)].reshape(-1, 3)
        return sub

    def clone(self) -> "Bucket":
        """A copy of everything (params at the same offsets into buffers of their own)."""
        c = copy.copy(self)
        c.params = []
        for p in self.params:
            q = strided(p.shape, p.stride(), p.dtype, p.device, p.storage_offset())
            c.params.append(q.copy_(p))
        for name in ("exp_avg", "exp_avg_sq", "beta1_prod", "steps_vec", "v_sum_vec"):
            setattr(c, name, getattr(self, name).clone())
        c.segments = self.segments.clone()
        c._views()
        return c

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def step_list(self) -> list[float]:
        """Step counters in tensor order."""
        return self.steps_vec[self.slot_index()].tolist()

    def v_sum_list(self) -> list[float]:
        """v_sums in tensor order."""
        return self.v_sum_vec[self.slot_index()].tolist()

    def v_sum(self, i: int) -> float:
        return self.v_sum_vec[self.slots[i]].item()

    def outside(self) -> list[torch.Tensor]:
        """The bits of what a call over these tensors must not touch: the state buffers
        outside their segments, and the slots they do not use."""
        parts, pos, end = [], 0, self.exp_avg.numel()
        spans = sorted((o, o + k) for o, k, _ in self.segments.tolist() if k > 0)
        for a, e in spans + [(end, end)]:
            if a > pos:
                parts += [buf[pos:a] for buf in (self.exp_avg, self.exp_avg_sq, self.beta1_prod)]
            pos = max(pos, e)
        unused = torch.tensor(sorted(set(range(self.n_slots)) - set(self.slots)),
                              dtype=torch.int64, device=self.device)
        parts += [self.steps_vec[unused], self.v_sum_vec[unused]]
        return [bits(t).clone() for t in parts]

    def snapshot(self) -> dict:
        """Copies of the tensors (in their dtypes and strides), steps, v_sums and `outside`."""
        copies = lambda ts: [t.detach().clone() for t in ts]  # noqa: E731
        return dict(params=copies(self.params), m=copies(self.m), v=copies(self.v),
                    b=copies(self.b), steps=self.step_list(), v_sums=self.v_sum_list(),
                    outside=self.outside())

    def tensors(self) -> list[torch.Tensor]:
        """Everything a step writes (for bitwise comparisons of whole runs)."""
        return [*self.params, self.exp_avg, self.exp_avg_sq, self.beta1_prod, self.steps_vec,
                self.v_sum_vec]


def make_bucket(target: Target, dtype, seed, shapes=None, states="shuffled", start="fresh",
                reversed_slots=None):
    """A bucket of the target's op-matrix tensors (or `shapes`) on its device, and the
    generator that made it (for its gradients)."""
    gen = torch.Generator().manual_seed(seed)
    params = [make_param(s, layout, dtype, gen, target.dev, off)
              for s, layout, off in (target.shapes if shapes is None else shapes)]
    return Bucket(params, states, start, gen, reversed_slots), gen


# Sample arguments of the ops (opcheck, validation): empty, one-element, odd, transposed and
# channels_last tensors.
SAMPLE_SHAPES = [((0,), "c", 0), ((1,), "c", 0), ((7,), "c", 0), ((37,), "c", 0),
                 ((13, 9), "t", 0), ((2, 3, 4, 5), "cl", 0)]
# argument positions
S_SEG, S_STEPS, S_V_SUMS, S_SCALE, S_OUT = 2, 3, 4, 5, 8
U_SEG, U_M, U_V, U_B, U_V_SUMS, U_STEPS, U_STATS, U_SCALE, U_INF, U_LR = range(2, 12)


def sample_args(target, dtype, weight_decay=0.0, decoupled=False, dampening=1.0,
                grad_scale=None, found_inf=None, lr_tensor=None, max_grad_norm=0.0,
                skip_nonfinite=False, misaligned=False, shapes=SAMPLE_SHAPES):
    """(stats_args, update_args) for one bucket mid-training (slots in reverse order), its
    stats row real and another bucket's row beside it; the step counters as before stats."""
    bk, gen = make_bucket(target, dtype, 0, shapes, "misaligned" if misaligned else "aligned",
                          "mid", reversed_slots=True)
    grads = make_grads(bk.params, gen)
    stats = torch.zeros(2, COLUMNS, dtype=F64, device=target.dev)
    l2 = 0.0 if decoupled else weight_decay
    stats_args = (bk.params, grads, bk.segments, bk.steps_vec, bk.v_sum_vec,
                  scalar(target, grad_scale), 0.99, l2, stats[0])
    target.ops.stats(*stats_args)  # a real row for update ...
    bk.steps_vec.sub_(1.0)         # ... and the counters as before that call
    stats[1] = torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0, 3.0, 100.0], dtype=F64)
    update_args = (bk.params, grads, bk.segments, bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod,
                   bk.v_sum_vec, bk.steps_vec, stats, scalar(target, grad_scale),
                   scalar(target, found_inf), scalar(target, lr_tensor), 0.1, 0.1, 0.99, 1e-3,
                   weight_decay, decoupled, dampening, max_grad_norm, skip_nonfinite)
    return stats_args, update_args


def oracle_input(snap: dict, grads, hp: dict) -> dict:
    """A bucket's snapshot (before a step) and its gradients, for oracle_step."""
    return dict(hp=hp, grads=grads, **{k: snap[k] for k in ("params", "m", "v", "b", "steps",
                                                             "v_sums")})


# ---- the ops --------------------------------------------------------------------------------


def l2_of(hp) -> float:
    return 0.0 if hp["decoupled"] else hp["weight_decay"]


def scalar(target: Target, x) -> torch.Tensor | None:
    """A 0-dim float32 control tensor on the target's device (None stays None)."""
    return None if x is None else torch.tensor(float(x), dtype=torch.float32, device=target.dev)


def stats_op(target, bk, grads, hp, out, grad_scale=None):
    target.ops.stats(bk.params, grads, bk.segments, bk.steps_vec, bk.v_sum_vec, grad_scale,
                     hp["betas"][1], l2_of(hp), out)


def update_op(target, bk, grads, hp, stats, grad_scale=None, found_inf=None, lr_tensor=None,
              max_grad_norm=0.0, skip_nonfinite=False, lr=None):
    """`lr`: the float lr passed (0.0 with a tensor lr unless given: it is ignored then)."""
    if lr is None:
        lr = 0.0 if lr_tensor is not None else hp["lr"]
    target.ops.update(bk.params, grads, bk.segments, bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod,
                      bk.v_sum_vec, bk.steps_vec, stats, grad_scale, found_inf, lr_tensor, lr,
                      hp["betas"][0], hp["betas"][1], hp["eps"], hp["weight_decay"],
                      hp["decoupled"], hp["dampening"], max_grad_norm, skip_nonfinite)


def run_step(target, pairs, hp, extra=(), grad_scale=None, **control) -> torch.Tensor:
    """One optimizer step over buckets: `pairs` of (bucket, grads), stats of each into its row
    of one matrix (then `extra`: other buckets' rows), then update of each. Returns the
    matrix. `control`: update's found_inf, lr_tensor, max_grad_norm, skip_nonfinite, lr."""
    stats = torch.zeros(len(pairs) + len(extra), COLUMNS, dtype=F64, device=target.dev)
    for j, row in enumerate(extra):
        stats[len(pairs) + j] = torch.tensor(row, dtype=F64)
    for j, (bk, grads) in enumerate(pairs):
        stats_op(target, bk, grads, hp, stats[j], grad_scale=grad_scale)
    for bk, grads in pairs:
        update_op(target, bk, grads, hp, stats, grad_scale=grad_scale, **control)
    return stats


def op_step(target, bk, grads, hp, extra=None, grad_scale=None, **control) -> torch.Tensor:
    """One step of one bucket; row 0 of the returned matrix is this bucket's, `extra` (another
    bucket's row) the second."""
    return run_step(target, [(bk, grads)], hp, [extra] if extra else [], grad_scale, **control)


# ---- checks ---------------------------------------------------------------------------------


def check_row(tol: Tolerance, row, expected, abs_row, l2=None, what=""):
    """A statistics row against the oracle's (see Tolerance). `l2`: when it is 0 in float32
    the params are not read: B is Bgg and the decay columns are 0, exactly."""
    got = row.tolist()
    assert got[N] == expected[N], f"{what}: N {got[N]} vs {expected[N]}"
    if l2 is not None and f32(l2) == 0.0:
        assert got[1] == got[BGG] and got[3] == 0.0 and got[BTT] == 0.0, f"{what}: {got}"
    for col, name in enumerate(("A", "B", "Bgg", "Bgt", "Btt", "Gn")):
        scale = abs(expected[col])
        if col == 3 and tol.bgt_by_squares:
            scale += abs(expected[BGG]) + abs(expected[BTT])
        bound = tol.row_rel * scale + tol.row_mass * abs_row[col] + 1e-300
        assert abs(got[col] - expected[col]) <= bound, \
            f"{what}: stats column {name}: {got[col]!r} vs {expected[col]!r}"


def assert_outside_untouched(bk, before, what=""):
    now = bk.outside()
    assert len(now) == len(before), what
    for k, (x, y) in enumerate(zip(now, before)):
        assert torch.equal(x, y), f"{what}: written outside the call's segments / slots ({k})"


def assert_unchanged(bk, snap, what="", outside=True):
    """Bitwise: every tensor of the bucket as in `snap` (a skipped step); `outside`: and what
    lies outside its segments and slots."""
    now = bk.snapshot()
    assert now["steps"] == snap["steps"], f"{what}: steps {now['steps']} vs {snap['steps']}"
    assert same_bits(torch.tensor(now["v_sums"], dtype=F64),
                     torch.tensor(snap["v_sums"], dtype=F64)), f"{what}: v_sums were written"
    if outside:
        assert_outside_untouched(bk, snap["outside"], what)
    for key in ("params", "m", "v", "b"):
        for i, (x, y) in enumerate(zip(now[key], snap[key])):
            assert same_bits(x, y), f"{what}: {key}[{i}] was written"


def check_step(target, pairs, snaps, grads_before, rows, expected, hp, grad_scale=None,
               what=""):
    """A step of `pairs` (bucket, grads) from `snaps` (their snapshots before it) against the
    oracle's `expected`: the rows, step counters, what lies outside the segments and slots,
    every tensor within the target's tolerance, v_sums, and the gradients unwritten."""
    assert not expected["skip"], what
    for j, ((bk, grads), snap, g0, exp) in enumerate(zip(pairs, snaps, grads_before,
                                                         expected["buckets"])):
        tol = target.tolerance(bk.params[0].dtype if bk.params else torch.float32)
        where = f"{target.name} {what} bucket {j}"
        check_row(tol, rows[j], expected["rows"][j], expected["abs_rows"][j], l2_of(hp), where)
        assert bk.step_list() == exp["steps"], where
        assert_outside_untouched(bk, snap["outside"], where)
        if tol.bounds:
            _check_bounds(bk, exp["flat"], hp, grad_scale, expected["clip"], where)
        for i, p in enumerate(bk.params):
            here = f"{where} tensor {i} {tuple(p.shape)} {p.dtype} stride {p.stride()}"
            assert p.stride() == snap["params"][i].stride(), here
            if tol.params:
                torch.testing.assert_close(p.double(), exp["params"][i].to(p.dtype).double(),
                                           **tol.params[p.dtype],
                                           msg=lambda m: f"{here}: params: {m}")
            for name, t in tol.states.items():
                torch.testing.assert_close(getattr(bk, name)[i].double(), exp[name][i], **t,
                                           msg=lambda m: f"{here}: {name}: {m}")
            # v_sums: the kernel's reduction of its own new v, and the oracle's
            own = float(bk.v[i].double().sum())
            assert math.isclose(bk.v_sum(i), own, rel_tol=tol.v_sum_own, abs_tol=1e-30), here
            if tol.v_sum_oracle:
                assert math.isclose(bk.v_sum(i), exp["v_sums"][i], rel_tol=tol.v_sum_oracle,
                                    abs_tol=1e-30), here
            for t in (p, bk.m[i], bk.v[i], bk.b[i]):
                assert torch.isfinite(t).all(), here
            assert same_bits(grads[i], g0[i]), f"{here}: the gradient was written"


@contextlib.contextmanager
def one_thread():
    """For the float64 reference math and the comparisons: elementwise ops over a bucket's
    100K elements, where on a busy machine waking a second thread costs more than it saves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def step_and_check(target, pairs, hp, extra=(), grad_scale=None, found_inf=None,
                   lr_tensor=None, max_grad_norm=0.0, skip_nonfinite=False, what=""):
    """One step of `pairs` (bucket, grads) through the ops and the oracle, checked with
    check_step. The gradients are what the ops get (scaled ones with `grad_scale`); control
    values are floats (tensors on the target's device for the ops). Returns (rows,
    expected)."""
    snaps = [bk.snapshot() for bk, _ in pairs]
    grads_before = [[g.clone() for g in grads] for _, grads in pairs]
    rows = run_step(target, pairs, hp, extra, scalar(target, grad_scale),
                    found_inf=scalar(target, found_inf), lr_tensor=scalar(target, lr_tensor),
                    max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)
    with one_thread():
        expected = oracle_step([oracle_input(s, g, hp) for s, (_, g) in zip(snaps, pairs)],
                               extra, grad_scale=grad_scale, found_inf=found_inf,
                               lr=None if lr_tensor is None else f32(lr_tensor),
                               max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)
        check_step(target, pairs, snaps, grads_before, rows, expected, hp, grad_scale, what)
    return rows, expected


def seed_of(*parts) -> int:
    """A fixed seed per case (its id), different between cases."""
    return zlib.crc32(" ".join(map(str, parts)).encode())


# ---- the CPU kernel's error bounds ----------------------------------------------------------
#
# Per element, u = 2^-24 (fp32 rounding), ulp_T(x) = spacing of dtype T at x. Per-element math
# is fp32, so the bounds are a first-order fp32 error analysis (|g| stands for |g| + |l2 theta|):
#
# | quantity          | bound                                                                  |
# |-------------------|------------------------------------------------------------------------|
# | v (exp_avg_sq)    | 1e-6 * (beta2 v + (1 - beta2) (|g| + |l2 theta|)^2)                    |
# | beta1 (internal)  | dbeta1 = (1 - beta1) * 4e-6 + 2u   (vhat / vbar to 4e-6 relative)      |
# | b (beta1_prod)    | b_old * dbeta1 + u b                                                   |
# | m (exp_avg)       | 3u (|beta1 m| + beta3 |g|) + dbeta1 |m| + d beta3 / (1 - beta1) dbeta1 |g| |
# | theta, float32    | 1 ulp_f32 + lr * dmhat + 2u (|theta| + lr |mhat|)                      |
# | theta, bf16/fp16  | 1 ulp of the dtype + the same fp32 error                               |
#
# with dmhat = beta0^(1-d) (dm / (1 - b) + |m| db / (1 - b)^2) + 2u |mhat|. For a well
# conditioned element (1 - b of order 1) theta's bound is about 1e-5 of the step lr * mhat.
# It grows only where fp32 itself is ill-conditioned: 1 - b and 1 - beta1 near eps = 1e-3 lose
# ~10 bits (b and beta1 are stored and computed near 1), so early steps of low-gradient
# elements are allowed ~1e-4 of their step. The 4e-6 on vhat / vbar: vbar comes from fp32 lane
# sums of <= 32 terms added in double (<= 32u ~ 2e-6, in both V_i and G_i), plus a few u from
# v, 1 / bc2 and pow. Reduced-precision params are rounded once (nearest even) from the fp32
# result, so they land on the float64 value rounded to the dtype or its neighbour. The
# measured errors stay within about half of these bounds.
#
# Three more error sources enter through the gradient and pow:
# - unscaling: g = grad * float(1 / scale) is one more rounding of g (2u relative, none for a
#   power-of-two scale);
# - clipping: the kernel's clip coefficient comes from its own fp32-lane sum of g^2
#   (<= 32u relative, so c is within 16u) and is applied as one float multiplier: e_g = 20u.
#   Both add e_g |g| to g's error, which enters v, vbar (through S: 2 e_g relative, so the
#   ratio's bound grows by 4 e_g) and m (beta3 e_g |g|);
# - AdaiV2's two pow(x, e) are 2^(e log2 x) in the kernel: (|e ln x| + 2) u relative
#   (csrc/cpu/vec_pow.h), added to 1 - beta1 and to beta3.

E_RATIO = 4e-6  # relative error of the kernel's vhat / vbar (see above)
V_RTOL = 1e-6   # v = beta2 v + (1 - beta2) g^2: a few roundings, no cancellation
MANTISSA = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
MIN_NORMAL_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (float64 x), subnormals included."""
    _, e = torch.frexp(x.abs())  # |x| = f * 2^e, f in [0.5, 1)
    e = torch.clamp(e - 1, min=MIN_NORMAL_EXP[dtype])
    return torch.pow(2.0, (e - (MANTISSA[dtype] - 1)).to(F64))


def fp32_bounds(r: dict, hp: dict, grad_scale, clip: float) -> dict:
    """First-order bounds on a float32 kernel's v, m, b and theta (the table above), from the
    oracle's flat intermediates `r` of one bucket."""
    u = U32
    beta0, beta2 = hp["betas"]
    lam, d, lr = hp["weight_decay"], hp["dampening"], r["lr"]
    l2 = 0.0 if hp["decoupled"] else lam
    e_g = 0.0  # relative error of the kernel's g beyond its own rounding
    if grad_scale is not None and math.frexp(grad_scale)[0] != 0.5:
        e_g += 2 * u
    if clip < 1.0:
        e_g += 20 * u
    e_ratio = E_RATIO + 4 * e_g
    g, beta1, beta3, b, m, mhat = (r[k] for k in ("g", "beta1", "beta3", "b", "m", "mhat"))
    g_err = e_g * g.abs()
    g_mag = g.abs() + (l2 * r["theta_old"]).abs() if l2 != 0.0 else g.abs()
    theta_tol = (u * r["theta_decayed"].abs() if hp["decoupled"] and lam != 0
                 else torch.zeros_like(g))
    v_tol = V_RTOL * (beta2 * r["v_old"] + (1.0 - beta2) * g_mag ** 2) + (
        1.0 - beta2) * 2 * g_mag * g_err
    m_old = r["m_old"].abs()
    d_beta1 = (1.0 - beta1) * e_ratio + 2 * u
    d_beta3 = d * beta3 / (1.0 - beta1) * d_beta1
    if d != 1.0:  # 2^(e log2 x) for both pows (csrc/cpu/vec_pow.h)
        ratio = r["ratio"]
        log_ratio = torch.where(ratio > 0, ratio.clamp_min(1e-300).log().abs(),
                                torch.zeros_like(ratio))
        d_beta1 = d_beta1 + (1.0 - beta1) * (r["e"] * log_ratio + 2) * u
        d_beta3 = (d * beta3 / (1.0 - beta1) * d_beta1
                   + beta3 * (d * (1.0 - beta1).log().abs() + 2) * u)
    b_tol = r["b_old"] * d_beta1 + u * b
    m_tol = (3 * u * (beta1 * m_old + beta3 * g_mag) + d_beta1 * m_old + d_beta3 * g_mag
             + beta3 * g_err)
    d_mhat = (beta0 ** (1.0 - d) * (m_tol / (1.0 - b) + m.abs() * b_tol / (1.0 - b) ** 2)
              + 2 * u * mhat.abs())
    theta_tol = theta_tol + lr * d_mhat + 2 * u * (r["theta_decayed"].abs() + lr * mhat.abs())
    return dict(v=v_tol, m=m_tol, b=b_tol, theta=theta_tol)


def assert_within(err: torch.Tensor, tol, what: str):
    if err.numel() == 0:
        return
    bad = err.abs() > tol
    if bad.any():
        tol = torch.as_tensor(tol, dtype=F64).expand_as(err)
        j = int(torch.argmax((err.abs() / tol.clamp_min(1e-300)).flatten()))
        pytest.fail(f"{what}: {int(bad.sum())} of {err.numel()} elements out of tolerance, "
                    f"worst error {err.flatten()[j].item():.3e} vs tol "
                    f"{tol.flatten()[j].item():.3e}")


def _flat(ts) -> torch.Tensor:
    if not ts:
        return torch.zeros(0, dtype=F64)
    return torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=F64) for t in ts])


def _check_bounds(bk, r, hp, grad_scale, clip, what):
    bounds = fp32_bounds(r, hp, grad_scale, clip)
    assert_within(_flat(bk.v) - r["v"], bounds["v"], f"{what} v")
    assert_within(_flat(bk.m) - r["m"], bounds["m"], f"{what} m")
    assert_within(_flat(bk.b) - r["b"], bounds["b"], f"{what} b")
    dtype = bk.params[0].dtype if bk.params else torch.float32
    # the dtype's rounding of the fp32 result (1 ulp covers a halfway flip), plus the fp32
    # result's own error
    assert_within(_flat(bk.params) - r["params"], ulp(r["params"], dtype) + bounds["theta"],
                  f"{what} theta")
