// adai::stats on CUDA: one launch per bucket, one block per chunk (multi_tensor.h).
// Each block writes the double sum of its chunk's (g + l2 * theta)^2 to its own slot; the last
// block to finish reduces the slots per tensor, increments the steps and writes `out`.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "elementwise.h"
#include "kernels.h"
#include "reduce.cuh"

namespace adai {
namespace cuda {
namespace {

template <typename T, bool kL2>
__global__ void __launch_bounds__(kBlock)
    stats_kernel(LaunchTable t, Consts c, double beta2, double* out) {
  __shared__ double s_red[kBlock / 32];
  __shared__ const T* s_grad;
  __shared__ const T* s_param;
  __shared__ int64_t s_len;
  __shared__ int s_aligned;
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
    }
    __syncthreads();
    const float acc = stats_thread<T, kL2>(static_cast<int>(threadIdx.x), kBlock, s_grad,
                                           s_param, s_len, s_aligned != 0, c);
    const double sum = block_sum(static_cast<double>(acc), s_red);
    if (threadIdx.x == 0) t.partials[chunk] = sum;
  }
  if (!finish_block(t.counter, &s_last)) return;

  // Last block: per tensor (one warp each), G_i in a fixed order, then its contribution.
  // Only this block touches steps and v_sums, so the increment cannot race with a read.
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t i = warp; i < t.n; i += kBlock / 32) {
    const double g_sum = tensor_partials_sum(t, i, lane);
    if (lane == 0) {
      const TensorMeta& m = t.metas[i];
      const float k = *m.step + 1.0f;
      *m.step = k;
      t.tensor_sums[i] = (beta2 * *m.v_sum + (1.0 - beta2) * g_sum) /
                         bias_correction2(beta2, static_cast<double>(k));
    }
  }
  __syncthreads();
  // The bucket sum: thread j adds tensors j, j + kBlock, ... in order, then a fixed tree.
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < t.n; i += kBlock) acc += __ldcg(t.tensor_sums + i);
  acc = block_sum(acc, s_red);
  if (threadIdx.x == 0) *out = acc;
}

template <typename T>
void launch(const LaunchTable& t, bool use_l2, const Consts& c, double beta2, double* out,
            cudaStream_t stream) {
  const unsigned int grid = grid_size(t);
  if (use_l2) {
    stats_kernel<T, true><<<grid, kBlock, 0, stream>>>(t, c, beta2, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    stats_kernel<T, false><<<grid, kBlock, 0, stream>>>(t, c, beta2, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_stats(const LaunchTable& t, c10::ScalarType dtype, bool use_l2, const Consts& c,
                  double beta2, double* out, cudaStream_t stream) {
  switch (dtype) {
    case c10::ScalarType::Float:
      launch<float>(t, use_l2, c, beta2, out, stream);
      break;
    case c10::ScalarType::Half:
      launch<c10::Half>(t, use_l2, c, beta2, out, stream);
      break;
    case c10::ScalarType::BFloat16:
      launch<c10::BFloat16>(t, use_l2, c, beta2, out, stream);
      break;
    default:
      TORCH_CHECK(false, "adai::stats: unsupported param dtype ", dtype);
  }
}

}  // namespace cuda
}  // namespace adai
