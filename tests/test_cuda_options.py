"""The optional arguments of adai::update / adai::stats on the CUDA kernels (emulated or on a
GPU): beta1_prod elision (`beta1_prod_max`, a freed `beta1_prod`), fp32 master weights
(`master`) and stochastic rounding (`rounding_seed`, `rounding_index`). Each is checked
bitwise against the same kernels without it: elision against beta1_prod_max=None, master
weights against an fp32-param run on the master's values, stochastic rounding against an
fp32-param run rounded by adai_kernels/rounding.py.

ADAI_GPU_TEST_DEVICE=emu runs them on the CPU emulator (csrc/emu/, `make test-emu`),
ADAI_GPU_TEST_DEVICE=cuda (default) on a GPU; skipped otherwise.
"""
from __future__ import annotations

import os

import pytest
import torch

import adai_kernels._native as native
from adai_kernels import rounding
from adai_kernels.ops import Ops

MODE = os.environ.get("ADAI_GPU_TEST_DEVICE", "cuda")
EMU = MODE == "emu"
DEVICE = torch.device("cpu" if EMU else "cuda")
if EMU:
    import emu_build

    emu_build.load(asan=os.environ.get("ADAI_EMU_ASAN") == "1")


def _skip_reason() -> str | None:
    if MODE not in ("emu", "cuda"):
        return "tests the CUDA kernels (ADAI_GPU_TEST_DEVICE=emu or cuda)"
    if MODE == "cuda" and not (torch.cuda.is_available() and native.has_cuda_kernels()):
        return "needs a CUDA GPU and adai_kernels._C built with CUDA kernels"
    return None


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]
ops = Ops("adai_emu" if EMU else "adai")
COLUMNS = 7  # csrc/adai_math.h StatsColumn
DONE = 2.0 ** -25  # csrc/adai_math.h kBeta1ProdDone
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (shape, layout): odd sizes, empty, one element, transposed, two chunks (kChunk = 16384).
SHAPES = [((7,), "c"), ((0,), "c"), ((1,), "c"), ((13, 17), "t"), ((129, 130), "c"),
          ((5, 3), "c")]
# Large eps and beta0 make every b done within about 50 steps (b <= (1 - eps)^k).
HYPER = dict(lr=1e-2, beta0=0.9, beta2=0.99, eps=0.3, weight_decay=0.05, decoupled=True,
             dampening=1.0)


def _align16(x: int) -> int:
    return (x + 15) // 16 * 16


