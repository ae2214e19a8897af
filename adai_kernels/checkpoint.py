"""Checkpoints: the optimizer's state as state_dict() gives it (the authors' format: per
parameter index `step`, `exp_avg`, `exp_avg_sq`, `beta1_prod`; with master weights
`master_param`, with stochastic rounding each group's `rounding_seed`) and the way back from
such a dict into buckets. Loading checks everything before it changes anything:
loaded_groups, loaded_seed and loaded_buckets build new groups, seed and buckets, commit
makes them the optimizer's.

Free functions of an Adai optimizer (adai_kernels/optimizer.py), whose param groups, buckets
and backends they read; only commit changes it."""
from __future__ import annotations

from collections import defaultdict

import torch

from . import plan, precision, sharding
from .buckets import BUFFER_KEYS, MASTER, Bucket
from .op_checks import state_dtype
from .validation import check_has_lr, check_seed, validate_hyperparameters

# A parameter's state, as opt.state and state_dict() show it.
STATE_KEYS = ("step", *BUFFER_KEYS)
# With master_weights, each bf16 / fp16 parameter's state has its fp32 master weights too.
MASTER_KEY = "master_param"
# With stochastic_rounding, every param group of state_dict() carries the optimizer's seed.
SEED_KEY = "rounding_seed"


def index(key) -> int | str:
    """A parameter index of a state dict; checkpoint libraries may hand it back as a str or a
    0-dim tensor (torch.distributed.checkpoint does)."""
    try:
        return int(key)
    except (TypeError, ValueError):
        return key


def numbering(opt) -> dict[int, tuple[int, torch.Tensor]]:
    """The state dict's parameter index -> (group index, parameter): the parameters in
    group order, each numbered once."""
    position, out = {}, {}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            if id(p) not in position:
                position[id(p)] = len(position)
                out[position[id(p)]] = (gi, p)
    return out


