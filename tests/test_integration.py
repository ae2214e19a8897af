"""Training-stack integration on CPU: GradScaler, fused clipping, non-finite gradients,
tensor learning rates. Every backend that runs here, against the oracle or plain torch."""
import pytest
import torch

from adai_kernels import Adai
from cases import (PARAM_TOL, clone_groups, cpu_backends, make_grads, make_groups,
                   set_grads)
from oracle import Oracle

BACKENDS = cpu_backends()


def flat_params(groups):
    return [p for g in groups for p in g["params"]]


def snapshot(opt, groups):
    params = [p.detach().clone() for p in flat_params(groups)]
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    return params, state


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        for n in a[1][k]:
            assert torch.equal(a[1][k][n], b[1][k][n]), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "not-clipped"])
def test_fused_clipping_matches_clip_grad_norm(backend, max_norm):
    """Same as torch.nn.utils.clip_grad_norm_ over every group, then Adai; gradients are not
    modified; grad_norm is the norm before clipping. Group 0 has L2 decay (the clip applies
    before the decay term is added), group 1 decoupled decay."""
    groups = make_groups()
    oracle = Oracle(clone_groups(groups))
    opt = Adai(groups, lr=1.0, max_grad_norm=max_norm, backend=backend)
    for k in range(4):
        grads = make_grads(groups, k)
        for row in grads:
            for i, g in enumerate(row):
                if g is not None:
                    row[i] = g * 0.1  # norms around 1: some steps clip, some do not
        set_grads(groups, grads)
        given = [g.clone() for row in grads for g in row if g is not None]
        opt.step()
        clipped = [[None if g is None else g.clone() for g in row] for row in grads]
        live = [g for row in clipped for g in row if g is not None]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double())
                                                      for g in live]))
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        for row in clipped:
            for i, g in enumerate(row):
                if g is not None:
                    row[i] = g.double() * coef
        oracle.step(clipped)
        torch.testing.assert_close(opt.grad_norm, total, rtol=1e-6, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(
            given, [p.grad for p in flat_params(groups) if p.grad is not None]))
    for gi, g in enumerate(groups):
        for p, q in zip(g["params"], oracle.params(gi)):
            torch.testing.assert_close(p.detach().double(), q, **PARAM_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_coefficient_is_torchs(backend):
    """One tensor, clipped: the step equals Adai on the gradient clip_grad_norm_ returns."""
    p1 = torch.nn.Parameter(torch.randn(100))
    p2 = torch.nn.Parameter(p1.detach().clone())
    a = Adai([p1], lr=0.1, max_grad_norm=0.25, backend=backend)
    b = Adai([p2], lr=0.1, backend=backend)
    for k in range(3):
        g = torch.randn(100) * (k + 1)
        p1.grad, p2.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_([p2], 0.25)
        a.step()
        b.step()
        torch.testing.assert_close(a.grad_norm.float(), norm, rtol=1e-6, atol=0)
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler(backend):
    """torch.amp.GradScaler: gradients are unscaled inside the step; a step with inf is
    skipped entirely (parameters, states and step counters unchanged) and the scale backs off."""
    groups, plain = make_groups(), None
    plain = clone_groups(groups)
    opt = Adai(groups, lr=1.0, backend=backend)
    ref = Adai(plain, lr=1.0, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for k in range(3):
        grads = make_grads(groups, k)
        set_grads(plain, grads)
        ref.step()
        scale = float(scaler.scale(torch.tensor(1.0)))  # what scaling the loss would do
        set_grads(groups, [[None if g is None else g * scale for g in row] for row in grads])
        scaler.step(opt)
        scaler.update()
    for p, q in zip(flat_params(groups), flat_params(plain)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = snapshot(opt, groups)
    grads = make_grads(groups, 3)
    grads[1][2][5] = float("inf")
    set_grads(groups, grads)
    scale = float(scaler.scale(torch.tensor(1.0)))
    scaler.step(opt)
    scaler.update()
    assert_same(before, snapshot(opt, groups))
    assert scaler.get_scale() < scale
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradients(backend, bad):
    """skip_nonfinite=True (or clipping) skips the step; found_inf set by hand skips it too.
    By default a non-finite gradient reaches its own parameter only: the others step with
    vhat / vbar := 0, as when vbar is 0 (the global mean is unknown)."""
    for kwargs in (dict(skip_nonfinite=True), dict(max_grad_norm=1.0)):
        groups = make_groups()
        opt = Adai(groups, lr=1.0, backend=backend, **kwargs)
        set_grads(groups, make_grads(groups, 0))
        opt.step()
        before = snapshot(opt, groups)
        grads = make_grads(groups, 1)
        grads[0][3][1, 2] = bad
        set_grads(groups, grads)
        opt.step()
        assert_same(before, snapshot(opt, groups))
        assert not torch.isfinite(opt.grad_norm)

    groups = make_groups()
    opt = Adai(groups, lr=1.0, backend=backend)
    set_grads(groups, make_grads(groups, 0))
    opt.step()
    opt.found_inf = torch.tensor(1.0)
    before = snapshot(opt, groups)
    opt.step()
    assert_same(before, snapshot(opt, groups))
    del opt.found_inf

    grads = make_grads(groups, 1)
    grads[0][3][1, 2] = bad
    set_grads(groups, grads)
    opt.step()
    poisoned = groups[0]["params"][3]
    assert not torch.isfinite(poisoned).all()
    for p in flat_params(groups):
        if p is not poisoned:
            assert torch.isfinite(p).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_learning_rate(backend):
    """A tensor lr is read on the device: changing it in place (as a scheduler would) gives
    the same trajectory as float learning rates."""
    a, b = make_groups(), None
    b = clone_groups(a)
    lrs = [torch.tensor(g["lr"]) for g in a]
    for g, lr in zip(a, lrs):
        g["lr"] = lr
    opt_a = Adai(a, lr=1.0, backend=backend)
    opt_b = Adai(b, lr=1.0, backend=backend)
    for k in range(3):
        grads = make_grads(a, k)
        set_grads(a, grads)
        set_grads(b, grads)
        for lr, gb in zip(lrs, opt_b.param_groups):
            lr.fill_(0.01 * (k + 1))
            gb["lr"] = 0.01 * (k + 1)
        opt_a.step()
        opt_b.step()
    for p, q in zip(flat_params(a), flat_params(b)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