def _clone_strided(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


class Bucket:
    """The tensors of one call and flat float32 states (`exp_avg`, `exp_avg_sq`, `beta1_prod`,
    optionally `master`), each tensor's span in its memory order; offset_by: how many elements
    past a multiple of 16 each span starts (1: the scalar paths)."""

    def __init__(self, params, offset_by=0):
        self.params = params
        self.offsets, cursor = [], 0
        for p in params:
            self.offsets.append(cursor + offset_by)
            cursor = _align16(cursor + offset_by + p.numel() + 1)
        n = len(params)
        self.slots = list(range(n))[::-1]  # slot i holds tensor n - 1 - i
        self.segments = torch.tensor([(o, p.numel(), s) for o, p, s in
                                      zip(self.offsets, params, self.slots)],
                                     dtype=torch.int64).reshape(-1, 3)
        self.exp_avg = torch.zeros(cursor, device=DEVICE)
        self.exp_avg_sq = torch.zeros(cursor, device=DEVICE)
        self.beta1_prod = torch.ones(cursor, device=DEVICE)
        self.steps = torch.zeros(n, dtype=torch.float64, device=DEVICE)
        self.v_sums = torch.zeros(n, dtype=torch.float64, device=DEVICE)
        self.b_max = torch.ones(n, device=DEVICE)
        self.master = None

    def span(self, buf, i) -> torch.Tensor:
        return buf[self.offsets[i]:self.offsets[i] + self.params[i].numel()]

    def clone(self, params=None) -> "Bucket":
        c = Bucket.__new__(Bucket)
        c.__dict__.update(self.__dict__)
        c.params = params if params is not None else [_clone_strided(p) for p in self.params]
        for k in ("exp_avg", "exp_avg_sq", "beta1_prod", "steps", "v_sums", "b_max", "master"):
            if getattr(self, k) is not None:
                setattr(c, k, getattr(self, k).clone())
        return c

    def select(self, idx) -> "Bucket":
        """The call over tensors `idx` only (sharing buffers, slots and params)."""
        sub = Bucket.__new__(Bucket)
        sub.__dict__.update(self.__dict__)
        sub.params = [self.params[i] for i in idx]
        sub.offsets = [self.offsets[i] for i in idx]
        sub.slots = [self.slots[i] for i in idx]
        sub.segments = self.segments[list(idx)].reshape(-1, 3)
        return sub


def make_params(dtype, gen, shapes=SHAPES):
    out = []
    for shape, layout in shapes:
        if layout == "t":
            t = torch.randn(shape[::-1], generator=gen).t()
        else:
            t = torch.randn(shape, generator=gen)
        out.append(_clone_strided(t.to(dtype).to(DEVICE)))
    return out


def like(p: torch.Tensor, values: torch.Tensor, dtype=None) -> torch.Tensor:
    """`values` in a tensor with p's strides (and dtype, unless given)."""
    out = torch.empty_strided(p.shape, p.stride(), dtype=dtype or p.dtype, device=DEVICE)
    return out.copy_(values)


def make_grads(params, gen):
    return [like(p, torch.randn(p.shape, generator=gen)) for p in params]


def step(bk, grads, *, elide=True, freed=False, rounding_seed=None, rounding_index=None,
         found_inf=None, hp=HYPER) -> torch.Tensor:
    """One stats + update call as the optimizer makes them; returns the statistics row."""
    stats = torch.zeros(1, COLUMNS, dtype=torch.float64, device=DEVICE)
    l2 = 0.0 if hp["decoupled"] else hp["weight_decay"]
    ops.stats(params=bk.params, grads=grads, segments=bk.segments, steps=bk.steps,
              v_sums=bk.v_sums, grad_scale=None, beta2=hp["beta2"], l2=l2, out=stats[0],
              master=bk.master)
    beta1_prod = torch.empty(0, device=DEVICE) if freed else bk.beta1_prod
    ops.update(params=bk.params, grads=grads, segments=bk.segments, exp_avg=bk.exp_avg,
               exp_avg_sq=bk.exp_avg_sq, beta1_prod=beta1_prod, v_sums=bk.v_sums,
               steps=bk.steps, stats=stats, grad_scale=None, found_inf=found_inf,
               lr_tensor=None, lr=hp["lr"], beta0=hp["beta0"], beta2=hp["beta2"],
               eps=hp["eps"], weight_decay=hp["weight_decay"], decoupled=hp["decoupled"],
               dampening=hp["dampening"], max_grad_norm=0.0, skip_nonfinite=False,
               beta1_prod_max=bk.b_max if elide else None, master=bk.master,
               rounding_seed=rounding_seed, rounding_index=rounding_index)
    return stats


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()])


def assert_same(x, y, what):
    assert x.shape == y.shape and torch.equal(bits(x), bits(y)), what


def assert_same_run(a: Bucket, b: Bucket, what, b_too=True):
    for i in range(len(a.params)):
        assert_same(a.params[i], b.params[i], f"{what}: param {i}")
    assert_same_states(a, b, what, b_too)


def assert_same_states(a: Bucket, b: Bucket, what, b_too=True):
    names = ("exp_avg", "exp_avg_sq", "steps", "v_sums") + (("beta1_prod",) if b_too else ())
    for k in names:
        assert_same(getattr(a, k), getattr(b, k), f"{what}: {k}")


def done_flags(bk) -> list[bool]:
    return [bool(bk.b_max[s] <= DONE) for s in bk.slots]


