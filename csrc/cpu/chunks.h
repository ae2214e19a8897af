// The CPU kernels' work split (csrc/cpu/adai_cpu.cpp, csrc/cpu/float64.h): one flat list of
// fixed-size chunks over all tensors of a call, chunks never crossing a tensor boundary, run
// with at::parallel_for. Every chunk writes its own partial slot and per-tensor sums add the
// slots in chunk order, so results do not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "op_prologue.h"

namespace adai_cpu {

// Elements per chunk. A multiple of every vector block, so only a tensor's last chunk has a
// scalar tail. 16K fp32 elements move ~640 KB per chunk in `update`: plenty to amortise
// the scheduling, small enough that a few large tensors still split over all threads.
constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t tensor;
  int64_t begin;  // element offset inside the tensor's memory span
  int64_t len;
};

// Chunks of every tensor, tensor by tensor, in memory order; first[i] is tensor i's first.
inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numel,
                                      std::vector<int64_t>& first) {
  std::vector<Chunk> chunks;
  const size_t n = numel.size();
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += (numel[i] + kChunk - 1) / kChunk;
  chunks.reserve(static_cast<size_t>(total));
  first.assign(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    first[i] = static_cast<int64_t>(chunks.size());
    for (int64_t s = 0; s < numel[i]; s += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), s, std::min(kChunk, numel[i] - s)});
    }
  }
  first[n] = static_cast<int64_t>(chunks.size());
  return chunks;
}

// Per-tensor sums of K interleaved sums: out[i * K + k] = tensor i's chunk slots
// partial[j * K + k] added in chunk order.
inline std::vector<double> tensor_sums(const std::vector<double>& partial,
                                       const std::vector<int64_t>& first, size_t n, int K) {
  std::vector<double> sums(n * K, 0.0);
  for (size_t i = 0; i < n; ++i) {
    for (int k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t j = first[i]; j < first[i + 1]; ++j) s += partial[j * K + k];
      sums[i * K + k] = s;
    }
  }
  return sums;
}

template <typename F>
inline void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  // Threads take tasks: runs of consecutive chunks of about kChunk elements in all, so that
  // many small tensors make few tasks (a call with < kChunk elements stays on the calling
  // thread) and threads get similar amounts of work. Each chunk still writes its own slot,
  // so the grouping does not change any result.
  std::vector<int64_t> task_begin;
  int64_t filled = kChunk;
  for (size_t k = 0; k < chunks.size(); ++k) {
    if (filled + chunks[k].len > kChunk) {
      task_begin.push_back(static_cast<int64_t>(k));
      filled = 0;
    }
    filled += chunks[k].len;
  }
  const int64_t n_tasks = static_cast<int64_t>(task_begin.size());
  task_begin.push_back(static_cast<int64_t>(chunks.size()));
  if (n_tasks == 1) {  // nothing to share: skip the parallel region
    for (size_t k = 0; k < chunks.size(); ++k) f(static_cast<int64_t>(k), chunks[k]);
    return;
  }
  at::parallel_for(0, n_tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = task_begin[b]; k < task_begin[e]; ++k) f(k, chunks[k]);
  });
}

// Raw pointers of one tensor list, taken once per call (the chunk loops then touch no
// at::Tensor). Dtypes are checked by the caller; read-only lists use const_data_ptr, so that
// they are never materialised (copy-on-write tensors).
template <typename T>
std::vector<T*> data_ptrs(at::TensorList ts) {
  std::vector<T*> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    if constexpr (std::is_const_v<T>) {
      out[i] = static_cast<T*>(ts[i].const_data_ptr());
    } else {
      out[i] = static_cast<T*>(ts[i].mutable_data_ptr());
    }
  }
  return out;
}

inline std::vector<int64_t> numels(at::TensorList ts) {
  std::vector<int64_t> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) out[i] = ts[i].numel();
  return out;
}

// v_sum's per-tensor sums: each segment's span of the state buffer `v`, summed chunk by chunk
// with `chunk_sum(const T* v, int64_t n)` and the chunks added in order (as update sums them).
template <typename T, typename F>
std::vector<double> segment_sums(const T* v, const adai::OpArgs& a, const F& chunk_sum) {
  std::vector<int64_t> numel(a.n);
  for (size_t i = 0; i < a.n; ++i) numel[i] = adai::segment(a, i, adai::kNumel);
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(numel, first);
  std::vector<double> partial(chunks.size(), 0.0);
  if (!chunks.empty()) {
    for_each_chunk(chunks, [&](int64_t k, const Chunk& ch) {
      const int64_t so = adai::segment(a, static_cast<size_t>(ch.tensor), adai::kOffset);
      partial[k] = chunk_sum(v + so + ch.begin, ch.len);
    });
  }
  return tensor_sums(partial, first, a.n, 1);
}

}  // namespace adai_cpu
