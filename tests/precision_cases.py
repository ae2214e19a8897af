"""Shared pieces of the master-weights and stochastic-rounding tests: the backends that
implement a feature, fp32 twins of low-precision parameter sets, and the gradients both get."""
from __future__ import annotations

import torch

from adai_kernels import backends
from cases import cpu_backends


def feature_backends(feature: str) -> list[str]:
    """The backends that run on CPU here and implement `feature`."""
    return [n for n in cpu_backends() if backends.get(n).supports(feature)]


def flat(groups) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def twin(groups, dtype=torch.float32):
    """The same groups with copies of the parameters in `dtype` (values and layouts kept)."""
    out = []
    for g in groups:
        g = dict(g)
        g["params"] = [torch.nn.Parameter(p.detach().to(dtype, copy=True))
                       for p in g["params"]]
        out.append(g)
    return out


def set_grads_as(groups, grads, dtype) -> None:
    """Each parameter's gradient: the given one converted to `dtype` (exact when widening)."""
    for g, row in zip(groups, grads):
        for p, grad in zip(g["params"], row):
            p.grad = None if grad is None else grad.to(dtype)


def memory_positions(p: torch.Tensor) -> torch.Tensor:
    """Each element's position in memory (sum of index * stride), for a dense tensor at
    storage offset 0: the position part of its rounding index."""
    assert p.storage_offset() == 0
    pos = torch.zeros(p.shape, dtype=torch.int64)
    for d, (n, stride) in enumerate(zip(p.shape, p.stride())):
        shape = [1] * p.dim()
        shape[d] = n
        pos = pos + (torch.arange(n, dtype=torch.int64) * stride).reshape(shape)
    return pos
