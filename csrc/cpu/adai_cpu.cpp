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
#include "op_prologue.h"
#include "param_dtype.h"
#include "cpu/vec_pow.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

using fVec = at::vec::Vectorized<float>;

// The wide builds must really get the wide implementations (and not silently the generic
// one, e.g. because a -m flag or a macro went missing).
#if defined(CPU_CAPABILITY_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__)
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

// Elements per chunk. A multiple of every vector block, so only a tensor's last chunk has a
// scalar tail. 16K fp32 elements move ~640 KB per chunk in `update`: plenty to amortise
// the scheduling, small enough that a few large tensors still split over all threads.
constexpr int64_t kChunk = 16384;
constexpr int64_t kW = fVec::size();
constexpr int64_t kBlock = 2 * kW;  // elements per vector iteration (two float vectors)
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
// when kL2).
using adai::kSumGg;
using adai::kSumGradSq;
using adai::kSumGt;
using adai::kSumTt;

template <typename scalar_t, bool kL2>
void stats_chunk(const scalar_t* g, const scalar_t* p, int64_t n, float inv_scale,
                 const adai::Consts& c, double* s) {
  const fVec scale(inv_scale);
  if constexpr (kL2) {
    blocked_sums<adai::kStatsSums>(
        n, s,
        [&](int64_t i, fVec* x0, fVec* x1) {
          fVec g0, g1, p0, p1;
          IO<scalar_t>::load(g + i, g0, g1);
          IO<scalar_t>::load(p + i, p0, p1);
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

// One vector block of the update: kBlock elements at p, g, m, v, b; returns the new v.
template <typename scalar_t>
inline void update_block(scalar_t* p, const scalar_t* g, float* m, float* v, float* b,
                         const fVec& gmul, const fVec& inv_bc2, const fVec& inv_vbar,
                         const adai::Consts& c, fVec& v0, fVec& v1) {
  fVec p0, p1, g0, g1;
  IO<scalar_t>::load(p, p0, p1);
  IO<scalar_t>::load(g, g0, g1);
  g0 = g0 * gmul;  // unscaling and clipping: one multiply, before the L2 term
  g1 = g1 * gmul;
  fVec m0 = fVec::loadu(m), m1 = fVec::loadu(m + kW);
  v0 = fVec::loadu(v);
  v1 = fVec::loadu(v + kW);
  fVec b0 = fVec::loadu(b), b1 = fVec::loadu(b + kW);
  adai::update(p0, g0, m0, v0, b0, inv_bc2, inv_vbar, c);
  adai::update(p1, g1, m1, v1, b1, inv_bc2, inv_vbar, c);
  IO<scalar_t>::store(p, p0, p1);
  m0.store(m);
  m1.store(m + kW);
  v0.store(v);
  v1.store(v + kW);
  b0.store(b);
  b1.store(b + kW);
}

// One fused pass over n elements; returns the sum of the new v. The last n % kBlock elements
// go through update_block on zero-padded copies (the padding lanes are computed and dropped).
template <typename scalar_t>
double update_chunk(scalar_t* p, const scalar_t* g, float* m, float* v, float* b, int64_t n,
                    float gmul, float inv_bc2, float inv_vbar, const adai::Consts& c) {
  const fVec gmul_v(gmul), inv_bc2_v(inv_bc2), inv_vbar_v(inv_vbar);
  const int64_t n_vec = n - n % kBlock;
  if (n_vec < n) {
    const int64_t r = n - n_vec;
    scalar_t pb[kBlock] = {}, gb[kBlock] = {};
    __at_align__ float mb[kBlock] = {}, vb[kBlock] = {}, bb[kBlock] = {};
    std::copy(p + n_vec, p + n, pb);
    std::copy(g + n_vec, g + n, gb);
    std::copy(m + n_vec, m + n, mb);
    std::copy(v + n_vec, v + n, vb);
    std::copy(b + n_vec, b + n, bb);
    fVec v0, v1;
    update_block(pb, gb, mb, vb, bb, gmul_v, inv_bc2_v, inv_vbar_v, c, v0, v1);
    std::copy(pb, pb + r, p + n_vec);
    std::copy(mb, mb + r, m + n_vec);
    std::copy(vb, vb + r, v + n_vec);
    std::copy(bb, bb + r, b + n_vec);
  }
  double s;
  blocked_sums<1>(
      n, &s,
      [&](int64_t i, fVec* x0, fVec* x1) {
        update_block(p + i, g + i, m + i, v + i, b + i, gmul_v, inv_bc2_v, inv_vbar_v, c,
                     x0[0], x1[0]);
      },
      [&](int64_t i, float* t) { t[0] = v[i]; });  // updated above
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

// ---- chunk list ---------------------------------------------------------------------------

struct Chunk {
  int64_t tensor;
  int64_t begin;  // element offset inside the tensor's memory span
  int64_t len;
};

// Chunks of every tensor, tensor by tensor, in memory order; first[i] is tensor i's first.
std::vector<Chunk> make_chunks(const std::vector<int64_t>& numel, std::vector<int64_t>& first) {
  std::vector<Chunk> chunks;
  const size_t n = numel.size();
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += (numel[i] + kChunk - 1) / kChunk;
  chunks.reserve(static_cast<size_t>(total));
  first.assign(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    first[i] = static_cast<int64_t>(chunks.size());
    for (int64_t s = 0; s < numel[i]; s += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), s, std::min(kChunk, numel[i] - s)});
    }
  }
  first[n] = static_cast<int64_t>(chunks.size());
  return chunks;
}

// Per-tensor sums of K interleaved sums: out[i * K + k] = tensor i's chunk slots
// partial[j * K + k] added in chunk order.
std::vector<double> tensor_sums(const std::vector<double>& partial,
                                const std::vector<int64_t>& first, size_t n, int K) {
  std::vector<double> sums(n * K, 0.0);
  for (size_t i = 0; i < n; ++i) {
    for (int k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t j = first[i]; j < first[i + 1]; ++j) s += partial[j * K + k];
      sums[i * K + k] = s;
    }
  }
  return sums;
}

template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  // Threads take tasks: runs of consecutive chunks of about kChunk elements in all, so that
  // many small tensors make few tasks (a call with < kChunk elements stays on the calling
  // thread) and threads get similar amounts of work. Each chunk still writes its own slot,
  // so the grouping does not change any result.
  std::vector<int64_t> task_begin;
  int64_t filled = kChunk;
  for (size_t k = 0; k < chunks.size(); ++k) {
    if (filled + chunks[k].len > kChunk) {
      task_begin.push_back(static_cast<int64_t>(k));
      filled = 0;
    }
    filled += chunks[k].len;
  }
  const int64_t n_tasks = static_cast<int64_t>(task_begin.size());
  task_begin.push_back(static_cast<int64_t>(chunks.size()));
  if (n_tasks == 1) {  // nothing to share: skip the parallel region
    for (size_t k = 0; k < chunks.size(); ++k) f(static_cast<int64_t>(k), chunks[k]);
    return;
  }
  at::parallel_for(0, n_tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = task_begin[b]; k < task_begin[e]; ++k) f(k, chunks[k]);
  });
}

