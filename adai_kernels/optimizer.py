"""Adai, AdaiW and AdaiV2: hyper-parameters, groups, validation and the state-dict contract.
The arithmetic lives in the backends; this file only decides what they are given."""
from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict

import torch
from torch.optim.optimizer import Optimizer, required

from . import backends
from . import sharding
from .buckets import Bucket, is_dense, state_strides
from .backends.base import GRAD_NORM_SQ, STATS_COLUMNS
from .work import Control, Work

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "beta1_prod")


def _check_number(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({what})")


def _check_lr(lr) -> None:
    """A number, or a tensor of one element (the kernels read it on the device)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a tensor of shape {tuple(lr.shape)} (a tensor lr "
                             f"must have exactly one element)")
        value = lr.item()
    else:
        value = lr
    _check_number("lr", lr, isinstance(value, (int, float)) and math.isfinite(value)
                  and value >= 0, "must be a finite number >= 0")


def validate_hyperparameters(group: dict) -> None:
    """Raise ValueError naming the first bad hyper-parameter of `group`. An lr left
    `required` (the defaults, when every group gives its own) is not a value to check."""
    if group["lr"] is not required:
        _check_lr(group["lr"])
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta0, beta2))")
    beta0, beta2 = betas
    _check_number("beta0 (betas[0])", beta0, isinstance(beta0, (int, float)) and beta0 >= 0,
                  "must be >= 0")
    _check_number("beta2 (betas[1])", beta2,
                  isinstance(beta2, (int, float)) and 0.0 <= beta2 < 1.0, "must be in [0, 1)")
    eps = group["eps"]
    _check_number("eps", eps, isinstance(eps, (int, float)) and eps >= 0, "must be >= 0")
    wd = group["weight_decay"]
    _check_number("weight_decay", wd, isinstance(wd, (int, float)) and wd >= 0, "must be >= 0")
    d = group["dampening"]
    _check_number("dampening", d, isinstance(d, (int, float)) and 0.0 <= d <= 1.0,
                  "must be in [0, 1]")
    for name in ("decoupled", "capturable"):
        if not isinstance(group.get(name, False), bool):
            raise ValueError(f"Invalid {name}: {group[name]!r} (must be a bool)")
    for name in ("eps", "weight_decay", "dampening"):
        value = group[name]
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be finite)")


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _index(key) -> int | str:
    """A parameter index of a state dict; checkpoint libraries may hand it back as a str or a
    0-dim tensor (torch.distributed.checkpoint does)."""
    try:
        return int(key)
    except (TypeError, ValueError):
        return key


class Adai(Optimizer):
    r"""Adai: Adaptive Inertia (Xie et al., ICML 2022, arXiv 2006.15815).

    SGD whose momentum coefficient adapts per element: coordinates with a large recent squared
    gradient (relative to the mean over the whole model) get little inertia.

    Args:
        params: parameters or param groups.
        lr: learning rate (as for SGD with momentum, about 10x SGD-M's): a number, or a tensor
            of one element (see capturable). Required unless every param group gives its own.
        betas: (beta0, beta2): inertia scale and second-moment decay. Default (0.1, 0.99).
        eps: bound on the inertia, beta1 <= 1 - eps. Default 1e-3.
        weight_decay: decay coefficient. Default 0.
        decoupled: decoupled (AdaiW) instead of L2 weight decay. Default False.
        dampening: d in [0, 1]; 1 is Adai, < 1 is AdaiV2. Default 1.
        backend: "auto", "cuda", "triton", "cpu" or "reference". "auto" (or the environment
            variable ADAI_BACKEND) picks the fastest backend available for each device.
        max_grad_norm: clip the global gradient norm (over every parameter of every group, as
            torch.nn.utils.clip_grad_norm_) inside the step; the gradients are not modified.
            A non-finite norm skips the step. `grad_norm` holds the norm before clipping.
        skip_nonfinite: skip the whole step (parameters, states and step counters unchanged)
            when a gradient is inf or NaN. Off by default: as in the reference code, a
            non-finite gradient then propagates into the parameters it touches.
        process_group: when parameters are sharded across processes (ZeRO-style), the group
            whose sum makes the global statistics; one all-reduce of a few scalars per step.
        capturable: allow step() to be captured in a CUDA graph (torch.cuda.graph) and
            replayed. Step counters always live on the device; to change the learning rate
            between replays give `lr` as a 0-dim tensor on the parameters' device (LR
            schedulers update a tensor lr in place). Run at least one eager step first: state
            is created at a parameter's first step, which a graph cannot replay. A graph
            keeps the tensors it captured; load_state_dict copies into them when the same
            parameters have state, but when a new parameter gets its first gradient,
            capture again.

    With torch.amp.GradScaler, gradients are unscaled inside the step and a step with inf/NaN
    gradients is skipped, without a device-to-host synchronisation.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=required, betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0,
                 decoupled=False, dampening=1.0, *, backend: str = "auto",
                 max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 process_group=None, capturable: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled=decoupled, dampening=dampening, capturable=capturable)
        validate_hyperparameters(defaults)
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and math.isfinite(max_grad_norm)
                                              and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be a finite "
                             f"number > 0, or None)")
        backends.check_name(backend)
        self._set_options(backend, max_grad_norm, skip_nonfinite, process_group)
        super().__init__(params, defaults)  # add_param_group checks each group's backend

    def _set_options(self, backend, max_grad_norm, skip_nonfinite, process_group) -> None:
        """The keyword options (already checked), and no run-time structures yet: buckets
        come with the first gradients or with loaded state, backends with each device."""
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.process_group = process_group
        self._requested_backend = backend
        self._last_stats: list[torch.Tensor] = []
        self._mesh_group = None  # the DTensor parameters' group, found at step time
        self._plan = None  # the last step's work lists, reused while they still fit
        self._backends: dict[torch.device, backends.Backend] = {}
        self._buckets: dict[tuple, Bucket] = {}
        self._beta0s: dict[int, float] = {}  # id(group) -> its beta0 at the last step
        self._warned_beta0 = False

    def _options(self) -> dict:
        """The keyword options as the constructor takes them (capturable is a group's)."""
        return dict(backend=self._requested_backend, max_grad_norm=self.max_grad_norm,
                    skip_nonfinite=self.skip_nonfinite, process_group=self.process_group)

    def __repr__(self) -> str:
        # torch's text lists each group's settings (capturable among them); the keyword
        # options are the optimizer's, with the backend that runs it rather than "auto"
        options = {**self._options(), "backend": self.backend}
        lines = "".join(f"    {k}: {v}\n" for k, v in options.items())
        return f"{super().__repr__()[:-1]}\nOptions\n{lines})"

    # -- copies -----------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """What copy.deepcopy and pickle keep: torch's defaults and param_groups, the state as
        state_dict() packs it (per-parameter copies, not the buckets' buffers), the keyword
        options and the last step's statistics (grad_norm). Hooks are not kept, as in
        torch.optim. The `required` lr is left out: a copy would not be that singleton."""
        return {"defaults": {k: v for k, v in self.defaults.items() if v is not required},
                "param_groups": self.param_groups, "state": self._pack_state()["state"],
                "options": self._options(), "last_stats": self._last_stats}

    def __setstate__(self, state: dict) -> None:
        """Rebuild what __getstate__ kept: each device's backend (one that cannot run here
        fails now) and the buckets, built from the state as load_state_dict builds them, so
        a copy steps on the original's trajectory."""
        super().__setstate__({"defaults": {"lr": required, **state["defaults"]},
                              "param_groups": state["param_groups"],
                              "state": defaultdict(dict)})
        self.defaults.pop("differentiable", None)  # torch's __setstate__ adds it; Adai has none
        self._set_options(**state["options"])
        self._last_stats = state["last_stats"]
        for group in self.param_groups:
            for device in dict.fromkeys(p.device for p in group["params"]):
                self._backend_for(device)
        self._commit(self.param_groups, self._loaded_buckets(state["state"], self._numbering()))

    def __deepcopy__(self, memo: dict) -> "Adai":
        # A process group is this process's handle on its peers and cannot be copied: the
        # copy reduces over the same one. (Pickling refuses it, as it refuses a ProcessGroup.)
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    # -- groups -----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):  # torch's TypeError says what else it must be
            self._check_has_lr(param_group, f"param group {len(self.param_groups)}")
        self._plan = None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        try:
            validate_hyperparameters(group)
            for device in {p.device for p in group["params"]}:
                self._backend_for(device)  # an explicit backend that cannot run fails here
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    def _check_has_lr(self, group: dict, where: str) -> None:
        """lr may be left out of the constructor when every group gives its own."""
        if "lr" not in group and self.defaults["lr"] is required:
            name = type(self).__name__
            raise ValueError(f"{where} has no lr and {name}() was given no default lr (give "
                             f"lr= to {name}() or an 'lr' to every param group)")

    # -- backends ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend that steps this optimizer's parameters (of the first device
        when parameters live on several)."""
        if not self._backends:
            return backends.resolve(self._requested_backend, torch.device("cpu")).name
        return next(iter(self._backends.values())).name

    def _backend_for(self, device: torch.device) -> backends.Backend:
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = backends.resolve(self._requested_backend, device)
        return backend

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One Adai step of every parameter that has a gradient (docs/design.md, "Two phases,
        two calls").

        Phase 1 advances each such parameter's step counter and sums its statistics: the
        second-moment sums and the squared gradient norm. From them, on the device, come the
        global mean vbar of the bias-corrected second moment (over every group, device and,
        with process_group or sharded DTensor parameters, process) and, with max_grad_norm,
        the clip coefficient. Phase 2 makes one pass over every element: weight decay, the
        second moment, the adaptive inertia beta1 = clamp(1 - beta0 * vhat / vbar, 0,
        1 - eps) (see AdaiV2 for d < 1), beta1_prod, the momentum and the parameter.
        Parameters without a gradient are not touched and do not count in vbar. The step is
        skipped (only the step counters are taken back) when GradScaler found inf/NaN, or
        when the gradient norm is not finite and skip_nonfinite or max_grad_norm is set.
        Nothing returns to the host.

        The first step, and any step whose parameters with gradients, dtypes or layouts
        changed, checks every gradient (sparse, complex, dtype, device: a RuntimeError naming
        the parameter, before anything changes) and creates the state of parameters that
        have none; other steps reuse that plan.

        Each device's parameters are stepped by the backend the `backend` option names; with
        "auto" (or ADAI_BACKEND) the CUDA kernels on CUDA (else Triton, else the reference
        backend), the C++ kernels on CPU (else the reference backend), the reference backend
        elsewhere. The `backend` property tells which one runs.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it
                runs with gradients enabled, before the step.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._watch_beta0()
        capturing = _capturing()
        if capturing:
            self._check_capture()
        works = self._prepare(capturing)
        if not works:
            return loss

        by_device: dict[torch.device, list[Work]] = defaultdict(list)
        for w in works:
            by_device[w.device].append(w)
        controls = {device: self._control(device) for device in by_device}
        stats = {}
        for device, ws in by_device.items():
            rows = torch.empty(len(ws), STATS_COLUMNS, dtype=torch.float64, device=device)
            backend = self._backends[device]
            for i, w in enumerate(ws):
                backend.stats(w, rows[i], controls[device])
            stats[device] = rows
        stats = self._global_stats(stats)
        self._last_stats = list(stats.values())[:1]
        for device, ws in by_device.items():
            backend = self._backends[device]
            for w in ws:
                backend.update(w, stats[device], controls[device])
                for param, stand_in in w.write_back:
                    param.copy_(stand_in)
        return loss

    def _watch_beta0(self) -> None:
        """Warn once when a group's beta0 changes between steps to a value above 0.5: that is
        what OneCycleLR and CyclicLR do with cycle_momentum=True (their default), taking
        betas[0] for Adam's momentum and cycling it near 0.9, where Adai's inertia scale
        (default 0.1) leaves almost no inertia to adapt."""
        for i, group in enumerate(self.param_groups):
            beta0 = group["betas"][0]
            before = self._beta0s.get(id(group), beta0)
            self._beta0s[id(group)] = beta0
            if beta0 != before and beta0 > 0.5 and not self._warned_beta0:
                self._warned_beta0 = True
                warnings.warn(
                    f"{type(self).__name__}: betas[0] of param group {i} changed from {before:g} "
                    f"to {beta0:g} between steps. Adai's beta0 is its inertia scale (default "
                    f"0.1), not a momentum: if a scheduler such as OneCycleLR or CyclicLR set it, "
                    f"give that scheduler cycle_momentum=False.", stacklevel=3)

    def _control(self, device: torch.device) -> Control:
        """This step's shared inputs on `device`: GradScaler sets `grad_scale` and `found_inf`
        on the optimizer just for the call to step()."""
        def here(t):
            return None if t is None else t.to(device=device, dtype=torch.float32).reshape(())
        return Control(grad_scale=here(getattr(self, "grad_scale", None)),
                       found_inf=here(getattr(self, "found_inf", None)),
                       max_grad_norm=self.max_grad_norm, skip_nonfinite=self.skip_nonfinite)

    def _global_stats(self, stats: dict) -> dict:
        """Make every device's statistics global: one row per bucket on a single device in a
        single process; otherwise the column sums, added across devices and all-reduced over
        the process group (still no host synchronisation)."""
        group = self.process_group if self.process_group is not None else self._mesh_group
        if len(stats) == 1 and group is None:
            return stats
        first = next(iter(stats))
        total = sum(rows.sum(0, keepdim=True).to(first) for rows in stats.values())
        if group is not None:
            import torch.distributed as dist
            dist.all_reduce(total, group=group)
        return {device: total.to(device) for device in stats}

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm (after unscaling, before clipping) of the last step, as a
        0-dim float64 tensor on the device; None before the first step."""
        if not self._last_stats:
            return None
        return self._last_stats[0][:, GRAD_NORM_SQ].sum().sqrt()

    def _check_capture(self) -> None:
        """A step being captured in a CUDA graph: every stepped group must allow it, and
        every tensor the graph reads must be on the device (a copy from the host would be
        captured as a read of host memory that does not survive the step)."""
        for gi, group in enumerate(self.param_groups):
            stepped = [p for p in group["params"] if p.grad is not None]
            if not stepped:
                continue
            if not group["capturable"]:
                raise RuntimeError(f"{type(self).__name__}.step() is being captured in a CUDA "
                                   f"graph but param group {gi} has capturable=False; "
                                   f"construct the optimizer with capturable=True")
            lr = group["lr"]
            for p in stepped:
                if p.device.type != "cuda":
                    raise RuntimeError(f"{type(self).__name__}.step() is being captured in a "
                                       f"CUDA graph but param group {gi} has a parameter on "
                                       f"{p.device}")
                if isinstance(lr, torch.Tensor) and lr.device != p.device:
                    raise RuntimeError(f"param group {gi}: a captured step needs lr on the "
                                       f"parameters' device {p.device}, not {lr.device}")

    def _prepare(self, capturing: bool = False) -> list[Work]:
        """Check every gradient, then give new parameters state and build the per-bucket
        work lists. Nothing is modified until every check has passed."""
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        works = self._replay_plan(grads)
        if works is None:
            works = self._plan_step(grads, capturing)
        return works

    def _replay_plan(self, grads: list) -> list[Work] | None:
        """The hot path: the same parameters have gradients as in the step the plan was made
        for, so every list but the gradients is reused; the gradients only need the checks
        that the plan's layouts still hold (else None: plan anew, with full checks)."""
        plan = self._plan
        if plan is None or plan[0] != tuple(g is None for g in grads):
            return None
        works = []
        for template, positions, strides in plan[1]:
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
            works.append(Work(template.group, device, dtype, template.params, gs,
                              template.exp_avg, template.exp_avg_sq, template.beta1_prod,
                              template.steps, template.v_sums, template.bucket,
                              template.segments))
        return works

    def _plan_step(self, grads: list, capturing: bool = False) -> list[Work]:
        selected = []  # (group index, flat index, param, grad)
        flat = 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = grads[flat]
                if g is not None:
                    self._check_param(p, g, gi, pi)
                    selected.append((gi, flat, p, g))
                flat += 1
        for device in {p.device for _, _, p, _ in selected}:
            self._backend_for(device)
        if self.process_group is None:
            self._mesh_group = sharding.reduce_group([p for _, _, p, _ in selected])

        joining: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for gi, _, p, _ in selected:
            key = (gi, p.device, p.dtype)
            bucket = self._buckets.get(key)
            if bucket is None or p not in bucket:
                joining[key].append(p)
        if capturing and joining:
            p = next(iter(joining.values()))[0]
            gi = next(key[0] for key in joining)
            pi = next(i for i, q in enumerate(self.param_groups[gi]["params"]) if q is p)
            raise RuntimeError(f"parameter {pi} of param group {gi} (shape {tuple(p.shape)}) "
                               f"has no optimizer state yet, and creating it cannot be "
                               f"captured in a CUDA graph: run at least one eager step "
                               f"before capturing")
        for key, params in joining.items():
            bucket = self._buckets.setdefault(key, Bucket(key[1], key[2]))
            bucket.add(params)
            self._publish_state(bucket)

        works: dict[tuple, Work] = {}
        positions: dict[tuple, list[int]] = defaultdict(list)
        members: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # as the buckets key them
        replayable = True  # no stand-ins, no copied gradients, no DTensors
        for gi, index, p, g in selected:
            key = (gi, p.device, p.dtype)
            w = works.get(key)
            if w is None:
                w = works[key] = Work(self.param_groups[gi], p.device, p.dtype,
                                      bucket=self._buckets[key])
            members[key].append(p)
            views = self._buckets[key].state_of(p)
            replayable &= not sharding.is_dtensor(p)
            p, g = sharding.local(p), sharding.local(g)
            dense_p = p if is_dense(p) else p.contiguous()
            if dense_p is not p:
                w.write_back.append((p, dense_p))
                replayable = False
            if g.stride() != dense_p.stride():
                g = torch.empty_strided(p.shape, state_strides(p), dtype=g.dtype,
                                        device=g.device).copy_(g)
                replayable = False
            w.params.append(dense_p)
            w.grads.append(g)
            positions[key].append(index)
            for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                getattr(w, k).append(views[k])
            w.steps.append(views["step"])
            w.v_sums.append(views["v_sum"])
        for key, w in works.items():
            w.segments = w.bucket.segments(members[key])
        self._plan = None
        if replayable:  # the templates hold no gradients: they must not keep them alive
            self._plan = (tuple(g is None for g in grads),
                          [(Work(w.group, w.device, w.dtype, w.params, [], w.exp_avg,
                                 w.exp_avg_sq, w.beta1_prod, w.steps, w.v_sums, w.bucket,
                                 w.segments),
                            positions[key],
                            [None if p.is_contiguous() else p.stride() for p in w.params])
                           for key, w in works.items()])
        return list(works.values())

    @staticmethod
    def _check_param(p: torch.Tensor, g: torch.Tensor, gi: int, pi: int) -> None:
        where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
        if g.is_sparse:
            raise RuntimeError(f"Adai does not support sparse gradients: {where}")
        if p.is_complex():
            raise RuntimeError(f"Adai does not support complex parameters: {where} is {p.dtype}")
        if p.dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(f"Adai supports float32, bfloat16 and float16 parameters: "
                               f"{where} is {p.dtype}")
        if g.dtype != p.dtype:
            raise RuntimeError(f"gradient of {where} is {g.dtype}, expected {p.dtype}")
        if g.device != p.device:
            raise RuntimeError(f"gradient of {where} is on {g.device}, expected {p.device}")

    def _publish_state(self, bucket: Bucket) -> None:
        """Point self.state[p] (what users and torch.optim see) at the bucket's views."""
        for p in bucket.params:
            views = bucket.state_of(p)
            self.state[p] = {k: views[k] for k in STATE_KEYS}

    # -- state dict -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The authors' format: per parameter index, `step` (int), `exp_avg`, `exp_avg_sq`,
        `beta1_prod` (float32, the parameter's shape); copies, never views of a bucket.

        Hooks run as in torch.optim: those registered with register_state_dict_pre_hook
        before, then those of register_state_dict_post_hook, each given the dict the previous
        one returned (a hook that returns None keeps it)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._pack_state()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _numbering(self) -> dict[int, tuple[int, torch.Tensor]]:
        """The state dict's parameter index -> (group index, parameter): the parameters in
        group order, each numbered once."""
        index, numbering = {}, {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in index:
                    index[id(p)] = len(index)
                    numbering[index[id(p)]] = (gi, p)
        return numbering

    def _pack_state(self) -> dict:
        steps = {}
        for bucket in self._buckets.values():
            for p, k in zip(bucket.params, bucket.steps_list()):
                steps[id(p)] = k
        index = {id(p): i for i, (_, p) in self._numbering().items()}
        state = {}
        for bucket in self._buckets.values():
            for p in bucket.params:
                views = bucket.state_of(p)
                entry = {"step": steps[id(p)]}
                for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                    entry[k] = sharding.like_param(
                        views[k].clone(memory_format=torch.contiguous_format), p)
                state[index[id(p)]] = entry
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of this optimizer or of the authors' `Adai` (missing group keys
        take this optimizer's defaults; a group saved without `param_names` keeps this
        optimizer's). On any error the optimizer is left as it was.

        Hooks run as in torch.optim: those registered with register_load_state_dict_pre_hook
        first, each given a shallow copy of `state_dict` (or what the previous one returned)
        to edit or replace; those of register_load_state_dict_post_hook after the load."""
        state_dict = state_dict.copy()  # a hook may set keys: the caller's dict keeps its own
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict must have 'state' (dict) and 'param_groups' (list)")
        groups, by_saved_index = self._loaded_groups(saved_groups)
        self._commit(groups, self._loaded_buckets(saved_state, by_saved_index))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_groups(self, saved_groups: list) -> tuple[list[dict], dict]:
        """The param groups a checkpoint's `param_groups` make, and its parameter index ->
        (group index, parameter)."""
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        new_groups, by_saved_index = [], {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi}: loaded state dict has "
                                 f"{len(saved['params'])} parameters, this optimizer has "
                                 f"{len(group['params'])}")
            self._check_has_lr(saved, f"param group {gi} of the loaded state dict")
            merged = dict(self.defaults)
            merged.update({k: v for k, v in saved.items() if k != "params"})
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
                by_saved_index[_index(saved_index)] = (gi, p)
        return new_groups, by_saved_index

    def _loaded_buckets(self, saved_state: dict, by_index: dict) -> dict[tuple, Bucket]:
        """New buckets holding the state of a state dict's `state` (with `by_index` mapping
        its keys to (group index, parameter)); checks everything, changes no state."""
        initial: dict[tuple, list] = defaultdict(list)
        for saved_index, entry in saved_state.items():
            saved_index = _index(saved_index)
            if saved_index not in by_index:
                raise ValueError(f"loaded state dict has state for parameter {saved_index}, "
                                 f"which is in none of its param groups")
            gi, p = by_index[saved_index]
            initial[(gi, p.device, p.dtype)].append((p, self._loaded_entry(entry, p, saved_index)))

        for device in {key[1] for key in initial}:
            self._backend_for(device)
        buckets = {}
        for key, items in initial.items():
            bucket = buckets[key] = Bucket(key[1], key[2])
            bucket.add([p for p, _ in items], [e for _, e in items])
            self._backend_for(key[1]).v_sum(bucket)
        return buckets

    def _commit(self, groups: list[dict], buckets: dict[tuple, Bucket]) -> None:
        """Make `groups` and `buckets` the optimizer's. A bucket of the same parameters as
        one already here keeps its buffers (a captured CUDA graph holds their addresses)."""
        for key, bucket in buckets.items():
            old = self._buckets.get(key)
            if old is not None and set(old.position) == set(bucket.position):
                old.copy_(bucket)
                buckets[key] = old
        self.param_groups[:] = groups
        self._beta0s.clear()  # the loaded groups' betas are their own
        self._buckets = buckets
        self._plan = None
        self.state = defaultdict(dict)
        for bucket in buckets.values():
            self._publish_state(bucket)

    @staticmethod
    def _loaded_entry(entry: dict, p: torch.Tensor, index) -> dict:
        missing = [k for k in STATE_KEYS if k not in entry]
        if missing:
            raise ValueError(f"loaded state of parameter {index} lacks {', '.join(missing)}")
        step = entry["step"]
        step = float(step.item() if isinstance(step, torch.Tensor) else step)
        if not (step >= 0 and step == int(step)):
            raise ValueError(f"loaded state of parameter {index}: step must be an integer "
                             f">= 0, got {step}")
        out = {"step": step}
        for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
            t = entry[k]
            if sharding.is_dtensor(t) and sharding.is_dtensor(p):
                if t.placements != p.placements or t.shape != p.shape:
                    raise ValueError(f"loaded state of parameter {index}: {k} is sharded as "
                                     f"{t.placements} {tuple(t.shape)}, the parameter as "
                                     f"{p.placements} {tuple(p.shape)}")
                t = t.to_local()
            lp = sharding.local(p)
            if not isinstance(t, torch.Tensor) or t.shape != lp.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"loaded state of parameter {index}: {k} has shape {shape}, "
                                 f"the parameter has shape {tuple(lp.shape)}")
            if t.is_complex() or not t.is_floating_point():
                raise ValueError(f"loaded state of parameter {index}: {k} is {t.dtype}")
            out[k] = t.to(device=lp.device, dtype=torch.float32)
        return out


class AdaiW(Adai):
    r"""AdaiW: Adai with decoupled weight decay, ``Adai(..., decoupled=True)``.

    Each step first shrinks every parameter that has a gradient,
    theta <- theta * (1 - lr * weight_decay), and then takes the Adai step with the gradient
    as it is. Adai's default L2 decay instead adds weight_decay * theta to the gradient, so
    the decay also enters the second moment and, through it, the inertia.

    Args:
        params, lr, betas, eps: as for Adai.
        weight_decay: decoupled decay coefficient. Default 0.
        dampening: d in [0, 1], as for Adai (1: Adai's update, < 1: AdaiV2's). Default 1.
        **options: Adai's keyword-only options (backend, max_grad_norm, skip_nonfinite,
            process_group, capturable).
    """

    def __init__(self, params, lr=required, betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0,
                 dampening=1.0, **options):
        super().__init__(params, lr, betas, eps, weight_decay, True, dampening, **options)


class AdaiV2(Adai):
    r"""AdaiV2, the authors' variant with a dampening d in [0, 1] of the momentum.

    With vhat / vbar an element's bias-corrected second moment relative to the global mean:

        beta1 = clamp(1 - beta0 * (vhat / vbar)^(1 / (3 - 2d)), 0, 1 - eps)
        m <- beta1 * m + (1 - beta1)^d * g
        theta <- theta - lr * beta0^(1 - d) * m / (1 - beta1_prod)

    d = 1 is Adai's update. As in the authors' code, weight decay is decoupled by default.
    With d < 1 the vectorised CPU kernels evaluate the two powers with their own
    polynomials, so CPU and CUDA results differ in the last bits (docs/design.md).

    Args:
        params, lr, betas, eps: as for Adai.
        weight_decay: decay coefficient. Default 0.
        dampening: d. Default 1.
        decoupled: decoupled (AdaiW) instead of L2 weight decay. Default True.
        **options: Adai's keyword-only options (backend, max_grad_norm, skip_nonfinite,
            process_group, capturable).
    """

    def __init__(self, params, lr=required, betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0,
                 dampening=1.0, decoupled=True, **options):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled, dampening, **options)
