"""The Triton update's optional arguments (docs/design.md, "Native op schemas"), at op level
on CPU tensors under TRITON_INTERPRET=1, each against the same op without the option:

- `beta1_prod_max` (elision of b for tensors whose b is done): params, m and v bitwise those
  of the run without it; the max is amax |b| of that run while a tensor is not done; a done
  tensor's b and max are untouched; NaN in a tensor's b keeps it from being done; an empty
  (freed) beta1_prod gives the same bits when every tensor is done.
- `master` (fp32 master weights): bitwise the fp32-param run on the master's values, and the
  param is the master rounded to nearest.
- `rounding_seed` / `rounding_index` (stochastic rounding of bf16 params): bitwise the
  fp32-param run rounded with adai_kernels/rounding.py; deterministic; seeds matter.
- In the sm_90 PTX, the hash's multiplies are 32-bit.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from adai_kernels import rounding  # noqa: E402
from adai_kernels.backends.triton import TRITON  # noqa: E402

_why = TRITON.unavailable(torch.device("cpu"))
if _why is not None:
    pytest.skip(f"triton backend unavailable on CPU: {_why}", allow_module_level=True)

from adai_kernels.ops import Ops  # noqa: E402

ops = Ops("adai_triton")
ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DONE = 2.0 ** -25  # adai_math.h::kBeta1ProdDone
# empty, one element, odd, two chunks (the last masked), transposed
SHAPES = [(0,), (1,), (7,), (1030,), (33, 17)]


def _param(shape, dtype, gen):
    if len(shape) == 2:  # transposed: not contiguous, dense
        return torch.randn(shape[::-1], generator=gen).t().to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


class State:
    """Params, flat fp32 state buffers (spans 16-element aligned) and slots for SHAPES;
    tensor i's b starts at b_scale[i] * U(0.5, 1)."""

    def __init__(self, dtype, seed, b_scale):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.params = [_param(s, dtype, self.gen) for s in SHAPES]
        n, offsets, cursor = len(SHAPES), [], 0
        for p in self.params:
            offsets.append(cursor)
            cursor += (p.numel() + 15) // 16 * 16
        self.offsets = offsets
        self.segments = torch.tensor([[o, p.numel(), i] for i, (o, p) in
                                      enumerate(zip(offsets, self.params))], dtype=torch.int64)
        self.m = torch.zeros(cursor)
        self.v = torch.zeros(cursor)
        self.b = torch.ones(cursor)
        for i, p in enumerate(self.params):
            k = p.numel()
            self.span(self.b, i).copy_(b_scale[i] * (0.5 + 0.5 * torch.rand(k, generator=self.gen)))
        self.steps = torch.zeros(n, dtype=torch.float64)
        self.v_sums = torch.zeros(n, dtype=torch.float64)
        self.b_max = torch.stack([self.span(self.b, i).abs().amax() if p.numel() else
                                  torch.tensor(0.0) for i, p in enumerate(self.params)])

    def span(self, buf, i):
        return buf[self.offsets[i]:self.offsets[i] + self.params[i].numel()]

    def grads(self, dtype=None):
        return [torch.randn(p.shape, generator=self.gen).as_strided(p.shape, p.stride())
                .to(dtype or self.dtype) for p in self.params]

    def clone(self):
        c = object.__new__(State)
        c.__dict__ = {k: ([t.clone() for t in v] if isinstance(v, list) and k == "params"
                          else v.clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in self.__dict__.items()}
        return c


HP = dict(lr=0.01, beta0=0.9, beta2=0.99, eps=0.3, weight_decay=0.1, decoupled=False,
          dampening=1.0)


def step(st, grads, b_max=None, beta1_prod=None, master=None, seed=None, index=None,
         hp=HP):
    """stats then update, as the optimizer calls them (one bucket)."""
    l2 = 0.0 if hp["decoupled"] else hp["weight_decay"]
    row = torch.zeros(1, 7, dtype=torch.float64)
    ops.stats(params=st.params, grads=grads, segments=st.segments, steps=st.steps,
              v_sums=st.v_sums, grad_scale=None, beta2=hp["beta2"], l2=l2, out=row[0],
              master=master)
    ops.update(params=st.params, grads=grads, segments=st.segments, exp_avg=st.m,
               exp_avg_sq=st.v, beta1_prod=st.b if beta1_prod is None else beta1_prod,
               v_sums=st.v_sums, steps=st.steps, stats=row, grad_scale=None, found_inf=None,
               lr_tensor=None, max_grad_norm=0.0, skip_nonfinite=False,
               beta1_prod_max=b_max, master=master, rounding_seed=seed, rounding_index=index,
               **hp)
    return row


def bits(x):
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def same(a, b):
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_same_run(x, y):
    for i, (p, q) in enumerate(zip(x.params, y.params)):
        assert same(p, q), f"params[{i}]"
    for key in ("m", "v", "steps", "v_sums"):
        assert same(getattr(x, key), getattr(y, key)), key


def _amax(t):
    return t.abs().amax() if t.numel() else torch.tensor(0.0)


# ------------------------------------------------------------------------------ elision
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elision_is_bitwise_the_full_update(dtype):
    """b starts at 1 (not done within the run), 1e-5 (done after some steps), 1e-9 (done
    from the start): with eps = 0.3, beta1 <= 0.7, so b shrinks by 0.7 or more per step."""
    scales = [1.0, 1e-9, 1e-5, 1.0, 1e-5]
    ref = State(dtype, 1, scales)
    run = ref.clone()
    b_max = run.b_max.clone()
    became_done = set()
    for k in range(14):
        grads = ref.grads()
        done_before = [b_max[i].item() <= DONE for i in range(len(SHAPES))]
        b_before, max_before = run.b.clone(), b_max.clone()
        step(ref, grads)
        step(run, grads, b_max=b_max)
        assert_same_run(ref, run)
        for i in range(len(SHAPES)):
            if done_before[i]:  # neither b nor its max touched
                assert same(run.span(run.b, i), run.span(b_before, i)), (k, i)
                assert same(b_max[i], max_before[i]), (k, i)
                became_done.add(i)
            else:
                assert same(run.span(run.b, i), ref.span(ref.b, i)), (k, i)
                assert same(b_max[i], _amax(ref.span(ref.b, i))), (k, i)
        # what nobody owns (the padding) is untouched
        owned = torch.zeros_like(run.b, dtype=torch.bool)
        for i in range(len(SHAPES)):
            owned[run.offsets[i]:run.offsets[i] + run.params[i].numel()] = True
        assert torch.equal(run.b[~owned], b_before[~owned])
    # the mix happened: done from the start, done on the way, and never done
    assert {0, 1, 2} <= became_done and b_max[3].item() > DONE
    assert ref.span(ref.b, 2).abs().amax().item() < DONE  # elided while ref still moved b


def test_elision_nan_is_never_done():
    st = State(torch.float32, 2, [1e-9] * len(SHAPES))
    b_max = st.b_max.clone()
    st.span(st.b, 3)[5] = float("nan")
    b_max[3] = float("nan")
    for _ in range(2):
        b_before = st.b.clone()
        step(st, st.grads(), b_max=b_max)
        assert torch.isnan(b_max[3]) and torch.isnan(st.span(st.b, 3)[5])
        # not done: b is read and written (its other elements move)
        assert not torch.equal(st.span(st.b, 3)[:5], st.span(b_before, 3)[:5])
        for i in (0, 1, 2, 4):
            assert b_max[i].item() <= DONE


def test_elision_nan_in_b_written_gives_nan_max():
    """A NaN appearing in b' (from a NaN gradient) makes the max NaN."""
    st = State(torch.float32, 3, [1.0] * len(SHAPES))
    b_max = st.b_max.clone()
    grads = st.grads()
    grads[4][3, 2] = float("nan")
    step(st, grads, b_max=b_max)
    assert torch.isnan(b_max[4])
    assert not (b_max[4] <= DONE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_freed_beta1_prod_when_all_done(dtype):
    st = State(dtype, 4, [1e-9] * len(SHAPES))
    freed = st.clone()
    b_max = st.b_max.clone()
    assert (b_max <= DONE).all()
    for _ in range(3):
        grads = st.grads()
        b_before = st.b.clone()
        step(st, grads, b_max=b_max)
        step(freed, grads, b_max=freed.b_max, beta1_prod=torch.empty(0))
        assert_same_run(st, freed)
        assert torch.equal(st.b, b_before)
    # without any flags too: an empty beta1_prod means every tensor is done
    plain = freed.clone()
    grads = st.grads()
    step(freed, grads, beta1_prod=torch.empty(0))
    step(plain, grads, b_max=plain.b_max, beta1_prod=torch.empty(0))
    assert_same_run(freed, plain)


# ------------------------------------------------------------------------------ master
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("decoupled", (False, True))
def test_master_is_the_fp32_run(dtype, decoupled):
    hp = HP | dict(eps=1e-3, beta0=0.1, decoupled=decoupled, dampening=0.5)
    lo = State(dtype, 5, [1.0] * len(SHAPES))
    master = torch.full_like(lo.m, 7.0)  # padding: must stay
    for i, p in enumerate(lo.params):
        lo.span(master, i).copy_(p.float().flatten() + 1e-3 * torch.randn(p.numel(),
                                                                           generator=lo.gen))
    hi = lo.clone()
    hi.params = [lo.span(master, i).view(p.shape) if p.dim() < 2 else
                 lo.span(master, i).view(p.shape[::-1]).t() for i, p in enumerate(lo.params)]
    hi.params = [p.clone() for p in hi.params]
    for p, q in zip(lo.params, hi.params):
        assert p.stride() == q.stride()
    for _ in range(3):
        grads = lo.grads()
        row_lo = step(lo, grads, master=master, hp=hp)
        row_hi = step(hi, [g.float() for g in grads], hp=hp)
        assert same(row_lo, row_hi)  # stats read theta from the master
        for key in ("m", "v", "b", "v_sums", "steps"):
            assert same(getattr(lo, key), getattr(hi, key)), key
        for i, (p, q) in enumerate(zip(lo.params, hi.params)):
            w = lo.span(master, i)
            assert same(w, q.t().flatten() if q.dim() == 2 else q.flatten()), i
            assert same(p, q.to(dtype)), i
    assert (master[lo.offsets[1] + 1:lo.offsets[2]] == 7.0).all()


# ------------------------------------------------------------------------------ rounding
def _sr_setup(seed):
    st = State(torch.bfloat16, 6, [1.0] * len(SHAPES))
    index = torch.tensor([(i << 40) + 3 * i for i in range(len(SHAPES))], dtype=torch.int64)
    return st, torch.tensor([seed], dtype=torch.int64), index


def test_stochastic_rounding_is_the_fp32_run_rounded():
    st, seed, index = _sr_setup(12345)
    for k in range(2):
        hi = st.clone()
        hi.params = [p.float() for p in st.params]
        grads = st.grads()
        step(st, grads, seed=seed, index=index)
        step(hi, [g.float() for g in grads])
        for key in ("m", "v", "b", "v_sums", "steps"):
            assert same(getattr(st, key), getattr(hi, key)), key
        for i, (p, q) in enumerate(zip(st.params, hi.params)):
            stream = rounding.rounding_stream(torch.tensor(12345),
                                              torch.tensor(int(st.steps[i].item())))
            idx = rounding.element_index(q.shape, q.stride(), int(index[i]), "cpu")
            want = rounding.bf16_round_stochastic(q, rounding.rounding_bits(stream, idx))
            assert same(p, want), (k, i)
        # the rounding is stochastic: some elements differ from round to nearest
        assert not all(same(p, q.to(torch.bfloat16)) for p, q in zip(st.params, hi.params))


def test_stochastic_rounding_is_deterministic_and_seeded():
    runs = []
    for seed in (1, 1, 2):
        st, s, index = _sr_setup(seed)
        gen = torch.Generator().manual_seed(9)
        for _ in range(2):
            grads = [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
                     for p in st.params]
            step(st, grads, seed=s, index=index)
        runs.append(torch.cat([p.flatten().float() for p in st.params]))
    assert same(runs[0], runs[1])
    assert not same(runs[0], runs[2])


# ------------------------------------------------------------------------------ compiled
def test_hash_multiplies_are_32_bit_on_sm90():
    """Triton's integer promotion could widen the hash's products (a constant over 2^31);
    the stochastic-rounding update for sm_90 must multiply in 32 bits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")]
                                                       if p])
    code = (
        "import json, sys, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from adai_kernels.backends import triton_kernels as K\n"
        "from adai_kernels.backends.triton import launch_specs\n"
        "from bench.triton_aot import TARGETS, variants\n"
        "spec = launch_specs(K)['update_kernel']\n"
        "label, chosen = [v for v in variants(spec) if v[1].get('CODE') == K.BF16\n"
        "                 and v[1]['THETA'] == K.TH_STOCHASTIC][0]\n"
        "c = spec.fixed | chosen\n"
        "sig = {a: 'constexpr' if a in c else spec.signature[a] for a in K.update_kernel.arg_names}\n"
        "k = triton.compile(ASTSource(K.update_kernel, sig, c), target=GPUTarget(*TARGETS['sm_90']),\n"
        "                   options=dict(num_warps=spec.num_warps))\n"
        "json.dump(k.asm['ptx'], sys.stdout)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(proc.stderr[-2000:])
        pytest.skip(f"Triton cannot compile for sm_90 here: {proc.stderr.strip()[-300:]}")
    ptx = json.loads(proc.stdout)
    # the hash's constants (triton_random.mix32) as PTX immediates, unsigned or signed
    consts = {0x7FEB352D, 0x846CA68B}
    words = {str(c) for c in consts} | {str(c - (1 << 32)) for c in consts}
    uses = [ln.split() for ln in ptx.splitlines()
            if words & {w.rstrip(";,") for w in ln.split()}]
    assert len(uses) >= 4, "the stochastic-rounding hash is missing from the PTX"
    wide = [" ".join(u) for u in uses if u[0] not in ("mul.lo.s32", "mul.lo.u32")]
    assert not wide, wide[:10]