// ---- the ops ------------------------------------------------------------------------------

const at::Device kCpu(at::kCPU);

// Raw pointers of one tensor list, taken once per call (the chunk loops then touch no
// at::Tensor). Dtypes are checked by the caller; read-only lists use const_data_ptr, so that
// they are never materialised (copy-on-write tensors).
template <typename T>
std::vector<T*> data_ptrs(at::TensorList ts) {
  std::vector<T*> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    if constexpr (std::is_const_v<T>) {
      out[i] = static_cast<T*>(ts[i].const_data_ptr());
    } else {
      out[i] = static_cast<T*>(ts[i].mutable_data_ptr());
    }
  }
  return out;
}

std::vector<int64_t> numels(at::TensorList ts) {
  std::vector<int64_t> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) out[i] = ts[i].numel();
  return out;
}

// stats' per-tensor sums: sums[i * K + k] = tensor i's StatsSum k (K = kStatsSums with L2
// decay, else 1: kSumGg), its chunks' sums added in chunk order.
std::vector<double> stats_tensor_sums(at::TensorList params, at::TensorList grads,
                                      const std::vector<int64_t>& numel, bool use_l2, int K,
                                      float inv_scale, const adai::Consts& c) {
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
        if (use_l2) {
          const scalar_t* p = static_cast<const scalar_t*>(pp[i]) + ch.begin;
          stats_chunk<scalar_t, true>(g, p, ch.len, inv_scale, c, s);
        } else {
          stats_chunk<scalar_t, false>(g, nullptr, ch.len, inv_scale, c, s);
        }
      });
    });
  }
  return tensor_sums(partial, first, numel.size(), K);
}

