"""The CUDA kernels on a GPU: adai::stats / adai::update / adai::sum_v against a float64
oracle written here, bitwise determinism, many tensors and the launch count, and the optimizer
with backend="cuda" against backend="reference".

Marker `gpu`; skipped without a GPU (or when adai_kernels._C has no CUDA kernels, unless
ADAI_REQUIRE_CUDA=1, as bench/gpu_check.sh sets, makes that a failure). ADAI_TEST_LARGE=1 adds
a tensor of 2^31 + 3 elements (about 45 GB of GPU memory).

ADAI_GPU_TEST_DEVICE=cpu runs the op-level tests on CPU tensors instead (the C++ CPU kernels
share the schema), to check the tests themselves on a machine without a GPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import adai_kernels._native as native

DEVICE = torch.device(os.environ.get("ADAI_GPU_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
BACKEND = "cuda" if ON_CUDA else "cpu"  # the optimizer tests' backend


def _skip_reason() -> str | None:
    if not ON_CUDA:
        return None
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not native.has_cuda_kernels() and os.environ.get("ADAI_REQUIRE_CUDA") != "1":
        return "adai_kernels._C was built without CUDA kernels"
    return None


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-specific")

ops = torch.ops.adai
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Parameters: float32 math vs float64 (amplified by at most 1/eps in m / (1 - b)); bf16/fp16:
# the expected value is rounded to the dtype, so they differ by a rare one-ulp rounding flip.
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2 * 2**-8, atol=1e-3),
    torch.float16: dict(rtol=2 * 2**-11, atol=1e-4),
}
STATE_TOL = dict(rtol=2e-4, atol=1e-6)
HYPER = {
    "coupled": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=1e-2, decoupled=False,
                    dampening=1.0),
    "decoupled_d0.5": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.1, decoupled=True,
                           dampening=0.5),
    "plain": dict(betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0, decoupled=False,
                  dampening=1.0),
}


# ---- tensors laid out as the optimizer lays them out ----------------------------------------


def _span(shape, stride) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def strided(shape, stride, dtype, offset=0, fill=0.0) -> torch.Tensor:
    """A tensor with these strides starting `offset` elements into a fresh buffer (offset 1:
    not 16-byte aligned)."""
    buf = torch.full((_span(shape, stride) + offset,), fill, dtype=dtype, device=DEVICE)
    return buf.as_strided(tuple(shape), tuple(stride), offset)


def make_param(shape, layout, dtype, gen, offset=0) -> torch.Tensor:
    if layout == "t":
        base = torch.randn(tuple(shape)[::-1], generator=gen).t()
    elif layout == "cl":
        base = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    else:
        base = torch.randn(shape, generator=gen)
    return strided(base.shape, base.stride(), dtype, offset).copy_(base)


def make_grads(params, gen, scale=1.0) -> list[torch.Tensor]:
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen) * scale
        out.append(strided(p.shape, p.stride(), p.dtype).copy_(g))
    return out


class Bucket:
    """Everything the ops take for one bucket: params, float32 states with the params' strides
    (starting `state_offset` elements into their buffers), and 0-dim views of a step vector
    and a v_sum vector."""

    def __init__(self, params, state_offset=0):
        n = len(params)
        self.params = params
        self.steps_vec = torch.zeros(n, dtype=torch.float32, device=DEVICE)
        self.vsum_vec = torch.zeros(n, dtype=torch.float64, device=DEVICE)
        self.steps = [self.steps_vec[i] for i in range(n)]
        self.v_sums = [self.vsum_vec[i] for i in range(n)]

        def state(fill):
            return [strided(p.shape, p.stride(), torch.float32, state_offset, fill)
                    for p in params]

        self.m, self.v, self.b = state(0.0), state(0.0), state(1.0)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def snapshot(self) -> dict:
        f64 = lambda ts: [t.detach().double().clone() for t in ts]  # noqa: E731
        return dict(params=f64(self.params), m=f64(self.m), v=f64(self.v), b=f64(self.b),
                    steps=self.steps_vec.double().tolist(), v_sums=self.vsum_vec.tolist())

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params, *self.m, *self.v, *self.b, self.steps_vec, self.vsum_vec]


def stats_op(bk, grads, hp, out):
    ops.stats(bk.params, grads, bk.steps, bk.v_sums, hp["betas"][1],
              0.0 if hp["decoupled"] else hp["weight_decay"], out)


def update_op(bk, grads, hp, stats, numel):
    ops.update(bk.params, grads, bk.m, bk.v, bk.b, bk.v_sums, bk.steps, stats, float(numel),
               hp["lr"], hp["betas"][0], hp["betas"][1], hp["eps"], hp["weight_decay"],
               hp["decoupled"], hp["dampening"])


def op_step(bk, grads, hp, extra=None) -> torch.Tensor:
    """One step of one bucket. `extra` = (S, N): other buckets' share of the global sum and
    their element count (a second slot of the stats vector)."""
    stats = torch.zeros(2 if extra else 1, dtype=torch.float64, device=DEVICE)
    if extra:
        stats[1] = extra[0]
    stats_op(bk, grads, hp, stats[0])
    update_op(bk, grads, hp, stats, bk.numel + (extra[1] if extra else 0))
    return stats


# ---- the float64 oracle of one step (docs/design.md semantics) ------------------------------


def oracle_step(snap, grads, hp, extra=None) -> dict:
    beta0, beta2 = hp["betas"]
    lr, wd, eps, d = hp["lr"], hp["weight_decay"], hp["eps"], hp["dampening"]
    l2 = 0.0 if hp["decoupled"] else wd
    S, N, phase1 = 0.0, 0, []
    for i, theta in enumerate(snap["params"]):
        k = snap["steps"][i] + 1
        bc2 = 1.0 - beta2**k
        ge = grads[i].double() + l2 * theta
        v = beta2 * snap["v"][i] + (1.0 - beta2) * ge * ge
        S += (beta2 * snap["v_sums"][i] + (1.0 - beta2) * float((ge * ge).sum())) / bc2
        N += theta.numel()
        phase1.append((k, bc2, ge, v))
    S_all, N_all = (S + extra[0], N + extra[1]) if extra else (S, N)
    inv_vbar = N_all / S_all if S_all > 0 else 0.0
    out = dict(S=S, params=[], m=[], v=[], b=[], steps=[], v_sums=[])
    for i, (k, bc2, ge, v) in enumerate(phase1):
        theta = snap["params"][i]
        ratio = v / bc2 * inv_vbar
        beta1 = (1.0 - beta0 * ratio ** (1.0 / (3.0 - 2.0 * d))).clamp(0.0, 1.0 - eps)
        beta3 = (1.0 - beta1) ** d
        b = snap["b"][i] * beta1
        m = beta1 * snap["m"][i] + beta3 * ge
        mhat = m / (1.0 - b) * beta0 ** (1.0 - d)
        decay = lr * wd * theta if hp["decoupled"] else 0.0
        out["params"].append(theta - decay - lr * mhat)
        out["m"].append(m)
        out["v"].append(v)
        out["b"].append(b)
        out["steps"].append(k)
        out["v_sums"].append(float(v.sum()))
    return out


def check_against_oracle(bk, grads_before, grads, stats, expected, what=""):
    assert math.isclose(stats[0].item(), expected["S"], rel_tol=1e-5, abs_tol=1e-300), \
        f"{what}: stats {stats[0].item()!r} vs {expected['S']!r}"
    assert bk.steps_vec.tolist() == expected["steps"], what
    for i, p in enumerate(bk.params):
        where = f"{what} tensor {i} {tuple(p.shape)} {p.dtype} stride {p.stride()}"
        exp_p = expected["params"][i].to(p.dtype).double()
        torch.testing.assert_close(p.double(), exp_p, **PARAM_TOL[p.dtype],
                                   msg=lambda m: f"{where}: params: {m}")
        for name in ("m", "v", "b"):
            torch.testing.assert_close(getattr(bk, name)[i].double(), expected[name][i],
                                       **STATE_TOL, msg=lambda m: f"{where}: {name}: {m}")
        # v_sums: the kernel's reduction of its own new v (tight), and the oracle's (loose)
        own = float(bk.v[i].double().sum())
        assert math.isclose(bk.vsum_vec[i].item(), own, rel_tol=1e-5, abs_tol=1e-30), where
        assert math.isclose(bk.vsum_vec[i].item(), expected["v_sums"][i], rel_tol=2e-4,
                            abs_tol=1e-30), where
        assert torch.equal(grads[i], grads_before[i]), f"{where}: the gradient was written"


# ---- the test matrix ---------------------------------------------------------------------

# (shape, layout, param offset in elements): odd sizes, empty tensors, transposed,
# channels_last, misaligned views (start at an odd element of a larger buffer).
SHAPES = [
    ((0,), "c", 0), ((1,), "c", 0), ((3,), "c", 0), ((4099,), "c", 0),
    ((1_048_576 + 3,), "c", 0), ((29, 31), "t", 0), ((2, 3, 5, 5), "cl", 0),
    ((4099,), "c", 1), ((1000,), "c", 3), ((0, 5), "c", 0), ((64, 65), "t", 1),
    ((16384,), "c", 0), ((16385,), "c", 0), ((8, 16, 3, 3), "cl", 0),
]


def make_bucket(dtype, seed, state_offset=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params = [make_param(s, layout, dtype, gen, off) for s, layout, off in shapes]
    return Bucket(params, state_offset), gen


@pytest.mark.parametrize("state_offset", [0, 1])
@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_match_oracle(dtype, hyper, state_offset):
    hp = dict(HYPER[hyper], lr=1e-2 if dtype == torch.float32 else 5e-2)
    bk, gen = make_bucket(dtype, seed=1, state_offset=state_offset)
    for step in range(3):
        grads = make_grads(bk.params, gen)
        grads_before = [g.clone() for g in grads]
        extra = (123.0, 4567) if step == 1 else None
        snap = bk.snapshot()
        stats = op_step(bk, grads, hp, extra)
        expected = oracle_step(snap, grads, hp, extra)
        check_against_oracle(bk, grads_before, grads, stats, expected,
                             f"{dtype} {hyper} state_offset={state_offset} step {step}")


def test_zero_gradients_leave_params_unchanged():
    hp = dict(HYPER["plain"], lr=1e-2)
    bk, _ = make_bucket(torch.float32, seed=2)
    before = [p.clone() for p in bk.params]
    grads = [torch.zeros_like(p) for p in bk.params]
    stats = op_step(bk, grads, hp)
    assert stats[0].item() == 0.0
    for p, p0, m, v, b in zip(bk.params, before, bk.m, bk.v, bk.b):
        assert torch.equal(p, p0)
        assert torch.count_nonzero(m) == 0 and torch.count_nonzero(v) == 0
        assert torch.all(b == torch.tensor(1.0 - 1e-3, dtype=torch.float32))
    assert bk.steps_vec.tolist() == [1.0] * len(bk.params)
    assert bk.vsum_vec.tolist() == [0.0] * len(bk.params)


def _run(dtype, seed, hyper, steps=3, stream=None):
    hp = dict(HYPER[hyper], lr=1e-2)
    bk, gen = make_bucket(dtype, seed)
    outs = []
    for _ in range(steps):
        grads = make_grads(bk.params, gen)
        if stream is None:
            outs.append(op_step(bk, grads, hp).clone())
        else:
            with torch.cuda.stream(stream):
                outs.append(op_step(bk, grads, hp).clone())
            torch.cuda.current_stream().wait_stream(stream)
    return bk.tensors() + outs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(dtype):
    a = _run(dtype, 3, "coupled")
    b = _run(dtype, 3, "coupled")
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"run-to-run difference in output tensor {i}"


@cuda_only
def test_bitwise_deterministic_on_a_side_stream():
    a = _run(torch.float32, 4, "decoupled_d0.5")
    b = _run(torch.float32, 4, "decoupled_d0.5", stream=torch.cuda.Stream())
    torch.cuda.synchronize()
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"side-stream difference in output tensor {i}"


@pytest.mark.parametrize("state_offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_v_reproduces_update_bitwise(dtype, state_offset):
    bk, gen = make_bucket(dtype, seed=5, state_offset=state_offset)
    hp = dict(HYPER["coupled"], lr=1e-2)
    for _ in range(2):
        op_step(bk, make_grads(bk.params, gen), hp)
    # The bucket's own views, and fresh (16-byte aligned) copies with the same strides.
    for v_list in (bk.v, [v.clone(memory_format=torch.preserve_format) for v in bk.v]):
        assert all(c.stride() == v.stride() for c, v in zip(v_list, bk.v))
        out = torch.full((len(bk.v),), float("nan"), dtype=torch.float64, device=DEVICE)
        ops.sum_v(v_list, [out[i] for i in range(len(bk.v))])
        assert torch.equal(out, bk.vsum_vec), (out - bk.vsum_vec).abs().max()


def test_empty_lists():
    out = torch.full((), float("nan"), dtype=torch.float64, device=DEVICE)
    ops.stats([], [], [], [], 0.99, 0.0, out)
    assert out.item() == 0.0
    stats = torch.ones(1, dtype=torch.float64, device=DEVICE)
    ops.update([], [], [], [], [], [], [], stats, 0.0, 1e-2, 0.1, 0.99, 1e-3, 0.0, False, 1.0)


def test_all_tensors_empty():
    bk = Bucket([strided((0,), (1,), torch.float32), strided((0, 3), (3, 1), torch.float32)])
    grads = [torch.empty_like(p) for p in bk.params]
    stats = op_step(bk, grads, dict(HYPER["plain"], lr=1e-2))
    assert stats[0].item() == 0.0
    assert bk.steps_vec.tolist() == [1.0, 1.0]
    assert bk.vsum_vec.tolist() == [0.0, 0.0]


@cuda_only
def test_validation_messages():
    p = torch.zeros(4, device=DEVICE)
    g = torch.zeros(4, device=DEVICE)
    step = torch.zeros((), device=DEVICE)
    vs = torch.zeros((), dtype=torch.float64, device=DEVICE)
    out = torch.zeros((), dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="grads has 0 tensors"):
        ops.stats([p], [], [step], [vs], 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on cpu"):
        ops.stats([p], [g.cpu()], [step], [vs], 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype"):
        ops.stats([p], [g.half()], [step], [vs], 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a 0-dim"):
        ops.stats([p], [g], [vs], [vs], 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match="out must be a 0-dim float64"):
        ops.stats([p], [g], [step], [vs], 0.99, 0.0, out.float())
    with pytest.raises(RuntimeError, match="non-overlapping and dense"):
        q = torch.zeros(8, device=DEVICE)[::2]
        ops.stats([q], [q], [step], [vs], 0.99, 0.0, out)
    with pytest.raises(RuntimeError, match=r"params must be float32, float16 or bfloat16"):
        ops.stats([p.double()], [g.double()], [step], [vs], 0.99, 0.0, out)
    stats = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"exp_avg\[0\] has dtype"):
        ops.update([p], [g], [p.double()], [p], [p], [vs], [step], stats, 4.0, 1e-2, 0.1,
                   0.99, 1e-3, 0.0, False, 1.0)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq\[0\] has shape"):
        ops.update([p], [g], [p], [p.view(2, 2)], [p], [vs], [step], stats, 4.0, 1e-2, 0.1,
                   0.99, 1e-3, 0.0, False, 1.0)
    with pytest.raises(RuntimeError, match="stats must be a 1-D float64"):
        ops.update([p], [g], [p], [p], [p], [vs], [step], stats.float(), 4.0, 1e-2, 0.1,
                   0.99, 1e-3, 0.0, False, 1.0)
    with pytest.raises(RuntimeError, match=r"v_sums has 2 tensors"):
        ops.sum_v([p], [vs, vs])


# ---- many tensors: parity and the number of kernel launches ---------------------------------


def _kernels_in(fn) -> tuple[list[str], list[str]]:
    """(kernel names, all GPU activity names) that `fn` puts on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if not n.startswith(("Memcpy", "Memset", "memcpy", "memset"))]
    return kernels, names


