"""The calls every backend implements (docs/design.md, "Two phases, two calls")."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..work import Control, Work

if TYPE_CHECKING:  # adai_kernels.ops needs this module's STATS_COLUMNS
    from ..ops import Ops

STATS_COLUMNS = 7  # csrc/adai_math.h, StatsColumn
GRAD_NORM_SQ = 5   # the column with the squared gradient norm
# The parameter dtypes of the kernels with float32 state (adai_kernels/op_checks.py).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_refused(name: str, dtype: torch.dtype, dtypes) -> str | None:
    """None when `dtype` is among `dtypes`, else the reason backend `name` gives."""
    if dtype in dtypes:
        return None
    names = [str(d).removeprefix("torch.") for d in dtypes]
    listed = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
    return f"backend {name!r} steps {listed} parameters only"

# Options that change what a step writes, which a backend's kernels implement or not
# (docs/design.md, "Master weights" and "Stochastic rounding").
MASTER_WEIGHTS = "master_weights"
STOCHASTIC_ROUNDING = "stochastic_rounding"
FEATURES = (MASTER_WEIGHTS, STOCHASTIC_ROUNDING)


class Backend:
    """A way to run the fused step. Subclasses implement the methods below."""

    name: str = "?"
    features: frozenset[str] = frozenset()  # of FEATURES, those this backend implements
    # whether `update` takes the buckets' done flags (beta1_prod_max) and a freed, empty
    # beta1_prod (adai_kernels/elision.py); a bucket stepped by a backend that does not is
    # never freed
    elides_beta1_prod: bool = False

    def supports(self, feature: str) -> bool:
        """Whether this backend's kernels implement `feature` (one of FEATURES)."""
        assert feature in FEATURES, feature
        return feature in self.features

    def unavailable(self, device: torch.device) -> str | None:
        """None if this backend can step parameters on `device`, else the reason why not."""
        raise NotImplementedError

    def unsupported(self, dtype: torch.dtype) -> str | None:
        """None if this backend steps parameters of `dtype` (on the devices it runs on),
        else the reason why not."""
        return dtype_refused(self.name, dtype, KERNEL_DTYPES)

    def stats(self, work: Work, out: torch.Tensor, ctl: Control) -> None:
        """Phase 1: increment `work.steps` and write the bucket's row of statistics into the
        float64 vector `out` (STATS_COLUMNS long)."""
        raise NotImplementedError

    def update(self, work: Work, stats: torch.Tensor, ctl: Control) -> None:
        """Phase 2: sum the rows of `stats` (float64, rows x STATS_COLUMNS), then one pass over
        every element; a skipped step only takes back the step increments."""
        raise NotImplementedError

    def v_sum(self, bucket) -> None:
        """Every parameter's v_sum = the sum of its exp_avg_sq, summed exactly as `update`
        sums the new v (used when state is loaded, so that a restored run matches an
        uninterrupted one bitwise)."""
        raise NotImplementedError


class OpsBackend(Backend):
    """A backend whose phases are the custom ops `<namespace>::stats` / `::update` /
    `::v_sum` (docs/design.md, "Native op schemas"), called through adai_kernels/ops.py. The
    C++ CPU and CUDA kernels and the Triton kernels all share that schema, so they share
    this wrapper."""

    def __init__(self, name: str, ops: Ops, device_types: tuple[str, ...], load,
                 features: frozenset[str] = frozenset(),
                 dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES, elides: bool = False):
        self.name = name
        self.features = frozenset(features)
        self._calls = ops
        self._device_types = device_types
        self._load = load  # () -> str | None: imports the ops, returns why they are missing
        self._dtypes = dtypes  # the parameter dtypes its ops step
        # its update takes beta1_prod_max and a freed beta1_prod (ops that do not refuse them)
        self.elides_beta1_prod = elides

    def unavailable(self, device: torch.device) -> str | None:
        if device.type not in self._device_types:
            return (f"backend {self.name!r} runs on {'/'.join(self._device_types)} tensors, "
                    f"not {device.type}")
        return self._load()

    def unsupported(self, dtype: torch.dtype) -> str | None:
        return dtype_refused(self.name, dtype, self._dtypes)

    @property
    def _ops(self) -> Ops:
        return self._calls

    def stats(self, work: Work, out: torch.Tensor, ctl: Control) -> None:
        b = work.bucket
        self._ops.stats(params=work.params, grads=work.grads, segments=work.segments,
                        steps=b.steps, v_sums=b.v_sums, grad_scale=ctl.grad_scale,
                        beta2=work.beta2, l2=work.l2, out=out, master=b.master)

    def update(self, work: Work, stats: torch.Tensor, ctl: Control) -> None:
        g, b = work.group, work.bucket
        lr_tensor = work.lr_tensor
        optional = {}
        if self.elides_beta1_prod:  # None when the elision is off: no tensor done
            optional["beta1_prod_max"] = b.beta1_prod_max
        self._ops.update(
            params=work.params, grads=work.grads, segments=work.segments,
            exp_avg=b.buffers["exp_avg"], exp_avg_sq=b.buffers["exp_avg_sq"],
            beta1_prod=b.buffers["beta1_prod"], v_sums=b.v_sums, steps=b.steps, stats=stats,
            grad_scale=ctl.grad_scale, found_inf=ctl.found_inf, lr_tensor=lr_tensor,
            lr=0.0 if lr_tensor is not None else g["lr"], beta0=g["betas"][0],
            beta2=g["betas"][1], eps=g["eps"], weight_decay=g["weight_decay"],
            decoupled=g["decoupled"], dampening=g["dampening"],
            max_grad_norm=ctl.max_grad_norm or 0.0, skip_nonfinite=ctl.skip_nonfinite,
            master=b.master, rounding_seed=work.rounding_seed(ctl),
            rounding_index=work.rounding_index, **optional)

    def v_sum(self, bucket) -> None:
        self._ops.v_sum(exp_avg_sq=bucket.buffers["exp_avg_sq"], segments=bucket.segments(),
                        v_sums=bucket.v_sums)
