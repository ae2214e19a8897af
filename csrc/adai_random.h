// Stochastic rounding of the parameter write (Adai(..., stochastic_rounding=True)): the
// random bits and the rounding, for every native kernel (host code and nvcc device code).
// The same functions exist in adai_kernels/rounding.py (torch, for the reference backend)
// and adai_kernels/backends/triton_random.py (Triton); tests/test_rounding.py checks that
// the three draw identical bits.
//
// The bits are a counter-based hash of (seed, step, index): no generator state, so a run is
// bitwise reproducible on a backend whatever its chunking, thread count or sharding.
// - seed: the optimizer's rounding seed (32 bits);
// - step: the tensor's step counter k after this step's increment (32 bits);
// - index: the element's 64-bit rounding index, (parameter number << 40) + the element's
//   position in the full parameter (memory order), so that two parameters, or two shards of
//   one, never share a stream (docs/design.md, "Stochastic rounding").
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ADAI_RNG_HD __host__ __device__ __forceinline__
#else
#define ADAI_RNG_HD inline
#endif

namespace adai {

constexpr uint32_t kGolden = 0x9E3779B9u;  // 2^32 / phi: keeps 0 from being a fixed point

// A 32-bit bijective mixer (C. Wellons' "lowbias32": shifts 16, 15, 16).
ADAI_RNG_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The per-(seed, step) part, computed once per tensor and step.
ADAI_RNG_HD uint32_t rounding_stream(uint32_t seed, uint32_t step) {
  return mix32(mix32(seed + kGolden) ^ step);
}

// 32 random bits of one element.
ADAI_RNG_HD uint32_t rounding_bits(uint32_t stream, uint64_t index) {
  const uint32_t lo = static_cast<uint32_t>(index);
  const uint32_t hi = static_cast<uint32_t>(index >> 32);
  return mix32(stream ^ mix32(lo ^ mix32(hi + kGolden)));
}

// fp32 -> bf16 bits, rounded up in magnitude with probability (dropped bits) / 2^16, so the
// expected result is x. The carry walks into the exponent as it should; inf stays inf; NaN
// stays a quiet NaN (adding bits could otherwise turn its payload into inf).
ADAI_RNG_HD uint16_t bf16_round_stochastic(float x, uint32_t bits) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, sizeof u);
#endif
  if (x != x) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + (bits & 0xFFFFu)) >> 16);
}

}  // namespace adai
