"""Step planning: which parameters a step moves, and the per-bucket work lists the backends
get (docs/design.md, "Two phases, two calls").

The first step, and any step whose parameters with gradients, dtypes or layouts changed, is
planned anew (plan_step): every gradient is checked, parameters without state get it, and the
work lists are built. Other steps replay the last plan (Plan.replay): the same lists with the
new gradients, which only need the checks that the plan's layouts still hold.

Free functions of an Adai optimizer (adai_kernels/optimizer.py): they read its param groups
and create its buckets, its backends and its plan."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch

from . import checkpoint, precision, sharding
from .buckets import BUFFER_KEYS, MASTER, state_strides
from .op_checks import PARAM_DTYPES, dtype_names, is_dense
from .work import Work

# The parameter dtypes the optimizer steps: those of the kernels, and float64 (float64 state,
# stepped by the backends that support it: Backend.unsupported).
STEP_DTYPES = tuple(dict.fromkeys((*PARAM_DTYPES, torch.float64)))


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def check_capture(opt) -> None:
    """A step being captured in a CUDA graph: every stepped group must allow it, and
    every tensor the graph reads must be on the device (a copy from the host would be
    captured as a read of host memory that does not survive the step)."""
    name = type(opt).__name__
    for gi, group in enumerate(opt.param_groups):
        stepped = [p for p in group["params"] if p.grad is not None]
        if not stepped:
            continue
        if not group["capturable"]:
            raise RuntimeError(f"{name}.step() is being captured in a CUDA graph but param "
                               f"group {gi} has capturable=False; construct the optimizer "
                               f"with capturable=True")
        lr = group["lr"]
        for p in stepped:
            if p.device.type != "cuda":
                raise RuntimeError(f"{name}.step() is being captured in a CUDA graph but "
                                   f"param group {gi} has a parameter on {p.device}")
            if isinstance(lr, torch.Tensor) and lr.device != p.device:
                raise RuntimeError(f"param group {gi}: a captured step needs lr on the "
                                   f"parameters' device {p.device}, not {lr.device}")


def check_param(p: torch.Tensor, g: torch.Tensor, gi: int, pi: int) -> None:
    """A parameter and its gradient, as a step can take them."""
    where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
    if g.is_sparse:
        raise RuntimeError(f"Adai does not support sparse gradients: {where}")
    if p.is_complex():
        raise RuntimeError(f"Adai does not support complex parameters: {where} is {p.dtype}")
    if p.dtype not in STEP_DTYPES:
        raise RuntimeError(f"Adai supports {dtype_names(STEP_DTYPES, last='and')} parameters: "
                           f"{where} is {p.dtype}")
    if g.dtype != p.dtype:
        raise RuntimeError(f"gradient of {where} is {g.dtype}, expected {p.dtype}")
    if g.device != p.device:
        raise RuntimeError(f"gradient of {where} is on {g.device}, expected {p.device}")


def check_backend(opt, gi: int, p: torch.Tensor) -> None:
    """The backend of `p`'s device and dtype exists: an explicit backend that refuses the
    dtype raises RuntimeError naming the parameter (of param group `gi`) and the dtype."""
    try:
        opt._backend_for(p.device, p.dtype)
    except RuntimeError as e:
        pi = next(i for i, q in enumerate(opt.param_groups[gi]["params"]) if q is p)
        raise RuntimeError(f"parameter {pi} of param group {gi} (shape {tuple(p.shape)}, "
                           f"{p.dtype}): {e}") from None


def prepare(opt, capturing: bool = False) -> list[Work]:
    """This step's work lists: the last plan's when it still fits, else a new plan. Nothing
    is modified until every check has passed."""
    grads = [p.grad for group in opt.param_groups for p in group["params"]]
    works = opt._plan.replay(grads) if opt._plan is not None else None
    if works is None:
        works = plan_step(opt, grads, capturing)
    return works


@dataclass
class Plan:
    """The work lists of the last planned step without their gradients, to be reused while
    the same parameters have gradients of the same dtypes and layouts. Made only when every
    list holds the parameters themselves (no dense stand-ins, no copied gradients, no
    DTensors); it holds no gradient, so that it keeps none alive."""

    no_grad: tuple[bool, ...]  # per parameter of every group, in order: its grad is None
    # per work list: the list without grads, the positions (in that order) of its grads,
    # and per parameter the grad's strides to check (None: contiguous)
    templates: list[tuple[Work, list[int], list]]

    @staticmethod
    def of(grads: list, works: dict[tuple, Work], positions: dict[tuple, list[int]]) -> Plan:
        return Plan(tuple(g is None for g in grads),
                    [(_with_grads(w, []), positions[key],
                      [None if p.is_contiguous() else p.stride() for p in w.params])
                     for key, w in works.items()])

    def replay(self, grads: list) -> list[Work] | None:
        """The work lists with `grads`, or None when they do not fit the plan (plan anew,
        with the full checks)."""
        if self.no_grad != tuple(g is None for g in grads):
            return None
        works = []
        for template, positions, strides in self.templates:
            gs = [grads[i] for i in positions]
            dtype, device = template.dtype, template.device
            try:
                for g, stride in zip(gs, strides):
                    # stride None: the parameter is contiguous, and is_contiguous() is a
                    # cheaper test than building the stride tuple
                    if (g.dtype is not dtype or g.device != device
                            or not (g.is_contiguous() if stride is None
                                    else g.stride() == stride)):
                        return None
            except RuntimeError:  # a sparse gradient has neither: the full checks say so
                return None
            works.append(_with_grads(template, gs))
        return works


def _with_grads(w: Work, grads: list) -> Work:
    return dataclasses.replace(w, grads=grads, write_back=[], scratch={})


def plan_step(opt, grads: list, capturing: bool = False) -> list[Work]:
    """Check every gradient, give the parameters without state their state, and build the
    per-bucket work lists; keep them as opt._plan when they can be replayed."""
    selected = _select(opt, grads)
    for gi, _, p, _ in selected:
        check_backend(opt, gi, p)
    if opt.process_group is None:
        opt._mesh_group = sharding.reduce_group([p for _, _, p, _ in selected])
    _give_state(opt, selected, capturing)
    works, positions, replayable = _build_works(opt, selected)
    opt._plan = Plan.of(grads, works, positions) if replayable else None
    return list(works.values())


def _select(opt, grads: list) -> list[tuple]:
    """(group index, flat index, parameter, gradient) of every parameter with a gradient,
    each checked."""
    selected = []
    flat = 0
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            g = grads[flat]
            if g is not None:
                check_param(p, g, gi, pi)
                precision.check_param(opt, p, gi, pi)
                selected.append((gi, flat, p, g))
            flat += 1
    return selected


def _give_state(opt, selected: list[tuple], capturing: bool) -> None:
    """Fresh state, in the buckets of their (group, device, dtype), for the selected
    parameters that have none; refused while a CUDA graph is captured (a graph cannot replay
    it)."""
    joining: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for gi, _, p, _ in selected:
        key = (gi, p.device, p.dtype)
        bucket = opt._buckets.get(key)
        if bucket is None or p not in bucket:
            joining[key].append(p)
    if capturing and joining:
        p = next(iter(joining.values()))[0]
        gi = next(key[0] for key in joining)
        pi = next(i for i, q in enumerate(opt.param_groups[gi]["params"]) if q is p)
        raise RuntimeError(f"parameter {pi} of param group {gi} (shape {tuple(p.shape)}) "
                           f"has no optimizer state yet, and creating it cannot be "
                           f"captured in a CUDA graph: run at least one eager step "
                           f"before capturing")
    numbering = checkpoint.numbering(opt) if joining else {}
    firsts = {key: precision.first_indices(opt, key[2], numbering, params)
              for key, params in joining.items()}  # may raise: before any bucket changes
    for key, params in joining.items():
        bucket = opt._buckets.get(key)
        if bucket is None:
            bucket = opt._buckets[key] = precision.new_bucket(opt, key[1], key[2])
        bucket.add(params, first_index=firsts[key])
        opt._publish_state(bucket)


def _build_works(opt, selected: list[tuple]):
    """The work list of each bucket, the flat positions of its gradients, and whether the
    lists can be replayed."""
    works: dict[tuple, Work] = {}
    positions: dict[tuple, list[int]] = defaultdict(list)
    members: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # as the buckets key them
    replayable = True
    for gi, index, p, g in selected:
        key = (gi, p.device, p.dtype)
        w = works.get(key)
        if w is None:
            w = works[key] = Work(opt.param_groups[gi], p.device, p.dtype,
                                  bucket=opt._buckets[key])
        members[key].append(p)
        positions[key].append(index)
        replayable &= _append(w, p, g)
    for key, w in works.items():
        w.segments = w.bucket.segments(members[key])
        if w.bucket.rounding:
            w.rounding_index = w.bucket.rounding_index(members[key])
    return works, positions, replayable


def _append(w: Work, p: torch.Tensor, g: torch.Tensor) -> bool:
    """Add parameter `p` (gradient `g`) to `w` as the ops take it: the local shard of a
    DTensor, a dense stand-in for a parameter that is not dense (copied back after the
    step), a gradient with the parameter's strides. Returns whether `w` still holds `p` and
    `g` themselves."""
    views, param = w.bucket.state_of(p), p
    own = not sharding.is_dtensor(p)
    p, g = sharding.local(p), sharding.local(g)
    dense_p = p if is_dense(p) else p.contiguous()
    if dense_p is not p:
        w.write_back.append((p, dense_p))
        own = False
    if g.stride() != dense_p.stride():
        g = torch.empty_strided(p.shape, state_strides(p), dtype=g.dtype,
                                device=g.device).copy_(g)
        own = False
    w.params.append(dense_p)
    w.grads.append(g)
    w.first_index.append(w.bucket.first_index_of(param))
    if MASTER in views:
        w.master.append(views[MASTER])
    for k in BUFFER_KEYS:
        getattr(w, k).append(views[k])
    w.steps.append(views["step"])
    w.v_sums.append(views["v_sum"])
    if "beta1_prod_max" in views:
        w.beta1_prod_max.append(views["beta1_prod_max"])
    return own
