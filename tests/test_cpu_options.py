"""The CPU kernels' optional update arguments (docs/design.md, "Native op schemas"): the
beta1_prod elision (`beta1_prod_max`, a freed `beta1_prod`), fp32 master weights (`master`)
and stochastic rounding (`rounding_seed`, `rounding_index`).

Each option is checked bitwise against the same op without it, on fresh random inputs:
the elision must not change a bit of params / m / v (1 - b == 1 exactly once b is done),
a master run is an fp32 run on the master values, and stochastic rounding is the fp32
result rounded with adai_kernels/rounding.py's functions."""
from __future__ import annotations

import pytest
import torch

from adai_kernels import _native, rounding
from adai_kernels.ops import Ops

OPS = Ops("adai")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DONE = 2.0 ** -25  # the fp32 flag rule: done when max |b| <= 2^-25


@pytest.fixture(autouse=True)
def _ops_loaded():
    assert _native.load_error() is None, _native.load_error()


def _params(dtype, gen):
    """Odd sizes, a 0-dim, an empty, a one-element and a transposed (non-contiguous) tensor,
    one tensor large enough for several chunks."""
    shapes = [(37,), (), (0,), (1,), (5, 9), (33000,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    params[4] = params[4].t()  # (9, 5) with strides (1, 9)
    return params


def _bits(t):
    """The tensor's bits as integers (NaN-safe bitwise comparison)."""
    view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16)
    return t.contiguous().view(view)


def _same(a, b, what):
    assert torch.equal(_bits(a), _bits(b)), what


class Bucket:
    """A bucket's state for `params`: flat buffers, segments with reversed slots."""

    def __init__(self, params, master=False):
        self.params = params
        n = len(params)
        offsets, size = [], 0
        for p in params:
            offsets.append(size)
            size += p.numel() + 3  # a gap between spans
        self.segments = torch.tensor([(o, p.numel(), n - 1 - i) for i, (o, p) in
                                      enumerate(zip(offsets, params))], dtype=torch.int64)
        self.exp_avg = torch.zeros(size)
        self.exp_avg_sq = torch.zeros(size)
        self.beta1_prod = torch.ones(size)
        self.steps = torch.zeros(n, dtype=torch.float64)
        self.v_sums = torch.zeros(n, dtype=torch.float64)
        self.master = None
        if master:
            self.master = torch.zeros(size)
            for p, w in zip(params, self.spans(self.master)):
                w.copy_(p.float())

    def spans(self, buf):
        """Each tensor's span of a flat state buffer, shaped and strided as memory order."""
        out = []
        for (o, k, _), p in zip(self.segments.tolist(), self.params):
            flat = buf[o:o + k]
            out.append(flat.as_strided(p.shape, p.stride()) if k else flat.view(p.shape))
        return out

    def clone(self):
        other = object.__new__(Bucket)
        other.__dict__ = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                          for k, v in self.__dict__.items()}
        other.params = [p.clone() if p.is_contiguous() else p.t().clone().t()
                        for p in self.params]
        return other


# decoupled decay: stats reads no theta, so the NaN the elision test plants in one element's
# b stays in that element
HYPER = dict(lr=0.05, beta0=0.9, beta2=0.99, eps=0.3, weight_decay=0.01, decoupled=True,
             dampening=1.0, max_grad_norm=0.0, skip_nonfinite=False)


def step(bucket, grads, hyper=HYPER, **options):
    """One optimizer step of the bucket: stats, then update with `options`."""
    stats = torch.zeros(1, 7, dtype=torch.float64)
    l2 = 0.0 if hyper["decoupled"] else hyper["weight_decay"]
    OPS.stats(params=bucket.params, grads=grads, segments=bucket.segments, steps=bucket.steps,
              v_sums=bucket.v_sums, grad_scale=None, beta2=hyper["beta2"], l2=l2,
              out=stats[0], master=bucket.master)
    OPS.update(params=bucket.params, grads=grads, segments=bucket.segments,
               exp_avg=bucket.exp_avg, exp_avg_sq=bucket.exp_avg_sq,
               beta1_prod=bucket.beta1_prod, v_sums=bucket.v_sums, steps=bucket.steps,
               stats=stats, grad_scale=None, found_inf=None, lr_tensor=None,
               master=bucket.master, **hyper, **options)


def _grads(params, gen, scales):
    grads = []
    for p, s in zip(params, scales):
        g = torch.empty_like(p)  # the param's strides
        g.copy_(torch.randn(p.shape, generator=gen) * s)
        grads.append(g)
    return grads


# the first tensor's gradients are much larger than the others': its beta1 is near 0 and it
# is done within a few steps, the small ones (beta1 = 1 - eps) take about 50
SCALES = [30.0, 0.01, 1.0, 0.02, 0.01, 0.01]


