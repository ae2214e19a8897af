// What the host launch code (ops_host.cpp) needs from the device it launches on, and nothing
// else: device_cuda.cpp implements it for CUDA devices, csrc/emu/device_emu.cpp for the CPU
// emulator of the kernels. Validation, segments, metas and the table layout stay shared, so
// the emulated kernels run the same launch code as the real ones.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace adai {
namespace cuda {
namespace device {

extern const char* const kName;  // what error messages call the device: "CUDA" or "CPU"

// Whether `t` lives on a device these kernels run on.
bool holds(const at::Tensor& t);

struct Stream {
  cudaStream_t handle;
  bool capturing;  // being captured into a CUDA graph: uploads must travel as arguments
};

// The current stream of `device` (the caller holds a DeviceGuard for it).
Stream current_stream(const at::Device& device);

// Host bytes to upload from: pinned memory on CUDA, unless the stream is being captured (the
// upload then goes through copy_as_arguments and the bytes may be reused at once).
at::Tensor staging(size_t bytes, bool capturing);

}  // namespace device
}  // namespace cuda
}  // namespace adai
