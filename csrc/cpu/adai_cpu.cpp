// Fused CPU kernels for adai::stats, adai::update and adai::sum_v (semantics:
// docs/design.md).
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
// are bitwise identical for any number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "adai_math.h"

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
  static inline fVec pow(fVec x, fVec e) { return x.pow(e); }
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

// The one summation order of every per-chunk sum (stats' G, update's and sum_v's v sums):
// vector blocks of kBlock elements go into two float accumulators (first and second half of
// the block), which are added into a double every kFlush elements, so no fp32 lane adds more
// than kFlush / kBlock (= 32) terms; then the scalar tail, element by element, in double.
// `vec(i, x0, x1)` produces block i's two vectors of terms, `tail(i)` element i's term.
// update and sum_v both sum the stored new v through here, so their sums agree bitwise.
constexpr int64_t kFlush = 1024;
static_assert(kFlush % kBlock == 0 && kChunk % kFlush == 0, "bad flush size");

template <typename VecBody, typename TailBody>
inline double blocked_sum(int64_t n, const VecBody& vec, const TailBody& tail) {
  const int64_t n_vec = n - n % kBlock;
  double s = 0.0;
  int64_t i = 0;
  while (i < n_vec) {
    const int64_t stop = std::min(n_vec, i + kFlush);
    fVec acc0(0.0f), acc1(0.0f);
    for (; i < stop; i += kBlock) {
      fVec x0, x1;
      vec(i, x0, x1);
      acc0 = acc0 + x0;
      acc1 = acc1 + x1;
    }
    s += hsum(acc0 + acc1);
  }
  for (; i < n; ++i) s += static_cast<double>(tail(i));
  return s;
}

// sum_j (g_j + l2 * theta_j)^2 over n elements; theta is read only when kL2.
template <typename scalar_t, bool kL2>
double grad_sq_chunk(const scalar_t* g, const scalar_t* p, int64_t n, const adai::Consts& c) {
  return blocked_sum(
      n,
      [&](int64_t i, fVec& x0, fVec& x1) {
        fVec g0, g1;
        IO<scalar_t>::load(g + i, g0, g1);
        if constexpr (kL2) {
          fVec p0, p1;
          IO<scalar_t>::load(p + i, p0, p1);
          x0 = adai::grad_sq(g0, p0, c);
          x1 = adai::grad_sq(g1, p1, c);
        } else {
          x0 = g0 * g0;
          x1 = g1 * g1;
        }
      },
      [&](int64_t i) {
        const float gi = static_cast<float>(g[i]);
        if constexpr (kL2) {
          return adai::grad_sq(gi, static_cast<float>(p[i]), c);
        } else {
          return gi * gi;
        }
      });
}

// One fused pass over n elements; returns the sum of the new v.
template <typename scalar_t>
double update_chunk(scalar_t* p, const scalar_t* g, float* m, float* v, float* b, int64_t n,
                    float inv_bc2, float inv_vbar, const adai::Consts& c) {
  const fVec inv_bc2_v(inv_bc2), inv_vbar_v(inv_vbar);
  return blocked_sum(
      n,
      [&](int64_t i, fVec& x0, fVec& x1) {
        fVec p0, p1, g0, g1;
        IO<scalar_t>::load(p + i, p0, p1);
        IO<scalar_t>::load(g + i, g0, g1);
        fVec m0 = fVec::loadu(m + i), m1 = fVec::loadu(m + i + kW);
        fVec v0 = fVec::loadu(v + i), v1 = fVec::loadu(v + i + kW);
        fVec b0 = fVec::loadu(b + i), b1 = fVec::loadu(b + i + kW);
        x0 = adai::update(p0, g0, m0, v0, b0, inv_bc2_v, inv_vbar_v, c);
        x1 = adai::update(p1, g1, m1, v1, b1, inv_bc2_v, inv_vbar_v, c);
        IO<scalar_t>::store(p + i, p0, p1);
        m0.store(m + i);
        m1.store(m + i + kW);
        v0.store(v + i);
        v1.store(v + i + kW);
        b0.store(b + i);
        b1.store(b + i + kW);
      },
      [&](int64_t i) {
        float th = static_cast<float>(p[i]);
        const float vn = adai::update(th, static_cast<float>(g[i]), m[i], v[i], b[i], inv_bc2,
                                      inv_vbar, c);
        p[i] = static_cast<scalar_t>(th);  // c10::BFloat16 / c10::Half round to nearest even
        return vn;
      });
}

