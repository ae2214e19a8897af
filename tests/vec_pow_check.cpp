// Accuracy and special cases of the CPU kernel's vector pow (csrc/cpu/vec_pow.h), against a
// float64 pow. Built and run by tests/test_cpu_kernel.py::test_vec_pow, once per ISA
// (-DCPU_CAPABILITY_AVX512 / _AVX2 with the matching -m flags). Prints "OK" when every check
// passes, else the failures.
//
// Bound checked: |pow(x, e) - x^e| <= (|e ln x| + 2) ulp(x^e) for normal results, over
// x spread log-uniformly over [2^-149, 2^30] (subnormal inputs included) and several e.
#include "cpu/vec_pow.h"

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using adai_vec::fVec;

namespace {

double ulp_of(double v) {
  int e = 0;
  std::frexp(std::fabs(v), &e);  // |v| = f 2^e, f in [0.5, 1)
  return std::ldexp(1.0, e - 24);
}

float pow1(float x, float e) {
  __at_align__ float buf[fVec::size()];
  adai_vec::pow(fVec(x), fVec(e)).store(buf);
  return buf[0];
}

bool same(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || (a == b && std::signbit(a) == std::signbit(b));
}

}  // namespace

int main() {
  int failures = 0;
  const int W = fVec::size();
  std::mt19937 rng(12345);
  std::uniform_real_distribution<double> log2x(-149.0, 30.0);
  std::vector<float> xs;
  for (int i = 0; i < 1 << 20; ++i) xs.push_back(static_cast<float>(std::exp2(log2x(rng))));
  for (float v : {1.0f, 0.75f, 1.5f, 0.74999994f, 1.4999999f, 2.0f, 3.0f, 0.999f, 1e-3f,
                  FLT_MIN, FLT_MIN / 2, 1e-45f, 1.0000001f, 0.99999994f}) {
    xs.push_back(v);
  }
  while (xs.size() % W) xs.push_back(1.0f);
  double worst = 0.0, worst_x = 0.0, worst_e = 0.0;
  for (float e : {1.0f / 3.0f, 0.25f, 0.5f, 0.6f, 0.75f, 0.9f, 1.0f}) {
    for (size_t i = 0; i < xs.size(); i += W) {
      __at_align__ float out[fVec::size()];
      adai_vec::pow(fVec::loadu(&xs[i]), fVec(e)).store(out);
      for (int j = 0; j < W; ++j) {
        const double x = xs[i + j];
        const double ref = std::pow(x, static_cast<double>(e));
        if (ref < FLT_MIN || ref > 1e38) continue;  // subnormal or near-overflow results
        const double excess = std::fabs(out[j] - ref) / ulp_of(ref) - std::fabs(e * std::log(x));
        if (excess > worst) {
          worst = excess;
          worst_x = x;
          worst_e = e;
        }
      }
    }
  }
  std::printf("max ulp error - |e ln x|: %.3f (x = %g, e = %g)\n", worst, worst_x, worst_e);
  if (worst > 2.0) {
    std::printf("FAIL: error bound (|e ln x| + 2) ulp exceeded\n");
    ++failures;
  }
  // exact and special cases
  const float inf = INFINITY, nan = NAN;
  struct Case {
    float x, e, want;
  } cases[] = {
      {1.0f, 0.5f, 1.0f},   {1.0f, 1.0f / 3.0f, 1.0f}, {0.0f, 0.5f, 0.0f},
      {-0.0f, 0.5f, 0.0f},  {inf, 0.5f, inf},          {nan, 0.5f, nan},
      {-1.0f, 0.5f, nan},   {-1e-30f, 0.5f, nan},      {0.0f, 0.0f, 1.0f},
      {nan, 0.0f, 1.0f},    {inf, 0.0f, 1.0f},         {-2.0f, 0.0f, 1.0f},
      {0x1p-148f, 0.25f, 0x1p-37f},  // a subnormal x, an exact result
      {4.0f, 0.5f, 2.0f},   {0.25f, 0.5f, 0.5f},
  };
  for (const Case& c : cases) {
    const float got = pow1(c.x, c.e);
    if (!same(got, c.want)) {
      std::printf("FAIL: pow(%g, %g) = %g, want %g\n", c.x, c.e, got, c.want);
      ++failures;
    }
  }
  if (failures == 0) std::printf("OK\n");
  return failures == 0 ? 0 : 1;
}
