"""CUDA-graph capture of Adai.step() (capturable=True) on a GPU, for each backend that runs on
CUDA (cuda, triton, reference): a captured step replayed with new gradients (and a new tensor
learning rate) gives bitwise what eager steps give; a whole training step (forward, backward,
step) captured with gradients allocated during capture; load_state_dict under a captured graph;
the refusals; and adai::_upload, the capture-safe host-to-device copy behind the kernels'
launch tables. Skips without a GPU (tests/test_capture.py checks the CPU-side rules).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import adai_kernels._native as native
from adai_kernels import Adai, backends
from cases import clone_groups, make_groups

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BACKENDS = ("cuda", "triton", "reference")


def _need(backend: str) -> None:
    why = backends.available(torch.device("cuda")).get(backend)
    if why is None:
        return
    if backend == "cuda" and os.environ.get("ADAI_REQUIRE_CUDA") == "1":
        pytest.fail(f"backend 'cuda' is unavailable: {why}")
    pytest.skip(f"backend {backend!r} is unavailable: {why}")


def _gpu_groups(dtype=torch.float32, lr=None):
    groups = make_groups(dtype, lr=lr)  # odd shapes, transposed and channels_last layouts
    for g in groups:
        g["params"] = [torch.nn.Parameter(p.detach().to("cuda")) for p in g["params"]]
    return groups


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _grads(params, step, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(1000 * seed + step)
    return [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen, device="cuda"))
            for p in params]


class Pair:
    """An optimizer whose step is captured and an eager twin with the same parameters."""

    def __init__(self, backend, dtype=torch.float32, **options):
        groups = _gpu_groups(dtype)
        twin = clone_groups(groups)
        self.cap = Adai(groups, lr=1.0, backend=backend, capturable=True, **options)
        self.eager = Adai(twin, lr=1.0, backend=backend, **options)
        self.static = [torch.zeros_like(p) for p in _params(self.cap)]
        for p, s in zip(_params(self.cap), self.static):
            p.grad = s

    def load(self, step):
        grads = _grads(self.static, step)
        for s, g in zip(self.static, grads):
            s.copy_(g)
        for p, g in zip(_params(self.eager), grads):
            p.grad = g

    def warm_up_and_capture(self, steps=2):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k in range(steps):
                self.load(k)
                self.cap.step()
                self.eager.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.cap.step()
        return graph

    def assert_equal(self, where):
        torch.cuda.synchronize()
        for i, (p, q) in enumerate(zip(_params(self.cap), _params(self.eager))):
            assert torch.equal(p, q), f"{where}: parameter {i} differs"
        a, b = self.cap.state_dict()["state"], self.eager.state_dict()["state"]
        assert a.keys() == b.keys()
        for i in a:
            assert a[i]["step"] == b[i]["step"], f"{where}: step of parameter {i}"
            for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                assert torch.equal(a[i][k], b[i][k]), f"{where}: {k} of parameter {i}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [{}, dict(max_grad_norm=5.0, skip_nonfinite=True)],
                         ids=["plain", "clip"])
def test_replays_equal_eager_steps(backend, dtype, options):
    _need(backend)
    pair = Pair(backend, dtype, **options)
    graph = pair.warm_up_and_capture()
    pair.assert_equal("after warm-up")  # capturing ran nothing
    for k in range(2, 6):
        pair.load(k)
        graph.replay()
        pair.eager.step()
        pair.assert_equal(f"replay {k}")
    if options:
        torch.testing.assert_close(pair.cap.grad_norm, pair.eager.grad_norm, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_changes_between_replays(backend):
    _need(backend)
    pair = Pair(backend)
    lrs = {}
    for opt in (pair.cap, pair.eager):
        lrs[opt] = [torch.tensor(g["lr"], device="cuda") for g in opt.param_groups]
        for g, lr in zip(opt.param_groups, lrs[opt]):
            g["lr"] = lr
    graph = pair.warm_up_and_capture()
    for k in range(2, 6):
        for opt in (pair.cap, pair.eager):
            for lr in lrs[opt]:
                lr.mul_(0.5)  # as an LR scheduler updates a tensor lr: in place
        pair.load(k)
        graph.replay()
        pair.eager.step()
        pair.assert_equal(f"replay {k}")


def test_skipped_step_in_a_replay():
    _need("cuda")
    pair = Pair("cuda", skip_nonfinite=True)
    graph = pair.warm_up_and_capture()
    pair.load(2)
    pair.static[3].view(-1)[0] = float("nan")
    pair.eager.param_groups[0]["params"][3].grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in _params(pair.cap)]
    graph.replay()
    pair.eager.step()
    pair.assert_equal("skipped replay")
    assert all(torch.equal(a, p) for a, p in zip(before, _params(pair.cap)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_under_a_captured_graph(backend):
    _need(backend)
    pair = Pair(backend)
    graph = pair.warm_up_and_capture()
    for k in range(2, 4):
        pair.load(k)
        graph.replay()
        pair.eager.step()
    saved = pair.eager.state_dict()
    saved_params = [p.detach().clone() for p in _params(pair.eager)]
    for k in range(4, 6):  # both move away from the checkpoint
        pair.load(k)
        graph.replay()
        pair.eager.step()
    with torch.no_grad():
        for opt in (pair.cap, pair.eager):
            for p, q in zip(_params(opt), saved_params):
                p.copy_(q)
            opt.load_state_dict(saved)
    for k in range(4, 6):
        pair.load(k)
        graph.replay()
        pair.eager.step()
        pair.assert_equal(f"replay {k} after load_state_dict")


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_training_step_captured(backend):
    """The pattern of torch.cuda.graphs' docs: warm up on a side stream, zero_grad(set_to_none),
    capture forward + backward + step (gradients are allocated during capture)."""
    _need(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 5)).cuda()
    twin = copy.deepcopy(model)
    opt = Adai(model.parameters(), lr=0.05, backend=backend, capturable=True)
    opt_twin = Adai(twin.parameters(), lr=0.05, backend=backend)
    x, y = torch.zeros(16, 37, device="cuda"), torch.zeros(16, 5, device="cuda")

    def data(k):
        gen = torch.Generator(device="cuda").manual_seed(k)
        return (torch.randn(16, 37, generator=gen, device="cuda"),
                torch.randn(16, 5, generator=gen, device="cuda"))

    def eager_step(k):
        xb, yb = data(k)
        opt_twin.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(twin(xb), yb).backward()
        opt_twin.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(3):
            xb, yb = data(k)
            x.copy_(xb)
            y.copy_(yb)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            eager_step(k)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    for k in range(3, 8):
        xb, yb = data(k)
        x.copy_(xb)
        y.copy_(yb)
        graph.replay()
        eager_step(k)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters()):
        # forward and backward inside a graph may pick other GEMM kernels than eager ones
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    steps = {e["step"] for e in opt.state_dict()["state"].values()}
    assert steps == {8}


def test_capture_needs_capturable_and_a_warm_up_step():
    _need("cuda")
    p = torch.nn.Parameter(torch.randn(100, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = Adai([p], lr=0.1, backend="cuda", capturable=True)
    with pytest.raises(RuntimeError, match="no optimizer state yet"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    assert not opt.state
    opt = Adai([p], lr=0.1, backend="cuda")
    opt.step()
    with pytest.raises(RuntimeError, match="capturable=False"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()


@pytest.mark.parametrize("nbytes", [1, 4096, 32 * 1024 - 64, 100_003])
def test_upload_is_kept_by_a_captured_graph(nbytes):
    """adai::_upload during capture copies the bytes as kernel arguments: a replay writes the
    bytes of capture time even after the host buffer has changed."""
    if not native.has_cuda_kernels():
        pytest.skip("adai_kernels._C was built without CUDA kernels")
    gen = torch.Generator().manual_seed(nbytes)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    expected = src.clone()
    dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    torch.ops.adai._upload(src, dst)  # eager: through pinned memory
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.adai._upload(src, dst)
    src.random_(0, 256, generator=gen)
    dst.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)
    with pytest.raises(RuntimeError, match="bytes"):
        torch.ops.adai._upload(src[:-1] if nbytes > 1 else src.repeat(2), dst)
