// Fused CPU kernels for adai::stats, adai::update and adai::v_sum (semantics:
// docs/design.md, "Native op schemas").
//
// This one source is compiled once per ISA into separate extension modules
// (adai_kernels._cpu_default / _cpu_avx2 / _cpu_avx512, see setup.py); only one of them is
// ever imported. CPU_CAPABILITY / CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 select ATen's
// Vectorized<float> implementation and its inline namespace, exactly as in ATen's own
// per-ISA kernels.
//
// Work split: one flat list of fixed-size chunks over all tensors of the call (chunks never
// cross a tensor boundary), run with at::parallel_for. Every chunk writes its partial sum to
// its own slot; per-tensor sums add the slots in chunk order in double, the bucket sum adds
// tensors in list order. Inside a chunk, sums run in Vectorized<float> lanes and are flushed
// into a double every kFlush elements. Which elements go through the vector body and which
// through the scalar tail depends only on the element's index inside its tensor, so results
// are bitwise identical for any number of threads. `update` has no scalar math: a tensor's
// last partial block runs through the vector code on a zero-padded copy, so every element
// gets the same arithmetic wherever it sits.
//
// State: tensor i's j-th element (in memory order) has its states at buffer[offset_i + j]
// and its step and v_sum at steps[slot_i] and v_sums[slot_i] (`segments`, csrc/op_schemas.h).
//
// pow: AdaiV2 (dampening < 1) needs two per element, and Vectorized<float>::pow (SLEEF's
// powf) made its update ~5x slower than Adai's. The kernel computes pow(x, e) as
// 2^(e log2 x) with inline polynomials instead (vec_pow.h; the default build: std::pow per
// lane). Its relative error is at most (|e ln x| + 2) ulp instead of powf's 1 (the rounding
// of the float exponent, amplified by 2^y): ~2-4 ulp for vhat / vbar near 1, ~15 ulp (1e-6)
// at vhat / vbar = 1e-13; tests/test_cpu_kernel.py adds exactly this term to its bounds.
// pow(0, e) = 0 for e > 0 and pow(x, 0) = 1, as powf. The CUDA kernels use powf, so CPU and
// CUDA results of AdaiV2 differ in the last bits.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "adai_math.h"
#include "adai_random.h"
#include "op_prologue.h"
#include "param_dtype.h"
#include "cpu/chunks.h"
#include "cpu/float64.h"
#include "cpu/vec_pow.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

using fVec = at::vec::Vectorized<float>;
using iVec = at::vec::Vectorized<int32_t>;

// The wide builds must really get the wide implementations (and not silently the generic
// one, e.g. because a -m flag or a macro went missing).
#if defined(CPU_CAPABILITY_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__)
#error "CPU_CAPABILITY_AVX512 build without -mavx512f -mavx512bw -mavx512vl -mavx512dq"
#endif
static_assert(fVec::size() == 16, "AVX512 build must use 512-bit Vectorized<float>");
// Compiles only if Vectorized<float> is the __m512 implementation (converts to __m512).
static_assert(sizeof(static_cast<__m512>(std::declval<fVec>())) == 64, "not __m512");
#define ADAI_CPU_ISA_NAME "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "CPU_CAPABILITY_AVX2 build without -mavx2 -mfma -mf16c"
#endif
static_assert(fVec::size() == 8, "AVX2 build must use 256-bit Vectorized<float>");
// Compiles only if Vectorized<float> is the __m256 implementation (converts to __m256).
static_assert(sizeof(static_cast<__m256>(std::declval<fVec>())) == 32, "not __m256");
#define ADAI_CPU_ISA_NAME "avx2"
#else
#define ADAI_CPU_ISA_NAME "default"
#endif

// Vector versions of the two non-arithmetic operations of adai_math.h.
namespace adai {
template <>
struct Ops<fVec> {
  // 2^(e log2 x), inline (vec_pow.h; see the top of this file for why and for its error)
  static inline fVec pow(fVec x, fVec e) { return adai_vec::pow(x, e); }
  // Same semantics as the scalar Ops<float>::clamp: comparisons with NaN are false, so a NaN
  // passes through unchanged (at::vec::clamp's generic version would turn it into `lo`).
  static inline fVec clamp(fVec x, fVec lo, fVec hi) {
    const fVec r = fVec::blendv(x, lo, x < lo);
    return fVec::blendv(r, hi, r > hi);
  }
};
}  // namespace adai

