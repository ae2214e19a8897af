// adai::stats on CUDA: one launch per bucket, one block per chunk (multi_tensor.h).
// Each block writes the double sums of its chunk's StatsSums (elementwise.h: g^2 and, with L2
// decay, (g + l2 theta)^2, g theta, theta^2; g the unscaled gradient) to its own slots; the
// last block to finish reduces the slots per tensor in a fixed order, increments the steps,
// and writes the statistics row (adai_math.h, StatsColumn) summed over tensors in a fixed
// order.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "elementwise.h"
#include "launchers.h"
#include "launch.h"
#include "reduce.cuh"

namespace adai {
namespace cuda {
namespace {

// Row columns kA .. kGn live in tensor_sums; kN comes from the host.
constexpr int kTensorCols = kGn + 1;
static_assert(kTensorCols == kStatsColumns - 1 && kN == kStatsColumns - 1, "stats columns");

template <typename T, bool kL2>
__global__ void __launch_bounds__(kBlock)
    stats_kernel(LaunchTable t, Consts c, double beta2, const float* grad_scale, double numel,
                 double* out, int64_t out_stride) {
  __shared__ double s_red[kBlock / 32];
  __shared__ const T* s_grad;
  __shared__ const T* s_param;
  __shared__ int64_t s_len;
  __shared__ int s_aligned;
  __shared__ float s_inv_scale;
  __shared__ int s_last;

  const int64_t chunk = blockIdx.x;
  if (chunk < t.total_chunks) {
    if (threadIdx.x == 0) {
      const ChunkRef r = locate_chunk(t.prefix, t.n, chunk, kChunk);
      const TensorMeta& m = t.metas[r.tensor];
      s_grad = static_cast<const T*>(m.grad) + r.begin;
      s_param = kL2 ? static_cast<const T*>(m.param) + r.begin : nullptr;
      s_len = chunk_len(m.numel, r.begin, kChunk);
      s_aligned = m.aligned;
      s_inv_scale = inv_grad_scale(grad_scale);
    }
    __syncthreads();
    const StatsSums acc = stats_thread<T, kL2>(static_cast<int>(threadIdx.x), kBlock, s_grad,
                                               s_param, s_len, s_aligned != 0, s_inv_scale, c);
    // Partial columns: 0 gg, 1 b, 2 gt, 3 tt (without L2 only gg is summed).
    double* partials = t.partials + chunk;
    const double gg = block_sum(static_cast<double>(acc.gg), s_red);
    if (threadIdx.x == 0) partials[0] = gg;
    if constexpr (kL2) {
      const double b = block_sum(static_cast<double>(acc.b), s_red);
      const double gt = block_sum(static_cast<double>(acc.gt), s_red);
      const double tt = block_sum(static_cast<double>(acc.tt), s_red);
      if (threadIdx.x == 0) {
        partials[1 * t.total_chunks] = b;
        partials[2 * t.total_chunks] = gt;
        partials[3 * t.total_chunks] = tt;
      }
    }
  }
  if (!finish_block(t.counter, &s_last)) return;

  // Last block: per tensor (one warp each), its sums in a fixed order, then its share of the
  // row. Only this block touches steps, so the increment cannot race with a read.
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t i = warp; i < t.n; i += kBlock / 32) {
    double s[kStatsSums] = {0.0, 0.0, 0.0, 0.0};  // gg, b, gt, tt
    s[0] = tensor_partials_sum(t, i, lane, 0);
    if constexpr (kL2) {
      s[1] = tensor_partials_sum(t, i, lane, 1);
      s[2] = tensor_partials_sum(t, i, lane, 2);
      s[3] = tensor_partials_sum(t, i, lane, 3);
    }
    if (lane == 0) {
      const TensorMeta& m = t.metas[i];
      const double k = *m.step + 1.0;
      *m.step = k;
      double row[kStatsColumns];
      stats_tensor_row(beta2, c.l2, *m.v_sum, k, s, row);
      for (int col = 0; col < kTensorCols; ++col) t.tensor_sums[col * t.n + i] = row[col];
    }
  }
  __syncthreads();
  // The bucket's row: per column, the tensors in a fixed order.
  for (int col = 0; col < kTensorCols; ++col) {
    const double sum = tensors_sum(t, col, s_red);
    if (threadIdx.x == 0) out[col * out_stride] = sum;
  }
  if (threadIdx.x == 0) out[kN * out_stride] = numel;
}

template <typename T>
void launch(const LaunchTable& t, bool use_l2, const Consts& c, double beta2,
            const float* grad_scale, double numel, double* out, int64_t out_stride,
            cudaStream_t stream) {
  const unsigned int grid = grid_size(t);
  if (use_l2) {
    ADAI_LAUNCH(grid, kBlock, stream, stats_kernel<T, true>)(t, c, beta2, grad_scale, numel, out,
                                                             out_stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    ADAI_LAUNCH(grid, kBlock, stream, stats_kernel<T, false>)(t, c, beta2, grad_scale, numel, out,
                                                              out_stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_stats(const LaunchTable& t, c10::ScalarType dtype, bool use_l2, const Consts& c,
                  double beta2, const float* grad_scale, double numel, double* out,
                  int64_t out_stride, cudaStream_t stream) {
  switch (dtype) {
    case c10::ScalarType::Float:
      launch<float>(t, use_l2, c, beta2, grad_scale, numel, out, out_stride, stream);
      break;
    case c10::ScalarType::Half:
      launch<c10::Half>(t, use_l2, c, beta2, grad_scale, numel, out, out_stride, stream);
      break;
    case c10::ScalarType::BFloat16:
      launch<c10::BFloat16>(t, use_l2, c, beta2, grad_scale, numel, out, out_stride, stream);
      break;
    default:
      TORCH_CHECK(false, "adai::stats: unsupported param dtype ", dtype);
  }
}

}  // namespace cuda
}  // namespace adai
