// What one thread of a block does with one chunk: the element loops of the kernels, as
// __host__ __device__ templates over the parameter type T (float, c10::Half, c10::BFloat16),
// and update's global inputs (derived alike by every block). The math is adai_math.h's; this
// file decides which thread touches which element and what is summed where. The kernels run
// these loops through csrc/cuda/chunk_kernel.cuh.
//
// A chunk is processed by `nthreads` threads; thread `tid` takes a fixed set of its elements
// that depends only on (tid, nthreads, len): see kGroup below. Because no element is shared
// between threads, running tid = 0 .. nthreads-1 one after the other on a CPU gives exactly
// what the kernel writes: tests/cuda_host_check.cpp does that.
#pragma once

#include <cstdint>
#include <cstring>

#include "../adai_math.h"

#if defined(__CUDA_ARCH__)
#define ADAI_UNROLL _Pragma("unroll")
#else
#define ADAI_UNROLL
#endif

// Global memory goes through the explicit built-ins (__ldca, __stwb) in device code and in
// the CPU emulator of the kernels (csrc/emu/), which checks them; plain host code copies.
#if defined(__CUDA_ARCH__) || defined(ADAI_CUDA_EMU)
#define ADAI_GLOBAL_BUILTINS 1
#endif

namespace adai {
namespace cuda {

// Copies the 16 bytes at src (16-byte aligned, global memory) into dst[0 .. 16 / sizeof(U)).
template <typename U>
ADAI_HD void load16(const U* src, U* dst) {
#if defined(ADAI_GLOBAL_BUILTINS)
  // An explicit global-space 128-bit load (ld.global.ca.v4): the pointers come from the
  // table, so the compiler could only emit generic loads.
  const int4 x = __ldca(reinterpret_cast<const int4*>(src));
  static_assert(sizeof(x) == 16, "int4");
  memcpy(static_cast<void*>(dst), &x, 16);
#else
  std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), 16);
#endif
}

// Copies src[0 .. 16 / sizeof(U)) to the 16 bytes at dst (16-byte aligned, global memory).
template <typename U>
ADAI_HD void store16(U* dst, const U* src) {
#if defined(ADAI_GLOBAL_BUILTINS)
  int4 x;
  memcpy(&x, static_cast<const void*>(src), 16);
  __stwb(reinterpret_cast<int4*>(dst), x);  // st.global.wb.v4
#else
  std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), 16);
#endif
}

// One element (4 or 2 bytes) from / to global memory, with explicit global-space accesses.
template <typename U>
ADAI_HD U load1(const U* src) {
#if defined(ADAI_GLOBAL_BUILTINS)
  static_assert(sizeof(U) == 4 || sizeof(U) == 2, "element size");
  U r;
  if constexpr (sizeof(U) == 4) {
    const unsigned int x = __ldca(reinterpret_cast<const unsigned int*>(src));
    memcpy(static_cast<void*>(&r), &x, 4);
  } else {
    const unsigned short x = __ldca(reinterpret_cast<const unsigned short*>(src));
    memcpy(static_cast<void*>(&r), &x, 2);
  }
  return r;
#else
  return *src;
#endif
}

template <typename U>
ADAI_HD void store1(U* dst, U value) {
#if defined(ADAI_GLOBAL_BUILTINS)
  static_assert(sizeof(U) == 4 || sizeof(U) == 2, "element size");
  if constexpr (sizeof(U) == 4) {
    unsigned int x;
    memcpy(&x, static_cast<const void*>(&value), 4);
    __stwb(reinterpret_cast<unsigned int*>(dst), x);
  } else {
    unsigned short x;
    memcpy(&x, static_cast<const void*>(&value), 2);
    __stwb(reinterpret_cast<unsigned short*>(dst), x);
  }
#else
  *dst = value;
#endif
}

// One canonical order for every per-thread sum: a chunk is cut into groups of kGroup
// consecutive elements, group q belongs to thread q % nthreads, and a thread adds its
// elements in increasing element order (in float). Only how a group is read and written
// depends on alignment: whole groups of an aligned tensor move as 16-byte vectors (params and
// grads: 2 x 4 floats or 1 x 8 halves; fp32 states: 2 x 4 floats), every other group element
// by element. So the sums do not depend on alignment, and v_sum reproduces update's v sums
// bitwise whatever the dtype and alignment of either call.
constexpr int kGroup = 8;

