// adai::update and adai::v_sum on CUDA: UpdateBody and VSumBody, run by the chunk kernel
// skeleton (chunk_kernel.cuh), one block per chunk. update: every block sums the statistics
// rows and derives the globals (elementwise.h, update_args); a skipped step writes nothing but
// the step counters (block 0 takes back stats' increments). Otherwise one pass per element
// (adai::update from adai_math.h, fp32 math); each block sums its chunk's new v, and the last
// block to finish writes every tensor's v_sum. v_sum sums given exp_avg_sq tensors in exactly
// the same order (elementwise.h), so its v_sums equal update's bitwise.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../param_dtype.h"
#include "chunk_kernel.cuh"
#include "elementwise.h"
#include "launchers.h"

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

// The last block's finish of update and v_sum: v_sums[i] = tensor i's sum (0 when empty).
__device__ __forceinline__ void write_v_sum(const LaunchTable& t, int64_t i, double sum) {
  *t.metas[i].v_sum = sum;
}

template <typename T>
struct UpdateBody {
  static constexpr int kSums = 1;  // the new v
  struct Shared {
    // What update_args derived for the whole launch (the rest of UpdateArgs::c is in.c).
    float lr, lr_wd, grad_mul, inv_vbar;
    int skip;
    T* param;
    const T* grad;
    float* exp_avg;
    float* exp_avg_sq;
    float* beta1_prod;
    int64_t len;
    int aligned;
    float inv_bc2;
  };

  UpdateInputs in;
  double beta2;

  // Every block derives the same globals from the rows (they are few), so the skip decision
  // needs no grid-wide handshake. Skipped step: parameters, states and v_sums stay as they
  // are; block 0 alone takes back the step increments of adai::stats (no other block reads
  // the steps on this path).
  __device__ bool begin_block(const LaunchTable& t, Shared& s) const {
    if (threadIdx.x == 0) {
      const UpdateArgs a = update_args(in);
      s.lr = a.c.lr;
      s.lr_wd = a.c.lr_wd;
      s.grad_mul = a.grad_mul;
      s.inv_vbar = a.inv_vbar;
      s.skip = a.skip ? 1 : 0;
    }
    __syncthreads();
    if (s.skip == 0) return true;
    if (blockIdx.x == 0) {
      for (int64_t i = threadIdx.x; i < t.n; i += kBlock) {
        double* step = t.metas[i].step;
        *step = *step - 1.0;
      }
    }
    return false;
  }

  __device__ void load_chunk(const TensorMeta& m, int64_t begin, int64_t len, Shared& s) const {
    s.param = static_cast<T*>(m.param) + begin;
    s.grad = static_cast<const T*>(m.grad) + begin;
    s.exp_avg = m.exp_avg + begin;
    s.exp_avg_sq = m.exp_avg_sq + begin;
    s.beta1_prod = m.beta1_prod + begin;
    s.len = len;
    s.aligned = m.aligned;
    s.inv_bc2 = static_cast<float>(1.0 / bias_correction2(beta2, *m.step));
  }

  __device__ void thread(const Shared& s, int tid, float* sums) const {
    // The constants from the kernel parameters (constant bank operands, no registers), only
    // what update_args derived on the device from shared memory.
    UpdateArgs args;
    args.c = in.c;
    args.c.lr = s.lr;
    args.c.lr_wd = s.lr_wd;
    args.grad_mul = s.grad_mul;
    args.inv_vbar = s.inv_vbar;
    args.skip = false;
    sums[0] = update_thread<T>(tid, kBlock, s.param, s.grad, s.exp_avg, s.exp_avg_sq,
                               s.beta1_prod, s.len, s.aligned != 0, s.inv_bc2, args);
  }

  __device__ void finish_tensor(const LaunchTable& t, int64_t i, const double* sums) const {
    write_v_sum(t, i, sums[0]);
  }
  __device__ void finish_launch(const LaunchTable&, double*) const {}
};

struct VSumBody {
  static constexpr int kSums = 1;  // v
  struct Shared {
    const float* exp_avg_sq;
    int64_t len;
    int aligned;
  };

  __device__ bool begin_block(const LaunchTable&, Shared&) const { return true; }
  __device__ void load_chunk(const TensorMeta& m, int64_t begin, int64_t len, Shared& s) const {
    s.exp_avg_sq = m.exp_avg_sq + begin;
    s.len = len;
    s.aligned = m.aligned;
  }
  __device__ void thread(const Shared& s, int tid, float* sums) const {
    sums[0] = v_sum_thread(tid, kBlock, s.exp_avg_sq, s.len, s.aligned != 0);
  }
  __device__ void finish_tensor(const LaunchTable& t, int64_t i, const double* sums) const {
    write_v_sum(t, i, sums[0]);
  }
  __device__ void finish_launch(const LaunchTable&, double*) const {}
};

template <typename T>
__global__ void __launch_bounds__(kBlock, kUpdateMinBlocks)
    update_kernel(LaunchTable t, UpdateBody<T> body) {
  run_chunk_kernel(t, body);
}

__global__ void __launch_bounds__(kBlock) v_sum_kernel(LaunchTable t, VSumBody body) {
  run_chunk_kernel(t, body);
}

}  // namespace

void launch_update(const LaunchTable& t, c10::ScalarType dtype, const UpdateInputs& in,
                   double beta2, cudaStream_t stream) {
  dispatch_param_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_chunk_kernel(update_kernel<T>, t, UpdateBody<T>{in, beta2}, stream);
  });
}

void launch_v_sum(const LaunchTable& t, cudaStream_t stream) {
  launch_chunk_kernel(v_sum_kernel, t, VSumBody{}, stream);
}

}  // namespace cuda
}  // namespace adai
