// The one skeleton of every chunk kernel (stats, update, v_sum), and its launch. A kernel is a
// Body (a functor, passed by value as the kernel's argument) run by run_chunk_kernel:
//
//   1. body.begin_block(t, s): false ends the block (update: a skipped step);
//   2. locate the chunk: block b takes global chunk b (multi_tensor.h); thread 0 finds its
//      tensor and hands it to body.load_chunk(meta, begin, len, s), which fills s, the
//      block's shared Body::Shared;
//   3. per-thread body: body.thread(s, tid, sums) writes this thread's Body::kSums float sums
//      over its share of the chunk (elementwise.h);
//   4. block sum: each column in a fixed tree (reduce.cuh), stored as the chunk's partial
//      (column k of chunk c at partials[k * total_chunks + c]);
//   5. last-block finish: the block that finishes last sums each tensor's partials in chunk
//      order (one warp per tensor) and hands them to body.finish_tensor(t, i, sums) in lane
//      0; then every thread of it calls body.finish_launch(t, s_red).
//
// Every sum has a fixed shape over fixed inputs, so the results do not depend on the order in
// which blocks run (tests/test_cuda_emu.py runs five orders and schedules). A Body provides:
//   static constexpr int kSums;  struct Shared (trivial: it lives in shared memory);
//   __device__ bool begin_block(const LaunchTable&, Shared&) const;
//   __device__ void load_chunk(const TensorMeta&, int64_t begin, int64_t len, Shared&) const;
//   __device__ void thread(const Shared&, int tid, float* sums) const;
//   __device__ void finish_tensor(const LaunchTable&, int64_t i, const double* sums) const;
//   __device__ void finish_launch(const LaunchTable&, double* s_red) const;
// Device code (and launch_chunk_kernel, host code, for the .cu files).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "launch.h"
#include "multi_tensor.h"
#include "reduce.cuh"

namespace adai {
namespace cuda {

template <typename Body>
__device__ __forceinline__ void run_chunk_kernel(const LaunchTable& t, const Body& body) {
  static_assert(Body::kSums >= 1, "a chunk kernel sums at least one column");
  __shared__ double s_red[kBlock / 32];
  __shared__ typename Body::Shared s_block;  // what the block shares about its chunk
  __shared__ int s_last;

  if (!body.begin_block(t, s_block)) return;
  const int64_t chunk = blockIdx.x;
  if (chunk < t.total_chunks) {
    if (threadIdx.x == 0) {
      const ChunkRef r = locate_chunk(t.prefix, t.n, chunk, kChunk);
      const TensorMeta& m = t.metas[r.tensor];
      body.load_chunk(m, r.begin, chunk_len(m.numel, r.begin, kChunk), s_block);
    }
    __syncthreads();
    float sums[Body::kSums];
    body.thread(s_block, static_cast<int>(threadIdx.x), sums);
#pragma unroll
    for (int k = 0; k < Body::kSums; ++k) {
      const double sum = block_sum(static_cast<double>(sums[k]), s_red);
      if (threadIdx.x == 0) t.partials[k * t.total_chunks + chunk] = sum;
    }
  }
  if (!finish_block(t.counter, &s_last)) return;

  // Last block: per tensor (one warp each), its sums in chunk order. Only this block runs the
  // finish, so what it writes (steps, v_sums) cannot race with a read of another block.
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t i = warp; i < t.n; i += kBlock / 32) {
    double sums[Body::kSums];
#pragma unroll
    for (int k = 0; k < Body::kSums; ++k) sums[k] = tensor_partials_sum(t, i, lane, k);
    if (lane == 0) body.finish_tensor(t, i, sums);
  }
  body.finish_launch(t, s_red);
}

inline unsigned int grid_size(const LaunchTable& t) {
  // A launch with no element work (no tensors, or all empty) still runs one block, which
  // does the final reduction (writes zeros, increments steps).
  return static_cast<unsigned int>(t.total_chunks > 0 ? t.total_chunks : 1);
}

// Launches `kernel` (a __global__ that calls run_chunk_kernel(t, body)) with one block of
// kBlock threads per chunk on `stream`.
template <typename Body>
void launch_chunk_kernel(void (*kernel)(LaunchTable, Body), const LaunchTable& t,
                         const Body& body, cudaStream_t stream) {
  ADAI_LAUNCH(grid_size(t), kBlock, stream, kernel)(t, body);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace adai
