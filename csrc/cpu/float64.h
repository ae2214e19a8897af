// float64 params with float64 state, in the CPU kernel (csrc/cpu/adai_cpu.cpp calls these
// once the op's prologue has found a float64 call). The per-element math is adai_math.h's at
// T = double with BasicConsts<double>; the loops are scalar (float64 is for accuracy, not for
// speed) over the same chunk list as the float32 kernels (chunks.h). Each chunk sums in one
// double, element by element, and update and v_sum sum the stored new v alike, so their sums
// agree bitwise. The per-tensor max |b| is kept in float32 (the bucket's `beta1_prod_max`),
// rounded up, so that `max <= 2^-54` says what the float64 values say.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "adai_math.h"
#include "cpu/chunks.h"
#include "op_prologue.h"

namespace adai_cpu {

using Consts64 = adai::BasicConsts<double>;

// x rounded to a float that is >= x (NaN stays NaN).
inline float round_up_to_float(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// stats' sums over one chunk (adai_math.h's StatsSum order; only kSumGg without L2).
template <bool kL2>
void stats_chunk_f64(const double* g, const double* p, int64_t n, double inv_scale,
                     const Consts64& c, double* s) {
  for (int k = 0; k < adai::kStatsSums; ++k) s[k] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double gi = g[i] * inv_scale;
    s[adai::kSumGg] += gi * gi;
    if constexpr (kL2) {
      const double pi = p[i];
      s[adai::kSumGradSq] += adai::grad_sq(gi, pi, c);
      s[adai::kSumGt] += gi * pi;
      s[adai::kSumTt] += pi * pi;
    }
  }
}

// stats' per-tensor sums: sums[i * K + k] (K = kStatsSums with L2 decay, else 1).
inline std::vector<double> stats_sums_f64(at::TensorList params, at::TensorList grads,
                                          bool use_l2, int K, double inv_scale,
                                          const Consts64& c) {
  const std::vector<const double*> gp = data_ptrs<const double>(grads);
  const std::vector<const double*> pp = data_ptrs<const double>(params);
  const std::vector<int64_t> numel = numels(params);
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(numel, first);
  std::vector<double> partial(chunks.size() * K, 0.0);
  for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
    double s[adai::kStatsSums];
    const double* g = gp[ch.tensor] + ch.begin;
    if (use_l2) {
      stats_chunk_f64<true>(g, pp[ch.tensor] + ch.begin, ch.len, inv_scale, c, s);
    } else {
      stats_chunk_f64<false>(g, nullptr, ch.len, inv_scale, c, s);
    }
    for (int j = 0; j < K; ++j) partial[k * K + j] = s[j];
  });
  return tensor_sums(partial, first, numel.size(), K);
}

// What update's elements share: the gradient multiplier (unscaling and clipping), the
// tensor's 1 / bc2, the global 1 / vbar and the group's constants.
struct UpdateArgs64 {
  double gmul, inv_bc2, inv_vbar;
  const Consts64* c;
};

// One fused pass over n elements; returns the sum of the new v. kB: b is read and written,
// and *bmax = the NaN-propagating max |b new|.
template <bool kB>
double update_chunk_f64(double* p, const double* g, double* m, double* v, double* b,
                        int64_t n, const UpdateArgs64& u, double* bmax) {
  double s = 0.0, mx = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double theta = p[i], mi = m[i], vi = v[i];
    const double gi = g[i] * u.gmul;
    if constexpr (kB) {
      double bi = b[i];
      adai::update(theta, gi, mi, vi, bi, u.inv_bc2, u.inv_vbar, *u.c);
      b[i] = bi;
      mx = adai::max_abs_nan(mx, bi);
    } else {
      adai::update_b_done(theta, gi, mi, vi, u.inv_bc2, u.inv_vbar, *u.c);
    }
    p[i] = theta;
    m[i] = mi;
    v[i] = vi;
    s += vi;
  }
  if constexpr (kB) *bmax = mx;
  return s;
}

// update's pass over every element of a float64 call (`done`: per tensor, its b is neither
// read nor written); returns each tensor's sum of its new v. With `beta1_prod_max`, the
// not-done tensors' slots get their max |b new|, rounded up to float.
inline std::vector<double> update_f64(at::TensorList params, at::TensorList grads,
                                      const adai::OpArgs& a, const at::Tensor& exp_avg,
                                      const at::Tensor& exp_avg_sq,
                                      const at::Tensor& beta1_prod,
                                      const std::vector<char>& done, double gmul,
                                      const std::vector<double>& inv_bc2, double inv_vbar,
                                      const Consts64& c) {
  const std::vector<double*> pp = data_ptrs<double>(params);
  const std::vector<const double*> gp = data_ptrs<const double>(grads);
  double* const m_base = exp_avg.mutable_data_ptr<double>();
  double* const v_base = exp_avg_sq.mutable_data_ptr<double>();
  double* const b_base = a.has_beta1_prod ? beta1_prod.mutable_data_ptr<double>() : nullptr;
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(numels(params), first);
  std::vector<double> partial(chunks.size(), 0.0), partial_max(chunks.size(), 0.0);
  for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
    const size_t i = static_cast<size_t>(ch.tensor);
    const int64_t so = adai::segment(a, i, adai::kOffset) + ch.begin;
    const UpdateArgs64 u{gmul, inv_bc2[i], inv_vbar, &c};
    double* const p = pp[i] + ch.begin;
    const double* const g = gp[i] + ch.begin;
    partial[k] = done[i] ? update_chunk_f64<false>(p, g, m_base + so, v_base + so, nullptr,
                                                   ch.len, u, nullptr)
                         : update_chunk_f64<true>(p, g, m_base + so, v_base + so, b_base + so,
                                                  ch.len, u, &partial_max[k]);
  });
  if (a.beta1_prod_max != nullptr) {  // not-done tensors: the max over their chunks
    for (size_t i = 0; i < a.n; ++i) {
      if (done[i]) continue;
      double mx = 0.0;
      for (int64_t j = first[i]; j < first[i + 1]; ++j) {
        mx = adai::max_abs_nan(mx, partial_max[j]);
      }
      a.beta1_prod_max[adai::segment(a, i, adai::kSlot)] = round_up_to_float(mx);
    }
  }
  return tensor_sums(partial, first, a.n, 1);
}

// The sum of float64 v over one chunk, as update_chunk_f64 sums the v it stores.
inline double v_sum_chunk_f64(const double* v, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += v[j];
  return s;
}

}  // namespace adai_cpu
