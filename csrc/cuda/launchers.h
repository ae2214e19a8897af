// The launchers of the CUDA kernels (stats.cu; update.cu: update and v_sum; upload.cu), called
// by ops_host.cpp with a table already uploaded on `stream`. Host-compilable: no device code.
#pragma once

#include <cuda_runtime_api.h>

#include <c10/core/ScalarType.h>

#include "../adai_math.h"
#include "elementwise.h"
#include "multi_tensor.h"

namespace adai {
namespace cuda {

// Phase 1: per tensor the sums of adai_math.h's StatsSum (g = grad * inv_grad_scale);
// the last block increments every step and writes the statistics row (adai_math.h,
// StatsColumn; out[k * out_stride] for column k, kN = numel). Reads params only when use_l2.
// grad_scale: a device pointer, or null.
void launch_stats(const LaunchTable& t, c10::ScalarType dtype, bool use_l2, const Consts& c,
                  double beta2, const float* grad_scale, double numel, double* out,
                  int64_t out_stride, cudaStream_t stream);

// Phase 2: every block derives update_args(in) (elementwise.h): skipped, only the steps are
// decremented; otherwise inv_bc2 per tensor from its step, then adai::update on every
// element with g = grad * grad_mul; the last block writes v_sum_i.
void launch_update(const LaunchTable& t, c10::ScalarType dtype, const UpdateInputs& in,
                   double beta2, cudaStream_t stream);

// v_sum: v_sum_i = sum of exp_avg_sq_i (TensorMeta::exp_avg_sq), summed exactly as
// launch_update sums the new v.
void launch_v_sum(const LaunchTable& t, cudaStream_t stream);

// Bytes of one kernel argument that carries data (upload.cu): below the 32,764-byte limit
// of CUDA 12.1+ with room for the other arguments.
constexpr int kPayloadBytes = 32 * 1024 - 64;

// Copies `bytes` bytes from host memory to the device on `stream` as the arguments of
// ceil(bytes / kPayloadBytes) small kernels, so that a CUDA graph capturing the stream keeps
// the data (upload.cu). `src` may be reused as soon as the call returns.
void copy_as_arguments(const void* src, size_t bytes, void* dst, cudaStream_t stream);

}  // namespace cuda
}  // namespace adai
