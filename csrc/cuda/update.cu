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

// Whether tensor m's b is done (csrc/adai_math.h): always when `beta1_prod` is freed, never
// without beta1_prod_max. Read on the device, so a captured graph follows the flags.
__device__ __forceinline__ bool b_done(const TensorMeta& m) {
  return m.beta1_prod == nullptr || (m.b_max != nullptr && beta1_prod_done(*m.b_max));
}

template <typename T>
struct UpdateBody {
  static constexpr int kSums = 1;   // the new v
  static constexpr int kMaxes = 1;  // max |b'| (beta1_prod_max)
  struct Shared {
    // What update_args derived for the whole launch (the rest of UpdateArgs::c is in.c).
    float lr, lr_wd, grad_mul, inv_vbar;
    int skip;
    UpdateSpans<T> spans;
    int64_t len;
    int aligned;
    float inv_bc2;
  };

  UpdateInputs in;
  double beta2;
  Theta theta;
  const int64_t* rounding_seed;  // device pointer (Theta::kStochastic), else null

  // Every block derives the same globals from the rows (they are few), so the skip decision
  // needs no grid-wide handshake. Skipped step: parameters, states, v_sums and
  // beta1_prod_max stay as they are; block 0 alone takes back the step increments of
  // adai::stats (no other block reads the steps on this path).
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

  // Every block reads the done flag before any block finishes (finish_block), and only the
  // last block writes beta1_prod_max, so the flag is the same for all chunks of a tensor.
  __device__ void load_chunk(const TensorMeta& m, int64_t begin, int64_t len, Shared& s) const {
    UpdateSpans<T>& p = s.spans;
    p.p = static_cast<T*>(m.param) + begin;
    p.g = static_cast<const T*>(m.grad) + begin;
    p.m = m.exp_avg + begin;
    p.v = m.exp_avg_sq + begin;
    p.b = b_done(m) ? nullptr : m.beta1_prod + begin;
    p.master = m.master != nullptr ? m.master + begin : nullptr;
    const double k = *m.step;
    p.index = static_cast<uint64_t>(m.round_index + begin);
    p.stream = rounding_seed != nullptr
                   ? rounding_stream(static_cast<uint32_t>(*rounding_seed),
                                     static_cast<uint32_t>(static_cast<int64_t>(k)))
                   : 0u;
    s.len = len;
    s.aligned = m.aligned;
    s.inv_bc2 = static_cast<float>(1.0 / bias_correction2(beta2, k));
  }

  __device__ void thread(const Shared& s, int tid, float* vals) const {
    // The constants from the kernel parameters (constant bank operands, no registers), only
    // what update_args derived on the device from shared memory.
    UpdateArgs args;
    args.c = in.c;
    args.c.lr = s.lr;
    args.c.lr_wd = s.lr_wd;
    args.grad_mul = s.grad_mul;
    args.inv_vbar = s.inv_vbar;
    args.skip = false;
    const UpdateSums r =
        update_thread<T>(tid, kBlock, s.spans, s.len, s.aligned != 0, s.inv_bc2, args, theta);
    vals[0] = r.v;
    vals[1] = r.b_max;
  }

  // A done tensor keeps its beta1_prod_max (its chunks wrote no b).
  __device__ void finish_tensor(const LaunchTable& t, int64_t i, const double* sums) const {
    write_v_sum(t, i, sums[0]);
    const TensorMeta& m = t.metas[i];
    if (m.b_max != nullptr && !b_done(m)) *m.b_max = static_cast<float>(sums[1]);
  }
  __device__ void finish_launch(const LaunchTable&, double*) const {}
};

struct VSumBody {
  static constexpr int kSums = 1;  // v
  static constexpr int kMaxes = 0;
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
                   double beta2, bool master, const int64_t* rounding_seed,
                   cudaStream_t stream) {
  const Theta theta = master                    ? Theta::kMaster
                      : rounding_seed != nullptr ? Theta::kStochastic
                                                 : Theta::kParam;
  dispatch_param_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_chunk_kernel(update_kernel<T>, t, UpdateBody<T>{in, beta2, theta, rounding_seed},
                        stream);
  });
}

void launch_v_sum(const LaunchTable& t, cudaStream_t stream) {
  launch_chunk_kernel(v_sum_kernel, t, VSumBody{}, stream);
}

}  // namespace cuda
}  // namespace adai