// Module info for the Python shim (csrc/cpu/pymodule.cpp).
extern "C" int adai_cpu_vec_size() { return static_cast<int>(fVec::size()); }
extern "C" const char* adai_cpu_isa() { return ADAI_CPU_ISA_NAME; }

namespace {

constexpr int64_t kW = fVec::size();
constexpr int64_t kBlock = 2 * kW;  // elements per vector iteration (two float vectors)
using adai_cpu::Chunk;
using adai_cpu::data_ptrs;
using adai_cpu::for_each_chunk;
using adai_cpu::kChunk;
using adai_cpu::make_chunks;
using adai_cpu::numels;
using adai_cpu::tensor_sums;
static_assert(kChunk % kBlock == 0, "chunk size must be a multiple of the vector block");

// ---- loads and stores of parameters / gradients as fp32 ------------------------------------

template <typename scalar_t>
struct IO;

template <>
struct IO<float> {
  static inline void load(const float* p, fVec& a, fVec& b) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kW);
  }
  static inline void store(float* p, const fVec& a, const fVec& b) {
    a.store(p);
    b.store(p + kW);
  }
};

template <typename scalar_t>
struct IOReduced {
  // Vectorized<scalar_t> holds exactly two float vectors' worth of elements.
  static_assert(at::vec::Vectorized<scalar_t>::size() == kBlock, "unexpected vector width");
  static inline void load(const scalar_t* p, fVec& a, fVec& b) {
    at::vec::load_to_float<scalar_t>(p, a, b);
  }
  // Round to nearest even (ATen's float -> bf16 / fp16 vector conversions do RNE).
  static inline void store(scalar_t* p, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
};
template <>
struct IO<c10::BFloat16> : IOReduced<c10::BFloat16> {};
template <>
struct IO<c10::Half> : IOReduced<c10::Half> {};

// Horizontal sum of a float vector, in double, lanes in order.
inline double hsum(const fVec& v) {
  __at_align__ float buf[kW];
  v.store(buf);
  double s = 0.0;
  for (int64_t k = 0; k < kW; ++k) s += static_cast<double>(buf[k]);
  return s;
}

// ---- per-chunk kernels ------------------------------------------------------------------------

// The one summation order of every per-chunk sum (stats' columns, update's and v_sum's v
// sums): vector blocks of kBlock elements go into two float accumulators per sum (first and
// second half of the block), which are added into a double every kFlush elements, so no fp32
// lane adds more than kFlush / kBlock (= 32) terms; then the scalar tail, element by element,
// in double. `vec(i, x0, x1)` produces block i's two vectors of terms of each of the K sums
// (x0[k], x1[k]), `tail(i, t)` element i's K terms. update and v_sum both sum the stored new
// v through here, so their sums agree bitwise.
constexpr int64_t kFlush = 1024;
static_assert(kFlush % kBlock == 0 && kChunk % kFlush == 0, "bad flush size");

template <int K, typename VecBody, typename TailBody>
inline void blocked_sums(int64_t n, double* s, const VecBody& vec, const TailBody& tail) {
  const int64_t n_vec = n - n % kBlock;
  for (int k = 0; k < K; ++k) s[k] = 0.0;
  int64_t i = 0;
  while (i < n_vec) {
    const int64_t stop = std::min(n_vec, i + kFlush);
    fVec acc0[K], acc1[K];
    for (int k = 0; k < K; ++k) acc0[k] = acc1[k] = fVec(0.0f);
    for (; i < stop; i += kBlock) {
      fVec x0[K], x1[K];
      vec(i, x0, x1);
      for (int k = 0; k < K; ++k) {
        acc0[k] = acc0[k] + x0[k];
        acc1[k] = acc1[k] + x1[k];
      }
    }
    for (int k = 0; k < K; ++k) s[k] += hsum(acc0[k] + acc1[k]);
  }
  for (; i < n; ++i) {
    float t[K];
    tail(i, t);
    for (int k = 0; k < K; ++k) s[k] += static_cast<double>(t[k]);
  }
}

// Sums of phase 1 over one chunk of n elements, g = grad * inv_scale (fp32), in the order of
// adai_math.h's StatsSum: s[kSumGg] = sum g^2; with kL2 also s[kSumGradSq] =
// sum (g + l2 theta)^2, s[kSumGt] = sum g theta, s[kSumTt] = sum theta^2 (theta is read only
// when kL2: from the param, theta_t = scalar_t, or from the fp32 master copy, float).
using adai::kSumGg;
using adai::kSumGradSq;
using adai::kSumGt;
using adai::kSumTt;

template <typename scalar_t, typename theta_t, bool kL2>
void stats_chunk(const scalar_t* g, const theta_t* p, int64_t n, float inv_scale,
                 const adai::Consts& c, double* s) {
  const fVec scale(inv_scale);
  if constexpr (kL2) {
    blocked_sums<adai::kStatsSums>(
        n, s,
        [&](int64_t i, fVec* x0, fVec* x1) {
          fVec g0, g1, p0, p1;
          IO<scalar_t>::load(g + i, g0, g1);
          IO<theta_t>::load(p + i, p0, p1);
          g0 = g0 * scale;
          g1 = g1 * scale;
          x0[kSumGg] = g0 * g0;
          x1[kSumGg] = g1 * g1;
          x0[kSumGradSq] = adai::grad_sq(g0, p0, c);
          x1[kSumGradSq] = adai::grad_sq(g1, p1, c);
          x0[kSumGt] = g0 * p0;
          x1[kSumGt] = g1 * p1;
          x0[kSumTt] = p0 * p0;
          x1[kSumTt] = p1 * p1;
        },
        [&](int64_t i, float* t) {
          const float gi = static_cast<float>(g[i]) * inv_scale;
          const float pi = static_cast<float>(p[i]);
          t[kSumGg] = gi * gi;
          t[kSumGradSq] = adai::grad_sq(gi, pi, c);
          t[kSumGt] = gi * pi;
          t[kSumTt] = pi * pi;
        });
  } else {
    blocked_sums<1>(
        n, s,
        [&](int64_t i, fVec* x0, fVec* x1) {
          fVec g0, g1;
          IO<scalar_t>::load(g + i, g0, g1);
          g0 = g0 * scale;
          g1 = g1 * scale;
          x0[0] = g0 * g0;
          x1[0] = g1 * g1;
        },
        [&](int64_t i, float* t) {
          const float gi = static_cast<float>(g[i]) * inv_scale;
          t[0] = gi * gi;
        });
  }
}

// Where theta comes from and goes to: the param (rounded to nearest when it is bf16/fp16),
// the fp32 master copy (then the param gets master rounded to nearest), or the param with
// stochastic rounding (bf16 only; csrc/adai_random.h).
enum class Theta { kParam, kMaster, kStochastic };

// What update_block needs besides the element pointers: the per-call vector constants and
// the tensor's rounding stream (kStochastic).
struct BlockArgs {
  fVec gmul, inv_bc2, inv_vbar;
  const adai::Consts* c;
  uint32_t stream;
};

// |b| as int32 lanes: the float bits with the sign cleared. For numbers >= 0 the integer order
// is the float order, and a NaN's bits lie above every number's, so an integer max of these
// propagates NaN in one instruction (at::vec::maximum on floats adds the NaN checks).
inline iVec abs_bits(const fVec& b) {
  return at::vec::cast<int32_t>(b) & iVec(0x7fffffff);
}

// One vector block of the update: kBlock elements at p, g, m, v, b (kB: the tensor's b is
// not done) and w (kMaster); returns the new v in v0, v1. kMax: bmax = the NaN-propagating
// lane max of |b new|, as the bits of |b| (abs_bits). index: the first element's rounding index (kStochastic).
template <typename scalar_t, bool kB, bool kMax, Theta kT>
ADAI_HD void update_block(scalar_t* p, const scalar_t* g, float* m, float* v, float* b,
                         float* w, uint64_t index, const BlockArgs& u, fVec& v0, fVec& v1,
                         iVec& bmax) {
  fVec p0, p1, g0, g1;
  if constexpr (kT == Theta::kMaster) {
    p0 = fVec::loadu(w);
    p1 = fVec::loadu(w + kW);
  } else {
    IO<scalar_t>::load(p, p0, p1);
  }
  IO<scalar_t>::load(g, g0, g1);
  g0 = g0 * u.gmul;  // unscaling and clipping: one multiply, before the L2 term
  g1 = g1 * u.gmul;
  fVec m0 = fVec::loadu(m), m1 = fVec::loadu(m + kW);
  v0 = fVec::loadu(v);
  v1 = fVec::loadu(v + kW);
  if constexpr (kB) {
    fVec b0 = fVec::loadu(b), b1 = fVec::loadu(b + kW);
    adai::update(p0, g0, m0, v0, b0, u.inv_bc2, u.inv_vbar, *u.c);
    adai::update(p1, g1, m1, v1, b1, u.inv_bc2, u.inv_vbar, *u.c);
    b0.store(b);
    b1.store(b + kW);
    if constexpr (kMax) {  // at::vec::maximum propagates NaN
      bmax = at::vec::maximum(bmax, at::vec::maximum(abs_bits(b0), abs_bits(b1)));
    }
  } else {
    adai::update_b_done(p0, g0, m0, v0, u.inv_bc2, u.inv_vbar, *u.c);
    adai::update_b_done(p1, g1, m1, v1, u.inv_bc2, u.inv_vbar, *u.c);
  }
  if constexpr (kT == Theta::kMaster) {
    p0.store(w);
    p1.store(w + kW);
  }
  if constexpr (kT == Theta::kStochastic && std::is_same_v<scalar_t, c10::BFloat16>) {
    __at_align__ float t[kBlock];
    p0.store(t);
    p1.store(t + kW);
    for (int64_t j = 0; j < kBlock; ++j) {
      const uint32_t bits = adai::rounding_bits(u.stream, index + static_cast<uint64_t>(j));
      p[j] = c10::BFloat16(adai::bf16_round_stochastic(t[j], bits), c10::BFloat16::from_bits());
    }
  } else {
    IO<scalar_t>::store(p, p0, p1);
  }
  m0.store(m);
  m1.store(m + kW);
  v0.store(v);
  v1.store(v + kW);
}

// The NaN-propagating max of |b| over the lanes of bmax (abs_bits), in lane order.
inline float hmax(const iVec& bits) {
  __at_align__ float buf[kW];
  at::vec::cast<float>(bits).store(buf);
  float acc = 0.0f;
  for (int64_t k = 0; k < kW; ++k) acc = adai::max_abs_nan(acc, buf[k]);
  return acc;
}

// One fused pass over n elements; returns the sum of the new v and (kMax) *bmax_out = the
// max |b new|. The last n % kBlock elements go through update_block on zero-padded copies
// (the padding lanes are computed and dropped).
template <typename scalar_t, bool kB, bool kMax, Theta kT>
double update_chunk(scalar_t* p, const scalar_t* g, float* m, float* v, float* b, float* w,
                    uint64_t index, int64_t n, const BlockArgs& args, float* bmax_out) {
  // Local copies: the compiler then knows that the stores to m, v, b cannot change them, and
  // keeps the constants in registers (through `args` it reloads them after every store).
  const adai::Consts c = *args.c;
  BlockArgs u = args;
  u.c = &c;
  const int64_t n_vec = n - n % kBlock;
  iVec bmax(0);
  float tail_max = 0.0f;
  if (n_vec < n) {
    const int64_t r = n - n_vec;
    scalar_t pb[kBlock] = {}, gb[kBlock] = {};
    __at_align__ float mb[kBlock] = {}, vb[kBlock] = {}, bb[kBlock] = {}, wb[kBlock] = {};
    std::copy(p + n_vec, p + n, pb);
    std::copy(g + n_vec, g + n, gb);
    std::copy(m + n_vec, m + n, mb);
    std::copy(v + n_vec, v + n, vb);
    if constexpr (kB) std::copy(b + n_vec, b + n, bb);
    if constexpr (kT == Theta::kMaster) std::copy(w + n_vec, w + n, wb);
    fVec v0, v1;
    iVec unused(0);
    update_block<scalar_t, kB, false, kT>(pb, gb, mb, vb, bb, wb,
                                          index + static_cast<uint64_t>(n_vec), u, v0, v1,
                                          unused);
    std::copy(pb, pb + r, p + n_vec);
    std::copy(mb, mb + r, m + n_vec);
    std::copy(vb, vb + r, v + n_vec);
    if constexpr (kB) std::copy(bb, bb + r, b + n_vec);
    if constexpr (kT == Theta::kMaster) std::copy(wb, wb + r, w + n_vec);
    if constexpr (kMax) {  // the real lanes only
      for (int64_t j = 0; j < r; ++j) tail_max = adai::max_abs_nan(tail_max, bb[j]);
    }
  }
  double s;
  blocked_sums<1>(
      n, &s,
      [&](int64_t i, fVec* x0, fVec* x1) {
        update_block<scalar_t, kB, kMax, kT>(p + i, g + i, m + i, v + i, kB ? b + i : nullptr,
                                             kT == Theta::kMaster ? w + i : nullptr,
                                             index + static_cast<uint64_t>(i), u, x0[0],
                                             x1[0], bmax);
      },
      [&](int64_t i, float* t) { t[0] = v[i]; });  // updated above
  if constexpr (kMax) *bmax_out = adai::max_abs_nan(hmax(bmax), tail_max);
  return s;
}

// The sum of v over n elements, exactly as update_chunk sums the v it stores.
double v_sum_chunk(const float* v, int64_t n) {
  double s;
  blocked_sums<1>(
      n, &s,
      [&](int64_t i, fVec* x0, fVec* x1) {
        x0[0] = fVec::loadu(v + i);
        x1[0] = fVec::loadu(v + i + kW);
      },
      [&](int64_t i, float* t) { t[0] = v[i]; });
  return s;
}

// ---- the ops ------------------------------------------------------------------------------

// The CPU: params of one call may mix the kernels' three dtypes; float64 is stepped too.
const adai::Target kCpu{at::Device(at::kCPU), /*one_dtype=*/false, /*float64=*/true};

// stats' per-tensor sums: sums[i * K + k] = tensor i's StatsSum k (K = kStatsSums with L2
// decay, else 1: kSumGg), its chunks' sums added in chunk order.
std::vector<double> stats_tensor_sums(at::TensorList params, at::TensorList grads,
                                      const std::vector<int64_t>& numel, bool use_l2, int K,
                                      float inv_scale, const adai::Consts& c,
                                      const adai::OpArgs& a) {
  const std::vector<const void*> gp = data_ptrs<const void>(grads);
  const std::vector<const void*> pp = data_ptrs<const void>(params);
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(numel, first);
  std::vector<double> partial(chunks.size() * K, 0.0);
  if (!chunks.empty()) {
    // one dtype per call in practice (a bucket), but any mix is handled
    for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
      const int64_t i = ch.tensor;
      double* s = partial.data() + k * K;
      adai::dispatch_param_dtype(params[i].scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        const scalar_t* g = static_cast<const scalar_t*>(gp[i]) + ch.begin;
        if (use_l2 && a.master != nullptr) {  // theta from the master copy at the span
          const float* w = a.master + adai::segment(a, static_cast<size_t>(i), adai::kOffset);
          stats_chunk<scalar_t, float, true>(g, w + ch.begin, ch.len, inv_scale, c, s);
        } else if (use_l2) {
          const scalar_t* p = static_cast<const scalar_t*>(pp[i]) + ch.begin;
          stats_chunk<scalar_t, scalar_t, true>(g, p, ch.len, inv_scale, c, s);
        } else {
          stats_chunk<scalar_t, scalar_t, false>(g, nullptr, ch.len, inv_scale, c, s);
        }
      });
    });
  }
  return tensor_sums(partial, first, numel.size(), K);
}

