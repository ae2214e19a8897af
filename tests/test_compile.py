"""torch.compile(opt.step, fullgraph=True): no graph breaks, the same result as eager, and a
tensor learning rate changed by a schedule causes no recompilation."""
import pytest
import torch
import torch._dynamo

from adai_kernels import Adai
from cases import cpu_backends

# the native and Triton ops are opaque custom ops to the compiler (Triton's run under its
# interpreter here); the reference is traced op by op and takes about a minute to compile on
# 2 cores, so it is left to the eager tests
BACKENDS = [b for b in cpu_backends() if b != "reference"]


def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_eager(backend):
    torch._dynamo.reset()
    a, b = model(0), model(0)
    lr = torch.tensor(0.05)
    opt_a = Adai(a.parameters(), lr=lr, weight_decay=1e-3, max_grad_norm=1.0, backend=backend)
    opt_b = Adai(b.parameters(), lr=0.05, weight_decay=1e-3, max_grad_norm=1.0,
                 backend=backend)
    compiled = torch.compile(opt_a.step, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=False):
        counts = []
        for k in range(4):
            for p, q in zip(a.parameters(), b.parameters()):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
            lr.fill_(0.05 / (k + 1))  # a schedule, in place
            opt_b.param_groups[0]["lr"] = 0.05 / (k + 1)
            compiled()
            opt_b.step()
            counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # state is created by the first call; every later call reuses one graph
    assert counts[-1] == counts[1], counts
