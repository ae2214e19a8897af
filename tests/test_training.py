"""The optimizer inside ordinary training loops: modules, schedulers, closures, and the PyPI
Adai people use today as an outside cross-check."""
import pytest
import torch

from adai_kernels import Adai, AdaiV2
from cases import cpu_backends


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10)).to(memory_format=torch.channels_last)


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


@pytest.mark.parametrize("backend", cpu_backends())
def test_trains_with_scheduler_and_closure(backend):
    model, (x, y) = net(), batch()
    opt = AdaiV2(model.parameters(), lr=0.1, weight_decay=1e-4, dampening=0.8, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(15):
        losses.append(opt.step(closure).item())
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", cpu_backends())
def test_matches_pytorch_optimizer_adai(backend):
    """Where pytorch_optimizer.Adai follows the authors' maths (every tensor stepped every
    time, so one step counter; mean second moment above its eps clamp), ours agrees. The
    same gradients go to both: through a model, float rounding differences would be
    amplified by the model, not by the optimizer."""
    po = pytest.importorskip("pytorch_optimizer")
    a, b = net(1), net(1)
    ours = Adai(a.parameters(), lr=0.05, weight_decay=1e-3, backend=backend)
    theirs = po.Adai(b.parameters(), lr=0.05, weight_decay=1e-3, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        ours.step()
        theirs.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
