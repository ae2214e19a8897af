"""Parameters on several devices in one optimizer: one bucket set per device, one global
mean. Needs a GPU (skips without one)."""
import pytest
import torch

from adai_kernels import Adai
from cases import clone_groups, make_grads, make_groups, set_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cpu_and_cuda_parameters_share_one_global_mean():
    on_cpu = make_groups()
    mixed = clone_groups(on_cpu)
    for g in mixed[1:]:  # groups 1 and 2 on the GPU, group 0 on the CPU
        g["params"] = [torch.nn.Parameter(p.detach().cuda()) for p in g["params"]]
    ref = Adai(on_cpu, lr=1.0, backend="reference")
    opt = Adai(mixed, lr=1.0, max_grad_norm=5.0)
    assert set(b.name for b in opt._backends.values()) <= {"cpu", "cuda", "triton"}
    for k in range(3):
        grads = make_grads(on_cpu, k)
        set_grads(on_cpu, grads)
        set_grads(mixed, [[None if x is None else x.to(p.device) for x, p in
                           zip(row, g["params"])] for row, g in zip(grads, mixed)])
        ref.step()
        opt.step()
    for ga, gb in zip(on_cpu, mixed):
        for p, q in zip(ga["params"], gb["params"]):
            torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.grad_norm.cpu(), ref.grad_norm, rtol=1e-9, atol=0)
