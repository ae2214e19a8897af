"""Adai, AdaiW and AdaiV2: the torch.optim contract (constructor, param groups, copies, state
dicts and their hooks, step). The step's parts live next door: the checks of the options in
validation.py, the planning of a step in plan.py, checkpoints in checkpoint.py, and the
arithmetic in the backends."""
from __future__ import annotations

import copy
import warnings
from collections import defaultdict

import torch
from torch.optim.optimizer import Optimizer, required

from . import backends, checkpoint, elision, plan, precision
from .backends.base import GRAD_NORM_SQ, STATS_COLUMNS
from .buckets import MASTER, Bucket
from .checkpoint import MASTER_KEY, STATE_KEYS
from .validation import (check_has_lr, check_max_grad_norm, check_precision_options,
                         validate_hyperparameters)
from .work import Control, Work


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
            variable ADAI_BACKEND) picks the fastest backend available for each device and
            parameter dtype. An explicit backend that does not step a dtype (float64 on
            CUDA, say) fails at the first step meeting such a parameter.
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
        master_weights: keep an fp32 copy of every bfloat16 / float16 parameter (created
            from the parameter at its first step): the step reads and writes the copy and
            writes the parameter as the copy rounded to nearest, so the weights follow an
            fp32 run. The state gains `master_param` (4 bytes per element). The copy is the
            weights the optimizer steps: a parameter changed by hand is overwritten by its
            copy at the next step (load the optimizer's state after the model's, or give the
            optimizer a checkpoint without `master_param`). float32 parameters ignore it.
        stochastic_rounding: round each step's fp32 result into a bfloat16 parameter
            stochastically (up with probability the dropped fraction of an ulp) instead of
            to nearest, so that updates smaller than half an ulp move the weights on
            average; reproducible from `seed`, and a sharded run rounds as an unsharded one.
            Not with master_weights; float16 parameters are refused; float32 ignore it.
        seed: the stochastic rounding seed, an int in [0, 2**32). Saved in every param group
            of the state dict as `rounding_seed` (when stochastic_rounding is on) and set by
            loading one.

    Parameters may be float32, bfloat16, float16 (float32 state) or float64 (float64 state
    and math, as torch's own optimizers; stepped by the reference backend where the
    device's kernels do not take float64).

    With torch.amp.GradScaler, gradients are unscaled inside the step and a step with inf/NaN
    gradients is skipped, without a device-to-host synchronisation.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=required, betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0,
                 decoupled=False, dampening=1.0, *, backend: str = "auto",
                 max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 process_group=None, capturable: bool = False, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0,
                 _elide_beta1_prod: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled=decoupled, dampening=dampening, capturable=capturable)
        validate_hyperparameters(defaults)
        check_max_grad_norm(max_grad_norm)
        check_precision_options(master_weights, stochastic_rounding, seed)
        backends.check_name(backend)
        self._set_options(backend, max_grad_norm, skip_nonfinite, process_group,
                          master_weights, stochastic_rounding, seed,
                          _elide_beta1_prod=bool(_elide_beta1_prod))
        super().__init__(params, defaults)  # add_param_group checks each group's backend

    def _set_options(self, backend, max_grad_norm, skip_nonfinite, process_group,
                     master_weights=False, stochastic_rounding=False, seed=0,
                     _elide_beta1_prod=True) -> None:
        """The keyword options (already checked), and no run-time structures yet: buckets
        come with the first gradients or with loaded state, backends with each device.
        `_elide_beta1_prod=False` (not public) turns the beta1_prod elision off, for tests
        that compare it with the full path."""
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.process_group = process_group
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self._seeds: dict[torch.device, torch.Tensor] = {}  # the seed on each device
        self._requested_backend = backend
        self._elide_beta1_prod = _elide_beta1_prod
        self._last_stats: list[torch.Tensor] = []
        self._mesh_group = None  # the DTensor parameters' group, found at step time
        self._plan = None  # the last step's work lists, reused while they still fit
        self._backends: dict[torch.device, backends.Backend] = {}
        # (device, dtype) -> the backend of the dtypes the device's backend refuses
        self._dtype_backends: dict[tuple, backends.Backend] = {}
        self._buckets: dict[tuple, Bucket] = {}
        self._beta0s: dict[int, float] = {}  # id(group) -> its beta0 at the last step
        self._warned_beta0 = False

    def _options(self) -> dict:
        """The keyword options as the constructor takes them (capturable is a group's)."""
        return dict(backend=self._requested_backend, max_grad_norm=self.max_grad_norm,
                    skip_nonfinite=self.skip_nonfinite, process_group=self.process_group,
                    master_weights=self.master_weights,
                    stochastic_rounding=self.stochastic_rounding, seed=self.seed,
                    _elide_beta1_prod=self._elide_beta1_prod)

    def __repr__(self) -> str:
        # torch's text lists each group's settings (capturable among them); the keyword
        # options are the optimizer's, with the backend that runs it rather than "auto"
        options = {**self._options(), "backend": self.backend}
        lines = "".join(f"    {k}: {v}\n" for k, v in options.items() if not k.startswith("_"))
        return f"{super().__repr__()[:-1]}\nOptions\n{lines})"

    # -- copies -----------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """What copy.deepcopy and pickle keep: torch's defaults and param_groups, the state as
        state_dict() packs it (per-parameter copies, not the buckets' buffers), the keyword
        options and the last step's statistics (grad_norm). Hooks are not kept, as in
        torch.optim. The `required` lr is left out: a copy would not be that singleton."""
        return {"defaults": {k: v for k, v in self.defaults.items() if v is not required},
                "param_groups": self.param_groups, "state": checkpoint.pack_state(self)["state"],
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
        checkpoint.commit(self, self.param_groups,
                          checkpoint.loaded_buckets(self, state["state"],
                                                    checkpoint.numbering(self)))

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
            check_has_lr(self, param_group, f"param group {len(self.param_groups)}")
        self._plan = None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        try:
            validate_hyperparameters(group)
            for device in {p.device for p in group["params"]}:
                self._backend_for(device)  # an explicit backend that cannot run fails here
            precision.check_group(self, group, len(self.param_groups) - 1)
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    # -- backends ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend that steps this optimizer's parameters (of the first device
        when parameters live on several; with "auto", float64 parameters may be stepped by
        another one when the device's does not take float64)."""
        if not self._backends:
            return backends.resolve(self._requested_backend, torch.device("cpu")).name
        return next(iter(self._backends.values())).name

    def _backend_for(self, device: torch.device,
                     dtype: torch.dtype | None = None) -> backends.Backend:
        """The backend of `device` or, given `dtype`, of its parameters of that dtype: the
        device's own when it supports the dtype, else (with "auto") the fastest one that
        does; an explicit backend that refuses the dtype raises RuntimeError."""
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = backends.resolve(self._requested_backend, device)
        if dtype is None or backend.unsupported(dtype) is None:
            return backend
        key = (device, dtype)
        if key not in self._dtype_backends:
            self._dtype_backends[key] = backends.resolve(self._requested_backend, device, dtype)
        return self._dtype_backends[key]

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
        capturing = plan.capturing()
        if capturing:
            plan.check_capture(self)
        works = plan.prepare(self, capturing)
        if not works:
            return loss
        by_device: dict[torch.device, list[Work]] = defaultdict(list)
        for w in works:
            by_device[w.device].append(w)
        controls = {device: self._control(device) for device in by_device}
        stats = self._global_stats(self._local_stats(by_device, controls))
        self._last_stats = list(stats.values())[:1]
        self._update(by_device, stats, controls)
        self._free_done_beta1_prods(works)
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
                       max_grad_norm=self.max_grad_norm, skip_nonfinite=self.skip_nonfinite,
                       rounding_seed=self._seed_on(device))

    def _seed_on(self, device: torch.device) -> torch.Tensor | None:
        """With stochastic_rounding, the seed as the kernels read it: an int64 tensor on
        `device`, made once (a fill, not a copy from the host) and kept, so that a captured
        graph reads it and a loaded seed reaches the graph (_set_seed fills it)."""
        if not self.stochastic_rounding:
            return None
        seed = self._seeds.get(device)
        if seed is None:
            seed = self._seeds[device] = torch.full((), self.seed, dtype=torch.int64,
                                                    device=device)
        return seed

    def _set_seed(self, seed: int) -> None:
        self.seed = seed
        for t in self._seeds.values():
            t.fill_(seed)

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

    def _local_stats(self, by_device: dict, controls: dict) -> dict:
        """Phase 1 on every device: one statistics row per bucket, a matrix per device."""
        stats = {}
        for device, ws in by_device.items():
            rows = torch.empty(len(ws), STATS_COLUMNS, dtype=torch.float64, device=device)
            for i, w in enumerate(ws):
                self._backend_for(device, w.dtype).stats(w, rows[i], controls[device])
            stats[device] = rows
        return stats

    def _update(self, by_device: dict, stats: dict, controls: dict) -> None:
        """Phase 2 on every device; then the dense stand-ins are copied into their
        parameters."""
        for device, ws in by_device.items():
            for w in ws:
                self._backend_for(device, w.dtype).update(w, stats[device], controls[device])
                for param, stand_in in w.write_back:
                    param.copy_(stand_in)

    def _free_done_beta1_prods(self, works: list[Work]) -> None:
        """Give back the beta1_prod buffer of each stepped bucket whose parameters are all
        done (adai_kernels/elision.py), found out without a host synchronisation; never
        for a capturable group (a graph holds the buffer's address). The plan's lists hold
        views of the buffer: the next step plans anew."""
        for w in works:
            if not self._backend_for(w.device, w.dtype).elides_beta1_prod:
                continue
            if elision.ready_to_free(w.bucket, w.group["capturable"]):
                w.bucket.free_beta1_prod()
                self._publish_state(w.bucket)
                self._plan = None

    def _new_bucket(self, key: tuple) -> Bucket:
        """An empty bucket for `key` = (group index, device, parameter dtype)."""
        return Bucket(key[1], key[2], elide=self._elide_beta1_prod)

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm (after unscaling, before clipping) of the last step, as a
        0-dim float64 tensor on the device; None before the first step."""
        if not self._last_stats:
            return None
        return self._last_stats[0][:, GRAD_NORM_SQ].sum().sqrt()

    def _publish_state(self, bucket: Bucket) -> None:
        """Point self.state[p] (what users and torch.optim see) at the bucket's views."""
        for p in bucket.params:
            views = bucket.state_of(p)
            self.state[p] = {k: views[k] for k in STATE_KEYS}
            if MASTER in views:
                self.state[p][MASTER_KEY] = views[MASTER]

    # -- state dict -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The authors' format: per parameter index, `step` (int), `exp_avg`, `exp_avg_sq`,
        `beta1_prod` (float32, the parameter's shape); copies, never views of a bucket.
        With master_weights, `master_param` (float32) too for bf16 / fp16 parameters; with
        stochastic_rounding, every param group has `rounding_seed`.

        Hooks run as in torch.optim: those registered with register_state_dict_pre_hook
        before, then those of register_state_dict_post_hook, each given the dict the previous
        one returned (a hook that returns None keeps it)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = checkpoint.pack_state(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of this optimizer or of the authors' `Adai` (missing group keys
        take this optimizer's defaults; a group saved without `param_names` keeps this
        optimizer's). With master_weights, a parameter without `master_param` takes its
        master weights from the parameter; with stochastic_rounding, a `rounding_seed`
        sets the seed. On any error the optimizer is left as it was.

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
        groups, by_saved_index = checkpoint.loaded_groups(self, saved_groups)
        seed = checkpoint.loaded_seed(saved_groups)
        checkpoint.commit(self, groups, checkpoint.loaded_buckets(self, saved_state,
                                                                  by_saved_index), seed)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


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
            process_group, capturable, master_weights, stochastic_rounding, seed).
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
            process_group, capturable, master_weights, stochastic_rounding, seed).
    """

    def __init__(self, params, lr=required, betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0,
                 dampening=1.0, decoupled=True, **options):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled, dampening, **options)