// The sum of v over n elements, exactly as update_chunk sums the v it stores.
double sum_v_chunk(const float* v, int64_t n) {
  return blocked_sum(
      n,
      [&](int64_t i, fVec& x0, fVec& x1) {
        x0 = fVec::loadu(v + i);
        x1 = fVec::loadu(v + i + kW);
      },
      [&](int64_t i) { return v[i]; });
}

// ---- chunk list ---------------------------------------------------------------------------

struct Chunk {
  int64_t tensor;
  int64_t begin;  // element offset inside the tensor's memory span
  int64_t len;
};

// Chunks of every tensor, tensor by tensor, in memory order; first[i] is tensor i's first.
std::vector<Chunk> make_chunks(at::TensorList ts, std::vector<int64_t>& first) {
  std::vector<Chunk> chunks;
  first.assign(ts.size() + 1, 0);
  for (size_t i = 0; i < ts.size(); ++i) {
    first[i] = static_cast<int64_t>(chunks.size());
    const int64_t n = ts[i].numel();
    for (int64_t s = 0; s < n; s += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), s, std::min(kChunk, n - s)});
    }
  }
  first[ts.size()] = static_cast<int64_t>(chunks.size());
  return chunks;
}

// Per-tensor sums: each tensor's chunk slots added in chunk order.
std::vector<double> tensor_sums(const std::vector<double>& partial,
                                const std::vector<int64_t>& first, size_t n) {
  std::vector<double> sums(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t k = first[i]; k < first[i + 1]; ++k) s += partial[k];
    sums[i] = s;
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
  at::parallel_for(0, n_tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = task_begin[b]; k < task_begin[e]; ++k) f(k, chunks[k]);
  });
}

// ---- validation ---------------------------------------------------------------------------

bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Same element -> memory mapping (and so the same memory order): same sizes, and the same
// strides in every dimension of size > 1 (strides of size-1 dimensions are irrelevant).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_len(const char* op, const char* name, size_t got, size_t want) {
  TORCH_CHECK(got == want, op, ": `", name, "` has ", got, " tensors but `params` has ",
              want);
}

void check_cpu(const char* op, const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(),
              ", expected a CPU tensor");
}

// params[i], grads[i] and (for update) the three states of tensor i.
void check_tensor(const char* op, size_t i, const at::Tensor& p, const at::Tensor& g) {
  check_cpu(op, "params", i, p);
  check_cpu(op, "grads", i, g);
  TORCH_CHECK(is_param_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ",
              p.scalar_type(), "; expected float32, bfloat16 or float16");
  TORCH_CHECK(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ",
              g.scalar_type(), " but params[", i, "] has ", p.scalar_type());
  TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
              "] must be non-overlapping and dense");
  TORCH_CHECK(same_layout(g, p), op, ": grads[", i, "] (sizes ", g.sizes(), ", strides ",
              g.strides(), ") must have the sizes and strides of params[", i, "] (sizes ",
              p.sizes(), ", strides ", p.strides(), ")");
}

void check_state(const char* op, const char* name, size_t i, const at::Tensor& s,
                 const at::Tensor& p) {
  check_cpu(op, name, i, s);
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, "[", i, "] has dtype ",
              s.scalar_type(), "; expected float32");
  TORCH_CHECK(same_layout(s, p), op, ": ", name, "[", i, "] (sizes ", s.sizes(),
              ", strides ", s.strides(), ") must have the sizes and strides of params[", i,
              "] (sizes ", p.sizes(), ", strides ", p.strides(), ")");
}

