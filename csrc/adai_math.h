// Per-element Adai / AdaiV2 math: the single source of truth for the arithmetic of every
// native kernel. Compiles as host code (g++) and as __host__ __device__ code (nvcc).
//
// The functions are templates over the value type T: `float` on CUDA and in scalar tails,
// `at::vec::Vectorized<float>` in the CPU kernel, `double` for float64 parameters (the CPU
// kernel only, with BasicConsts<double>). Everything that is not plain + - * / goes through
// adai::Ops<T>, which the CPU kernel specialises for its vector type.
#pragma once

#include <cmath>
#include <cstdint>

// Always inlined: a call per element (or per vector) would cost more than the math, and with
// several call sites (update and update_b_done, per dtype and option) GCC stopped inlining
// update() into the CPU kernel's loop, which then ran 1.6x the instructions per element.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define ADAI_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define ADAI_HD inline __attribute__((always_inline))
#else
#define ADAI_HD inline
#endif

namespace adai {

// Scalar implementations. NaN propagates through clamp (comparisons with NaN are false),
// matching torch.clamp in the reference backend.
template <typename T>
struct Ops {
  static ADAI_HD T pow(T x, T e) { return ::powf(x, e); }
  static ADAI_HD T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
};

template <>
struct Ops<double> {
  static ADAI_HD double pow(double x, double e) { return ::pow(x, e); }
  static ADAI_HD double clamp(double x, double lo, double hi) {
    return x < lo ? lo : (x > hi ? hi : x);
  }
};

// Constants of one launch (one parameter group), in the precision of the state: S = float
// (Consts) for float32 state, double for float64 state. Built on the host by make_consts().
template <typename S>
struct BasicConsts {
  S lr;
  S beta0;
  S beta2;
  S one_minus_beta2;
  S beta1_max;          // 1 - eps
  S l2;                 // coupled weight decay, 0 when decoupled
  S lr_wd;              // decoupled decay: lr * weight_decay (0 when coupled). Kept apart
                        // from 1: float(1 - 1e-5) is 0.6% off in its distance to 1.
  S dampening;          // d
  S exponent;           // 1 / (3 - 2d)
  S mhat_scale;         // beta0^(1 - d)
  bool adai_v1;         // d == 1: exponent 1, beta3 = 1 - beta1, mhat_scale 1 (no pow)
};
using Consts = BasicConsts<float>;

template <typename S = float>
inline BasicConsts<S> make_consts(double lr, double beta0, double beta2, double eps,
                                  double weight_decay, bool decoupled, double dampening) {
  BasicConsts<S> c;
  c.lr = static_cast<S>(lr);
  c.beta0 = static_cast<S>(beta0);
  c.beta2 = static_cast<S>(beta2);
  c.one_minus_beta2 = static_cast<S>(1.0 - beta2);
  c.beta1_max = static_cast<S>(1.0 - eps);
  c.l2 = decoupled ? S(0) : static_cast<S>(weight_decay);
  c.lr_wd = decoupled ? static_cast<S>(lr * weight_decay) : S(0);
  c.dampening = static_cast<S>(dampening);
  c.exponent = static_cast<S>(1.0 / (3.0 - 2.0 * dampening));
  c.mhat_scale = static_cast<S>(std::pow(beta0, 1.0 - dampening));
  c.adai_v1 = dampening == 1.0;
  return c;
}

// Bias correction of the second moment for a tensor at (already incremented) step k.
// In double: for beta2 = 0.99 and k = 1, 1 - beta2^k in float would lose 7 bits.
ADAI_HD double bias_correction2(double beta2, double k) { return 1.0 - ::pow(beta2, k); }

// inv_vbar = 1 / vbar, or 0 when vbar == 0 (every gradient exactly zero): then
// vhat / vbar := 0, beta1 = 1 - eps, m stays 0 and theta does not move.
ADAI_HD double inv_mean(double sum, double count) {
  return sum > 0.0 ? count / sum : 0.0;
}

// Columns of a bucket's statistics row (float64), written by `stats`, summed over rows by
// `update`. g is the gradient after unscaling (grad / grad_scale), before clipping; k_i the
// incremented step; w_i = (1 - beta2) / bc2_i.
enum StatsColumn {
  kA = 0,    // sum_i beta2 * V_i / bc2_i            (V_i: sum of v before this step)
  kB = 1,    // sum_i w_i * sum_j (g + l2 theta)^2   (the gradient part of S when not clipped)
  kBgg = 2,  // sum_i w_i * sum_j g^2                (with kBgt, kBtt: the same, expanded,
  kBgt = 3,  // sum_i w_i * sum_j 2 l2 g theta        so that a clip coefficient c found
  kBtt = 4,  // sum_i w_i * sum_j (l2 theta)^2        only after the reduction applies:
             //   S = A + c^2 Bgg + c Bgt + Btt)
  kGn = 5,   // sum_i sum_j g^2                      (the squared global gradient norm)
  kN = 6,    // sum_i numel_i
  kStatsColumns = 7,
};

// The sums over one tensor's elements that its share of the row is made of, in the order
// every backend keeps its partial sums in (g unscaled, theta the parameter). Without L2
// decay only kSumGg is summed (then B = Bgg and Bgt = Btt = 0).
enum StatsSum {
  kSumGg = 0,      // sum_j g^2
  kSumGradSq = 1,  // sum_j (g + l2 theta)^2, adai::grad_sq: the sum column B weighs
  kSumGt = 2,      // sum_j g theta
  kSumTt = 3,      // sum_j theta^2
  kStatsSums = 4,
};

// The statistics rows of a step (rows x kStatsColumns, any strides) added column by column in
// row order: what `update` reads.
ADAI_HD void sum_stats_rows(const double* stats, int64_t rows, int64_t row_stride,
                            int64_t col_stride, double* totals) {
  for (int k = 0; k < kStatsColumns; ++k) totals[k] = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < kStatsColumns; ++k) totals[k] += stats[r * row_stride + k * col_stride];
  }
}

