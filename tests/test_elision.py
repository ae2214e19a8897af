"""The exact beta1_prod elision (docs/design.md, "Eliding beta1_prod"), for every backend that
runs here and every dtype.

Eliding b changes no result, only the bytes a step moves, so parameters, m and v are bitwise
the same with the elision on and off on every backend, whether or not its kernels elide yet.
What the Python side adds is checked where it applies: the done flags (the reference
backend always writes them; a kernel backend once it writes them), the freed buffer and its
memory, b reported as 0, checkpoints across the flip (bitwise resume, and the authors'
semantics continuing from them), NaN never done, skipped steps writing nothing.
"""
from __future__ import annotations

import pytest
import torch

from adai_kernels import Adai, backends, elision
from bench.timing import state_bytes
from cases import DTYPES, PARAM_TOL, cpu_backends
from oracle import Oracle

BACKENDS = cpu_backends()
SLOW = {"triton"}  # the interpreter: about a second per step, so a few steps
F64 = torch.float64


def dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """The parameter dtypes `backend` steps: the kernels' three, and float64 where supported.
    The slow one steps float32 and bfloat16 (float16 goes the same way as bfloat16 in its
    kernels: 16-bit parameters, float32 state)."""
    if backend in SLOW:
        return (torch.float32, torch.bfloat16)
    extra = (F64,) if backends.get(backend).unsupported(F64) is None else ()
    return (*DTYPES, *extra)


MATRIX = [(b, d) for b in BACKENDS for d in dtypes(b)]
IDS = [f"{b}-{str(d).removeprefix('torch.')}" for b, d in MATRIX]


# ---- the rule ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_threshold_is_where_one_minus_b_stops_moving(dtype):
    t = torch.tensor(elision.threshold(dtype), dtype=dtype)
    one = torch.ones((), dtype=dtype)
    assert one - t == 1 and one + t == 1
    above = torch.nextafter(t, one)
    assert one - above != 1


def test_max_abs_propagates_nan_and_rounds_float64_up():
    assert elision.max_abs(torch.tensor([0.5, -2.0, 1.0])) == 2.0
    assert elision.max_abs(torch.tensor([1.0, float("nan"), 3.0])).isnan()
    assert elision.max_abs(torch.empty(0)) == 0 and elision.max_abs(torch.empty(0, 3)) == 0
    thr = elision.threshold(F64)
    just_above = torch.nextafter(torch.tensor(thr, dtype=F64), torch.tensor(1.0, dtype=F64))
    m = elision.max_abs(just_above.reshape(1))
    assert m.dtype == torch.float32 and m.double() >= just_above and m > thr
    assert elision.max_abs(torch.tensor([thr], dtype=F64)) == thr
    assert elision.done(torch.tensor([thr, float("nan"), 0.0, 1.0]), F64).tolist() == [
        True, False, True, False]


# ---- the runs -----------------------------------------------------------------------------
# short (few launches, for the slow backends): every tensor of the eps 0.99 groups is done
# after 4 of its steps (9 in float64), but the rare one (every other step) is not in 5
# steps; the bucket of group 2 is freed after step 3 and gets a joining parameter at step
# `join`; group 1 has no gradients. long (fast backends): eps 0.3 and 0.5, a few hundred
# steps, group 1 never done until its eps rises mid-run.
CONFIGS = {
    "short": dict(eps=(0.99, 0.01, 0.99), steps=5, rare=2, join=4, eps_change=None,
                  frozen=(1,)),
    "long": dict(eps=(0.3, 0.01, 0.5), steps=200, rare=7, join=100, eps_change=(60, 0.5),
                 frozen=()),
}
GRAD_SCALES = (1.0, 1e2, 1e-3)  # the rare tensor (the third) gets the small ones