// The unscaling multiplier of float64 gradients: float32(1 / scale), as for every dtype (and
// as GradScaler.unscale_ multiplies float64 gradients by its float32 inverse scale).
double inv_grad_scale64(const adai::OpArgs& a) {
  return static_cast<double>(adai::inv_grad_scale(a.grad_scale));
}

void stats_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
               const at::Tensor& steps, const at::Tensor& v_sums,
               const std::optional<at::Tensor>& grad_scale, double beta2, double l2,
               const at::Tensor& out,
               const std::optional<at::Tensor>& master) {
  const char* op = "adai::stats";
  const adai::OpArgs a = adai::stats_prologue(op, params, grads, segments, steps, v_sums,
                                              master, grad_scale, out, kCpu);
  const bool f64 = a.state_dtype == at::kDouble;
  const adai::Consts c = adai::make_consts(0.0, 0.0, beta2, 0.0, l2, false, 1.0);
  // The per-element l2 is the state's (adai::BasicConsts): params are read only when it is
  // nonzero (as adai::effective_grad adds the term), and the row's expanded columns use the
  // same value.
  const double l2d = f64 ? l2 : static_cast<double>(c.l2);
  const bool use_l2 = l2d != 0.0;
  const int K = use_l2 ? adai::kStatsSums : 1;
  const std::vector<int64_t> numel = numels(params);
  const std::vector<double> sums =
      f64 ? adai_cpu::stats_sums_f64(params, grads, use_l2, K, inv_grad_scale64(a),
                                     adai::make_consts<double>(0.0, 0.0, beta2, 0.0, l2, false,
                                                               1.0))
          : stats_tensor_sums(params, grads, numel, use_l2, K,
                              adai::inv_grad_scale(a.grad_scale), c, a);

  // The bucket's row: the tensors' terms added in list order, each straight into its column
  // (the compiler may fuse a term's multiply with that add, so this is not the CUDA kernels'
  // per-tensor stats_tensor_row; written this way, the CPU row keeps its bits).
  double* step_p = steps.mutable_data_ptr<double>();
  const double* v_sum_p = v_sums.const_data_ptr<double>();
  double row[adai::kStatsColumns] = {};
  for (size_t i = 0; i < a.n; ++i) {
    const int64_t slot = adai::segment(a, i, adai::kSlot);
    double* k = step_p + slot;
    *k += 1.0;
    const double bc2 = adai::bias_correction2(beta2, *k);
    const double w = (1.0 - beta2) / bc2;
    const double V = v_sum_p[slot];
    const double gg = sums[i * K + kSumGg];
    const double wgg = w * gg;
    row[adai::kA] += beta2 * V / bc2;
    if (use_l2) {
      row[adai::kB] += w * sums[i * K + kSumGradSq];
      row[adai::kBgg] += wgg;
      row[adai::kBgt] += w * (2.0 * l2d * sums[i * K + kSumGt]);
      row[adai::kBtt] += w * (l2d * l2d * sums[i * K + kSumTt]);
    } else {
      row[adai::kB] += wgg;
      row[adai::kBgg] += wgg;
    }
    row[adai::kGn] += gg;
    row[adai::kN] += static_cast<double>(numel[i]);
  }
  double* o = out.mutable_data_ptr<double>();
  const int64_t os = out.stride(0);
  for (int j = 0; j < adai::kStatsColumns; ++j) o[j * os] = row[j];
}

