// adai::update and adai::v_sum on CUDA: one launch per call, one block per chunk
// (multi_tensor.h). update: every block sums the statistics rows and derives the globals
// (elementwise.h, update_args); a skipped step writes nothing but the step counters (block 0
// takes back stats' increments). Otherwise one pass per element (adai::update from
// adai_math.h, fp32 math); each block writes the double sum of its chunk's new v to its own
// slot, and the last block to finish reduces the slots per tensor into v_sums. v_sum sums
// given exp_avg_sq tensors in exactly the same order (elementwise.h), so its v_sums equal
// update's bitwise.
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

// Blocks per SM update_kernel is compiled for. For sm_90, ptxas (CUDA 13) caps the fp32
// kernel at 80 registers when it aims at 3 blocks and spills 16 bytes in the element loop;
// at 2 blocks (16 warps, ~80 KB of fp32 loads in flight per SM) it does not spill. sm_80 fits
// 3 blocks without spilling. (Chosen from ptxas -v, not yet timed against the alternative.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kUpdateMinBlocks = 2;
#else
constexpr int kUpdateMinBlocks = 3;
#endif

// In the last block: v_sums[i] = the sum of tensor i's chunk partials (one warp per tensor;
// empty tensors get 0).
__device__ __forceinline__ void write_v_sums(const LaunchTable& t) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t i = warp; i < t.n; i += kBlock / 32) {
    const double v_sum = tensor_partials_sum(t, i, lane);
    if (lane == 0) *t.metas[i].v_sum = v_sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock, kUpdateMinBlocks)
    update_kernel(LaunchTable t, UpdateInputs in, double beta2) {
  __shared__ double s_red[kBlock / 32];
  __shared__ T* s_param;
  __shared__ const T* s_grad;
  __shared__ float* s_exp_avg;
  __shared__ float* s_exp_avg_sq;
  __shared__ float* s_beta1_prod;
  __shared__ int64_t s_len;
  __shared__ int s_aligned;
  __shared__ float s_inv_bc2;
  __shared__ UpdateArgs s_args;
  __shared__ int s_last;

  // Every block derives the same globals from the rows (they are few), so the skip decision
  // needs no grid-wide handshake.
  if (threadIdx.x == 0) s_args = update_args(in);
  __syncthreads();
  if (s_args.skip) {
    // Skipped step: parameters, states and v_sums stay as they are; block 0 alone takes back
    // the step increments of adai::stats (no other block reads the steps on this path).
    if (blockIdx.x == 0) {
      for (int64_t i = threadIdx.x; i < t.n; i += kBlock) {
        double* step = t.metas[i].step;
        *step = *step - 1.0;
      }
    }
    return;
  }

  const int64_t chunk = blockIdx.x;
  if (chunk < t.total_chunks) {
    if (threadIdx.x == 0) {
      const ChunkRef r = locate_chunk(t.prefix, t.n, chunk, kChunk);
      const TensorMeta& m = t.metas[r.tensor];
      s_param = static_cast<T*>(m.param) + r.begin;
      s_grad = static_cast<const T*>(m.grad) + r.begin;
      s_exp_avg = m.exp_avg + r.begin;
      s_exp_avg_sq = m.exp_avg_sq + r.begin;
      s_beta1_prod = m.beta1_prod + r.begin;
      s_len = chunk_len(m.numel, r.begin, kChunk);
      s_aligned = m.aligned;
      s_inv_bc2 = static_cast<float>(1.0 / bias_correction2(beta2, *m.step));
    }
    __syncthreads();
    // The constants from the kernel parameters (constant bank operands, no registers), only
    // what update_args derived on the device from shared memory.
    UpdateArgs args;
    args.c = in.c;
    args.c.lr = s_args.c.lr;
    args.c.lr_wd = s_args.c.lr_wd;
    args.grad_mul = s_args.grad_mul;
    args.inv_vbar = s_args.inv_vbar;
    args.skip = false;
    const float vacc = update_thread<T>(static_cast<int>(threadIdx.x), kBlock, s_param, s_grad,
                                        s_exp_avg, s_exp_avg_sq, s_beta1_prod, s_len,
                                        s_aligned != 0, s_inv_bc2, args);
    const double sum = block_sum(static_cast<double>(vacc), s_red);
    if (threadIdx.x == 0) t.partials[chunk] = sum;
  }
  if (!finish_block(t.counter, &s_last)) return;
  write_v_sums(t);
}

__global__ void __launch_bounds__(kBlock) v_sum_kernel(LaunchTable t) {
  __shared__ double s_red[kBlock / 32];
  __shared__ const float* s_exp_avg_sq;
  __shared__ int64_t s_len;
  __shared__ int s_aligned;
  __shared__ int s_last;

  const int64_t chunk = blockIdx.x;
  if (chunk < t.total_chunks) {
    if (threadIdx.x == 0) {
      const ChunkRef r = locate_chunk(t.prefix, t.n, chunk, kChunk);
      const TensorMeta& m = t.metas[r.tensor];
      s_exp_avg_sq = m.exp_avg_sq + r.begin;
      s_len = chunk_len(m.numel, r.begin, kChunk);
      s_aligned = m.aligned;
    }
    __syncthreads();
    const float acc = v_sum_thread(static_cast<int>(threadIdx.x), kBlock, s_exp_avg_sq, s_len,
                                  s_aligned != 0);
    const double sum = block_sum(static_cast<double>(acc), s_red);
    if (threadIdx.x == 0) t.partials[chunk] = sum;
  }
  if (!finish_block(t.counter, &s_last)) return;
  write_v_sums(t);
}

template <typename T>
void launch(const LaunchTable& t, const UpdateInputs& in, double beta2, cudaStream_t stream) {
  ADAI_LAUNCH(grid_size(t), kBlock, stream, update_kernel<T>)(t, in, beta2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_update(const LaunchTable& t, c10::ScalarType dtype, const UpdateInputs& in,
                   double beta2, cudaStream_t stream) {
  switch (dtype) {
    case c10::ScalarType::Float:
      launch<float>(t, in, beta2, stream);
      break;
    case c10::ScalarType::Half:
      launch<c10::Half>(t, in, beta2, stream);
      break;
    case c10::ScalarType::BFloat16:
      launch<c10::BFloat16>(t, in, beta2, stream);
      break;
    default:
      TORCH_CHECK(false, "adai::update: unsupported param dtype ", dtype);
  }
}

void launch_v_sum(const LaunchTable& t, cudaStream_t stream) {
  ADAI_LAUNCH(grid_size(t), kBlock, stream, v_sum_kernel)(t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace adai
