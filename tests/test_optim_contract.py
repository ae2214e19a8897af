"""The torch.optim.Optimizer contract: lr given by the groups, the learning rate's checks,
state-dict hooks, parameter names across a load, copies and pickles, and print(opt)."""
import copy
import pickle

import warnings

import pytest
import torch

from adai_kernels import Adai, AdaiV2, AdaiW
from cases import cpu_backends, make_grads, make_groups, set_grads


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


def test_state_dict_hooks_run_in_order_and_may_replace():
    a, b = p(3), p(2)
    opt = Adai([a, b], lr=0.1, backend="reference")
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre, prepended", o)), prepend=True)
    dropped = opt.register_state_dict_pre_hook(lambda o: calls.append("removed"))
    dropped.remove()

    def tag(o, sd):  # edits the dict, returns None: the dict is kept
        sd["tag"] = 1

    def wrap(o, sd):
        calls.append(("post", sd.get("tag")))
        return {"wrapped": sd}

    opt.register_state_dict_post_hook(wrap)
    opt.register_state_dict_post_hook(tag, prepend=True)
    saved = opt.state_dict()
    assert calls == [("pre, prepended", opt), ("pre", opt), ("post", 1)]
    assert list(saved) == ["wrapped"] and list(saved["wrapped"]["state"]) == [0, 1]

    calls.clear()

    def mark(o, sd):  # given a shallow copy: the caller's dict keeps its keys
        calls.append("pre, prepended")
        sd["seen"] = True

    opt.register_load_state_dict_pre_hook(lambda o, sd: sd["wrapped"])  # replaces the dict
    opt.register_load_state_dict_pre_hook(mark, prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post",
                                                                  o.param_groups[0]["lr"])))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post, prepended"), prepend=True)
    saved["wrapped"]["param_groups"][0]["lr"] = 0.5
    opt.load_state_dict(saved)
    assert calls == ["pre, prepended", "post, prepended", ("post", 0.5)]
    assert "seen" not in saved
    assert opt.param_groups[0]["lr"] == 0.5


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def _train(model, opt, steps, start):
    for k in range(start, start + steps):
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(k))
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