// Calls f(std::integral_constant<Theta, ...>) for the theta handling of a tensor of `dtype`
// (only the combinations the prologue lets through are instantiated).
template <typename scalar_t, typename F>
void dispatch_theta(const adai::OpArgs& a, const F& f) {
  using K = Theta;
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (a.master != nullptr) return f(std::integral_constant<K, K::kMaster>{});
  }
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (a.rounding_seed != nullptr) return f(std::integral_constant<K, K::kStochastic>{});
  }
  f(std::integral_constant<K, K::kParam>{});
}

// Which tensors of the call are done (their b is neither read nor written): all of them when
// `beta1_prod` is freed, none without `beta1_prod_max`, else by the flag rule of the state.
std::vector<char> done_tensors(const adai::OpArgs& a) {
  std::vector<char> done(a.n, 0);
  for (size_t i = 0; i < a.n; ++i) {
    if (!a.has_beta1_prod) {
      done[i] = 1;
    } else if (a.beta1_prod_max != nullptr) {
      const float b_max = a.beta1_prod_max[adai::segment(a, i, adai::kSlot)];
      done[i] = a.state_dtype == at::kDouble ? adai::beta1_prod_done64(b_max)
                                             : adai::beta1_prod_done(b_max);
    }
  }
  return done;
}

