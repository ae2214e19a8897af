// The CUDA built-ins the kernels of csrc/cuda/ use, for the CPU emulator (csrc/emu/README.md).
// Included through the shadow headers in csrc/emu/include/ (cuda_runtime.h, ...), so the .cu
// sources compile unchanged as C++ with ADAI_CUDA_EMU defined.
//
// Threads of a block are fibers run one at a time by scheduler.cpp. Every built-in that a
// kernel uses to talk to other threads or to global memory is a scheduling point and a check:
// - __syncthreads / __shfl_down_sync are real barriers (block / warp): every thread (lane)
//   must arrive at the same call site after the same number of barriers, and none may have
//   exited;
// - __ldca / __ldcg / __stwb / atomicAdd / __threadfence check the alignment of their address
//   and may yield to another thread (seeded);
// - `__shared__` variables are function statics (blocks run one at a time), filled with
//   garbage before every block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) int4 {
  int x, y, z, w;
};
typedef struct CUstream_st* cudaStream_t;

namespace adai {
namespace emu {

// The coordinates of the thread that runs now (set by the scheduler at every switch).
struct Coords {
  uint3 thread, block, block_dim, grid_dim;
};
extern const Coords* g_coords;

// Scheduling points (scheduler.cpp). `site` is the call's file and line.
void syncthreads(const char* file, int line);
uint64_t shfl_down(const char* file, int line, unsigned int mask, uint64_t bits,
                   unsigned int delta, int width);
void memory_op(const char* what, const void* address, size_t size, size_t align);

template <typename T>
T ld(const char* what, const T* p) {
  static_assert(std::is_trivially_copyable<T>::value, "load of a trivially copyable type");
  memory_op(what, p, sizeof(T), alignof(T) > sizeof(T) ? alignof(T) : sizeof(T));
  return *p;
}

template <typename T>
void st(const char* what, T* p, T v) {
  memory_op(what, p, sizeof(T), alignof(T) > sizeof(T) ? alignof(T) : sizeof(T));
  *p = v;
}

template <typename T>
T shfl_down_t(const char* file, int line, unsigned int mask, T var, unsigned int delta,
              int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled type");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl_down(file, line, mask, bits, delta, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Runs `kernel(args...)` on a grid of `grid` blocks of `block` threads; returns when every
// block has finished (or throws c10::Error with what a check found).
void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* ctx);

template <typename... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    // The arguments are converted once, as a launch copies them into the kernel's parameter
    // space; every thread then gets its own copy of each (by value, as on the device).
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(grid, block, [](void* c) {
      auto* x = static_cast<Ctx*>(c);
      std::apply(x->kernel, x->params);
    }, &ctx);
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, kernel};
}

}  // namespace emu
}  // namespace adai

#define threadIdx (::adai::emu::g_coords->thread)
#define blockIdx (::adai::emu::g_coords->block)
#define blockDim (::adai::emu::g_coords->block_dim)
#define gridDim (::adai::emu::g_coords->grid_dim)

#define __syncthreads() ::adai::emu::syncthreads(__FILE__, __LINE__)
#define __shfl_down_sync(...) ::adai::emu::shfl_down_t(__FILE__, __LINE__, __VA_ARGS__)
#define __ldca(p) ::adai::emu::ld("__ldca", p)
#define __ldcg(p) ::adai::emu::ld("__ldcg", p)
#define __stwb(p, v) ::adai::emu::st("__stwb", p, v)

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  ::adai::emu::memory_op("atomicAdd", address, sizeof(unsigned int), sizeof(unsigned int));
  const unsigned int old = *address;
  *address = old + value;
  return old;
}

inline void __threadfence() { ::adai::emu::memory_op("__threadfence", nullptr, 0, 1); }
