"""Stochastic rounding in Triton: the hash and the rounding of csrc/adai_random.h (its
comments define them), for the Triton update kernel. Imported only where triton is.
tests/test_rounding.py checks that this, the C++ and the torch versions draw identical bits."""
import triton
import triton.language as tl


@triton.jit
def mix32(x):
    """x: uint32 (products wrap mod 2^32, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def rounding_stream(seed, step):
    """seed, step: uint32."""
    return mix32(mix32(seed + 0x9E3779B9) ^ step)


@triton.jit
def rounding_bits(stream, index):
    """stream: uint32 from rounding_stream; index: int64 rounding indices (>= 0)."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    return mix32(stream ^ mix32(lo ^ mix32(hi + 0x9E3779B9)))


@triton.jit
def bf16_round_stochastic(x, bits):
    """float32 x -> bfloat16, rounded up in magnitude with probability (dropped bits) / 2^16."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + (bits & 0xFFFF)) >> 16
    rounded = tl.where(x != x, (u >> 16) | 0x0040, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
