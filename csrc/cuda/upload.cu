// Host-to-device copies that a CUDA graph can capture: the bytes travel as kernel arguments.
//
// An asynchronous copy from pinned host memory, once captured, reads that host memory again at
// every replay, so the memory would have to stay unchanged for as long as the graph lives;
// the pinned buffers of ops_host.cpp go back to the host allocator after the call. Kernel
// arguments are instead copied into the graph when it is captured. Each launch carries up to
// kPayloadBytes (the CUDA 12.1+ limit on kernel arguments is 32,764 bytes on sm_70 and newer;
// a launch table of 1,000 tensors takes three launches).
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstring>

#include "launchers.h"
#include "launch.h"

namespace adai {
namespace cuda {
namespace {

struct alignas(16) Payload {
  unsigned char bytes[kPayloadBytes];
};

// __grid_constant__: the argument is read in place, not copied to each thread's stack.
__global__ void write_payload_kernel(const __grid_constant__ Payload p, unsigned char* dst,
                                     int n) {
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) {
    dst[i] = p.bytes[i];
  }
}

}  // namespace

void copy_as_arguments(const void* src, size_t bytes, void* dst, cudaStream_t stream) {
  thread_local Payload p;  // 32 KB: not on the stack; the launch copies it before returning
  static_assert(sizeof(Payload) == kPayloadBytes, "Payload has no padding");
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  for (size_t off = 0; off < bytes; off += kPayloadBytes) {
    const size_t len = std::min(bytes - off, static_cast<size_t>(kPayloadBytes));
    std::memcpy(p.bytes, s + off, len);
    ADAI_LAUNCH(1, kBlock, stream, write_payload_kernel)(p, d + off, static_cast<int>(len));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace adai