def pack_state(opt) -> dict:
    """The state dict (before its hooks): per parameter with state, copies of its buffers
    (DTensors for DTensor parameters) and its step as an int; the groups with their
    parameters' indices. A done parameter's beta1_prod (adai_kernels/elision.py) is
    reported as zeros: 1 - 0 == 1 - b == 1, so the authors' code continues on the same
    trajectory, and a state dict does not depend on the elision."""
    steps, done = {}, {}
    for bucket in opt._buckets.values():
        for p, k, d in zip(bucket.params, bucket.steps_list(), bucket.done()):
            steps[id(p)], done[id(p)] = k, d
    position = {id(p): i for i, (_, p) in numbering(opt).items()}
    state = {}
    for bucket in opt._buckets.values():
        for p in bucket.params:
            views = bucket.state_of(p)
            entry = {"step": steps[id(p)]}
            for k in BUFFER_KEYS:
                view = views[k]
                copy = (torch.zeros(view.shape, dtype=view.dtype, device=view.device)
                        if k == "beta1_prod" and done[id(p)]
                        else view.clone(memory_format=torch.contiguous_format))
                entry[k] = sharding.like_param(copy, p)
            if MASTER in views:
                entry[MASTER_KEY] = sharding.like_param(
                    views[MASTER].clone(memory_format=torch.contiguous_format), p)
            state[position[id(p)]] = entry
    groups = []
    for group in opt.param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = [position[id(p)] for p in group["params"]]
        if opt.stochastic_rounding:
            packed[SEED_KEY] = opt.seed
        groups.append(packed)
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def loaded_groups(opt, saved_groups: list) -> tuple[list[dict], dict]:
    """The param groups a checkpoint's `param_groups` make (missing keys take the
    optimizer's defaults; a group saved without `param_names` keeps the optimizer's), and
    its parameter index -> (group index, parameter)."""
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                         f"this optimizer has {len(opt.param_groups)}")
    new_groups, by_saved_index = [], {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi}: loaded state dict has "
                             f"{len(saved['params'])} parameters, this optimizer has "
                             f"{len(group['params'])}")
        check_has_lr(opt, saved, f"param group {gi} of the loaded state dict")
        merged = dict(opt.defaults)
        merged.update({k: v for k, v in saved.items() if k not in ("params", SEED_KEY)})
        merged["betas"] = tuple(merged["betas"])
        merged["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            merged["param_names"] = group["param_names"]
        try:
            validate_hyperparameters(merged)
        except ValueError as e:
            raise ValueError(f"param group {gi} of the loaded state dict: {e}") from None
        new_groups.append(merged)
        for saved_index, p in zip(saved["params"], group["params"]):
            by_saved_index[index(saved_index)] = (gi, p)
    return new_groups, by_saved_index


def loaded_seed(saved_groups: list) -> int | None:
    """The stochastic rounding seed a checkpoint's param groups carry (one value, in every
    group that has it), or None when none has it."""
    seeds = set()
    for gi, saved in enumerate(saved_groups):
        if SEED_KEY in saved:
            seed = saved[SEED_KEY]
            seed = seed.item() if isinstance(seed, torch.Tensor) else seed
            check_seed(seed, f"{SEED_KEY} of param group {gi} of the loaded state dict")
            seeds.add(seed)
    if len(seeds) > 1:
        raise ValueError(f"the param groups of the loaded state dict have different "
                         f"{SEED_KEY} values {sorted(seeds)}; the optimizer has one seed")
    return seeds.pop() if seeds else None


def loaded_buckets(opt, saved_state: dict, by_index: dict) -> dict[tuple, Bucket]:
    """New buckets holding the state of a state dict's `state` (with `by_index` mapping
    its keys to (group index, parameter)), their v_sums summed by each device's backend;
    checks everything, changes no state."""
    initial: dict[tuple, list] = defaultdict(list)
    for saved_index, entry in saved_state.items():
        saved_index = index(saved_index)
        if saved_index not in by_index:
            raise ValueError(f"loaded state dict has state for parameter {saved_index}, "
                             f"which is in none of its param groups")
        gi, p = by_index[saved_index]
        initial[(gi, p.device, p.dtype)].append((p, loaded_entry(entry, p, saved_index)))

    for key, items in initial.items():
        plan.check_backend(opt, key[0], items[0][0])
    buckets = {}
    live = numbering(opt)  # the rounding indices number the parameters as state_dict() does
    for key, items in initial.items():
        bucket = buckets[key] = precision.new_bucket(opt, key[1], key[2])
        params = [p for p, _ in items]
        bucket.add(params, [e for _, e in items],
                   precision.first_indices(opt, key[2], live, params))
        opt._backend_for(key[1], key[2]).v_sum(bucket)
    return buckets


def commit(opt, groups: list[dict], buckets: dict[tuple, Bucket],
           seed: int | None = None) -> None:
    """Make `groups` and `buckets` (and, when given and the optimizer rounds
    stochastically, `seed`) the optimizer's. A bucket of the same parameters as one already
    there keeps its buffers (a captured CUDA graph holds their addresses), and the seed
    keeps its tensors."""
    if seed is not None and opt.stochastic_rounding:
        opt._set_seed(seed)
    for key, bucket in buckets.items():
        old = opt._buckets.get(key)
        if old is not None and set(old.position) == set(bucket.position):
            old.copy_(bucket)
            buckets[key] = old
    opt.param_groups[:] = groups
    opt._beta0s.clear()  # the loaded groups' betas are their own
    opt._buckets = buckets
    opt._plan = None
    opt.state = defaultdict(dict)
    for bucket in buckets.values():
        opt._publish_state(bucket)


def loaded_entry(entry: dict, p: torch.Tensor, key) -> dict:
    """One parameter's loaded state, checked, as Bucket.add takes it (tensors of the state
    dtype on the parameter's device, shaped as its local shard)."""
    missing = [k for k in STATE_KEYS if k not in entry]
    if missing:
        raise ValueError(f"loaded state of parameter {key} lacks {', '.join(missing)}")
    step = entry["step"]
    step = float(step.item() if isinstance(step, torch.Tensor) else step)
    if not (step >= 0 and step == int(step)):
        raise ValueError(f"loaded state of parameter {key}: step must be an integer "
                         f">= 0, got {step}")
    out = {"step": step, **{k: _loaded_buffer(entry[k], k, p, key) for k in BUFFER_KEYS}}
    if entry.get(MASTER_KEY) is not None:  # absent: the master is made from the parameter
        out[MASTER_KEY] = _loaded_buffer(entry[MASTER_KEY], MASTER_KEY, p, key)
    return out


def _loaded_buffer(t, name: str, p: torch.Tensor, key) -> torch.Tensor:
    """A loaded exp_avg / exp_avg_sq / beta1_prod / master_param of parameter `p` (state-dict
    index `key`), checked against the parameter (sharded as it is, of its shape, floating
    point)."""
    if sharding.is_dtensor(t) and sharding.is_dtensor(p):
        if t.placements != p.placements or t.shape != p.shape:
            raise ValueError(f"loaded state of parameter {key}: {name} is sharded as "
                             f"{t.placements} {tuple(t.shape)}, the parameter as "
                             f"{p.placements} {tuple(p.shape)}")
        t = t.to_local()
    lp = sharding.local(p)
    if not isinstance(t, torch.Tensor) or t.shape != lp.shape:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"loaded state of parameter {key}: {name} has shape {shape}, "
                         f"the parameter has shape {tuple(lp.shape)}")
    if t.is_complex() or not t.is_floating_point():
        raise ValueError(f"loaded state of parameter {key}: {name} is {t.dtype}")
    return t.to(device=lp.device, dtype=state_dtype(p.dtype))
