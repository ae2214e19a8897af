"""The torch.optim.Optimizer contract: lr given by the groups, the learning rate's checks,
state-dict hooks, parameter names across a load, copies and pickles, and print(opt)."""
import pytest
import torch

from adai_kernels import Adai, AdaiV2, AdaiW


def p(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


def test_every_group_gives_its_lr():
    a, b = p(3), p(2)
    opt = Adai([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.0}], backend="reference")
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.0]
    before = [a.detach().clone(), b.detach().clone()]
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    assert not torch.equal(a, before[0]) and torch.equal(b, before[1])
    opt.add_param_group({"params": [p(4)], "lr": 0.3})
    assert opt.param_groups[2]["lr"] == 0.3


@pytest.mark.parametrize("cls", [Adai, AdaiW, AdaiV2])
def test_a_group_without_lr_is_named(cls):
    with pytest.raises(ValueError, match="param group 0 has no lr"):
        cls([p(3)])
    with pytest.raises(ValueError, match="param group 1 has no lr"):
        cls([{"params": [p(3)], "lr": 0.1}, {"params": [p(2)]}])
    opt = cls([{"params": [p(3)], "lr": 0.1}])
    with pytest.raises(ValueError, match="param group 1 has no lr"):
        opt.add_param_group({"params": [p(2)]})
    assert len(opt.param_groups) == 1
    saved = opt.state_dict()
    del saved["param_groups"][0]["lr"]
    with pytest.raises(ValueError, match="param group 0 of the loaded state dict has no lr"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("lr", [torch.tensor([0.1, 0.2]), torch.tensor([]),
                                torch.tensor(float("inf")), torch.tensor(-1.0)], ids=str)
def test_bad_tensor_lr(lr):
    with pytest.raises(ValueError, match="Invalid lr"):
        Adai([p(3)], lr=lr)
    opt = Adai([p(3)], lr=0.1)
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": [p(2)], "lr": lr})
    assert len(opt.param_groups) == 1


def test_tensor_lr_of_one_element_steps_as_the_number():
    params = [p(5), p(5)]
    with torch.no_grad():
        params[1].copy_(params[0])
    for q, lr in zip(params, (0.1, torch.tensor([0.1]))):
        opt = Adai([q], lr=lr, backend="reference")
        q.grad = torch.linspace(-1, 1, 5)
        opt.step()
    assert torch.equal(params[0], params[1])
