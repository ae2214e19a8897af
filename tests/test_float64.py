"""float64 parameters: float64 state and float64 math, on the backends that step them (and
"auto" picks one that does for each device and dtype); an explicit backend that does not
fails at the first step meeting such a parameter, naming it, before anything changes."""
import pytest
import torch

from adai_kernels import Adai, backends
from cases import PARAM_TOL, clone_groups, cpu_backends, make_grads, make_groups, set_grads
from oracle import Oracle

F64 = torch.float64
STEPPING = [b for b in cpu_backends() if backends.get(b).unsupported(F64) is None]
REFUSING = [b for b in cpu_backends() if backends.get(b).unsupported(F64) is not None]
# float64 math against the float64 oracle: they differ in the order of the sums (vbar from
# per-tensor sums, the oracle's from element sums), a few ulps (2^-52 relative), amplified
# by at most 1/eps = 1e3 in m / (1 - b) and accumulated over the steps; float32 math would be
# off by about 1e-7.
F64_TOL = dict(rtol=1e-10, atol=1e-12)
STEPS = 10


def assert_matches(opt, groups, oracle, f64_tol=F64_TOL):
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            tol = f64_tol if p.dtype == F64 else PARAM_TOL[p.dtype]
            torch.testing.assert_close(p.detach().double(), oracle.params(gi)[pi], **tol,
                                       msg=lambda m: f"param {gi}.{pi}: {m}")
            st, ref = opt.state.get(p), oracle.state.get((gi, pi))
            assert (st is None) == (ref is None)
            if st is None or p.dtype != F64:
                continue
            for key, rkey in (("exp_avg_sq", "v"), ("exp_avg", "m"), ("beta1_prod", "b")):
                assert st[key].dtype == F64
                torch.testing.assert_close(st[key], ref[rkey], **f64_tol,
                                           msg=lambda m: f"{key} of {gi}.{pi}: {m}")


@pytest.mark.parametrize("backend", ["auto", *STEPPING])
def test_matches_the_float64_oracle(backend):
    groups = make_groups(F64)
    oracle = Oracle(clone_groups(groups))
    opt = Adai(groups, lr=1.0, backend=backend)
    for k in range(STEPS):
        grads = make_grads(groups, k)
        set_grads(groups, grads)
        opt.step()
        oracle.step(grads)
    assert_matches(opt, groups, oracle)
    for entry in opt.state_dict()["state"].values():
        assert all(entry[k].dtype == F64 for k in ("exp_avg", "exp_avg_sq", "beta1_prod"))


def test_auto_steps_each_dtype_with_a_backend_that_takes_it():
    """A model of float32 and float64 parameters on CPU: the float32 ones go to the device's
    backend, the float64 ones to one that steps float64; one global vbar over both."""
    f32, f64 = make_groups(torch.float32, seed=3), make_groups(F64, seed=4)
    groups = [f32[0], f64[1], dict(f32[2], params=f32[2]["params"] + f64[2]["params"])]
    oracle = Oracle(clone_groups(groups))
    opt = Adai(groups, lr=1.0)
    cpu = torch.device("cpu")
    assert opt._backend_for(cpu).name == backends.resolve("auto", cpu).name
    assert opt._backend_for(cpu, F64).unsupported(F64) is None
    for k in range(STEPS):
        grads = make_grads(groups, k)
        set_grads(groups, grads)
        opt.step()
        oracle.step(grads)
    # vbar sums float32 state too, so the float64 parameters inherit float32's tolerance
    assert_matches(opt, groups, oracle, f64_tol=dict(rtol=1e-5, atol=1e-5))
    assert {key[2] for key in opt._buckets} == {torch.float32, F64}


def test_auto_never_picks_a_backend_that_refuses_the_dtype(monkeypatch):
    """With every backend of "auto"'s list available (stand-ins), float64 goes to the first
    one that takes it: the reference backend on CUDA."""
    class StandIn(backends.Backend):
        def __init__(self, name):
            self.name = name

        def unavailable(self, device):
            return None

    real_get = backends.get
    monkeypatch.setattr(backends, "get", lambda name: real_get(name) if name == "reference"
                        else StandIn(name))
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda).name == "cuda"
    assert backends.resolve("auto", cuda, torch.bfloat16).name == "cuda"
    assert backends.resolve("auto", cuda, F64).name == "reference"
    with pytest.raises(RuntimeError, match="'triton' steps float32, bfloat16 and float16 "
                                           "parameters only, not torch.float64"):
        backends.resolve("triton", cuda, F64)


