"""Stochastic rounding in plain PyTorch, for the reference backend: the hash and the rounding
of csrc/adai_random.h (its comments define them), on int64 tensors holding uint32 values.
tests/test_rounding.py checks that this, the C++ and the Triton versions draw identical bits."""
from __future__ import annotations

import torch

GOLDEN = 0x9E3779B9
MASK32 = 0xFFFFFFFF
INDEX_SHIFT = 40  # rounding index = (parameter number << 40) + position in the parameter


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32): in two 16-bit halves of c, so that no int64
    product overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_stream(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """seed and step as int64 tensors holding uint32 values (any broadcastable shapes)."""
    return mix32((mix32((seed + GOLDEN) & MASK32) ^ step) & MASK32)


def rounding_bits(stream: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """stream: from rounding_stream; index: int64 rounding indices (>= 0)."""
    lo, hi = index & MASK32, (index >> 32) & MASK32
    return mix32(stream ^ mix32(lo ^ mix32((hi + GOLDEN) & MASK32)))


def bf16_round_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 x -> bfloat16, rounded up in magnitude with probability (dropped bits) / 2^16."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    rounded = ((u + (bits & 0xFFFF)) >> 16) & 0xFFFF
    rounded = torch.where(torch.isnan(x), (u >> 16) | 0x0040, rounded)
    # int16 holds the 16 bits (two's complement), which bfloat16 reinterprets
    return (rounded - ((rounded & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)


def element_index(shape, strides, first: int, device) -> torch.Tensor:
    """Each element's rounding index for a dense tensor of `shape` and `strides` whose first
    element in memory has index `first`: memory order, as the kernels walk it."""
    numel = 1
    for s in shape:
        numel *= s
    flat = torch.arange(numel, dtype=torch.int64, device=device) + first
    return flat.as_strided(tuple(shape), tuple(strides))