void check_scalar(const char* op, const char* name, size_t i, const at::Tensor& t,
                  at::ScalarType dtype) {
  check_cpu(op, name, i, t);
  TORCH_CHECK(t.dim() == 0, op, ": ", name, "[", i, "] must be a 0-dim tensor, got sizes ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ",
              t.scalar_type(), "; expected ", dtype);
}

// Calls f(tag) with a value of the parameter's C++ type (float, c10::BFloat16, c10::Half).
template <typename F>
void dispatch_param(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "adai: unsupported parameter dtype ", t);
  }
}

// ---- the ops ------------------------------------------------------------------------------

void stats_cpu(at::TensorList params, at::TensorList grads, at::TensorList steps,
               at::TensorList v_sums, double beta2, double l2, const at::Tensor& out) {
  const char* op = "adai::stats";
  const size_t n = params.size();
  check_len(op, "grads", grads.size(), n);
  check_len(op, "steps", steps.size(), n);
  check_len(op, "v_sums", v_sums.size(), n);
  check_cpu(op, "out", 0, out);
  TORCH_CHECK(out.dim() == 0 && out.scalar_type() == at::kDouble, op,
              ": `out` must be a 0-dim float64 tensor, got ", out.scalar_type(), " of sizes ",
              out.sizes());
  for (size_t i = 0; i < n; ++i) {
    check_tensor(op, i, params[i], grads[i]);
    check_scalar(op, "steps", i, steps[i], at::kFloat);
    check_scalar(op, "v_sums", i, v_sums[i], at::kDouble);
  }

  const adai::Consts c = adai::make_consts(0.0, 0.0, beta2, 0.0, l2, false, 1.0);
  const bool use_l2 = l2 != 0.0;

  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(params, first);
  std::vector<double> partial(chunks.size(), 0.0);
  for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
    const at::Tensor& g = grads[ch.tensor];
    const at::Tensor& p = params[ch.tensor];
    dispatch_param(g.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* gp = g.const_data_ptr<scalar_t>() + ch.begin;
      if (use_l2) {
        const scalar_t* pp = p.const_data_ptr<scalar_t>() + ch.begin;
        partial[k] = grad_sq_chunk<scalar_t, true>(gp, pp, ch.len, c);
      } else {
        partial[k] = grad_sq_chunk<scalar_t, false>(gp, nullptr, ch.len, c);
      }
    });
  });
  const std::vector<double> G = tensor_sums(partial, first, n);

  double total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    float* k = steps[i].mutable_data_ptr<float>();
    *k += 1.0f;
    const double V = *v_sums[i].const_data_ptr<double>();
    total += (beta2 * V + (1.0 - beta2) * G[i]) /
             adai::bias_correction2(beta2, static_cast<double>(*k));
  }
  *out.mutable_data_ptr<double>() = total;
}