// Loads / stores one group of kGroup elements (16-byte aligned) with 16-byte accesses.
template <typename U>
ADAI_HD void load_group(const U* src, U* dst) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(U));
  static_assert(kGroup % kPer == 0, "group size");
  ADAI_UNROLL
  for (int k = 0; k < kGroup; k += kPer) load16(src + k, dst + k);
}

template <typename U>
ADAI_HD void store_group(U* dst, const U* src) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(U));
  ADAI_UNROLL
  for (int k = 0; k < kGroup; k += kPer) store16(dst + k, src + k);
}

// One thread's float sums over its share of a chunk of `len` elements, in the canonical order,
// with kIlp groups loaded before any is added (loads in flight). stats and v_sum are its uses
// (update stores what it computes, update_thread). `Terms` says what a group holds and adds:
//   Terms::Group                           the registers of one group;
//   terms.load(e0, r)                      the aligned whole group at element e0, as vectors;
//   terms.load_partial(e0, n, r)           its first n elements one by one, zero after them;
//   terms.add(r, k, acc)                   element k's terms into the thread's sums `acc`.
template <int kIlp, typename Terms, typename Acc>
ADAI_HD void sum_groups(int tid, int nthreads, int64_t len, bool aligned, const Terms& terms,
                        Acc& acc) {
  const int64_t ngroups = (len + kGroup - 1) / kGroup;
  const int64_t nvector = aligned ? len / kGroup : 0;  // groups moved as vectors
  for (int64_t base = tid; base < ngroups; base += static_cast<int64_t>(kIlp) * nthreads) {
    typename Terms::Group r[kIlp];
    ADAI_UNROLL
    for (int j = 0; j < kIlp; ++j) {
      const int64_t q = base + static_cast<int64_t>(j) * nthreads;
      const int64_t e0 = q * kGroup;
      if (q < nvector) {
        terms.load(e0, r[j]);
      } else {
        terms.load_partial(e0, len - e0, r[j]);
      }
    }
    ADAI_UNROLL
    for (int j = 0; j < kIlp; ++j) {
      const int64_t e0 = (base + static_cast<int64_t>(j) * nthreads) * kGroup;
      ADAI_UNROLL
      for (int k = 0; k < kGroup; ++k) {
        if (k < len - e0) terms.add(r[j], k, acc);
      }
    }
  }
}

// ---- phase 1 (adai::stats) -------------------------------------------------------------

// One thread's per-element sums over its share of a chunk (float, canonical order), indexed
// by adai_math.h's StatsSum, with g the unscaled gradient: v[kSumGg] = sum g^2 always; with
// L2 decay also v[kSumGradSq] = sum (g + l2 theta)^2 (adai::grad_sq), v[kSumGt] = sum g theta
// and v[kSumTt] = sum theta^2 (0 without L2).
struct StatsSums {
  float v[kStatsSums];
};

template <bool kL2>
ADAI_HD void stats_element(float g, float theta, const Consts& c, StatsSums& s) {
  s.v[kSumGg] += g * g;
  if constexpr (kL2) {
    s.v[kSumGradSq] += adai::grad_sq(g, theta, c);
    s.v[kSumGt] += g * theta;
    s.v[kSumTt] += theta * theta;
  }
}

// sum_groups' terms of stats: g = float(grad) * inv_scale, theta (p) read only when kL2.
template <typename T, bool kL2>
struct StatsTerms {
  struct Group {
    T g[kGroup];
    T p[kGroup];
  };
  const T* g;
  const T* p;
  float inv_scale;
  const Consts& c;

  ADAI_HD void load(int64_t e0, Group& r) const {
    load_group(g + e0, r.g);
    if constexpr (kL2) load_group(p + e0, r.p);
  }
  ADAI_HD void load_partial(int64_t e0, int64_t n, Group& r) const {
    ADAI_UNROLL
    for (int k = 0; k < kGroup; ++k) {
      const bool in = k < n;
      r.g[k] = in ? load1(g + e0 + k) : static_cast<T>(0.0f);
      if constexpr (kL2) r.p[k] = in ? load1(p + e0 + k) : static_cast<T>(0.0f);
    }
  }
  ADAI_HD void add(const Group& r, int k, StatsSums& acc) const {
    float th = 0.0f;
    if constexpr (kL2) th = static_cast<float>(r.p[k]);
    stats_element<kL2>(static_cast<float>(r.g[k]) * inv_scale, th, c, acc);
  }
};

