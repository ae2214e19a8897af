// adai::stats on CUDA: StatsBody, run by the chunk kernel skeleton (chunk_kernel.cuh), one
// block per chunk. Each block sums its chunk's StatsSums (elementwise.h: g^2 and, with L2
// decay, (g + l2 theta)^2, g theta, theta^2; g the unscaled gradient); the last block to
// finish increments every step, writes each tensor's share of the statistics row (adai_math.h,
// StatsColumn) and the bucket's row, summed over tensors in a fixed order.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../param_dtype.h"
#include "chunk_kernel.cuh"
#include "elementwise.h"
#include "launchers.h"

namespace adai {
namespace cuda {
namespace {

// Row columns kA .. kGn live in tensor_sums; kN comes from the host.
constexpr int kTensorCols = kGn + 1;
static_assert(kTensorCols == kStatsColumns - 1 && kN == kStatsColumns - 1, "stats columns");

// Reads theta only when kL2 (then every StatsSum is summed, else only kSumGg), as P: the
// param type T, or float from the master copy (TensorMeta::param points into it then).
template <typename T, bool kL2, typename P = T>
struct StatsBody {
  static constexpr int kSums = kL2 ? kStatsSums : 1;
  static constexpr int kMaxes = 0;
  struct Shared {
    const T* grad;
    const P* param;
    int64_t len;
    int aligned;
    float inv_scale;
  };

  Consts c;
  double beta2;
  const float* grad_scale;  // device pointer or null
  double numel;             // column kN
  double* out;              // the row: column k at out[k * out_stride]
  int64_t out_stride;

  __device__ bool begin_block(const LaunchTable&, Shared&) const { return true; }

  __device__ void load_chunk(const TensorMeta& m, int64_t begin, int64_t len, Shared& s) const {
    s.grad = static_cast<const T*>(m.grad) + begin;
    s.param = kL2 ? static_cast<const P*>(m.param) + begin : nullptr;
    s.len = len;
    s.aligned = m.aligned;
    s.inv_scale = inv_grad_scale(grad_scale);
  }

  __device__ void thread(const Shared& s, int tid, float* sums) const {
    const StatsSums acc = stats_thread<T, kL2, P>(tid, kBlock, s.grad, s.param, s.len,
                                                  s.aligned != 0, s.inv_scale, c);
#pragma unroll
    for (int k = 0; k < kSums; ++k) sums[k] = acc.v[k];
  }

  // Tensor i's step and share of the row, into tensor_sums.
  __device__ void finish_tensor(const LaunchTable& t, int64_t i, const double* sums) const {
    double s[kStatsSums] = {sums[0], 0.0, 0.0, 0.0};
#pragma unroll
    for (int k = 1; k < kSums; ++k) s[k] = sums[k];
    const TensorMeta& m = t.metas[i];
    const double k = *m.step + 1.0;
    *m.step = k;
    double row[kStatsColumns];
    stats_tensor_row(beta2, c.l2, *m.v_sum, k, s, row);
    for (int col = 0; col < kTensorCols; ++col) t.tensor_sums[col * t.n + i] = row[col];
  }

  // The bucket's row: per column, the tensors in a fixed order.
  __device__ void finish_launch(const LaunchTable& t, double* s_red) const {
    __syncthreads();
    for (int col = 0; col < kTensorCols; ++col) {
      const double sum = tensors_sum(t, col, s_red);
      if (threadIdx.x == 0) out[col * out_stride] = sum;
    }
    if (threadIdx.x == 0) out[kN * out_stride] = numel;
  }
};

template <typename T, bool kL2>
__global__ void __launch_bounds__(kBlock) stats_kernel(LaunchTable t, StatsBody<T, kL2> body) {
  run_chunk_kernel(t, body);
}

// With L2 decay and fp32 master weights: theta from the master copy.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    stats_master_kernel(LaunchTable t, StatsBody<T, true, float> body) {
  run_chunk_kernel(t, body);
}

}  // namespace

void launch_stats(const LaunchTable& t, c10::ScalarType dtype, bool use_l2, bool master,
                  const Consts& c,
                  double beta2, const float* grad_scale, double numel, double* out,
                  int64_t out_stride, cudaStream_t stream) {
  dispatch_param_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (use_l2 && master) {
      launch_chunk_kernel(stats_master_kernel<T>, t,
                          StatsBody<T, true, float>{c, beta2, grad_scale, numel, out, out_stride},
                          stream);
    } else if (use_l2) {
      launch_chunk_kernel(stats_kernel<T, true>, t,
                          StatsBody<T, true>{c, beta2, grad_scale, numel, out, out_stride},
                          stream);
    } else {
      launch_chunk_kernel(stats_kernel<T, false>, t,
                          StatsBody<T, false>{c, beta2, grad_scale, numel, out, out_stride},
                          stream);
    }
  });
}

}  // namespace cuda
}  // namespace adai
