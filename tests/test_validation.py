"""Bad input: a clear error naming the parameter, before anything changes."""
import pytest
import torch

from adai_kernels import Adai, AdaiV2, AdaiW, backends
from cases import cpu_backends


def p(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(lr=1e-3, betas=(-0.1, 0.99)), "beta0"),
    (dict(lr=1e-3, betas=(0.1, 1.0)), "beta2"),
    (dict(lr=1e-3, betas=(0.1, -0.5)), "beta2"),
    (dict(lr=1e-3, eps=-1e-3), "eps"),
    (dict(lr=1e-3, weight_decay=-1.0), "weight_decay"),
    (dict(lr=1e-3, dampening=1.5), "dampening"),
    (dict(lr=1e-3, dampening=-0.1), "dampening"),
    (dict(lr=float("nan")), "lr"),
])
def test_construction_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Adai([p(3)], **kwargs)


def test_add_param_group_validates():
    opt = Adai([p(3)], lr=1e-3)
    with pytest.raises(ValueError, match="dampening"):
        opt.add_param_group({"params": [p(2)], "dampening": 2.0})
    assert len(opt.param_groups) == 1


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        Adai([p(3)], lr=1e-3, backend="fastest")


def test_env_backend(monkeypatch):
    monkeypatch.setenv("ADAI_BACKEND", "reference")
    assert Adai([p(3)], lr=1e-3).backend == "reference"
    monkeypatch.setenv("ADAI_BACKEND", "nope")
    with pytest.raises(ValueError, match="ADAI_BACKEND"):
        Adai([p(3)], lr=1e-3)


def test_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        Adai([p(3)], lr=1e-3, backend="cuda")  # CPU parameters


def test_class_defaults():
    assert Adai([p(3)], lr=1e-3).defaults["decoupled"] is False
    assert AdaiW([p(3)], lr=1e-3).defaults["decoupled"] is True
    v2 = AdaiV2([p(3)], lr=1e-3, dampening=0.5)
    assert v2.defaults["decoupled"] is True and v2.defaults["dampening"] == 0.5


def snapshot(opt, params):
    return ([t.detach().clone() for t in params],
            {id(k): {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()})


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bad", ["sparse", "complex", "dtype", "float64"])
def test_step_errors_change_nothing(backend, bad):
    if bad == "float64" and backends.get(backend).unsupported(torch.float64) is None:
        pytest.skip(f"backend {backend!r} steps float64 parameters (tests/test_float64.py)")
    good, other = p(4, 3), p(5)
    params = [good, other]
    if bad == "complex":
        params.append(torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)))
    if bad == "float64":
        params.append(torch.nn.Parameter(torch.randn(3, dtype=torch.float64)))
    opt = Adai(params, lr=0.1, backend=backend)
    good.grad, other.grad = torch.randn(4, 3), torch.randn(5)
    opt.step()
    good.grad, other.grad = torch.randn(4, 3), torch.randn(5)
    if bad == "sparse":
        other.grad = torch.randn(5).to_sparse()
    elif bad == "dtype":
        other.grad_dtype = None  # torch checks assignments unless told not to
        other.grad = torch.randn(5, dtype=torch.float64)
    else:
        params[-1].grad = torch.randn_like(params[-1])
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="parameter"):
        opt.step()
    after = snapshot(opt, params)
    for x, y in zip(before[0], after[0]):
        assert torch.equal(x, y)
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        for n in before[1][k]:
            assert torch.equal(before[1][k][n], after[1][k][n])


def test_empty_and_duplicate_parameters():
    with pytest.raises(ValueError, match="empty"):
        Adai([], lr=1e-3)
    shared = p(3)
    with pytest.raises(ValueError, match="more than one"):
        Adai([{"params": [shared]}, {"params": [shared, p(2)]}], lr=1e-3)
    opt = Adai([shared], lr=1e-3)
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [shared]})
    assert len(opt.param_groups) == 1


def test_invalid_max_grad_norm():
    for bad in (0.0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="max_grad_norm"):
            Adai([p(3)], lr=1e-3, max_grad_norm=bad)


@pytest.mark.parametrize("backend", cpu_backends())
def test_parameters_added_and_frozen_mid_training(backend):
    """A group added after some steps gets fresh state (step 1 on its first step) and joins
    the global mean; a parameter whose grad becomes None keeps its state untouched."""
    a, b = p(6, 2), p(5)
    opt = Adai([a], lr=0.1, backend=backend)
    for _ in range(2):
        a.grad = torch.randn(6, 2)
        opt.step()
    opt.add_param_group({"params": [b], "lr": 0.2})
    a.grad, b.grad = torch.randn(6, 2), torch.randn(5)
    opt.step()
    assert int(opt.state[a]["step"]) == 3 and int(opt.state[b]["step"]) == 1
    a.grad = None
    frozen = {k: v.clone() for k, v in opt.state[a].items()}
    b.grad = torch.randn(5)
    opt.step()
    for k, v in opt.state[a].items():
        assert torch.equal(v, frozen[k])
    assert int(opt.state[b]["step"]) == 2
