// What one thread of a block does with one chunk: the element loops of both kernels, as
// __host__ __device__ templates over the parameter type T (float, c10::Half, c10::BFloat16).
// The math is adai_math.h's; this file only decides which thread touches which element.
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

namespace adai {
namespace cuda {

// Copies the 16 bytes at src (16-byte aligned, global memory) into dst[0 .. 16 / sizeof(U)).
template <typename U>
ADAI_HD void load16(const U* src, U* dst) {
#if defined(__CUDA_ARCH__)
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
#if defined(__CUDA_ARCH__)
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
#if defined(__CUDA_ARCH__)
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
#if defined(__CUDA_ARCH__)
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
// by element. So the sums do not depend on alignment, and sum_v reproduces update's v sums
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

// Phase 1: this thread's share of sum_j (g_j + l2 * theta_j)^2 over one chunk of `len`
// elements, in the canonical order. theta (p) is read only when kL2. Two groups (16
// elements) in flight per thread.
template <typename T, bool kL2>
ADAI_HD float stats_thread(int tid, int nthreads, const T* g, const T* p, int64_t len,
                           bool aligned, const Consts& c) {
  constexpr int kIlp = 2;
  float acc = 0.0f;
  const int64_t ngroups = (len + kGroup - 1) / kGroup;
  const int64_t nvector = aligned ? len / kGroup : 0;
  for (int64_t base = tid; base < ngroups; base += static_cast<int64_t>(kIlp) * nthreads) {
    T rg[kIlp][kGroup];
    T rp[kIlp][kGroup];
    ADAI_UNROLL
    for (int j = 0; j < kIlp; ++j) {
      const int64_t q = base + static_cast<int64_t>(j) * nthreads;
      const int64_t e0 = q * kGroup;
      if (q < nvector) {
        load_group(g + e0, rg[j]);
        if constexpr (kL2) load_group(p + e0, rp[j]);
      } else {
        ADAI_UNROLL
        for (int k = 0; k < kGroup; ++k) {
          const bool in = k < len - e0;
          rg[j][k] = in ? load1(g + e0 + k) : static_cast<T>(0.0f);
          if constexpr (kL2) rp[j][k] = in ? load1(p + e0 + k) : static_cast<T>(0.0f);
        }
      }
    }
    ADAI_UNROLL
    for (int j = 0; j < kIlp; ++j) {
      const int64_t e0 = (base + static_cast<int64_t>(j) * nthreads) * kGroup;
      ADAI_UNROLL
      for (int k = 0; k < kGroup; ++k) {
        if (k < len - e0) {
          float th = 0.0f;
          if constexpr (kL2) th = static_cast<float>(rp[j][k]);
          acc += adai::grad_sq(static_cast<float>(rg[j][k]), th, c);
        }
      }
    }
  }
  return acc;
}

// Phase 2: updates this thread's elements of one chunk in place (theta, m, v, b; g is read)
// and returns the sum of their new v, in the canonical order.
template <typename T>
ADAI_HD float update_thread(int tid, int nthreads, T* p, const T* g, float* m, float* v,
                            float* b, int64_t len, bool aligned, float inv_bc2,
                            float inv_vbar, const Consts& c) {
  float vacc = 0.0f;
  const int64_t ngroups = (len + kGroup - 1) / kGroup;
  const int64_t nvector = aligned ? len / kGroup : 0;  // groups moved as vectors
  for (int64_t q = tid; q < ngroups; q += nthreads) {
    const int64_t e0 = q * kGroup;
    float rp[kGroup], rg[kGroup], rm[kGroup], rv[kGroup], rb[kGroup];
    if (q < nvector) {
      T tp[kGroup], tg[kGroup];
      load_group(p + e0, tp);
      load_group(g + e0, tg);
      load_group(m + e0, rm);
      load_group(v + e0, rv);
      load_group(b + e0, rb);
      ADAI_UNROLL
      for (int k = 0; k < kGroup; ++k) {
        rp[k] = static_cast<float>(tp[k]);
        rg[k] = static_cast<float>(tg[k]);
      }
      ADAI_UNROLL
      for (int k = 0; k < kGroup; ++k) {
        vacc += adai::update(rp[k], rg[k], rm[k], rv[k], rb[k], inv_bc2, inv_vbar, c);
        tp[k] = static_cast<T>(rp[k]);
      }
      store_group(p + e0, tp);
      store_group(m + e0, rm);
      store_group(v + e0, rv);
      store_group(b + e0, rb);
    } else {
      const int64_t n = len - e0 < kGroup ? len - e0 : kGroup;
      ADAI_UNROLL
      for (int k = 0; k < kGroup; ++k) {
        rp[k] = rg[k] = rm[k] = rv[k] = rb[k] = 0.0f;
        if (k < n) {
          rp[k] = static_cast<float>(load1(p + e0 + k));
          rg[k] = static_cast<float>(load1(g + e0 + k));
          rm[k] = load1(m + e0 + k);
          rv[k] = load1(v + e0 + k);
          rb[k] = load1(b + e0 + k);
        }
      }
      ADAI_UNROLL
      for (int k = 0; k < kGroup; ++k) {
        if (k < n) {
          vacc += adai::update(rp[k], rg[k], rm[k], rv[k], rb[k], inv_bc2, inv_vbar, c);
          store1(p + e0 + k, static_cast<T>(rp[k]));
          store1(m + e0 + k, rm[k]);
          store1(v + e0 + k, rv[k]);
          store1(b + e0 + k, rb[k]);
        }
      }
    }
  }
  return vacc;
}

// sum_v: this thread's share of the sum of v over one chunk, in update_thread's order.
ADAI_HD float vsum_thread(int tid, int nthreads, const float* v, int64_t len, bool aligned) {
  constexpr int kIlp = 2;  // groups in flight per thread
  float acc = 0.0f;
  const int64_t ngroups = (len + kGroup - 1) / kGroup;
  const int64_t nvector = aligned ? len / kGroup : 0;
  for (int64_t base = tid; base < ngroups; base += static_cast<int64_t>(kIlp) * nthreads) {
    float rv[kIlp][kGroup];
    ADAI_UNROLL
    for (int j = 0; j < kIlp; ++j) {
      const int64_t q = base + static_cast<int64_t>(j) * nthreads;
      const int64_t e0 = q * kGroup;
      if (q < nvector) {
        load_group(v + e0, rv[j]);
      } else {
        ADAI_UNROLL
        for (int k = 0; k < kGroup; ++k) {
          rv[j][k] = k < len - e0 ? load1(v + e0 + k) : 0.0f;
        }
      }
    }
    ADAI_UNROLL
    for (int j = 0; j < kIlp; ++j) {
      const int64_t q = base + static_cast<int64_t>(j) * nthreads;
      const int64_t e0 = q * kGroup;
      ADAI_UNROLL
      for (int k = 0; k < kGroup; ++k) {
        if (k < len - e0) acc += rv[j][k];
      }
    }
  }
  return acc;
}

}  // namespace cuda
}  // namespace adai