// Phase 1: this thread's StatsSums over one chunk of `len` elements. Two groups (16 elements)
// in flight per thread.
template <typename T, bool kL2>
ADAI_HD StatsSums stats_thread(int tid, int nthreads, const T* g, const T* p, int64_t len,
                               bool aligned, float inv_scale, const Consts& c) {
  StatsSums acc = {{0.0f, 0.0f, 0.0f, 0.0f}};
  sum_groups<2>(tid, nthreads, len, aligned, StatsTerms<T, kL2>{g, p, inv_scale, c}, acc);
  return acc;
}

// One tensor's share of the statistics row: columns kA .. kGn (kN is the caller's), from its
// previous v sum, its incremented step k and its StatsSum sums s (s[kSumGg] only when
// l2 == 0). l2 is the float Consts::l2 the elements used.
ADAI_HD void stats_tensor_row(double beta2, float l2, double v_sum, double k, const double* s,
                              double* row) {
  const double bc2 = bias_correction2(beta2, k);
  const double w = (1.0 - beta2) / bc2;
  const double gg = s[kSumGg];
  row[kA] = beta2 * v_sum / bc2;
  row[kBgg] = w * gg;
  if (l2 != 0.0f) {
    const double l2d = static_cast<double>(l2);
    row[kB] = w * s[kSumGradSq];
    row[kBgt] = w * (s[kSumGt] * (2.0 * l2d));
    row[kBtt] = w * (s[kSumTt] * (l2d * l2d));
  } else {
    row[kB] = row[kBgg];
    row[kBgt] = 0.0;
    row[kBtt] = 0.0;
  }
  row[kGn] = gg;
}

// ---- phase 2 (adai::update) ------------------------------------------------------------

// What adai::update gets besides the tensors (device pointers; optional ones may be null).
struct UpdateInputs {
  const double* stats;  // rows x kStatsColumns float64
  int64_t rows, row_stride, col_stride;
  const float* grad_scale;  // optional: gradients are multiplied by 1 / *grad_scale
  const float* found_inf;   // optional: nonzero skips the step
  const float* lr_tensor;   // optional: replaces c.lr (and c.lr_wd = lr * decoupled_wd)
  Consts c;
  double decoupled_wd;  // weight_decay when decoupled, else 0
  double max_grad_norm;  // <= 0: no clipping
  bool skip_nonfinite;
};

// What every block of one update launch derives from UpdateInputs, identically.
struct UpdateArgs {
  Consts c;        // with the learning rate of this step
  float grad_mul;  // float(1 / double(grad_scale)) * clip
  float inv_vbar;
  bool skip;       // the step is skipped: nothing but the step counters is written
};

// The rows summed column by column in row order, then adai::globals.
ADAI_HD UpdateArgs update_args(const UpdateInputs& in) {
  double totals[kStatsColumns];
  sum_stats_rows(in.stats, in.rows, in.row_stride, in.col_stride, totals);
  const bool found_inf = in.found_inf != nullptr && *in.found_inf != 0.0f;
  const Globals gl = adai::globals(totals, in.max_grad_norm, in.skip_nonfinite, found_inf);
  UpdateArgs a;
  a.c = in.c;
  if (in.lr_tensor != nullptr) {
    const float lr = *in.lr_tensor;
    a.c.lr = lr;
    a.c.lr_wd = static_cast<float>(static_cast<double>(lr) * in.decoupled_wd);
  }
  a.grad_mul = inv_grad_scale(in.grad_scale) * gl.clip;
  a.inv_vbar = gl.inv_vbar;
  a.skip = gl.skip;
  return a;
}