// update's fused pass over every element of the call (g = grad * gmul); returns each
// tensor's sum of its new v, its chunks' sums added in chunk order. With `beta1_prod_max`,
// the not-done tensors' slots get their max |b new| (chunk maxima in chunk order).
std::vector<double> update_tensors(at::TensorList params, at::TensorList grads,
                                   const adai::OpArgs& a, const at::Tensor& exp_avg,
                                   const at::Tensor& exp_avg_sq, const at::Tensor& beta1_prod,
                                   const std::vector<char>& done, float gmul,
                                   const std::vector<float>& inv_bc2, float inv_vbar,
                                   const adai::Consts& c, const std::vector<uint32_t>& streams) {
  const std::vector<void*> pp = data_ptrs<void>(params);
  const std::vector<const void*> gp = data_ptrs<const void>(grads);
  float* const m_base = exp_avg.mutable_data_ptr<float>();
  float* const v_base = exp_avg_sq.mutable_data_ptr<float>();
  float* const b_base = a.has_beta1_prod ? beta1_prod.mutable_data_ptr<float>() : nullptr;
  const bool with_max = a.beta1_prod_max != nullptr;
  const std::vector<int64_t> numel = numels(params);
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(numel, first);
  std::vector<double> partial(chunks.size(), 0.0);
  std::vector<float> partial_max(chunks.size(), 0.0f);
  if (!chunks.empty()) {
    for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
      const int64_t i = ch.tensor;
      const int64_t o = ch.begin;
      const int64_t so = adai::segment(a, static_cast<size_t>(i), adai::kOffset) + o;
      const BlockArgs u{fVec(gmul), fVec(inv_bc2[i]), fVec(inv_vbar), &c,
                        streams.empty() ? 0u : streams[i]};
      const uint64_t index =
          a.rounding_index != nullptr ? static_cast<uint64_t>(a.rounding_index[i] + o) : 0;
      float* const w = a.master != nullptr ? a.master + so : nullptr;
      adai::dispatch_param_dtype(params[i].scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        scalar_t* const p = static_cast<scalar_t*>(pp[i]) + o;
        const scalar_t* const g = static_cast<const scalar_t*>(gp[i]) + o;
        dispatch_theta<scalar_t>(a, [&](auto theta) {
          constexpr Theta kT = decltype(theta)::value;
          float* const mx = &partial_max[k];
          if (done[i]) {
            partial[k] = update_chunk<scalar_t, false, false, kT>(
                p, g, m_base + so, v_base + so, nullptr, w, index, ch.len, u, mx);
          } else if (with_max) {
            partial[k] = update_chunk<scalar_t, true, true, kT>(
                p, g, m_base + so, v_base + so, b_base + so, w, index, ch.len, u, mx);
          } else {
            partial[k] = update_chunk<scalar_t, true, false, kT>(
                p, g, m_base + so, v_base + so, b_base + so, w, index, ch.len, u, mx);
          }
        });
      });
    });
  }
  if (with_max) {  // not-done tensors: the max over their chunks (0 when empty)
    for (size_t i = 0; i < a.n; ++i) {
      if (done[i]) continue;
      float mx = 0.0f;
      for (int64_t j = first[i]; j < first[i + 1]; ++j) mx = adai::max_abs_nan(mx, partial_max[j]);
      a.beta1_prod_max[adai::segment(a, i, adai::kSlot)] = mx;
    }
  }
  return tensor_sums(partial, first, a.n, 1);
}