def _max_abs(b):
    return b.abs().amax() if b.numel() else torch.tensor(0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elision_is_bitwise_and_tracks_max(dtype):
    gen = torch.Generator().manual_seed(1)
    full = Bucket(_params(dtype, gen))
    full.beta1_prod[full.segments[5, 0] + 7] = float("nan")  # this tensor is never done
    elided = full.clone()
    b_max = torch.ones(len(full.params))
    saw_mixed = False
    for k in range(60):
        grads = _grads(full.params, gen, SCALES)
        done_before = [bool(b_max[s] <= DONE) for s in full.segments[:, 2].tolist()]
        saw_mixed |= any(done_before) and not all(done_before)
        b_elided_before = [b.clone() for b in elided.spans(elided.beta1_prod)]
        step(full, grads)
        step(elided, grads, beta1_prod_max=b_max)
        for i, (p, q) in enumerate(zip(full.params, elided.params)):
            _same(p, q, f"step {k}: params[{i}]")
        _same(full.exp_avg, elided.exp_avg, f"step {k}: exp_avg")
        _same(full.exp_avg_sq, elided.exp_avg_sq, f"step {k}: exp_avg_sq")
        _same(full.v_sums, elided.v_sums, f"step {k}: v_sums")
        spans = zip(full.spans(full.beta1_prod), elided.spans(elided.beta1_prod),
                    b_elided_before, full.segments[:, 2].tolist(), done_before)
        for i, (b_full, b_el, b_old, slot, done) in enumerate(spans):
            if done:  # untouched, and so is its max
                _same(b_el, b_old, f"step {k}: done tensor {i}'s b was written")
                assert b_max[slot] <= DONE
            else:
                _same(b_el, b_full, f"step {k}: beta1_prod of tensor {i}")
                want = _max_abs(b_full).float()
                assert (torch.isnan(want) and torch.isnan(b_max[slot])) or \
                    torch.equal(b_max[slot], want), f"step {k}: beta1_prod_max[{i}]"
    assert saw_mixed
    assert torch.isnan(b_max[full.segments[5, 2]]), "a NaN in b must keep its tensor not done"
    assert all(b_max[s] <= DONE for s in full.segments[:5, 2].tolist())


@pytest.mark.parametrize("dtype", DTYPES)
def test_freed_beta1_prod_gives_the_same_bits(dtype):
    gen = torch.Generator().manual_seed(2)
    full = Bucket(_params(dtype, gen))
    b_max = torch.ones(len(full.params))
    for _ in range(60):  # every tensor done (beta1 <= 1 - eps = 0.7)
        step(full, _grads(full.params, gen, SCALES), beta1_prod_max=b_max)
    assert bool((b_max <= DONE).all())
    freed = full.clone()
    freed.beta1_prod = torch.empty(0)
    for k in range(3):
        grads = _grads(full.params, gen, SCALES)
        step(full, grads)  # no max: reads and writes b
        step(freed, grads)
        for i, (p, q) in enumerate(zip(full.params, freed.params)):
            _same(p, q, f"step {k}: params[{i}]")
        _same(full.exp_avg, freed.exp_avg, "exp_avg")
        _same(full.exp_avg_sq, freed.exp_avg_sq, "exp_avg_sq")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
def test_master_weights_are_an_fp32_run(dtype, decoupled):
    gen = torch.Generator().manual_seed(3)
    low = Bucket(_params(dtype, gen), master=True)
    f32 = low.clone()
    f32.params = [w.clone() if w.is_contiguous() else w.t().clone().t()
                  for w in low.spans(low.master)]
    f32.master = None
    hyper = dict(HYPER, eps=1e-3, decoupled=decoupled, weight_decay=0.05)
    for k in range(4):
        grads = _grads(low.params, gen, SCALES)
        step(low, grads, hyper)
        step(f32, [g.float() for g in grads], hyper)
        for i, (p, w, q) in enumerate(zip(low.params, low.spans(low.master), f32.params)):
            _same(w, q, f"step {k}: master of params[{i}]")
            _same(p, w.to(dtype), f"step {k}: params[{i}] is master rounded to nearest")
        for name in ("exp_avg", "exp_avg_sq", "beta1_prod", "v_sums"):
            _same(getattr(low, name), getattr(f32, name), f"step {k}: {name}")


def _rounded_step(bucket, grads, seed, first, hyper):
    """The expected stochastic rounding step: the fp32 op on the upcast params (same state),
    rounded with adai_kernels/rounding.py; returns (params, state bucket)."""
    f32 = bucket.clone()
    f32.params = [p.float() for p in bucket.params]  # keeps the strides
    step(f32, [g.float() for g in grads], hyper)
    out = []
    for p, q, (_, _, slot), f in zip(bucket.params, f32.params, bucket.segments.tolist(), first):
        k = int(f32.steps[slot].item())
        stream = rounding.rounding_stream(torch.tensor(seed), torch.tensor(k))
        index = rounding.element_index(p.shape, p.stride(), f, "cpu")
        bits = rounding.rounding_bits(stream, index)
        out.append(rounding.bf16_round_stochastic(q, bits).view(p.shape))
    return out, f32


def _sr_run(seed, steps=3, gen_seed=4):
    gen = torch.Generator().manual_seed(gen_seed)
    bucket = Bucket(_params(torch.bfloat16, gen))
    first = [(i << 40) + 1000 * i for i in range(len(bucket.params))]
    hyper = dict(HYPER, eps=1e-3, decoupled=False)
    history = []
    for k in range(steps):
        grads = _grads(bucket.params, gen, SCALES)
        expect, f32 = _rounded_step(bucket, grads, seed, first, hyper)
        step(bucket, grads, hyper, rounding_seed=torch.tensor([seed]),
             rounding_index=torch.tensor(first))
        for i, (p, e) in enumerate(zip(bucket.params, expect)):
            _same(p, e, f"step {k}: params[{i}]")
        for name in ("exp_avg", "exp_avg_sq", "beta1_prod", "v_sums", "steps"):
            _same(getattr(bucket, name), getattr(f32, name), f"step {k}: {name}")
        history.append([p.clone() for p in bucket.params])
    return history


def test_stochastic_rounding_matches_the_torch_rounding():
    a = _sr_run(seed=5)
    b = _sr_run(seed=5)
    for pa, pb in zip(a[-1], b[-1]):
        _same(pa, pb, "two runs with one seed differ")
    c = _sr_run(seed=6)
    assert any(not torch.equal(_bits(pa), _bits(pc)) for pa, pc in zip(a[0], c[0])), \
        "different seeds gave the same rounding"
