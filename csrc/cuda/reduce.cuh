// Deterministic block reductions and the "last block finishes" handshake (device code only),
// the steps of chunk_kernel.cuh's skeleton. No float atomics: every sum is a fixed tree over
// fixed inputs, so results are bitwise reproducible run to run.
#pragma once

#include <cuda_runtime.h>

#include "multi_tensor.h"

namespace adai {
namespace cuda {

// Sum over the 32 lanes of a warp by a fixed shuffle tree; complete in lane 0. Every lane of
// the warp must call it.
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the kBlock threads of the block; complete in thread 0. `shared` holds kBlock / 32
// doubles. Contains __syncthreads(): every thread of the block must call it.
__device__ __forceinline__ double block_sum(double x, double* shared) {
  static_assert(kBlock % 32 == 0 && kBlock / 32 <= 32, "block size");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  double r = 0.0;
  if (warp == 0) {
    r = lane < kBlock / 32 ? shared[lane] : 0.0;
    r = warp_sum(r);
  }
  __syncthreads();  // `shared` may be reused after this
  return r;
}

// Every block calls this once, after its thread 0 stored the block's partial. Returns true in
// all threads of the one block that finishes last (the counter starts at 0: it is uploaded
// with the table). The fences order each block's partial before its counter increment, and
// the last block's reads (__ldcg, L2) after its increment.
__device__ __forceinline__ bool finish_block(unsigned int* counter, int* s_last) {
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned int done_before = atomicAdd(counter, 1u);
    const bool last = done_before == gridDim.x - 1;
    if (last) __threadfence();
    *s_last = last ? 1 : 0;
  }
  __syncthreads();
  return *s_last != 0;
}

// In the last block: the sum of tensor i's chunk partials (column `col`). Lane l adds chunks
// prefix[i] + l, + 32, ... in order, then the lanes are combined by warp_sum. Complete in
// lane 0; every lane of the warp must call it with the same i and col.
__device__ __forceinline__ double tensor_partials_sum(const LaunchTable& t, int64_t i,
                                                      int lane, int col = 0) {
  const double* partials = t.partials + static_cast<int64_t>(col) * t.total_chunks;
  const int64_t end = t.prefix[i + 1];
  double s = 0.0;
  for (int64_t c = t.prefix[i] + lane; c < end; c += 32) s += __ldcg(partials + c);
  return warp_sum(s);
}

// In the last block: the sum over tensors of column `col` of tensor_sums, in a fixed order
// (thread j adds tensors j, j + kBlock, ... in order, then block_sum). Complete in thread 0;
// every thread of the block must call it.
__device__ __forceinline__ double tensors_sum(const LaunchTable& t, int col, double* shared) {
  const double* sums = t.tensor_sums + static_cast<int64_t>(col) * t.n;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < t.n; i += kBlock) acc += __ldcg(sums + i);
  return block_sum(acc, shared);
}

}  // namespace cuda
}  // namespace adai