def amax_nan(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.zeros((), device=x.device)
    return torch.where(x.isnan().any(), torch.tensor(float("nan"), device=x.device),
                       x.abs().max())


# ---- beta1_prod elision ---------------------------------------------------------------------


def _elision_runs(dtype, offset_by, steps=60, late=(3,), late_from=25):
    """The same run with and without beta1_prod_max, checked after every step; the tensors in
    `late` join at step `late_from`, so that some are done while others are not."""
    gen = torch.Generator().manual_seed(7)
    ref = Bucket(make_params(dtype, gen), offset_by)
    ela = ref.clone()
    n = len(ref.params)
    early = [i for i in range(n) if i not in late]
    became_done = {}
    for k in range(steps):
        idx = early if k < late_from else list(range(n))
        grads = make_grads([ref.params[i] for i in idx], gen)
        done_before = done_flags(ela)
        step(ref.select(idx), grads, elide=False)
        step(ela.select(idx), grads)
        assert_same_run(ref, ela, f"step {k}", b_too=False)
        for i in range(n):
            s = ref.slots[i]
            if done_before[i]:
                # b neither read nor written: its NaN poison (set when done) stays, unused.
                assert ela.span(ela.beta1_prod, i).isnan().all(), f"step {k}: b of done {i}"
                assert_same(ela.b_max[s], became_done[i], f"step {k}: max of done {i}")
            else:
                assert_same(ela.span(ela.beta1_prod, i), ref.span(ref.beta1_prod, i),
                            f"step {k}: b {i}")
                expect = amax_nan(ref.span(ref.beta1_prod, i)) if i in idx else \
                    torch.ones((), device=DEVICE)
                assert_same(ela.b_max[s], expect, f"step {k}: beta1_prod_max {i}")
                if ela.b_max[s] <= DONE:
                    became_done[i] = ela.b_max[s].clone()
                    ela.span(ela.beta1_prod, i).fill_(float("nan"))
    return ref, ela, became_done


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset_by", [0, 1])
def test_elision_is_bitwise_the_full_update(dtype, offset_by):
    ref, ela, done = _elision_runs(dtype, offset_by, steps=60, late_from=8)
    n = len(ref.params)
    assert len(done) == n, f"only {sorted(done)} of {n} tensors got done"
    # Every tensor done: a freed (empty) beta1_prod gives the same bits.
    gen = torch.Generator().manual_seed(8)
    for k in range(3):
        grads = make_grads(ref.params, gen)
        step(ref, grads, elide=False)
        step(ela, grads, freed=True)
        assert_same_run(ref, ela, f"freed, step {k}", b_too=False)


def test_mixed_done_and_not_done():
    # At the end of a shorter run the late tensor is not done while the others are.
    ref, ela, done = _elision_runs(torch.float32, 0, steps=52, late=(4,), late_from=30)
    assert 4 not in done and len(done) == len(ref.params) - 1, sorted(done)


def test_freed_beta1_prod_treats_every_tensor_as_done():
    gen = torch.Generator().manual_seed(3)
    ref = Bucket(make_params(torch.float32, gen))
    ela = ref.clone()
    grads = make_grads(ref.params, gen)
    # No tensor is flagged done, yet with b freed the update is the elided one: mhat = m,
    # which is the full update of b = 0.
    ref.beta1_prod.zero_()
    step(ref, grads, elide=False)
    before = ela.b_max.clone()
    step(ela, grads, freed=True)
    assert_same_run(ref, ela, "freed", b_too=False)
    assert_same(ela.b_max, before, "beta1_prod_max untouched")


def test_nan_b_is_never_done():
    gen = torch.Generator().manual_seed(4)
    ref = Bucket(make_params(torch.float32, gen))
    ref.span(ref.beta1_prod, 0)[3] = float("nan")  # tensor 0 (decoupled decay: stays local)
    ela = ref.clone()
    for k in range(55):
        grads = make_grads(ref.params, gen)
        step(ref, grads, elide=False)
        step(ela, grads)
    assert ela.b_max[ela.slots[0]].isnan()
    assert_same_run(ref, ela, "NaN in one b", b_too=False)
    assert_same(ela.span(ela.beta1_prod, 0), ref.span(ref.beta1_prod, 0), "b written throughout")
    assert done_flags(ela)[1:] == [True] * (len(ref.params) - 1)


def test_nan_gradient_is_never_done():
    gen = torch.Generator().manual_seed(5)
    ref = Bucket(make_params(torch.float32, gen))
    ela = ref.clone()
    for k in range(55):
        grads = make_grads(ref.params, gen)
        if k == 0:
            grads[0].view(-1)[2] = float("nan")
        step(ref, grads, elide=False)
        step(ela, grads)
        for i in range(len(ref.params)):
            if i == 0 or k == 0:
                assert_same(ela.b_max[ela.slots[i]], amax_nan(ref.span(ref.beta1_prod, i)),
                            f"step {k}: max {i}")
    assert ela.b_max[ela.slots[0]].isnan() and not done_flags(ela)[0]
    assert_same_run(ref, ela, "NaN gradient", b_too=False)


def test_skipped_step_writes_no_max():
    gen = torch.Generator().manual_seed(6)
    bk = Bucket(make_params(torch.float32, gen))
    step(bk, make_grads(bk.params, gen))
    before = bk.clone()
    step(bk, make_grads(bk.params, gen), found_inf=torch.ones((), device=DEVICE))
    assert_same_run(before, bk, "skipped")
    assert_same(bk.b_max, before.b_max, "skipped: beta1_prod_max")


# ---- master weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("decoupled", (False, True))
@pytest.mark.parametrize("offset_by", [0, 1])
def test_master_weights_are_the_fp32_update(dtype, decoupled, offset_by):
    gen = torch.Generator().manual_seed(11)
    hp = dict(HYPER, eps=1e-3, beta0=0.1, decoupled=decoupled)
    full = [like(p, p + 1e-3 * torch.randn(p.shape, generator=gen))
            for p in make_params(torch.float32, gen)]  # fp32 values no 16-bit type holds
    low = Bucket([_clone_strided(p.to(dtype)) for p in full], offset_by)
    low.master = torch.full_like(low.exp_avg, float("nan"))
    for i, p in enumerate(full):
        low.span(low.master, i).copy_(p.permute(*_memory_order(p)).reshape(-1))
    f32 = low.clone(params=[_clone_strided(p) for p in full])
    f32.master = None
    for k in range(4):
        grads = make_grads(low.params, gen)
        row_low = step(low, grads, hp=hp)
        row_f32 = step(f32, [g.float() for g in grads], hp=hp)
        assert_same(row_low, row_f32, f"step {k}: stats row")
        assert_same_states(f32, low, f"step {k}")
        for i, p in enumerate(f32.params):
            flat = p.permute(*_memory_order(p)).reshape(-1)
            assert_same(low.span(low.master, i), flat, f"step {k}: master {i}")
            assert_same(low.params[i], p.to(dtype), f"step {k}: param {i}")


def _memory_order(t: torch.Tensor) -> list[int]:
    """The dims of a dense tensor from outermost to innermost in memory."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


# ---- stochastic rounding ----------------------------------------------------------------------


def _rounding_index(bk) -> torch.Tensor:
    # (parameter number << 40) + the shard's first position (nonzero for some).
    return torch.tensor([(i << rounding.INDEX_SHIFT) + 1000 * (i % 2)
                         for i in range(len(bk.params))], dtype=torch.int64)


def _rounding_run(seed, steps=3, offset_by=0):
    gen = torch.Generator().manual_seed(21)
    bk = Bucket(make_params(torch.bfloat16, gen), offset_by)
    index = _rounding_index(bk)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    history = []
    for k in range(steps):
        grads = make_grads(bk.params, gen)
        f32 = bk.clone(params=[_clone_strided(p.float()) for p in bk.params])
        step(f32, [g.float() for g in grads])
        step(bk, grads, rounding_seed=seed_t, rounding_index=index)
        assert_same_states(f32, bk, f"step {k}")
        for i, p in enumerate(f32.params):
            k_step = torch.tensor(int(f32.steps[f32.slots[i]].item()), dtype=torch.int64)
            stream = rounding.rounding_stream(torch.tensor(seed & rounding.MASK32), k_step)
            idx = rounding.element_index(p.shape, p.stride(), int(index[i]), p.device)
            expect = rounding.bf16_round_stochastic(p, rounding.rounding_bits(stream, idx))
            assert_same(bk.params[i], expect.reshape(p.shape), f"step {k}: param {i}")
        history.append([p.clone() for p in bk.params])
    return history


@pytest.mark.parametrize("offset_by", [0, 1])
def test_stochastic_rounding_is_the_fp32_update_rounded(offset_by):
    _rounding_run(seed=12345, offset_by=offset_by)


def test_stochastic_rounding_is_reproducible_and_seeded():
    a, b = _rounding_run(seed=1, steps=2), _rounding_run(seed=1, steps=2)
    c = _rounding_run(seed=2, steps=2)
    for k in range(2):
        for x, y, z in zip(a[k], b[k], c[k]):
            assert_same(x, y, "two runs")
        big = [(x, z) for x, z in zip(a[k], c[k]) if x.numel() > 100]
        assert any(not torch.equal(bits(x), bits(z)) for x, z in big), "seeds 1 and 2"
