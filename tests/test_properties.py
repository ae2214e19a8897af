"""Property-based checks against the float64 oracle over shapes, dtypes, layouts and
hyper-parameters (fixed seed, bounded examples), and a long run."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from adai_kernels import Adai
from cases import PARAM_TOL, cpu_backends
from oracle import Oracle

FAST_BACKENDS = [b for b in cpu_backends() if b != "triton"]  # the interpreter is too slow here

shapes = st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple)
hyper = st.fixed_dictionaries(dict(
    lr=st.floats(1e-4, 1.0),
    betas=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 0.999)),
    # float32 state: 1 - beta1_prod is off by up to 2^-24 / eps relative, so eps stays >= 1e-4
    eps=st.floats(1e-4, 0.2),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
    decoupled=st.booleans(),
    dampening=st.sampled_from([1.0, 0.0, 0.5, 0.9]),
))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape_list=st.lists(shapes, min_size=1, max_size=4), h=hyper,
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       transpose=st.booleans(), steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_configurations(backend, shape_list, h, dtype, transpose, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shape_list:
        t = torch.randn(s, generator=gen)
        if transpose and t.dim() >= 2:
            t = t.transpose(0, 1)
        params.append(torch.nn.Parameter(t.to(dtype)))
    oracle = Oracle([dict(params=params, **h)])
    opt = Adai(params, backend=backend, **h)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        oracle.step([grads])
    rel = max(1e-5, 8 * 2**-24 / h["eps"])
    tol = PARAM_TOL[dtype] if dtype != torch.float32 else dict(rtol=rel, atol=10 * rel * h["lr"] * steps)
    for p, q in zip(params, oracle.params(0)):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().double(), q, **tol)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_long_run_stays_finite_and_on_the_oracle(backend):
    """20,000 steps: beta1_prod falls far below 2^-25 (where 1 - b is exactly 1 in float32)
    and everything stays finite and on the float64 trajectory."""
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((8, 8), (33,), (5,))]
    groups = [dict(params=params[:2], lr=1e-3, betas=(0.1, 0.99), eps=1e-3, weight_decay=1e-4,
                   decoupled=False, dampening=1.0),
              dict(params=params[2:], lr=1e-3, betas=(0.1, 0.99), eps=1e-3, weight_decay=1e-2,
                   decoupled=True, dampening=0.5)]
    oracle = Oracle(groups)
    opt = Adai(groups, lr=1e-3, backend=backend)
    for k in range(20_000):
        grads = [torch.randn(p.shape, generator=gen) + 0.1 for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        oracle.step([grads[:2], grads[2:]])
    assert max(float(opt.state[p]["beta1_prod"].max()) for p in params) < 2**-25
    for p, q in zip(params, oracle.params(0) + oracle.params(1)):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().double(), q, rtol=1e-4, atol=1e-4)
