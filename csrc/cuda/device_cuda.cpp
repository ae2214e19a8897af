// CUDA devices for the host launch code (device.h), and the registration of the CUDA ops.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "device.h"
#include "ops_host.h"

namespace adai {
namespace cuda {
namespace device {

const char* const kName = "CUDA";

bool holds(const at::Tensor& t) { return t.is_cuda(); }

Stream current_stream(const at::Device& device) {
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(s, &status));
  return Stream{s, status != cudaStreamCaptureStatusNone};
}

at::Tensor staging(size_t bytes, bool capturing) {
  return at::empty({static_cast<int64_t>(bytes)},
                   at::TensorOptions().dtype(at::kByte).pinned_memory(!capturing));
}

}  // namespace device
}  // namespace cuda
}  // namespace adai

// _chunk_table has no tensor argument: a composite kernel serves every call (as the kernel
// of m.def(schema, fn) would).
TORCH_LIBRARY_IMPL(adai, CompositeImplicitAutograd, m) {
  m.impl("_chunk_table", &adai::cuda::chunk_table);
}

TORCH_LIBRARY_IMPL(adai, CUDA, m) {
  m.impl("stats", &adai::cuda::stats_op);
  m.impl("update", &adai::cuda::update_op);
  m.impl("v_sum", &adai::cuda::v_sum_op);
  m.impl("_upload", &adai::cuda::upload_op);
}
