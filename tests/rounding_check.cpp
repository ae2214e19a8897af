// csrc/adai_random.h as host code, for tests/test_rounding.py: reads
//   seed step n, then n lines "index x_bits" (uint64, uint32 bit pattern of a float)
// from stdin and prints, per line, "bits bf16_bits" of the hash and the stochastic rounding.
#include "adai_random.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>

int main() {
  uint32_t seed = 0, step = 0;
  unsigned long long n = 0;
  if (std::scanf("%" SCNu32 " %" SCNu32 " %llu", &seed, &step, &n) != 3) return 2;
  const uint32_t stream = adai::rounding_stream(seed, step);
  for (unsigned long long i = 0; i < n; ++i) {
    unsigned long long index = 0;
    uint32_t xb = 0;
    if (std::scanf("%llu %" SCNu32, &index, &xb) != 2) return 2;
    float x;
    std::memcpy(&x, &xb, sizeof x);
    const uint32_t bits = adai::rounding_bits(stream, index);
    std::printf("%" PRIu32 " %u\n", bits, static_cast<unsigned>(adai::bf16_round_stochastic(x, bits)));
  }
  return 0;
}