def make_model(dtype, config, seed=0):
    """Three groups: L2 decay; plain; decoupled decay with dampening 0.5 (AdaiV2), with a
    parameter that gets its first gradient at step `join`. Odd shapes and layouts."""
    gen = torch.Generator().manual_seed(seed)
    eps = CONFIGS[config]["eps"]

    def param(shape, layout="c"):
        t = torch.randn(shape[::-1] if layout == "t" else shape, generator=gen)
        t = t.t() if layout == "t" else t
        if layout == "cl":
            t = t.contiguous(memory_format=torch.channels_last)
        return torch.nn.Parameter(t.to(dtype))

    specs = [
        (dict(weight_decay=1e-2), [param((0,)), param((1,)), param((7,)),
                                   param((13, 17), "t"), param((2, 3, 5, 5), "cl"),
                                   param((300,))]),
        (dict(), [param((5,)), param((33,))]),
        (dict(weight_decay=0.1, decoupled=True, dampening=0.5),
         [param((9,)), param((4, 4)), param((6,))]),
    ]
    return [dict(params=ps, eps=e, **hyper) for (hyper, ps), e in zip(specs, eps)]


def grads_for(groups, step, config, seed=1):
    """Gradients of `step`: tensor i scaled by GRAD_SCALES[i % 3]; the rare tensor (group 0,
    third) gets one every `rare` steps, the joiner (group 2, last) from step `join`."""
    cfg = CONFIGS[config]
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out, i = [], 0
    for gi, g in enumerate(groups):
        row = []
        for pi, p in enumerate(g["params"]):
            grad = (torch.randn(p.shape, generator=gen) * GRAD_SCALES[i % 3]).to(p.dtype)
            if p.dim() == 4:  # as autograd makes it: in the parameter's layout
                grad = grad.contiguous(memory_format=torch.channels_last)
            i += 1
            if (gi, pi) == (0, 2) and step % cfg["rare"]:
                grad = None
            if (gi, pi) == (2, 2) and step < cfg["join"] or gi in cfg["frozen"]:
                grad = None
            row.append(grad)
        out.append(row)
    return out


def set_grads(groups, grads):
    for g, row in zip(groups, grads):
        for p, grad in zip(g["params"], row):
            p.grad = grad


def clone_model(groups):
    return [dict(g, params=[torch.nn.Parameter(p.detach().clone(
        memory_format=torch.preserve_format)) for p in g["params"]]) for g in groups]


def optimizer(groups, backend, elide=True, **options):
    return Adai(groups, lr=1e-3, betas=(0.9, 0.99), backend=backend,
                _elide_beta1_prod=elide, **options)


def step(opt, groups, k, config, grads=None):
    cfg = CONFIGS[config]
    if cfg["eps_change"] is not None and k == cfg["eps_change"][0]:
        opt.param_groups[1]["eps"] = cfg["eps_change"][1]
    set_grads(groups, grads if grads is not None else grads_for(groups, k, config))
    opt.step()


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(ints[t.element_size()])


def assert_same_trajectory(opt_a, groups_a, opt_b, groups_b, keys=("exp_avg", "exp_avg_sq")):
    for ga, gb in zip(groups_a, groups_b):
        for pi, (pa, pb) in enumerate(zip(ga["params"], gb["params"])):
            same = torch.equal(bits(pa), bits(pb))
            assert same, f"parameter {pi} {tuple(pa.shape)}"
            assert (pa in opt_a.state) == (pb in opt_b.state)
            if pa not in opt_a.state:
                continue
            sa, sb = opt_a.state[pa], opt_b.state[pb]
            assert int(sa["step"]) == int(sb["step"])
            for key in keys:
                same = torch.equal(bits(sa[key]), bits(sb[key]))
                assert same, f"{key} of {tuple(pa.shape)}"


def buckets(opt):
    """The buckets by group index."""
    return {key[0]: b for key, b in opt._buckets.items()}