MANY = [((4096,), "c", 0)] * 1000


def test_many_tensors_match_oracle():
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=6, shapes=MANY)
    for step in range(2):
        grads = make_grads(bk.params, gen)
        grads_before = [g.clone() for g in grads]
        snap = bk.snapshot()
        stats = op_step(bk, grads, hp)
        check_against_oracle(bk, grads_before, grads, stats, oracle_step(snap, grads, hp),
                             f"1000 x 4096 step {step}")


@cuda_only
def test_many_tensors_launch_count():
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=7, shapes=MANY)
    grads = make_grads(bk.params, gen)
    stats = torch.zeros(1, dtype=torch.float64, device=DEVICE)

    def step():
        stats_op(bk, grads, hp, stats[0])
        update_op(bk, grads, hp, stats, bk.numel)

    step()  # warm-up (pinned memory, allocator)
    kernels, names = _kernels_in(step)
    assert any("stats_kernel" in k for k in kernels) and any("update_kernel" in k for k in
                                                             kernels), names
    assert len(kernels) <= 4, kernels


@cuda_only
def test_ops_do_not_synchronise_with_the_host():
    """A step (table upload from pinned memory, both kernels) never waits for the GPU."""
    hp = dict(HYPER["coupled"], lr=1e-2)
    bk, gen = make_bucket(torch.float32, seed=10)
    grads = make_grads(bk.params, gen)
    stats = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    op_step(bk, grads, hp)  # warm-up: pinned memory, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            stats_op(bk, grads, hp, stats[0])
            update_op(bk, grads, hp, stats, bk.numel)
            ops.sum_v(bk.v, bk.v_sums)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ---- the optimizer ------------------------------------------------------------------------


