"""Flat optimizer-state buckets: all state of one (param group, device, dtype) lives in a few
contiguous buffers, and each parameter's state is a view into them (docs/design.md)."""
from __future__ import annotations

from array import array

import torch

from .op_checks import is_dense
from .sharding import local

ALIGN = 16  # elements; each segment starts 64-byte aligned, so vector loads stay aligned
BUFFER_KEYS = ("exp_avg", "exp_avg_sq", "beta1_prod")  # the float32 buffers of a bucket
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
    the ops' `rounding_index`; docs/design.md, "Stochastic rounding")."""

    def __init__(self, device: torch.device, dtype: torch.dtype, master: bool = False,
                 rounding: bool = False):
        self.device = device
        self.dtype = dtype
        self.rounding = rounding
        self.first_index: list[int] = []  # per parameter, in join order
        self.params: list[torch.Tensor] = []
        self.position: dict[int, int] = {}  # id(param) -> index in self.params
        self.offsets: list[int] = []
        self.size = 0
        f32 = dict(dtype=torch.float32, device=device)
        self.buffers = {k: torch.empty(0, **f32) for k in BUFFER_KEYS}
        if master:
            self.buffers[MASTER] = torch.empty(0, **f32)
        self.steps = torch.empty(0, dtype=torch.float64, device=device)  # exact to 2^53
        self.v_sums = torch.empty(0, dtype=torch.float64, device=device)
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
            buf = torch.empty(size, dtype=torch.float32, device=self.device)
            buf[: old.numel()].copy_(old)
            new_buffers[key] = buf
        steps = torch.zeros(n_new, dtype=torch.float64, device=self.device)
        steps[:n_old].copy_(self.steps)
        v_sums = torch.zeros(n_new, dtype=torch.float64, device=self.device)
        v_sums[:n_old].copy_(self.v_sums)

        self.buffers, self.steps, self.v_sums = new_buffers, steps, v_sums
        self.offsets, self.size = offsets, size
        for p in params:
            self.position[id(p)] = len(self.params)
            self.params.append(p)
        self.views = [self._make_views(i) for i in range(n_new)]

        for i, init in enumerate(initial, start=n_old):
            views = self.views[i]
            if init is None:
                views["exp_avg"].zero_()
                views["exp_avg_sq"].zero_()
                views["beta1_prod"].fill_(1.0)
            else:
                for key in BUFFER_KEYS:
                    views[key].copy_(init[key])
                self.steps[i] = float(init["step"])
            if MASTER in views:
                self._init_master(views[MASTER], self.params[i], init)
        # v_sums of loaded state are the owner's to fill (Backend.v_sum); fresh state sums to 0

    @staticmethod
    def _init_master(master: torch.Tensor, param: torch.Tensor, init: dict | None) -> None:
        """A loaded master_param, else the parameter itself (detached: the state must not
        join the parameter's autograd graph)."""
        loaded = None if init is None else init.get("master_param")
        master.copy_(local(param).detach() if loaded is None else loaded)

    def copy_(self, other: "Bucket") -> None:
        """Take the values of `other`, a bucket of the same parameters (in any order), keeping
        this bucket's buffers (and so every view, and the addresses a CUDA graph captured)."""
        if [id(p) for p in self.params] == [id(p) for p in other.params]:
            for key, buf in self.buffers.items():
                buf.copy_(other.buffers[key])
            self.steps.copy_(other.steps)
            self.v_sums.copy_(other.v_sums)
            return
        for p in other.params:
            mine, theirs = self.state_of(p), other.state_of(p)
            for key in (*self.buffers, "step", "v_sum"):
                mine[key].copy_(theirs[key])

    def _make_views(self, i: int) -> dict[str, torch.Tensor]:
        p, off = local(self.params[i]), self.offsets[i]
        stride = state_strides(p)
        views = {k: buf.as_strided(p.shape, stride, off) for k, buf in self.buffers.items()}
        views["step"] = self.steps[i]
        views["v_sum"] = self.v_sums[i]
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