// What one step needs from the global statistics, computed alike by every block.
struct Globals {
  float inv_vbar;  // 1 / vbar, 0 when vbar == 0
  float clip;      // gradient multiplier from clipping (1 when not clipping)
  bool skip;       // skip the whole step: found_inf, or a non-finite norm when checked
  double inv_vbar64, clip64;  // the same in double: what float64 state uses
};

ADAI_HD Globals globals(const double* t, double max_grad_norm, bool skip_nonfinite,
                        bool found_inf) {
  Globals out;
  const double gn2 = t[kGn];
  const bool finite = gn2 - gn2 == 0.0;  // false for inf and NaN, also under fast-math
  out.skip = found_inf || ((skip_nonfinite || max_grad_norm > 0.0) && !finite);
  double c = 1.0;
  if (max_grad_norm > 0.0 && finite) {
    c = max_grad_norm / (::sqrt(gn2) + 1e-6);  // as torch.nn.utils.clip_grad_norm_
    if (c > 1.0) c = 1.0;
  }
  const double s = c == 1.0 ? t[kA] + t[kB] : t[kA] + c * c * t[kBgg] + c * t[kBgt] + t[kBtt];
  out.inv_vbar64 = inv_mean(s, t[kN]);
  out.clip64 = c;
  out.inv_vbar = static_cast<float>(out.inv_vbar64);
  out.clip = static_cast<float>(c);
  return out;
}

// The gradient multiplier of unscaling: float(1 / double(scale)), as GradScaler.unscale_
// computes it; 1 without a scale (grad_scale null).
ADAI_HD float inv_grad_scale(const float* grad_scale) {
  return grad_scale != nullptr ? static_cast<float>(1.0 / static_cast<double>(*grad_scale))
                               : 1.0f;
}

// The gradient as both phases see it: L2 decay added (never written back to the caller).
// Without L2 decay theta is not touched, so a non-finite parameter cannot reach v through
// 0 * inf.
template <typename T, typename S>
ADAI_HD T effective_grad(T g, T theta, const BasicConsts<S>& c) {
  return c.l2 != S(0) ? g + T(c.l2) * theta : g;
}