void update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                at::TensorList exp_avg_sq, at::TensorList beta1_prod, at::TensorList v_sums,
                at::TensorList steps, const at::Tensor& stats, double numel, double lr,
                double beta0, double beta2, double eps, double weight_decay, bool decoupled,
                double dampening) {
  const char* op = "adai::update";
  const size_t n = params.size();
  check_len(op, "grads", grads.size(), n);
  check_len(op, "exp_avg", exp_avg.size(), n);
  check_len(op, "exp_avg_sq", exp_avg_sq.size(), n);
  check_len(op, "beta1_prod", beta1_prod.size(), n);
  check_len(op, "v_sums", v_sums.size(), n);
  check_len(op, "steps", steps.size(), n);
  check_cpu(op, "stats", 0, stats);
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.dim() <= 1, op,
              ": `stats` must be a 1-D float64 tensor, got ", stats.scalar_type(),
              " of sizes ", stats.sizes());
  for (size_t i = 0; i < n; ++i) {
    check_tensor(op, i, params[i], grads[i]);
    check_state(op, "exp_avg", i, exp_avg[i], params[i]);
    check_state(op, "exp_avg_sq", i, exp_avg_sq[i], params[i]);
    check_state(op, "beta1_prod", i, beta1_prod[i], params[i]);
    check_scalar(op, "v_sums", i, v_sums[i], at::kDouble);
    check_scalar(op, "steps", i, steps[i], at::kFloat);
  }

  // Global statistic: the slots of `stats` added in index order.
  double S = 0.0;
  {
    const double* sp = stats.const_data_ptr<double>();
    const int64_t len = stats.numel();
    const int64_t st = stats.dim() == 1 ? stats.stride(0) : 1;
    for (int64_t j = 0; j < len; ++j) S += sp[j * st];
  }
  const float inv_vbar = static_cast<float>(adai::inv_mean(S, numel));
  const adai::Consts c =
      adai::make_consts(lr, beta0, beta2, eps, weight_decay, decoupled, dampening);

  std::vector<float> inv_bc2(n);
  for (size_t i = 0; i < n; ++i) {
    const double k = static_cast<double>(*steps[i].const_data_ptr<float>());
    inv_bc2[i] = static_cast<float>(1.0 / adai::bias_correction2(beta2, k));
  }

  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(params, first);
  std::vector<double> partial(chunks.size(), 0.0);
  for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
    const int64_t i = ch.tensor;
    const at::Tensor& p = params[i];
    dispatch_param(p.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      const int64_t o = ch.begin;
      partial[k] = update_chunk<scalar_t>(
          p.mutable_data_ptr<scalar_t>() + o, grads[i].const_data_ptr<scalar_t>() + o,
          exp_avg[i].mutable_data_ptr<float>() + o, exp_avg_sq[i].mutable_data_ptr<float>() + o,
          beta1_prod[i].mutable_data_ptr<float>() + o, ch.len, inv_bc2[i], inv_vbar, c);
    });
  });
  const std::vector<double> V = tensor_sums(partial, first, n);
  for (size_t i = 0; i < n; ++i) *v_sums[i].mutable_data_ptr<double>() = V[i];
}

void sum_v_cpu(at::TensorList exp_avg_sq, at::TensorList v_sums) {
  const char* op = "adai::sum_v";
  const size_t n = exp_avg_sq.size();
  TORCH_CHECK(v_sums.size() == n, op, ": `v_sums` has ", v_sums.size(),
              " tensors but `exp_avg_sq` has ", n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& v = exp_avg_sq[i];
    check_cpu(op, "exp_avg_sq", i, v);
    TORCH_CHECK(v.scalar_type() == at::kFloat, op, ": exp_avg_sq[", i, "] has dtype ",
                v.scalar_type(), "; expected float32");
    TORCH_CHECK(v.is_non_overlapping_and_dense(), op, ": exp_avg_sq[", i,
                "] must be non-overlapping and dense");
    check_scalar(op, "v_sums", i, v_sums[i], at::kDouble);
  }
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(exp_avg_sq, first);
  std::vector<double> partial(chunks.size(), 0.0);
  for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
    partial[k] = sum_v_chunk(exp_avg_sq[ch.tensor].const_data_ptr<float>() + ch.begin, ch.len);
  });
  const std::vector<double> V = tensor_sums(partial, first, n);
  for (size_t i = 0; i < n; ++i) *v_sums[i].mutable_data_ptr<double>() = V[i];
}

}  // namespace

TORCH_LIBRARY_IMPL(adai, CPU, m) {
  m.impl("stats", &stats_cpu);
  m.impl("update", &update_cpu);
  m.impl("sum_v", &sum_v_cpu);
}
