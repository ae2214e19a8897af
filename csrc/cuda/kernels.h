// Launchers of the CUDA kernels (stats.cu; update.cu: update and sum_v), called by
// ops_cuda.cpp with a table already uploaded on `stream`. Host-compilable: no device code.
#pragma once

#include <cuda_runtime_api.h>

#include <c10/core/ScalarType.h>

#include "../adai_math.h"
#include "multi_tensor.h"

namespace adai {
namespace cuda {

// Phase 1: per tensor G_i = sum (g + c.l2 * theta)^2; the last block increments every step,
// writes tensor_sums[i] = (beta2 * v_sum_i + (1 - beta2) * G_i) / bc2(beta2, k_i) and
// *out = their sum. Reads params only when use_l2.
void launch_stats(const LaunchTable& t, c10::ScalarType dtype, bool use_l2, const Consts& c,
                  double beta2, double* out, cudaStream_t stream);

// Phase 2: inv_vbar from sum(stats[k * stats_stride], k < stats_len) and numel, inv_bc2 per
// tensor from its step, then adai::update on every element; the last block writes v_sum_i.
void launch_update(const LaunchTable& t, c10::ScalarType dtype, const Consts& c, double beta2,
                   const double* stats, int64_t stats_len, int64_t stats_stride, double numel,
                   cudaStream_t stream);

// sum_v: v_sum_i = sum of exp_avg_sq_i (TensorMeta::exp_avg_sq), summed exactly as
// launch_update sums the new v.
void launch_sum_v(const LaunchTable& t, cudaStream_t stream);

}  // namespace cuda
}  // namespace adai
