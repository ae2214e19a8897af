// Kernels with one deliberate bug each, so the tests can show that the emulator's checks
// catch what they are meant to catch (tests/test_cuda_emu.py): adai_emu::_selftest(name,
// blocks) runs one on a grid of `blocks` blocks of 64 threads and returns what it wrote (one
// float64 per thread), or raises what the emulator found.
#include "selftest.h"

#include <ATen/ops/zeros.h>

#include <algorithm>
#include <iterator>
#include <utility>

#include "../cuda/launch.h"

namespace adai {
namespace cuda {  // like the real kernels, so that their __shared__ statics are found
namespace {

constexpr int kThreads = 64;

// Correct: a block sum through shared memory with a barrier, then a warp shuffle sum.
__global__ void ok_kernel(double* out) {
  __shared__ double s_vals[kThreads];
  s_vals[threadIdx.x] = threadIdx.x + 1.0;
  __syncthreads();
  double x = s_vals[(threadIdx.x + 1) % kThreads];
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  out[blockIdx.x * kThreads + threadIdx.x] = x;
}

// Half the block waits at one barrier, the other half at another.
__global__ void divergent_barrier_kernel(double* out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[blockIdx.x * kThreads + threadIdx.x] = 1.0;
}

// One thread returns before the barrier the others wait at.
__global__ void exited_thread_kernel(double* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = 1.0;
}

// A 16-byte load from an address that is only 8-byte aligned.
__global__ void misaligned_kernel(double* out) {
  const int4 v = __ldca(reinterpret_cast<const int4*>(out + 1));
  out[blockIdx.x * kThreads + threadIdx.x] = v.x;
}

// Only the even lanes of each warp shuffle.
__global__ void shuffle_divergence_kernel(double* out) {
  double x = 1.0;
  if (threadIdx.x % 2 == 0) x = __shfl_down_sync(0xffffffffu, x, 1);
  out[blockIdx.x * kThreads + threadIdx.x] = x;
}

// Reads a __shared__ variable before any thread of the block wrote it.
__global__ void uninitialised_shared_kernel(double* out) {
  __shared__ double s_value;
  out[blockIdx.x * kThreads + threadIdx.x] = s_value;
  __syncthreads();
  if (threadIdx.x == 0) s_value = 0.0;
}

// Thread 0 sets up a value that the others read, without the barrier in between.
__global__ void missing_barrier_kernel(double* out) {
  __shared__ double s_value;
  if (threadIdx.x == 0) {
    __threadfence();  // a scheduling point, as real setup code has loads there
    s_value = blockIdx.x + 1.0;
  }
  out[blockIdx.x * kThreads + threadIdx.x] = s_value;
}

// Reads through a pointer that points nowhere (as a garbage shared pointer would).
__global__ void illegal_address_kernel(double* out) {
  const auto* nowhere = reinterpret_cast<const volatile double*>(uintptr_t{8});
  out[blockIdx.x * kThreads + threadIdx.x] = *nowhere;
}

}  // namespace
}  // namespace cuda

namespace emu {

at::Tensor selftest(const std::string& name, int64_t blocks) {
  using namespace adai::cuda;
  TORCH_CHECK(blocks >= 1, "adai_emu::_selftest: blocks must be positive, got ", blocks);
  // Padded so that every kernel's stray access stays inside the tensor.
  at::Tensor out = at::zeros({blocks * kThreads + 2}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  using Kernel = void (*)(double*);
  const std::pair<const char*, Kernel> kernels[] = {
      {"ok", ok_kernel},
      {"divergent_barrier", divergent_barrier_kernel},
      {"exited_thread", exited_thread_kernel},
      {"misaligned", misaligned_kernel},
      {"shuffle_divergence", shuffle_divergence_kernel},
      {"uninitialised_shared", uninitialised_shared_kernel},
      {"illegal_address", illegal_address_kernel},
      {"missing_barrier", missing_barrier_kernel},
  };
  const auto* k = std::find_if(std::begin(kernels), std::end(kernels),
                               [&](const auto& e) { return name == e.first; });
  TORCH_CHECK(k != std::end(kernels), "adai_emu::_selftest: unknown kernel '", name, "'");
  ADAI_LAUNCH(static_cast<unsigned int>(blocks), kThreads, nullptr, k->second)(o);
  return out.narrow(0, 0, blocks * kThreads);
}

}  // namespace emu
}  // namespace adai