// Each tensor's rounding stream (its step after this step's increment), or none.
std::vector<uint32_t> rounding_streams(const adai::OpArgs& a, const double* step_p) {
  std::vector<uint32_t> streams;
  if (a.rounding_seed == nullptr) return streams;
  const uint32_t seed = static_cast<uint32_t>(*a.rounding_seed);
  for (size_t i = 0; i < a.n; ++i) {
    const double k = step_p[adai::segment(a, i, adai::kSlot)];
    // k holds an integer < 2^53: its low 32 bits
    streams.push_back(adai::rounding_stream(seed, static_cast<uint32_t>(static_cast<uint64_t>(k))));
  }
  return streams;
}

// v_sums[slot_i] = V[i] for every tensor of the call.
void write_v_sums(const adai::OpArgs& a, const std::vector<double>& V,
                  const at::Tensor& v_sums) {
  double* v_sum_p = v_sums.mutable_data_ptr<double>();
  for (size_t i = 0; i < a.n; ++i) v_sum_p[adai::segment(a, i, adai::kSlot)] = V[i];
}

void update_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                const at::Tensor& beta1_prod, const at::Tensor& v_sums, const at::Tensor& steps,
                const at::Tensor& stats,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& lr_tensor, double lr, double beta0,
                double beta2, double eps, double weight_decay, bool decoupled,
                double dampening, double max_grad_norm, bool skip_nonfinite,
                const std::optional<at::Tensor>& beta1_prod_max,
                const std::optional<at::Tensor>& master,
                const std::optional<at::Tensor>& rounding_seed,
                const std::optional<at::Tensor>& rounding_index) {
  const char* op = "adai::update";
  const adai::OpArgs a = adai::update_prologue(
      op, params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats,
      grad_scale, found_inf, lr_tensor, {beta1_prod_max, master, rounding_seed, rounding_index},
      kCpu);
  double totals[adai::kStatsColumns];
  adai::sum_stats_rows(stats.const_data_ptr<double>(), stats.size(0), stats.stride(0),
                       stats.stride(1), totals);
  const bool inf_found = a.found_inf != nullptr && *a.found_inf != 0.0f;
  const adai::Globals gl = adai::globals(totals, max_grad_norm, skip_nonfinite, inf_found);
  double* step_p = steps.mutable_data_ptr<double>();
  if (gl.skip) {  // take back the increments of `stats`; nothing else is written
    for (size_t i = 0; i < a.n; ++i) step_p[adai::segment(a, i, adai::kSlot)] -= 1.0;
    return;
  }
  const double lr_value = a.lr_tensor != nullptr ? static_cast<double>(*a.lr_tensor) : lr;
  std::vector<double> inv_bc2(a.n);
  for (size_t i = 0; i < a.n; ++i) {
    inv_bc2[i] = 1.0 / adai::bias_correction2(beta2, step_p[adai::segment(a, i, adai::kSlot)]);
  }
  const std::vector<char> done = done_tensors(a);
  std::vector<double> V;
  if (a.state_dtype == at::kDouble) {
    V = adai_cpu::update_f64(params, grads, a, exp_avg, exp_avg_sq, beta1_prod, done,
                             inv_grad_scale64(a) * gl.clip64, inv_bc2, gl.inv_vbar64,
                             adai::make_consts<double>(lr_value, beta0, beta2, eps,
                                                       weight_decay, decoupled, dampening));
  } else {
    const float gmul = adai::inv_grad_scale(a.grad_scale) * gl.clip;
    V = update_tensors(params, grads, a, exp_avg, exp_avg_sq, beta1_prod, done, gmul,
                       std::vector<float>(inv_bc2.begin(), inv_bc2.end()), gl.inv_vbar,
                       adai::make_consts(lr_value, beta0, beta2, eps, weight_decay, decoupled,
                                         dampening),
                       rounding_streams(a, step_p));
  }
  write_v_sums(a, V, v_sums);
}

void v_sum_cpu(const at::Tensor& exp_avg_sq, const at::Tensor& segments,
               const at::Tensor& v_sums) {
  const adai::OpArgs a = adai::v_sum_prologue("adai::v_sum", exp_avg_sq, segments, v_sums, kCpu);
  write_v_sums(a,
               a.state_dtype == at::kDouble
                   ? adai_cpu::segment_sums(exp_avg_sq.const_data_ptr<double>(), a,
                                            adai_cpu::v_sum_chunk_f64)
                   : adai_cpu::segment_sums(exp_avg_sq.const_data_ptr<float>(), a, v_sum_chunk),
               v_sums);
}

}  // namespace

TORCH_LIBRARY_IMPL(adai, CPU, m) {
  m.impl("stats", &stats_cpu);
  m.impl("update", &update_cpu);
  m.impl("v_sum", &v_sum_cpu);
}
