"""The beta1_prod elision on a GPU: the done flags reach the host through pinned memory and an
event, so no step synchronises, and a bucket's b buffer goes a step or more after its flags
say every tensor is done. For the reference backend, and for each CUDA backend whose kernels
take the flags. Skips without a GPU (tests/test_elision.py checks the rest on CPU)."""
from __future__ import annotations

import pytest
import torch

from adai_kernels import Adai, backends
from bench.timing import state_bytes

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _eliding():
    out = []
    for name, why in backends.available(torch.device("cuda")).items():
        if why is None and backends.get(name).elides_beta1_prod:
            out.append(name)
    return out or ["reference"]


@pytest.mark.parametrize("backend", _eliding())
def test_freed_without_synchronising(backend):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(1000, device=dev, generator=gen)),
          torch.nn.Parameter(torch.randn(3, 37, device=dev, generator=gen))]
    opt = Adai(ps, lr=1e-3, betas=(0.9, 0.99), eps=0.99, backend=backend)  # done in 4 steps

    def step():
        for p in ps:
            p.grad = torch.randn(p.shape, device=dev, generator=gen)
        opt.step()

    step()  # creates the state
    before = state_bytes(opt)
    bucket = next(iter(opt._buckets.values()))
    freed_at = None
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        for k in range(1, 12):
            step()
            if freed_at is None and bucket.beta1_prod_freed:
                freed_at = k
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert freed_at is not None and freed_at >= 4  # done after step 3, seen later
    assert before - state_bytes(opt) == 4 * bucket.size - 4
    for p in ps:
        b = opt.state[p]["beta1_prod"]
        assert b.shape == p.shape and not b.any()
