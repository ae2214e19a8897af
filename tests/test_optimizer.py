"""Every backend that runs on CPU here, against the float64 oracle, over the test matrix."""
import io

import pytest
import torch

from adai_kernels import Adai
from cases import (DTYPES, PARAM_TOL, STATE_TOL, clone_groups, cpu_backends, make_grads,
                   make_groups, set_grads)
from oracle import Oracle

BACKENDS = cpu_backends()
STEPS = 5


def run(opt, groups, steps, start=0, seed=1):
    for k in range(start, start + steps):
        set_grads(groups, make_grads(groups, k, seed))
        opt.step()


def assert_matches_oracle(opt, groups, oracle):
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            expected = oracle.params(gi)[pi]
            torch.testing.assert_close(p.detach().double(), expected, **PARAM_TOL[p.dtype],
                                       msg=lambda m: f"param {gi}.{pi} {tuple(p.shape)}: {m}")
            st, ref = opt.state.get(p), oracle.state.get((gi, pi))
            assert (st is None) == (ref is None)
            if st is None:
                continue
            assert int(st["step"]) == ref["step"]
            for key, rkey in (("exp_avg_sq", "v"), ("exp_avg", "m"), ("beta1_prod", "b")):
                # states of rounded (bf16/fp16) trajectories inherit the parameters' tolerance
                tol = STATE_TOL if p.dtype == torch.float32 else PARAM_TOL[p.dtype]
                torch.testing.assert_close(st[key].double(), ref[rkey], **tol,
                                           msg=lambda m: f"{key} of {gi}.{pi}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle(backend, dtype):
    groups = make_groups(dtype)
    oracle = Oracle(clone_groups(groups))
    opt = Adai(groups, lr=1.0, backend=backend)
    assert opt.backend == backend
    for k in range(STEPS):
        grads = make_grads(groups, k)
        set_grads(groups, grads)
        opt.step()
        oracle.step(grads)
    assert_matches_oracle(opt, groups, oracle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_backend(backend):
    a, b = make_groups(), None
    b = clone_groups(a)
    opt_a = Adai(a, lr=1.0, backend=backend)
    opt_b = Adai(b, lr=1.0, backend="reference")
    run(opt_a, a, STEPS)
    run(opt_b, b, STEPS)
    for ga, gb in zip(a, b):
        for pa, pb in zip(ga["params"], gb["params"]):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_and_gradients_untouched(backend):
    groups = make_groups()
    layouts = [[p.stride() for p in g["params"]] for g in groups]
    opt = Adai(groups, lr=1.0, backend=backend)
    grads = make_grads(groups, 0)
    set_grads(groups, grads)
    given = [[None if g is None else p.grad for p, g in zip(gr["params"], row)]
             for gr, row in zip(groups, grads)]
    opt.step()
    for gr, row, strides, kept in zip(groups, grads, layouts, given):
        for p, g, stride, grad in zip(gr["params"], row, strides, kept):
            assert p.stride() == stride
            if g is not None:
                assert grad is p.grad and torch.equal(p.grad, g)  # the caller's grad, unchanged
                for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                    assert opt.state[p][key].stride() == stride
                    assert opt.state[p][key].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_gradients_first_step(backend):
    """vbar == 0: defined as vhat / vbar = 0, so nothing moves and nothing is NaN."""
    groups = make_groups()
    before = [p.detach().clone() for g in groups for p in g["params"]]
    opt = Adai(groups, lr=1.0, weight_decay=0.0, backend=backend)
    for g in groups:
        g_ = opt.param_groups[groups.index(g)]
        g_["weight_decay"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    after = [p.detach() for g in groups for p in g["params"]]
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    for st in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(st[key]) == 0
        assert torch.allclose(st["beta1_prod"], torch.full_like(st["beta1_prod"], 1 - 1e-3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_state_and_no_grad_steps(backend):
    frozen = torch.nn.Parameter(torch.randn(1000))
    live = torch.nn.Parameter(torch.randn(10))
    opt = Adai([frozen, live], lr=0.1, backend=backend)
    opt.step()  # no gradients at all: a no-op
    assert len(opt.state) == 0
    live.grad = torch.randn(10)
    opt.step()
    assert frozen not in opt.state and live in opt.state
    assert sum(b.size for b in opt._buckets.values()) < 1000  # the frozen one costs nothing
    sd = opt.state_dict()
    assert list(sd["state"]) == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_continue_is_bitwise(backend):
    straight = make_groups()
    opt = Adai(straight, lr=1.0, backend=backend)
    run(opt, straight, 6)

    first = make_groups()
    opt1 = Adai(first, lr=1.0, backend=backend)
    run(opt1, first, 3)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    resumed = clone_groups(first)
    opt2 = Adai(resumed, lr=1.0, backend=backend)
    opt2.load_state_dict(torch.load(buf))
    run(opt2, resumed, 3, start=3)
    for ga, gb in zip(straight, resumed):
        for pa, pb in zip(ga["params"], gb["params"]):
            assert torch.equal(pa, pb)
            if pa in opt.state:
                for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                    assert torch.equal(opt.state[pa][key], opt2.state[pb][key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_counter_exact_past_float32(backend):
    """A checkpoint at step 2^31 - 1 (or 2^24, where a float32 counter stops) continues to
    2^31 (2^24 + 1) exactly, as the authors' int step does, and a skipped step keeps it."""
    for start in (2**24, 2**31 - 1):
        p = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(0)))
        opt = Adai([p], lr=0.1, backend=backend, skip_nonfinite=True)
        state = {"step": start, "exp_avg": torch.zeros(5), "exp_avg_sq": torch.full((5,), 0.1),
                 "beta1_prod": torch.full((5,), 0.5)}
        opt.load_state_dict({"state": {0: state}, "param_groups": opt.state_dict()["param_groups"]})
        p.grad = torch.ones(5)
        opt.step()
        assert opt.state_dict()["state"][0]["step"] == start + 1
        p.grad = torch.full((5,), float("inf"))
        opt.step()  # skipped
        assert opt.state_dict()["state"][0]["step"] == start + 1


def test_state_dict_is_authors_format():
    groups = make_groups()
    opt = Adai(groups, lr=1.0, backend="reference")
    run(opt, groups, 2)
    sd = opt.state_dict()
    flat = [p for g in groups for p in g["params"]]
    for index, entry in sd["state"].items():
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "beta1_prod"}
        assert isinstance(entry["step"], int)
        for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
            assert entry[key].shape == flat[index].shape
            assert entry[key].untyped_storage().nbytes() == 4 * flat[index].numel()  # a copy
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1, 2, 3, 4], [5, 6, 7], [8]]
    assert {"lr", "betas", "eps", "weight_decay", "decoupled", "dampening"} <= set(
        sd["param_groups"][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_loads_authors_checkpoint_and_continues(backend):
    """A checkpoint as the authors' Adai writes it (int steps, groups without `dampening`)
    continues on the oracle's trajectory."""
    groups = make_groups()
    for g in groups:
        g["dampening"] = 1.0
    oracle = Oracle(clone_groups(groups))
    for k in range(3):
        oracle.step(make_grads(groups, k))
    flat_keys = [(gi, pi) for gi, g in enumerate(groups) for pi in range(len(g["params"]))]
    state = {}
    for index, key in enumerate(flat_keys):
        st = oracle.state.get(key)
        if st is not None:
            state[index] = dict(step=st["step"], exp_avg=st["m"].float(),
                                exp_avg_sq=st["v"].float(), beta1_prod=st["b"].float())
    start = 0
    param_groups = []
    for g in groups:
        n = len(g["params"])
        param_groups.append(dict(lr=g["lr"], betas=g["betas"], eps=g["eps"],
                                 weight_decay=g["weight_decay"], decoupled=g["decoupled"],
                                 params=list(range(start, start + n))))
        start += n
    for gi, g in enumerate(groups):  # the model as the oracle left it
        for p, q in zip(g["params"], oracle.params(gi)):
            p.data.copy_(q)
    opt = Adai([{"params": g["params"]} for g in groups], lr=123.0, backend=backend)
    opt.load_state_dict({"state": state, "param_groups": param_groups})
    assert opt.param_groups[1]["lr"] == groups[1]["lr"] and opt.param_groups[0]["dampening"] == 1
    for k in range(3, 6):
        grads = make_grads(groups, k)
        set_grads(groups, grads)
        opt.step()
        oracle.step(grads)
    assert_matches_oracle(opt, groups, oracle)


def test_load_state_dict_errors_leave_optimizer_unchanged():
    groups = make_groups()
    opt = Adai(groups, lr=1.0, backend="reference")
    run(opt, groups, 2)
    good = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[groups[0]["params"][3]].items()}

    def broken(edit):
        sd = opt.state_dict()
        edit(sd)
        return sd

    cases = {
        "shape": lambda sd: sd["state"][3].update(exp_avg=torch.zeros(2, 2)),
        "missing": lambda sd: sd["state"][3].pop("beta1_prod"),
        "groups": lambda sd: sd["param_groups"].pop(),
        "group size": lambda sd: sd["param_groups"][0]["params"].pop(),
        "bad lr": lambda sd: sd["param_groups"][0].update(lr=-1.0),
        "tensor lr": lambda sd: sd["param_groups"][0].update(lr=torch.tensor([0.1, 0.2])),
        "bad step": lambda sd: sd["state"][3].update(step=-2),
    }
    for name, edit in cases.items():
        with pytest.raises(ValueError):
            opt.load_state_dict(broken(edit))
        after = opt.state[groups[0]["params"][3]]
        for k in before:
            assert torch.equal(before[k], after[k]), name
        assert opt.param_groups[0]["lr"] == good["param_groups"][0]["lr"]
    opt.load_state_dict(good)


def test_load_casts_and_moves_state():
    groups = make_groups(torch.bfloat16)
    opt = Adai(groups, lr=1.0, backend="reference")
    run(opt, groups, 2)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["exp_avg"] = entry["exp_avg"].double()
        entry["step"] = torch.tensor(float(entry["step"]))
    opt.load_state_dict(sd)
    for st in opt.state.values():
        assert st["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("saver, loader", [(a, b) for a in BACKENDS for b in BACKENDS if a != b])
def test_checkpoint_moves_between_backends(saver, loader):
    """Saved on one backend, loaded on another: the run continues on the oracle's path."""
    groups = make_groups()
    oracle = Oracle(clone_groups(groups))
    opt = Adai(groups, lr=1.0, backend=saver)
    for k in range(2):
        grads = make_grads(groups, k)
        set_grads(groups, grads)
        opt.step()
        oracle.step(grads)
    moved = Adai(groups, lr=1.0, backend=loader)
    moved.load_state_dict(opt.state_dict())
    for k in range(2, 4):
        grads = make_grads(groups, k)
        set_grads(groups, grads)
        moved.step()
        oracle.step(grads)
    assert_matches_oracle(moved, groups, oracle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_layout_changes_between_steps(backend):
    """Steps reuse the previous step's work lists while the gradients fit them; a gradient
    in another layout (or a parameter losing its gradient) makes the step plan anew."""
    def params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(6, 5).t()), torch.nn.Parameter(torch.randn(9))]

    a, b = params(), params()
    opt_a = Adai(a, lr=0.1, backend=backend)
    opt_b = Adai(b, lr=0.1, backend="reference")
    gen = torch.Generator().manual_seed(1)
    for k in range(5):
        g0 = torch.randn(6, 5, generator=gen)
        g0 = g0.t() if k in (0, 1, 3) else g0.t().contiguous()  # the param's layout, or not
        g1 = None if k == 2 else torch.randn(9, generator=gen)
        for ps in (a, b):
            ps[0].grad, ps[1].grad = g0.clone(memory_format=torch.preserve_format), g1
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