@pytest.mark.parametrize("backend", REFUSING)
def test_explicit_backend_refusing_float64_fails_naming_the_parameter(backend):
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5, dtype=F64))
    opt = Adai([{"params": [a]}, {"params": [torch.nn.Parameter(torch.randn(2)), b]}],
               lr=0.1, backend=backend)
    a.grad = torch.randn(4, 3)
    opt.step()  # no float64 parameter with a gradient yet
    before = a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()}
    a.grad, b.grad = torch.randn(4, 3), torch.randn(5, dtype=F64)
    with pytest.raises(RuntimeError, match=r"parameter 1 of param group 1 \(shape \(5,\), "
                                           r"torch.float64\).*float64"):
        opt.step()
    assert torch.equal(a, before[0]) and b not in opt.state
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[a].items())
    # and a checkpoint with float64 state cannot be loaded into it either
    other = Adai([b], lr=0.1, backend="reference")
    other.step()
    b.grad = torch.randn(5, dtype=F64)
    other.step()
    target = Adai([b], lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 .*float64"):
        target.load_state_dict(other.state_dict())
    assert not target.state


@pytest.mark.parametrize("backend", ["auto", *STEPPING])
def test_checkpoint_keeps_float64_and_resumes_bitwise(backend):
    groups = make_groups(F64)
    opt = Adai(groups, lr=1.0, backend=backend)
    for k in range(3):
        set_grads(groups, make_grads(groups, k))
        opt.step()
    sd = opt.state_dict()
    twin = clone_groups(groups)
    resumed = Adai(twin, lr=1.0, backend=backend)
    resumed.load_state_dict(sd)
    for k in range(3, 6):
        grads = make_grads(groups, k)
        set_grads(groups, grads)
        set_grads(twin, grads)
        opt.step()
        resumed.step()
    for g, h in zip(groups, twin):
        for p, q in zip(g["params"], h["params"]):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                assert resumed.state[q][key].dtype == F64
                assert torch.equal(opt.state[p][key], resumed.state[q][key])
    # float32 state (an authors' checkpoint of a float32 run) loaded for float64 parameters
    sd32 = {"state": {i: {k: (v.float() if isinstance(v, torch.Tensor) else v)
                          for k, v in e.items()} for i, e in sd["state"].items()},
            "param_groups": sd["param_groups"]}
    resumed.load_state_dict(sd32)
    assert all(s["exp_avg"].dtype == F64 for s in resumed.state.values())


def test_a_float64_model_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1)).double()
    x = torch.randn(64, 8, dtype=F64)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin()
    opt = Adai(model.parameters(), lr=0.5, weight_decay=1e-4)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert all(st["exp_avg"].dtype == F64 for st in opt.state.values())


def test_cpu_kernel_keeps_a_float64_max_rounded_up():
    """The CPU kernel keeps a float64 tensor's max |b| in float32, rounded up: a b just above
    2^-54 (1 - b < 1 in float64: not done) must not be stored as 2^-54 (done), as rounding to
    nearest would. With beta0 = 0 and eps = 0, beta1 = 1 and b stays what it was."""
    from adai_kernels import _native, elision
    from op_fixtures import Bucket

    if _native.load_error() is not None:
        pytest.skip(f"the compiled ops are not built: {_native.load_error()}")
    x = 2.0**-54 * (1.0 + 2.0**-30)
    gen = torch.Generator().manual_seed(0)
    bk = Bucket([torch.randn(5, generator=gen, dtype=F64)], "aligned", "fresh")
    bk.b[0].fill_(2.0**-60)
    bk.b[0][2] = -x
    grads = [torch.randn(5, generator=gen, dtype=F64)]
    b_max = torch.ones(bk.n_slots, dtype=torch.float32)  # not done: b is read
    stats = torch.zeros(1, 7, dtype=F64)
    ops = torch.ops.adai
    ops.stats(bk.params, grads, bk.segments, bk.steps_vec, bk.v_sum_vec, None, 0.99, 0.0,
              stats[0])
    ops.update(bk.params, grads, bk.segments, bk.exp_avg, bk.exp_avg_sq, bk.beta1_prod,
               bk.v_sum_vec, bk.steps_vec, stats, None, None, None, 0.1, 0.0, 0.99, 0.0, 0.0,
               False, 1.0, 0.0, False, beta1_prod_max=b_max)
    assert bk.b[0][2].item() == -x
    got = b_max[bk.slots[0]]
    assert got.item() > 2.0**-54 and not elision.done(got, F64)
    assert torch.equal(got, elision.max_abs(bk.b[0]))  # the reference's rule, bitwise