void stats_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
               const at::Tensor& steps, const at::Tensor& v_sums,
               const std::optional<at::Tensor>& grad_scale, double beta2, double l2,
               const at::Tensor& out,
               const std::optional<at::Tensor>& master) {
  const char* op = "adai::stats";
  const adai::OpArgs a = adai::stats_prologue(op, params, grads, segments, steps, v_sums,
                                              master, grad_scale, out, kCpu,
                                              /*one_dtype=*/false);
  adai::refuse_optionals(op, a, "CPU kernels");
  const adai::Consts c = adai::make_consts(0.0, 0.0, beta2, 0.0, l2, false, 1.0);
  // The per-element l2 is float (adai::Consts): params are read only when it is nonzero (as
  // adai::effective_grad adds the term), and the row's expanded columns use the same value.
  const bool use_l2 = c.l2 != 0.0f;
  const int K = use_l2 ? adai::kStatsSums : 1;
  const std::vector<int64_t> numel = numels(params);
  const std::vector<double> sums = stats_tensor_sums(
      params, grads, numel, use_l2, K, adai::inv_grad_scale(a.grad_scale), c);

  // The bucket's row: the tensors' terms added in list order, each straight into its column
  // (the compiler may fuse a term's multiply with that add, so this is not the CUDA kernels'
  // per-tensor stats_tensor_row; written this way, the CPU row keeps its bits).
  double* step_p = steps.mutable_data_ptr<double>();
  const double* v_sum_p = v_sums.const_data_ptr<double>();
  const double l2d = static_cast<double>(c.l2);
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

// update's fused pass over every element of the call (g = grad * gmul); returns each
// tensor's sum of its new v, its chunks' sums added in chunk order.
std::vector<double> update_tensors(at::TensorList params, at::TensorList grads,
                                   const adai::OpArgs& a, const at::Tensor& exp_avg,
                                   const at::Tensor& exp_avg_sq, const at::Tensor& beta1_prod,
                                   float gmul, const std::vector<float>& inv_bc2,
                                   float inv_vbar, const adai::Consts& c) {
  const std::vector<void*> pp = data_ptrs<void>(params);
  const std::vector<const void*> gp = data_ptrs<const void>(grads);
  float* const m_base = exp_avg.mutable_data_ptr<float>();
  float* const v_base = exp_avg_sq.mutable_data_ptr<float>();
  float* const b_base = beta1_prod.mutable_data_ptr<float>();
  const std::vector<int64_t> numel = numels(params);
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(numel, first);
  std::vector<double> partial(chunks.size(), 0.0);
  if (!chunks.empty()) {
    for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
      const int64_t i = ch.tensor;
      const int64_t o = ch.begin;
      const int64_t so = adai::segment(a, static_cast<size_t>(i), adai::kOffset) + o;
      adai::dispatch_param_dtype(params[i].scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        partial[k] = update_chunk<scalar_t>(
            static_cast<scalar_t*>(pp[i]) + o, static_cast<const scalar_t*>(gp[i]) + o,
            m_base + so, v_base + so, b_base + so, ch.len, gmul, inv_bc2[i], inv_vbar, c);
      });
    });
  }
  return tensor_sums(partial, first, a.n, 1);
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
      kCpu, /*one_dtype=*/false);
  adai::refuse_optionals(op, a, "CPU kernels");
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
  const adai::Consts c =
      adai::make_consts(lr_value, beta0, beta2, eps, weight_decay, decoupled, dampening);
  std::vector<float> inv_bc2(a.n);
  for (size_t i = 0; i < a.n; ++i) {
    const double k = step_p[adai::segment(a, i, adai::kSlot)];
    inv_bc2[i] = static_cast<float>(1.0 / adai::bias_correction2(beta2, k));
  }
  const float gmul = adai::inv_grad_scale(a.grad_scale) * gl.clip;
  write_v_sums(a,
               update_tensors(params, grads, a, exp_avg, exp_avg_sq, beta1_prod, gmul, inv_bc2,
                              gl.inv_vbar, c),
               v_sums);
}

void v_sum_cpu(const at::Tensor& exp_avg_sq, const at::Tensor& segments,
               const at::Tensor& v_sums) {
  const adai::OpArgs a = adai::v_sum_prologue("adai::v_sum", exp_avg_sq, segments, v_sums, kCpu);
  std::vector<int64_t> numel(a.n);
  for (size_t i = 0; i < a.n; ++i) numel[i] = adai::segment(a, i, adai::kNumel);
  const float* const v_base = exp_avg_sq.const_data_ptr<float>();
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(numel, first);
  std::vector<double> partial(chunks.size(), 0.0);
  if (!chunks.empty()) {
    for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
      const int64_t so = adai::segment(a, static_cast<size_t>(ch.tensor), adai::kOffset) + ch.begin;
      partial[k] = v_sum_chunk(v_base + so, ch.len);
    });
  }
  write_v_sums(a, tensor_sums(partial, first, a.n, 1), v_sums);
}

}  // namespace

TORCH_LIBRARY_IMPL(adai, CPU, m) {
  m.impl("stats", &stats_cpu);
  m.impl("update", &update_cpu);
  m.impl("v_sum", &v_sum_cpu);
}
