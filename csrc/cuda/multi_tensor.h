// Multi-tensor launch metadata for the CUDA kernels: plain C++ (host and device), no CUDA or
// ATen headers, so the chunk table and the chunk lookup are unit-tested on a CPU
// (tests/test_cuda_build.py via the adai::_chunk_table op, and tests/cuda_host_check.cpp).
//
// One launch covers every tensor of a bucket. Each tensor is cut into chunks of kChunk
// elements (the last one shorter); block b of the grid processes global chunk b. The table,
// uploaded once per launch (pinned host buffer -> device, asynchronously, on the current
// stream), holds per tensor its pointers and numel, and the prefix sum of chunk counts; a
// block finds its tensor by binary search over the prefix sums. Empty tensors own no chunk.
//
// Device buffer layout (one allocation of TableLayout::total_bytes, 16-byte aligned parts):
//   [0, 16)              header: uint32 counter of finished blocks (0 when uploaded)
//   [prefix_off, ...)    int64 prefix[n + 1]: prefix[0] = 0, prefix[i + 1] = prefix[i] + chunks_i
//   [meta_off, ...)      TensorMeta[n]
//   ---- host_bytes: everything above is uploaded; everything below is device scratch ----
//   [partial_off, ...)   double[partial_cols][total_chunks]: a block's partial sums (one per
//                        column; column k of chunk c at partials[k * total_chunks + c])
//   [tensor_off, ...)    double[tensor_cols][n]: per tensor results of the final reduction
//                        (column k of tensor i at tensor_sums[k * n + i])
#pragma once

#include <cstddef>
#include <cstdint>

#include "../adai_math.h"

namespace adai {
namespace cuda {

constexpr int kBlock = 256;                 // threads per block (all kernels)
constexpr int64_t kChunk = 16384;           // elements per block; a multiple of every vector width
constexpr int64_t kMaxChunks = 2147483647;  // grid.x limit

// Per tensor pointers. Unused pointers are null (stats has no states). `aligned` = 1 when
// every pointer the kernel dereferences is 16-byte aligned: then the vector path is taken
// (chunk starts are multiples of kChunk elements, so every chunk is aligned as well).
// update's optional ones: beta1_prod null when `beta1_prod` is freed (every tensor done);
// b_max the tensor's beta1_prod_max slot (null: no elision); master its span of the master
// copy (null: none; stats with L2 decay reads theta from `param` = that span); round_index
// the rounding index of its first element (stochastic rounding).
struct TensorMeta {
  void* param;
  void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* beta1_prod;
  float* b_max;
  float* master;
  double* step;
  double* v_sum;
  int64_t round_index;
  int64_t numel;
  int32_t aligned;
  int32_t reserved;
};

ADAI_HD int64_t num_chunks(int64_t numel, int64_t chunk) {
  return numel > 0 ? (numel + chunk - 1) / chunk : 0;
}

// prefix must hold n + 1 entries. Returns the total number of chunks (prefix[n]).
inline int64_t build_chunk_prefix(const int64_t* numels, int64_t n, int64_t chunk,
                                  int64_t* prefix) {
  prefix[0] = 0;
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + num_chunks(numels[i], chunk);
  return prefix[n];
}

// The tensor that owns global chunk c, 0 <= c < prefix[n]: the i with
// prefix[i] <= c < prefix[i + 1] (empty tensors repeat a prefix value and are never found).
ADAI_HD int64_t find_tensor(const int64_t* prefix, int64_t n, int64_t c) {
  int64_t lo = 0, hi = n;  // invariant: prefix[lo] <= c < prefix[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (prefix[mid] <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Where global chunk c lies: its tensor and its first element in that tensor.
struct ChunkRef {
  int64_t tensor;
  int64_t begin;
};

ADAI_HD ChunkRef locate_chunk(const int64_t* prefix, int64_t n, int64_t c, int64_t chunk) {
  ChunkRef r;
  r.tensor = find_tensor(prefix, n, c);
  r.begin = (c - prefix[r.tensor]) * chunk;
  return r;
}

// Number of elements of the chunk that starts at `begin` in a tensor of `numel` elements.
ADAI_HD int64_t chunk_len(int64_t numel, int64_t begin, int64_t chunk) {
  return numel - begin < chunk ? numel - begin : chunk;
}

ADAI_HD size_t align16(size_t x) { return (x + 15) & ~static_cast<size_t>(15); }

struct TableLayout {
  size_t prefix_off, meta_off, host_bytes, partial_off, tensor_off, total_bytes;
};

// partial_cols / tensor_cols: doubles per chunk / per tensor in the scratch part (stats: 4
// with L2 decay, else 1, and 6; update and v_sum: the defaults).
inline TableLayout table_layout(int64_t n, int64_t total_chunks, int partial_cols = 1,
                                int tensor_cols = 1) {
  TableLayout t;
  t.prefix_off = 16;
  t.meta_off = align16(t.prefix_off + sizeof(int64_t) * static_cast<size_t>(n + 1));
  t.host_bytes = align16(t.meta_off + sizeof(TensorMeta) * static_cast<size_t>(n));
  t.partial_off = t.host_bytes;
  t.tensor_off = align16(t.partial_off + sizeof(double) * static_cast<size_t>(partial_cols) *
                                             static_cast<size_t>(total_chunks));
  t.total_bytes = align16(t.tensor_off + sizeof(double) * static_cast<size_t>(tensor_cols) *
                                             static_cast<size_t>(n));
  return t;
}

// Device pointers into one uploaded table (see the layout above).
struct LaunchTable {
  const int64_t* prefix;
  const TensorMeta* metas;
  unsigned int* counter;
  double* partials;     // column k of chunk c: partials[k * total_chunks + c]
  double* tensor_sums;  // column k of tensor i: tensor_sums[k * n + i]
  int64_t n;
  int64_t total_chunks;
};

}  // namespace cuda
}  // namespace adai