// Phase 1 contribution of one element to G_i = sum (g + l2 * theta)^2.
template <typename T, typename S>
ADAI_HD T grad_sq(T g, T theta, const BasicConsts<S>& c) {
  const T ge = effective_grad(g, theta, c);
  return ge * ge;
}

// Phase 2 up to the inertia: L2, the new v, beta1 and beta3 (shared by both updates below).
template <typename T>
struct Inertia {
  T ge, beta1, beta3;
};

template <typename T, typename S>
ADAI_HD Inertia<T> inertia(T theta, T g, T& v, T inv_bc2, T inv_vbar,
                           const BasicConsts<S>& c) {
  const T ge = effective_grad(g, theta, c);
  v = T(c.beta2) * v + T(c.one_minus_beta2) * ge * ge;
  const T ratio = v * inv_bc2 * inv_vbar;                       // vhat / vbar
  const T scaled = c.adai_v1 ? ratio : Ops<T>::pow(ratio, T(c.exponent));
  const T beta1 = Ops<T>::clamp(T(S(1)) - T(c.beta0) * scaled, T(S(0)), T(c.beta1_max));
  const T one_minus_beta1 = T(S(1)) - beta1;
  const T beta3 = c.adai_v1 ? one_minus_beta1 : Ops<T>::pow(one_minus_beta1, T(c.dampening));
  return {ge, beta1, beta3};
}

// The momentum and the parameter, from mhat before AdaiV2's scale.
template <typename T, typename S>
ADAI_HD void step_param(T& theta, T mhat, const BasicConsts<S>& c) {
  if (!c.adai_v1) mhat = mhat * T(c.mhat_scale);
  theta = theta - T(c.lr_wd) * theta - T(c.lr) * mhat;
}

// Phase 2: one element's whole update. Reads and writes theta, m, v, b in registers; returns
// the new v (the caller sums it into v_sums). inv_bc2 is per tensor, inv_vbar global.
template <typename T, typename S>
ADAI_HD T update(T& theta, T g, T& m, T& v, T& b, T inv_bc2, T inv_vbar,
                 const BasicConsts<S>& c) {
  const Inertia<T> in = inertia(theta, g, v, inv_bc2, inv_vbar, c);
  b = b * in.beta1;
  m = in.beta1 * m + in.beta3 * in.ge;
  step_param(theta, m / (T(S(1)) - b), c);
  return v;
}

// The same update for a tensor whose b is done (beta1_prod_done): b is neither read nor
// written, and mhat = m, which is bitwise what update() computes then (1 - b == 1).
template <typename T, typename S>
ADAI_HD T update_b_done(T& theta, T g, T& m, T& v, T inv_bc2, T inv_vbar,
                        const BasicConsts<S>& c) {
  const Inertia<T> in = inertia(theta, g, v, inv_bc2, inv_vbar, c);
  m = in.beta1 * m + in.beta3 * in.ge;
  step_param(theta, m, c);
  return v;
}

// The exact elision rule (ADAI_SPEC.md, "Exactness shortcut"): in float, 1 - b rounds to
// exactly 1 for every |b| <= 2^-25 (round to nearest even), in double for |b| <= 2^-54, and
// b never grows during training. `b_max` is the max |b| over a tensor's elements (NaN when
// any is NaN: never done), kept in float32 whatever the state (a double max rounded up).
constexpr float kBeta1ProdDone = 2.98023223876953125e-08f;  // 2^-25
constexpr float kBeta1ProdDone64 = 5.5511151231257827e-17f;  // 2^-54, exact in float

ADAI_HD bool beta1_prod_done(float b_max) { return b_max <= kBeta1ProdDone; }
ADAI_HD bool beta1_prod_done64(float b_max) { return b_max <= kBeta1ProdDone64; }

// One step of the NaN-propagating max of |b| (start from 0): once NaN, stays NaN.
template <typename T>
ADAI_HD T max_abs_nan(T acc, T b) {
  const T a = b < T(0) ? -b : b;
  return (a > acc || a != a) ? a : acc;
}

}  // namespace adai