// update_thread's two ways through one group of kGroup elements at e0: adai::update on every
// element in place, the new v added to vacc in element order.
template <typename T>
ADAI_HD void update_group_vector(T* p, const T* g, float* m, float* v, float* b, int64_t e0,
                                 float inv_bc2, const UpdateArgs& a, float& vacc) {
  float rp[kGroup], rg[kGroup], rm[kGroup], rv[kGroup], rb[kGroup];
  T tp[kGroup], tg[kGroup];
  load_group(p + e0, tp);
  load_group(g + e0, tg);
  load_group(m + e0, rm);
  load_group(v + e0, rv);
  load_group(b + e0, rb);
  ADAI_UNROLL
  for (int k = 0; k < kGroup; ++k) {
    rp[k] = static_cast<float>(tp[k]);
    rg[k] = static_cast<float>(tg[k]) * a.grad_mul;
  }
  ADAI_UNROLL
  for (int k = 0; k < kGroup; ++k) {
    vacc += adai::update(rp[k], rg[k], rm[k], rv[k], rb[k], inv_bc2, a.inv_vbar, a.c);
    tp[k] = static_cast<T>(rp[k]);
  }
  store_group(p + e0, tp);
  store_group(m + e0, rm);
  store_group(v + e0, rv);
  store_group(b + e0, rb);
}

// The first n (<= kGroup) elements at e0, element by element.
template <typename T>
ADAI_HD void update_group_scalar(T* p, const T* g, float* m, float* v, float* b, int64_t e0,
                                 int64_t n, float inv_bc2, const UpdateArgs& a, float& vacc) {
  float rp[kGroup], rg[kGroup], rm[kGroup], rv[kGroup], rb[kGroup];
  ADAI_UNROLL
  for (int k = 0; k < kGroup; ++k) {
    rp[k] = rg[k] = rm[k] = rv[k] = rb[k] = 0.0f;
    if (k < n) {
      rp[k] = static_cast<float>(load1(p + e0 + k));
      rg[k] = static_cast<float>(load1(g + e0 + k)) * a.grad_mul;
      rm[k] = load1(m + e0 + k);
      rv[k] = load1(v + e0 + k);
      rb[k] = load1(b + e0 + k);
    }
  }
  ADAI_UNROLL
  for (int k = 0; k < kGroup; ++k) {
    if (k < n) {
      vacc += adai::update(rp[k], rg[k], rm[k], rv[k], rb[k], inv_bc2, a.inv_vbar, a.c);
      store1(p + e0 + k, static_cast<T>(rp[k]));
      store1(m + e0 + k, rm[k]);
      store1(v + e0 + k, rv[k]);
      store1(b + e0 + k, rb[k]);
    }
  }
}

// Phase 2: updates this thread's elements of one chunk in place (theta, m, v, b; g is read)
// with g = float(grad) * a.grad_mul, and returns the sum of their new v, in the canonical
// order. Writes nothing (and returns 0) when a.skip.
template <typename T>
ADAI_HD float update_thread(int tid, int nthreads, T* p, const T* g, float* m, float* v,
                            float* b, int64_t len, bool aligned, float inv_bc2,
                            const UpdateArgs& a) {
  float vacc = 0.0f;
  if (a.skip) return vacc;
  const int64_t ngroups = (len + kGroup - 1) / kGroup;
  const int64_t nvector = aligned ? len / kGroup : 0;  // groups moved as vectors
  for (int64_t q = tid; q < ngroups; q += nthreads) {
    const int64_t e0 = q * kGroup;
    if (q < nvector) {
      update_group_vector(p, g, m, v, b, e0, inv_bc2, a, vacc);
    } else {
      const int64_t n = len - e0 < kGroup ? len - e0 : kGroup;
      update_group_scalar(p, g, m, v, b, e0, n, inv_bc2, a, vacc);
    }
  }
  return vacc;
}

// sum_groups' terms of v_sum: the v values themselves.
struct VSumTerms {
  struct Group {
    float v[kGroup];
  };
  const float* v;

  ADAI_HD void load(int64_t e0, Group& r) const { load_group(v + e0, r.v); }
  ADAI_HD void load_partial(int64_t e0, int64_t n, Group& r) const {
    ADAI_UNROLL
    for (int k = 0; k < kGroup; ++k) r.v[k] = k < n ? load1(v + e0 + k) : 0.0f;
  }
  ADAI_HD void add(const Group& r, int k, float& acc) const { acc += r.v[k]; }
};

// v_sum: this thread's share of the sum of v over one chunk, in update_thread's order (two
// groups in flight per thread).
ADAI_HD float v_sum_thread(int tid, int nthreads, const float* v, int64_t len, bool aligned) {
  float acc = 0.0f;
  sum_groups<2>(tid, nthreads, len, aligned, VSumTerms{v}, acc);
  return acc;
}

}  // namespace cuda
}  // namespace adai