def writes_flags(opt) -> bool:
    """Whether the backend wrote done flags: the max of a non-empty tensor left its initial
    value 1, as only an update writes it."""
    for b in opt._buckets.values():
        if b.beta1_prod_freed:
            return True
        for i, p in enumerate(b.params):
            if p.numel() and b.beta1_prod_max[i] != 1:
                return True
    return False


def check_flags(opt, twin):
    """The flags of `opt` (elision on) against the b values of `twin` (elision off, the same
    trajectory): a tensor that is not done has twin's b bitwise and its max |b| as its max;
    a done tensor's twin b is below the threshold too."""
    for key, bucket in opt._buckets.items():
        other = twin._buckets[key]
        flags = bucket.done()
        for i, p in enumerate(bucket.params):
            b_twin = other.state_of(other.params[i])["beta1_prod"]
            thr = elision.threshold(bucket.state_dtype)
            if flags[i]:
                assert not b_twin.isnan().any() and bool((b_twin.abs() <= thr).all())
            else:
                views = bucket.state_of(p)
                assert torch.equal(bits(views["beta1_prod"]), bits(b_twin))
                got, want = views["beta1_prod_max"], elision.max_abs(b_twin)
                if bool(want.isnan()):  # any NaN (the kernels' payloads differ) is never done
                    assert bool(got.isnan())
                else:
                    assert torch.equal(bits(got), bits(want))


# ---- on and off: bitwise the same ---------------------------------------------------------
def run_on_and_off(backend, dtype, config, **options):
    groups = make_model(dtype, config)
    twin = clone_model(groups)
    on, off = optimizer(groups, backend, **options), optimizer(twin, backend, False, **options)
    freed_at, restored = None, False
    for k in range(CONFIGS[config]["steps"]):
        step(on, groups, k, config)
        step(off, twin, k, config)
        b2 = buckets(on)[2]
        if freed_at is None and b2.beta1_prod_freed:
            freed_at = k
        restored |= freed_at is not None and not b2.beta1_prod_freed
    assert_same_trajectory(on, groups, off, twin)
    assert all(b.beta1_prod_max is None for b in off._buckets.values())
    return on, off, groups, freed_at, restored


@pytest.mark.parametrize("backend, dtype", MATRIX, ids=IDS)
def test_on_and_off_bitwise_short(backend, dtype):
    on, off, groups, freed_at, restored = run_on_and_off(backend, dtype, "short")
    if backend == "reference" or writes_flags(on):
        check_flags(on, off)
    if backend == "reference":
        flags = {gi: b.done() for gi, b in buckets(on).items()}
        if dtype != F64:  # float64's threshold takes 9 steps
            assert freed_at == 3 and restored  # done after 4 steps; the joiner brings b back
            assert flags[0] == [True, True, False, True, True, True]  # the rare one is not
            assert flags[2] == [True, True, False]


@pytest.mark.parametrize("backend, dtype", [m for m in MATRIX if m[0] not in SLOW],
                         ids=[i for m, i in zip(MATRIX, IDS) if m[0] not in SLOW])