def _optimizer_groups(dtype, seed):
    from cases import make_groups

    groups = make_groups(dtype, seed=seed)
    for g in groups:
        g["params"] = [torch.nn.Parameter(p.detach().to(DEVICE)) for p in g["params"]]
    return groups


def _clone(groups):
    out = []
    for g in groups:
        g = dict(g)
        g["params"] = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
                       for p in g["params"]]
        out.append(g)
    return out


def _set_grads(groups, step, seed=1):
    from cases import make_grads as case_grads

    for g, row in zip(groups, case_grads(groups, step, seed)):
        for p, grad in zip(g["params"], row):
            p.grad = None if grad is None else grad.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_cuda_matches_reference_and_oracle(dtype):
    from adai_kernels import Adai
    from oracle import Oracle

    groups = _optimizer_groups(dtype, seed=0)
    ref_groups = _clone(groups)
    oracle = Oracle([dict(g, params=[p.detach().cpu() for p in g["params"]]) for g in groups])
    opt = Adai(groups, lr=1e-2, backend=BACKEND)
    ref = Adai(ref_groups, lr=1e-2, backend="reference")
    assert opt.backend == BACKEND
    for step in range(5):
        _set_grads(groups, step)
        _set_grads(ref_groups, step)
        oracle.step([[None if p.grad is None else p.grad.cpu() for p in g["params"]]
                     for g in groups])
        opt.step()
        ref.step()
    for gi, (g, rg) in enumerate(zip(groups, ref_groups)):
        for pi, (p, rp) in enumerate(zip(g["params"], rg["params"])):
            where = f"param {gi}.{pi} {tuple(p.shape)} {dtype}"
            torch.testing.assert_close(p.detach().double(), rp.detach().double(),
                                       **PARAM_TOL[dtype], msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(p.detach().double().cpu(), oracle.params(gi)[pi],
                                       **PARAM_TOL[dtype], msg=lambda m: f"{where}: {m}")
            st, rst = opt.state.get(p), ref.state.get(rp)
            assert (st is None) == (rst is None), where
            if st is not None:
                for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                    torch.testing.assert_close(st[k].double(), rst[k].double(), **STATE_TOL,
                                               msg=lambda m: f"{where} {k}: {m}")


def test_optimizer_checkpoint_resume_is_bitwise():
    """A run restored from a state dict (v_sums recomputed by adai::sum_v) continues exactly
    as the uninterrupted run."""
    from adai_kernels import Adai

    base = _optimizer_groups(torch.float32, seed=3)
    straight, resumed = _clone(base), _clone(base)
    opt = Adai(straight, lr=1e-2, backend=BACKEND)
    first = Adai(resumed, lr=1e-2, backend=BACKEND)
    for step in range(3):
        _set_grads(straight, step)
        opt.step()
        _set_grads(resumed, step)
        first.step()
    second = Adai(resumed, lr=1e-2, backend=BACKEND)
    second.load_state_dict(first.state_dict())
    for step in range(3, 6):
        _set_grads(straight, step)
        opt.step()
        _set_grads(resumed, step)
        second.step()
    for g, r in zip(straight, resumed):
        for p, q in zip(g["params"], r["params"]):
            assert torch.equal(p, q), tuple(p.shape)


@cuda_only
def test_optimizer_launch_count_1000_tensors():
    from adai_kernels import Adai

    gen = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.randn(4096, generator=gen).to(DEVICE))
              for _ in range(1000)]
    opt = Adai(params, lr=1e-2, backend=BACKEND)
    for p in params:
        p.grad = torch.randn(4096, generator=gen).to(DEVICE)
    opt.step()  # lazy state creation
    kernels, names = _kernels_in(opt.step)
    assert len(kernels) <= 4, kernels


