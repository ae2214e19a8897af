"""Flat optimizer-state buckets: all state of one (param group, device, dtype) lives in a few
contiguous buffers, and each parameter's state is a view into them (docs/design.md)."""
from __future__ import annotations

from array import array

import torch

from . import elision
from .op_checks import is_dense, state_dtype
from .sharding import local

ALIGN = 16  # elements; each segment starts 64-byte aligned, so vector loads stay aligned
BUFFER_KEYS = ("exp_avg", "exp_avg_sq", "beta1_prod")  # the state buffers of a bucket
MASTER = "master"  # the buffer of fp32 master weights, in buckets that keep them


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def state_strides(param: torch.Tensor) -> tuple[int, ...]:
    """Strides of the parameter's state views: the parameter's own when it is dense (so
    channels_last and transposed layouts are kept), else contiguous."""
    if is_dense(param):
        return param.stride()
    return torch.empty(param.shape, device="meta").stride()


class Bucket:
    """State of the parameters of one (group, device, dtype), in join order. For a DTensor
    parameter the state is that of its local shard.

    With `master`, one more float32 buffer (MASTER) holds the parameters' fp32 master
    weights, laid out as the states; with `rounding`, the parameters are rounded
    stochastically and each has a rounding index for its first element (`first_index`,
    the ops' `rounding_index`; docs/design.md, "Stochastic rounding").

    `beta1_prod_max` (float32, a slot per parameter) is the max |b| of each parameter's
    beta1_prod, by which the kernels skip b once it no longer matters (adai_kernels/
    elision.py); None when `elide` is off. `generation` counts the changes of the slots'
    values other than by a step (parameters joining, state loaded, the b buffer freed)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, master: bool = False,
                 rounding: bool = False, elide: bool = True):
        self.device = device
        self.dtype = dtype
        self.state_dtype = state_dtype(dtype)
        self.rounding = rounding
        self.first_index: list[int] = []  # per parameter, in join order
        self.params: list[torch.Tensor] = []
        self.position: dict[int, int] = {}  # id(param) -> index in self.params
        self.offsets: list[int] = []
        self.size = 0
        st = dict(dtype=self.state_dtype, device=device)
        self.buffers = {k: torch.empty(0, **st) for k in BUFFER_KEYS}
        if master:
            self.buffers[MASTER] = torch.empty(0, dtype=torch.float32, device=device)
        self.steps = torch.empty(0, dtype=torch.float64, device=device)  # exact to 2^53
        self.v_sums = torch.empty(0, dtype=torch.float64, device=device)
        self.beta1_prod_max = (torch.empty(0, dtype=torch.float32, device=device) if elide
                               else None)
        self.beta1_prod_freed = False  # every parameter done, the b buffer given back
        self.generation = 0
        self.watch = elision.DoneWatch()
        self.views: list[dict[str, torch.Tensor]] = []

    def __contains__(self, param: torch.Tensor) -> bool:
        return id(param) in self.position

    @property
    def master(self) -> torch.Tensor | None:
        """The flat fp32 master weights, or None when the bucket keeps none."""
        return self.buffers.get(MASTER)

    def add(self, params: list[torch.Tensor], initial: list[dict | None] | None = None,
            first_index: list[int] | None = None) -> None:
        """Give `params` state: fresh (step 0, m = v = 0, b = 1) or, per parameter, the
        tensors in `initial` (keys step, exp_avg, exp_avg_sq, beta1_prod, and optionally
        master_param); the master weights are the parameter's value unless loaded.
        `first_index`: per parameter, the rounding index of its first element (default 0).
        The buffers grow once for the whole call; every existing view is re-pointed."""
        if not params:
            return
        initial = initial or [None] * len(params)
        self.first_index.extend(first_index or [0] * len(params))
        offsets = list(self.offsets)
        size = self.size
        for p in params:
            offsets.append(size)
            size += _round_up(local(p).numel())
        n_old, n_new = len(self.params), len(self.params) + len(params)

        new_buffers = {}
        for key, old in self.buffers.items():
            # zeros, not empty: the padding between tensors is never stepped, and garbage
            # there (NaN included) would make two equal buffers compare unequal
            buf = torch.zeros(size, dtype=old.dtype, device=self.device)
            if key == "beta1_prod" and self.beta1_prod_freed:
                buf[: self.size].zero_()  # back for the joining ones: the others are done
            else:
                buf[: old.numel()].copy_(old)
            new_buffers[key] = buf
        steps = torch.zeros(n_new, dtype=torch.float64, device=self.device)
        steps[:n_old].copy_(self.steps)
        v_sums = torch.zeros(n_new, dtype=torch.float64, device=self.device)
        v_sums[:n_old].copy_(self.v_sums)

        self.buffers, self.steps, self.v_sums = new_buffers, steps, v_sums
        self.beta1_prod_freed = False
        self.offsets, self.size = offsets, size
        self._grow_beta1_prod_max(n_old, n_new)
        for p in params:
            self.position[id(p)] = len(self.params)
            self.params.append(p)
        self.views = [self._make_views(i) for i in range(n_new)]

        for i, init in enumerate(initial, start=n_old):
            self._init_state(i, init)
        # v_sums of loaded state are the owner's to fill (Backend.v_sum); fresh state sums to 0

    def _init_state(self, i: int, init: dict | None) -> None:
        """Slot i's state: fresh (init None) or the loaded tensors of `init`."""
        views = self.views[i]
        if init is None:
            views["exp_avg"].zero_()
            views["exp_avg_sq"].zero_()
            views["beta1_prod"].fill_(1.0)
            if self.beta1_prod_max is not None:  # max |b| of ones, 0 when empty
                views["beta1_prod_max"].fill_(1.0 if views["beta1_prod"].numel() else 0.0)
        else:
            for key in BUFFER_KEYS:
                views[key].copy_(init[key])
            self.steps[i] = float(init["step"])
            if self.beta1_prod_max is not None:
                views["beta1_prod_max"].copy_(elision.max_abs(views["beta1_prod"]))
        if MASTER in views:
            self._init_master(views[MASTER], self.params[i], init)

    @staticmethod
    def _init_master(master: torch.Tensor, param: torch.Tensor, init: dict | None) -> None:
        """A loaded master_param, else the parameter itself (detached: the state must not
        join the parameter's autograd graph)."""
        loaded = None if init is None else init.get("master_param")
        master.copy_(local(param).detach() if loaded is None else loaded)

    def _grow_beta1_prod_max(self, n_old: int, n_new: int) -> None:
        """Slots for the joining parameters (their values are set with their b)."""
        self.generation += 1
        if self.beta1_prod_max is None:
            return
        b_max = torch.zeros(n_new, dtype=torch.float32, device=self.device)
        b_max[:n_old].copy_(self.beta1_prod_max)
        self.beta1_prod_max = b_max

    def free_beta1_prod(self) -> None:
        """Give back the b buffer: every parameter is done (its b no longer read). Each
        parameter's b then shows as zeros of its shape that cost no memory."""
        self.buffers["beta1_prod"] = torch.empty(0, dtype=self.state_dtype, device=self.device)
        self._zero = torch.zeros((), dtype=self.state_dtype, device=self.device)
        self.beta1_prod_freed = True
        self.generation += 1
        self.views = [self._make_views(i) for i in range(len(self.params))]

    def restore_beta1_prod(self) -> None:
        """Bring a freed b buffer back, zeros (what b is for done parameters)."""
        if not self.beta1_prod_freed:
            return
        self.buffers["beta1_prod"] = torch.zeros(self.size, dtype=self.state_dtype,
                                                 device=self.device)
        self.beta1_prod_freed = False
        self.generation += 1
        self.views = [self._make_views(i) for i in range(len(self.params))]

    def done(self) -> list[bool]:
        """Per parameter, in join order: whether its b no longer matters (one
        device-to-host copy; every parameter when the buffer is freed, none when the
        elision is off)."""
        if self.beta1_prod_freed:
            return [True] * len(self.params)
        if self.beta1_prod_max is None:
            return [False] * len(self.params)
        return elision.done(self.beta1_prod_max, self.state_dtype).tolist()

    def copy_(self, other: "Bucket") -> None:
        """Take the values of `other`, a bucket of the same parameters (in any order), keeping
        this bucket's buffers (and so every view, and the addresses a CUDA graph captured).
        A freed b buffer comes back when `other` has b values (a freed buffer is never one
        a graph captured)."""
        if not other.beta1_prod_freed:
            self.restore_beta1_prod()
        self.generation += 1
        keys = [k for k in (*BUFFER_KEYS, "step", "v_sum")
                if not (k == "beta1_prod" and self.beta1_prod_freed)]  # both freed: all done
        if self.beta1_prod_max is not None and other.beta1_prod_max is not None:
            keys.append("beta1_prod_max")
        if MASTER in self.buffers and MASTER in other.buffers:
            keys.append(MASTER)
        if [id(p) for p in self.params] == [id(p) for p in other.params]:
            mine = {**self.buffers, "step": self.steps, "v_sum": self.v_sums,
                    "beta1_prod_max": self.beta1_prod_max}
            theirs = {**other.buffers, "step": other.steps, "v_sum": other.v_sums,
                      "beta1_prod_max": other.beta1_prod_max}
            for key in keys:
                if key == "beta1_prod" and other.beta1_prod_freed:
                    mine[key].zero_()
                else:
                    mine[key].copy_(theirs[key])
            return
        for p in other.params:
            mine, theirs = self.state_of(p), other.state_of(p)
            for key in keys:
                mine[key].copy_(theirs[key])  # a freed b: expanded zeros

    def _make_views(self, i: int) -> dict[str, torch.Tensor]:
        p, off = local(self.params[i]), self.offsets[i]
        stride = state_strides(p)
        views = {k: buf.as_strided(p.shape, stride, off) for k, buf in self.buffers.items()
                 if not (k == "beta1_prod" and self.beta1_prod_freed)}
        if self.beta1_prod_freed:  # zeros of the parameter's shape, one element of memory
            views["beta1_prod"] = self._zero.expand(p.shape)
        views["step"] = self.steps[i]
        views["v_sum"] = self.v_sums[i]
        if self.beta1_prod_max is not None:
            views["beta1_prod_max"] = self.beta1_prod_max[i]
        return views

    def state_of(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.views[self.position[id(param)]]

    def first_index_of(self, param: torch.Tensor) -> int:
        return self.first_index[self.position[id(param)]]

    def _slots(self, params) -> range | list[int]:
        return range(len(self.params)) if params is None else [self.position[id(p)]
                                                               for p in params]

    def segments(self, params=None) -> torch.Tensor:
        """The ops' `segments` table (csrc/op_schemas.h) of `params` (default: all, in join
        order): per parameter (offset, numel, slot) as an int64 CPU tensor of shape (n, 3)."""
        rows = [x for i in self._slots(params)
                for x in (self.offsets[i], local(self.params[i]).numel(), i)]
        return _host_table(rows).reshape(-1, 3)

    def rounding_index(self, params=None) -> torch.Tensor:
        """The ops' `rounding_index` of `params` (default: all, in join order): each one's
        first rounding index, as an int64 CPU tensor of shape (n,)."""
        return _host_table([self.first_index[i] for i in self._slots(params)])

    def steps_list(self) -> list[int]:
        """Step counters as ints, in join order (one device-to-host copy)."""
        return [int(s) for s in self.steps.tolist()]


def _host_table(values: list[int]) -> torch.Tensor:
    """`values` as a 1-D int64 CPU tensor that the ops read on the host."""
    if not values:
        return torch.empty(0, dtype=torch.int64)
    if torch.compiler.is_compiling():  # a constant of the graph
        return torch.tensor(values, dtype=torch.int64)
    # frombuffer: no copy, and no op that reads host data (which a CUDA graph could not
    # replay); the table stays on the host, the ops read it there
    return torch.frombuffer(array("q", values), dtype=torch.int64)