def test_on_and_off_bitwise_long(backend, dtype):
    """A few hundred steps: tensors done at different times (gradient scales, a rarely
    stepped one), a group whose eps rises mid-run, a bucket freed, joined, freed again."""
    on, off, groups, freed_at, restored = run_on_and_off(backend, dtype, "long")
    if backend == "reference" or writes_flags(on):
        check_flags(on, off)
    if backend == "reference":
        flags = {gi: b.done() for gi, b in buckets(on).items()}
        assert flags[0][2] is False and sum(flags[0]) == 5  # the rare one is not done yet
        assert all(flags[1]) and all(flags[2])  # group 1 after its eps change
        assert freed_at is not None and restored and buckets(on)[2].beta1_prod_freed
        assert not buckets(on)[0].beta1_prod_freed


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_capturable_never_frees(backend):
    """Python's decision (the backend only writes the flags): the fast backends show it."""
    on, off, groups, freed_at, restored = run_on_and_off(backend, torch.float32, "short",
                                                         capturable=True)
    assert freed_at is None
    if backend == "reference":  # done since step 3, when the buffer would have gone
        assert buckets(on)[2].done()[:2] == [True, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_is_never_done(backend):
    """A NaN gradient in one tensor (no skip_nonfinite): its b is NaN and never done; the
    others still get done (vbar is not finite, so they step with the most inertia: 1 - eps,
    done after 4 steps); on and off stay bitwise the same, NaNs included."""
    config = "short"
    groups = make_model(torch.float32, config)
    twin = clone_model(groups)
    on, off = optimizer(groups, backend), optimizer(twin, backend, False)
    for k in range(CONFIGS[config]["steps"]):
        grads = grads_for(groups, k, config)
        if k == 1:
            grads[0][5][3] = float("nan")
        step(on, groups, k, config, grads)
        step(off, twin, k, config, [[None if g is None else g.clone() for g in row]
                                    for row in grads])
    assert_same_trajectory(on, groups, off, twin)
    assert groups[0]["params"][5].isnan().any()
    if backend == "reference" or writes_flags(on):
        check_flags(on, off)
        b0 = buckets(on)[0]
        assert not b0.beta1_prod_freed and buckets(on)[2].done()[:2] == [True, True]
        assert b0.done() == [True, True, False, True, True, False]  # the rare one, the NaN
    if backend == "reference":  # a kernel's clamp may turn a NaN inertia into a bound
        assert b0.beta1_prod_max[5].isnan()
        assert on.state_dict()["state"][5]["beta1_prod"].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_writes_no_flags(backend):
    config = "short"
    groups = make_model(torch.float32, config)
    opt = optimizer(groups, backend)
    for k in range(2):
        step(opt, groups, k, config)
    before = {k: (b.beta1_prod_max.clone(), b.buffers["beta1_prod"].clone())
              for k, b in opt._buckets.items()}
    opt.found_inf = torch.tensor(1.0)
    step(opt, groups, 2, config)
    del opt.found_inf
    for key, b in opt._buckets.items():
        assert torch.equal(b.beta1_prod_max, before[key][0])
        assert torch.equal(bits(b.buffers["beta1_prod"]), bits(before[key][1]))  # padding too


# ---- memory ------------------------------------------------------------------------------
def test_freed_buffer_costs_no_memory_and_comes_back():
    """Once every tensor of a bucket is done its b buffer goes (bench's state_bytes, which
    counts the storages opt.state holds); b shows as zeros of each parameter's shape. A
    parameter joining the bucket brings the buffer back: zeros for the done ones."""
    a, b, joiner = (torch.nn.Parameter(torch.randn(s)) for s in ((1000,), (3, 7), (5,)))
    opt = Adai([a, b, joiner], lr=1e-3, betas=(0.9, 0.99), eps=0.99, backend="reference")
    sizes = []
    for k in range(6):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
        sizes.append(state_bytes(opt))
    bucket = buckets(opt)[0]
    assert bucket.beta1_prod_freed and bucket.size == 1008 + 32  # segments padded to 16
    # after 3 steps nothing is done; after 6 the b buffer (4 bytes per element) is gone,
    # one zero element stands for every b
    assert not any(buckets(opt)[0].done()) or sizes[2] == sizes[0]
    assert sizes[2] - sizes[-1] == 4 * bucket.size - 4
    for x in (a, b):
        st = opt.state[x]["beta1_prod"]
        assert st.shape == x.shape and not st.any() and st.untyped_storage().nbytes() == 4
    assert opt.state_dict()["state"][0]["beta1_prod"].untyped_storage().nbytes() == 4000

    a.grad, b.grad, joiner.grad = torch.zeros(1000), torch.zeros(3, 7), torch.zeros(5)
    opt.step()
    bucket = buckets(opt)[0]
    assert not bucket.beta1_prod_freed and bucket.size == 1008 + 32 + 16
    assert state_bytes(opt) - sizes[-1] > 4 * bucket.size - 4  # b back, and the joiner's m, v
    assert not opt.state[a]["beta1_prod"].any() and not opt.state[b]["beta1_prod"].any()
    b_new = opt.state[joiner]["beta1_prod"]  # one step from 1: beta1 = 1 - eps (no gradient)
    assert bool(((b_new > 0) & (b_new < 0.0101)).all())
    assert opt.state[a]["beta1_prod"].data_ptr() == bucket.buffers["beta1_prod"].data_ptr()


# ---- checkpoints across the flip ----------------------------------------------------------
def _resume(saved_model, saved_sd, backend, config, start, stop):
    model = clone_model(saved_model)
    opt = optimizer(model, backend)
    opt.load_state_dict(saved_sd)
    for k in range(start, stop):
        step(opt, model, k, config)
    return opt, model


def _checkpoint_points(backend):
    """The config, the steps at which the run is saved and its length."""
    if backend in SLOW:  # one step after the flip (group 2 freed)
        return "short", (4,), 5
    # early (few done), tensors getting done, group 2 freed, and after the joiner
    return "long", (3, 20, 30, 105), 115


@pytest.mark.parametrize("backend, dtype", [m for m in MATRIX if m[0] not in SLOW
                                            or m[1] == torch.float32],
                         ids=[i for m, i in zip(MATRIX, IDS) if m[0] not in SLOW
                              or m[1] == torch.float32])
def test_checkpoints_across_the_flip_resume_bitwise(backend, dtype):
    """Saved before, at and after tensors get done (and while a bucket is freed), loaded into
    a fresh optimizer, continued: bitwise the uninterrupted run, whose state dict it equals
    (b reported as 0 for done tensors in both). Then the first checkpoint (nothing done)
    loaded back into the uninterrupted optimizer, whose buffer is freed, brings b back."""
    config, points, stop = _checkpoint_points(backend)
    groups = make_model(dtype, config)
    opt = optimizer(groups, backend)
    saved = {}
    for k in range(stop):
        if k in points:
            saved[k] = (clone_model(groups), opt.state_dict())
        step(opt, groups, k, config)
    for k, (model, sd) in saved.items():
        resumed, resumed_model = _resume(model, sd, backend, config, k, stop)
        assert_same_trajectory(resumed, resumed_model, opt, groups)
        _assert_same_state_dict(resumed.state_dict(), opt.state_dict(),
                                exact_b=backend == "reference" or writes_flags(opt))
    if backend == "reference":
        def reported_done(sd):
            return sum(not e["beta1_prod"].any() for e in sd["state"].values()
                       if e["beta1_prod"].numel())
        assert reported_done(saved[points[0]][1]) < reported_done(opt.state_dict())
        assert reported_done(opt.state_dict()) >= (4 if dtype != F64 else 2)
    first, (model, sd) = next(iter(saved.items()))
    with torch.no_grad():
        for p, q in zip([p for g in groups for p in g["params"]],
                        [p for g in model for p in g["params"]]):
            p.copy_(q)
    freed = any(b.beta1_prod_freed for b in opt._buckets.values())
    opt.load_state_dict(sd)
    assert not any(b.beta1_prod_freed for b in opt._buckets.values())
    assert freed or backend != "reference"
    more = 1 if backend in SLOW else 3
    resumed, resumed_model = _resume(model, sd, backend, config, first, first + more)
    for k in range(first, first + more):
        step(opt, groups, k, config)
    assert_same_trajectory(opt, groups, resumed, resumed_model,
                           keys=("exp_avg", "exp_avg_sq", "beta1_prod"))


def _assert_same_state_dict(a, b, exact_b=True):
    """The same state dicts. `exact_b` off (a backend that writes no done flags, whose
    uninterrupted run never learns that its tensors are done, while a loaded run does): a
    b reported as 0 in one may be the b below the threshold in the other."""
    assert a["state"].keys() == b["state"].keys()
    for i, entry in a["state"].items():
        other = b["state"][i]
        assert entry["step"] == other["step"]
        for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
            if key == "beta1_prod" and not exact_b and not torch.equal(entry[key], other[key]):
                x, y = (entry[key], other[key]) if not entry[key].any() else (other[key],
                                                                              entry[key])
                assert not x.any() and bool((y.abs() <= elision.threshold(y.dtype)).all())
                continue
            assert torch.equal(bits(entry[key]), bits(other[key])), (i, key)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_authors_semantics_continue_from_a_checkpoint_with_done_tensors(backend):
    """A state dict with done tensors (b reported as 0) loaded into the authors' semantics
    (the float64 oracle) continues on our trajectory."""
    config = "long"
    groups = make_model(torch.float32, config)
    opt = optimizer(groups, backend)
    for k in range(40):
        step(opt, groups, k, config)
    sd = opt.state_dict()
    zeros = [i for i, e in sd["state"].items() if e["beta1_prod"].numel()
             and not e["beta1_prod"].any()]
    if backend == "reference" or writes_flags(opt):
        assert len(zeros) >= 4
    oracle_groups = [dict(g, lr=1e-3, betas=(0.9, 0.99), weight_decay=g.get("weight_decay", 0.0),
                          decoupled=g.get("decoupled", False),
                          dampening=g.get("dampening", 1.0)) for g in groups]
    oracle = Oracle(oracle_groups)
    index = 0
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            entry = sd["state"].get(index)
            if entry is not None:
                oracle.state[(gi, pi)] = dict(step=entry["step"], m=entry["exp_avg"].double(),
                                              v=entry["exp_avg_sq"].double(),
                                              b=entry["beta1_prod"].double())
            index += 1
    for k in range(40, 45):
        grads = grads_for(groups, k, config)
        step(opt, groups, k, config, grads)
        oracle.step(grads)
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            torch.testing.assert_close(p.detach().double(), oracle.params(gi)[pi],
                                       **PARAM_TOL[torch.float32])


# ---- the watch on CUDA, without a GPU ------------------------------------------------------
class _Event:
    """torch.cuda.Event as the watch uses it, completing when the test says so."""
    made = []

    def __init__(self):
        self.complete = False
        _Event.made.append(self)

    def record(self):
        pass

    def query(self):
        return self.complete


class _CudaBucket:
    """What DoneWatch reads of a bucket, its device said to be CUDA."""
    def __init__(self, b_max):
        self.device = torch.device("cuda")
        self.state_dtype = torch.float32
        self.beta1_prod_max = b_max
        self.generation = 0


def test_watch_reads_a_completed_copy_of_the_same_generation(monkeypatch):
    """On CUDA the flags are copied to pinned memory after an update and read at a later
    step once the copy's event has completed; a change of the bucket's slots in between
    voids the copy."""
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(elision.DoneWatch, "_pinned", staticmethod(torch.empty_like))
    _Event.made.clear()
    done, not_done = elision.threshold(torch.float32), 1.0
    bucket = _CudaBucket(torch.tensor([done, not_done]))
    watch = elision.DoneWatch()
    assert not watch.look(bucket) and len(_Event.made) == 1  # a copy is under way
    bucket.beta1_prod_max.fill_(done)
    assert not watch.look(bucket) and len(_Event.made) == 1  # not complete: no new copy
    _Event.made[-1].complete = True
    assert not watch.look(bucket) and len(_Event.made) == 2  # the copy said: not all done
    _Event.made[-1].complete = True
    bucket.generation += 1  # e.g. a parameter joined after the copy
    assert not watch.look(bucket) and len(_Event.made) == 3
    _Event.made[-1].complete = True
    assert watch.look(bucket)