@cuda_only
def test_optimizer_step_does_not_synchronise_with_the_host():
    from adai_kernels import Adai

    groups = _optimizer_groups(torch.float32, seed=11)
    opt = Adai(groups, lr=1e-2, backend=BACKEND)
    for step in range(2):
        _set_grads(groups, step)
        opt.step()
    _set_grads(groups, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---- 64-bit indexing ----------------------------------------------------------------------


@cuda_only
@pytest.mark.skipif(os.environ.get("ADAI_TEST_LARGE") != "1", reason="set ADAI_TEST_LARGE=1")
def test_tensor_of_2_pow_31_plus_3_elements():
    """First step of a 2^31 + 3 element tensor followed by a small one, in one launch: the
    global sum, both ends of the big tensor, the small tensor, and the v sums."""
    n, piece = 2**31 + 3, 1 << 28
    hp = dict(HYPER["plain"], lr=1e-2)
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    bk = Bucket([torch.randn(n, generator=gen, device=DEVICE),
                 torch.randn(5, generator=gen, device=DEVICE)])
    grads = [torch.randn(n, generator=gen, device=DEVICE),
             torch.randn(5, generator=gen, device=DEVICE)]
    # First step from fresh state (V = 0, k = 1, bc2 = 1 - beta2): S = sum g^2.
    S = sum(float(grads[0][i:i + piece].double().pow(2).sum()) for i in range(0, n, piece))
    S += float(grads[1].double().pow(2).sum())
    spans = [(0, 0, 1 << 20), (0, n - (1 << 20), n), (1, 0, 5)]
    before = {sp: bk.params[sp[0]][sp[1]:sp[2]].double().clone() for sp in spans}

    stats = op_step(bk, grads, hp)

    assert math.isclose(stats[0].item(), S, rel_tol=1e-5), (stats[0].item(), S)
    beta0, beta2 = hp["betas"]
    bc2, inv_vbar = 1.0 - beta2, (n + 5) / S
    for (t, a, e), theta in before.items():
        g = grads[t][a:e].double()
        v = (1.0 - beta2) * g * g
        beta1 = (1.0 - beta0 * (v / bc2 * inv_vbar)).clamp(0.0, 1.0 - hp["eps"])
        m = (1.0 - beta1) * g
        where = f"tensor {t} [{a}:{e}]"
        torch.testing.assert_close(bk.params[t][a:e].double(), theta - hp["lr"] * m / (1 - beta1),
                                   **PARAM_TOL[torch.float32], msg=lambda x: f"{where}: {x}")
        torch.testing.assert_close(bk.v[t][a:e].double(), v, **STATE_TOL)
        torch.testing.assert_close(bk.m[t][a:e].double(), m, **STATE_TOL)
        torch.testing.assert_close(bk.b[t][a:e].double(), beta1, **STATE_TOL)
    v_total = sum(float(bk.v[0][i:i + piece].double().sum()) for i in range(0, n, piece))
    assert math.isclose(bk.vsum_vec[0].item(), v_total, rel_tol=1e-5)
    assert math.isclose(bk.vsum_vec[1].item(), float(bk.v[1].double().sum()), rel_tol=1e-6)
    assert bk.steps_vec.tolist() == [1.0, 1.0]