def test_hooks_key_a_checkpoint_by_parameter_name():
    """As a checkpoint library uses them: state saved by parameter name, mapped back to this
    optimizer's indices when loaded, and the run continues exactly."""
    def by_name(opt, sd):
        names = [n for g in sd["param_groups"] for n in g["param_names"]]
        return {**sd, "state": {names[i]: entry for i, entry in sd["state"].items()}}

    def by_index(opt, sd):
        names = [n for g in opt.param_groups for n in g["param_names"]]
        return {**sd, "state": {names.index(n): entry for n, entry in sd["state"].items()}}

    straight, first = _model(), _model()
    opt = Adai(straight.named_parameters(), lr=0.1, backend="reference")
    _train(straight, opt, 4, 0)
    opt1 = Adai(first.named_parameters(), lr=0.1, backend="reference")
    opt1.register_state_dict_post_hook(by_name)
    _train(first, opt1, 2, 0)
    saved = opt1.state_dict()
    assert set(saved["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}

    resumed = _model()
    resumed.load_state_dict(first.state_dict())
    opt2 = Adai(resumed.named_parameters(), lr=0.1, backend="reference")
    opt2.register_load_state_dict_pre_hook(by_index)
    opt2.load_state_dict(saved)
    _train(resumed, opt2, 2, 2)
    for x, y in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls", [torch.optim.SGD, Adai], ids=["torch SGD", "Adai"])
def test_load_keeps_parameter_names(cls):
    """Names stay when a checkpoint has none; a checkpoint's names replace them."""
    model = torch.nn.Linear(3, 2)
    unnamed = cls(model.parameters(), lr=0.1)
    named = cls(model.named_parameters(), lr=0.1)
    named.load_state_dict(unnamed.state_dict())
    assert named.param_groups[0]["param_names"] == ["weight", "bias"]
    assert named.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    renamed = named.state_dict()
    renamed["param_groups"][0]["param_names"] = ["w", "b"]
    named.load_state_dict(renamed)
    assert named.param_groups[0]["param_names"] == ["w", "b"]
    unnamed.load_state_dict(renamed)
    assert unnamed.param_groups[0]["param_names"] == ["w", "b"]


def _pickled(opt):
    return pickle.loads(pickle.dumps(opt))


def _grads(groups, k):
    """The test matrix's gradients; parameter 0 of group 1 has none before step 3 (it gets
    state after the copy), and step 4's are inf (a skipped step)."""
    grads = make_grads(groups, k)
    if k < 3:
        grads[1][0] = None
    if k == 4:
        grads = [[None if g is None else torch.full_like(g, float("inf")) for g in row]
                 for row in grads]
    return grads


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in cpu_backends()])
def test_a_copy_steps_on_the_same_trajectory(backend, copier):
    groups = make_groups()
    opt = AdaiW(groups, lr=1.0, backend=backend, max_grad_norm=20.0, skip_nonfinite=True,
                capturable=True)
    for k in range(2):
        set_grads(groups, _grads(groups, k))
        opt.step()
    twin = copier(opt)
    assert type(twin) is AdaiW and twin.backend == opt.backend == backend
    assert (twin.max_grad_norm, twin.skip_nonfinite, twin.process_group) == (20.0, True, None)
    assert twin.defaults == opt.defaults and twin.param_groups[0]["capturable"] is True
    assert torch.equal(twin.grad_norm, opt.grad_norm)
    for k in range(2, 6):
        grads = _grads(groups, k)
        for o in (opt, twin):
            set_grads(o.param_groups, grads)
            o.step()
    for ga, gb in zip(opt.param_groups, twin.param_groups):
        for pa, pb in zip(ga["params"], gb["params"]):
            assert pa is not pb and torch.equal(pa, pb)
    a, b = opt.state_dict(), twin.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, entry in a["state"].items():
        assert entry["step"] == b["state"][i]["step"]
        for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
            assert torch.equal(entry[key], b["state"][i][key])


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_a_copy_keeps_the_groups_lr_contract_and_no_hooks(copier):
    opt = Adai([{"params": [p(3)], "lr": 0.1}], backend="reference")
    opt.register_state_dict_post_hook(lambda o, sd: {"not": "kept"})
    twin = copier(opt)
    assert "param_groups" in twin.state_dict()
    with pytest.raises(ValueError, match="param group 1 has no lr"):
        twin.add_param_group({"params": [p(2)]})
    twin.add_param_group({"params": [p(2)], "lr": 0.2})
    assert "differentiable" not in twin.param_groups[1]


class _Group:
    """Stands for a ProcessGroup, which can be neither copied nor pickled."""

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle '_Group' object")


def test_a_deep_copy_reduces_over_the_same_process_group():
    group = _Group()
    opt = Adai([p(3)], lr=0.1, process_group=group)
    assert copy.deepcopy(opt).process_group is group
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(opt)


def test_print_shows_the_options():
    opt = Adai([p(3)], lr=0.1, backend="reference", max_grad_norm=2.0, skip_nonfinite=True,
               capturable=True)
    text = repr(opt)
    assert text.startswith("Adai (\nParameter Group 0\n") and text.endswith("\n)")
    for line in ("lr: 0.1", "capturable: True", "backend: reference", "max_grad_norm: 2.0",
                 "skip_nonfinite: True", "process_group: None"):
        assert f"\n    {line}\n" in text, line


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3),
], ids=["OneCycleLR", "CyclicLR"])
def test_warns_once_when_a_scheduler_cycles_beta0(make):
    """With cycle_momentum=True (their default) these schedulers move betas[0] to ~0.9 and
    back, as if it were Adam's momentum: one warning names the cure. Not with
    cycle_momentum=False, nor for a small change of beta0 by hand."""
    def run(opt, sched, steps=6):
        p = opt.param_groups[0]["params"][0]
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
            if sched is not None:
                sched.step()

    p = torch.nn.Parameter(torch.zeros(3))
    opt = Adai([p], lr=0.1)
    with pytest.warns(UserWarning, match="cycle_momentum=False") as record:
        run(opt, make(opt))
    assert sum("cycle_momentum" in str(w.message) for w in record) == 1

    q = torch.nn.Parameter(torch.zeros(3))
    quiet = Adai([q], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.OneCycleLR(quiet, max_lr=0.1, total_steps=10,
                                                    cycle_momentum=False)
        run(quiet, sched)
        quiet.param_groups[0]["betas"] = (0.2, 0.99)
        run(quiet, None, 2)
