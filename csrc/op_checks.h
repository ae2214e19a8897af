// The contract checks of the ops' arguments (host code only), each written once for the CPU
// and CUDA ops: the list lengths, params and grads, the statistics tensors, the flat state
// buffers, the control tensors and the `segments` table (csrc/op_schemas.h). After these
// checks every state access of a kernel is in bounds and every tensor owns its own step
// counter and v_sum. csrc/op_prologue.h runs them in each op's order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "adai_math.h"
#include "param_dtype.h"

namespace adai {

// Columns of a row of `segments`.
enum SegmentColumn { kOffset = 0, kNumel = 1, kSlot = 2, kSegmentColumns = 3 };

inline void check_len(const char* op, const char* name, size_t got, size_t want) {
  TORCH_CHECK(got == want, op, ": `", name, "` has ", got, " tensors but `params` has ", want,
              "; the tensor lists must have the same length");
}

// A tensor argument on the op's device (`device`: where the backend runs the op).
inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": `", name, "` is on ", t.device(),
              " but the op runs on ", device);
}

// Element i of the tensor list `name` (params or grads) on `device`.
inline void check_list_device(const char* op, const char* name, size_t i, const at::Tensor& t,
                              const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
              " but the op runs on ", device);
}

// Same element -> memory mapping (and so the same memory order): same sizes, and the same
// strides in every dimension of size > 1 (the strides of size-1 dimensions do not change
// where elements are).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Where an op runs and what its kernels take: `device` (the CPU, or the CUDA device of the
// op's first device tensor), whether the params of one call must share a dtype (`one_dtype`:
// a CUDA launch takes one dtype; the CPU kernel dispatches per tensor), and whether float64
// params with float64 state are stepped (`float64`: the CPU kernel). A float64 call has only
// float64 params: the state dtype is the call's.
struct Target {
  at::Device device;
  bool one_dtype;
  bool float64;
};

// The state dtype of a call whose params[0] has `dtype`.
inline at::ScalarType state_dtype(at::ScalarType dtype, const Target& t) {
  return t.float64 && dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// params[i] and grads[i]: on the target's device, of a parameter dtype (param_dtype.h; float64
// too where the target steps it), the grad of its param's dtype, shape and strides, the param
// non-overlapping and dense (unless empty: no element is touched). `dtype` is params[0]'s.
inline void check_param(const char* op, size_t i, const at::Tensor& p, const at::Tensor& g,
                        at::ScalarType dtype, const Target& t) {
  check_list_device(op, "params", i, p, t.device);
  check_list_device(op, "grads", i, g, t.device);
  const at::ScalarType pt = p.scalar_type();
  TORCH_CHECK(is_param_dtype(pt) || (t.float64 && pt == at::kDouble), op, ": params[", i,
              "] has dtype ", pt, "; expected ",
              t.float64 ? "float32, float64, bfloat16 or float16" : "float32, bfloat16 or float16");
  const bool one_dtype = t.one_dtype || pt == at::kDouble || dtype == at::kDouble;
  TORCH_CHECK(!one_dtype || pt == dtype, op, ": params[", i, "] has dtype ", pt,
              " but params[0] has ", dtype, "; all params of one call must share a dtype");
  TORCH_CHECK(g.scalar_type() == pt, op, ": grads[", i, "] has dtype ", g.scalar_type(),
              " but params[", i, "] has ", pt);
  TORCH_CHECK(p.numel() == 0 || p.is_non_overlapping_and_dense(), op, ": params[", i,
              "] must be non-overlapping and dense, got shape ", p.sizes(), " and strides ",
              p.strides());
  TORCH_CHECK(same_layout(g, p), op, ": grads[", i, "] (sizes ", g.sizes(), ", strides ",
              g.strides(), ") must have the sizes and strides of params[", i, "] (sizes ",
              p.sizes(), ", strides ", p.strides(), ")");
}

// stats' `out`: one statistics row, 1-D float64 of kStatsColumns elements.
inline void check_stats_row(const char* op, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.dim() == 1 &&
                  out.size(0) == kStatsColumns,
              op, ": `out` must be a 1-D float64 tensor of ", static_cast<int>(kStatsColumns),
              " elements (one statistics row), got ", out.scalar_type(), " with shape ",
              out.sizes());
}

// update's `stats`: 2-D float64, one row per bucket, kStatsColumns columns.
inline void check_stats_matrix(const char* op, const at::Tensor& stats) {
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.dim() == 2 &&
                  stats.size(1) == kStatsColumns,
              op, ": `stats` must be a 2-D float64 tensor with ", static_cast<int>(kStatsColumns),
              " columns (one statistics row per bucket), got ", stats.scalar_type(),
              " with shape ", stats.sizes());
}

// `segments` must be a contiguous int64 CPU tensor of shape (n, 3). Returns its rows.
inline const int64_t* segment_rows(const char* op, const at::Tensor& segments, size_t n) {
  TORCH_CHECK(segments.defined() && segments.device().is_cpu() &&
                  segments.scalar_type() == at::kLong && segments.dim() == 2 &&
                  segments.size(1) == kSegmentColumns && segments.is_contiguous(),
              op, ": `segments` must be a contiguous int64 CPU tensor of shape (n, 3) (offset, "
              "numel, slot per tensor), got ", segments.scalar_type(), " on ", segments.device(),
              " with shape ", segments.sizes());
  TORCH_CHECK(static_cast<size_t>(segments.size(0)) == n, op, ": `segments` has ",
              segments.size(0), " rows but `params` has ", n, " tensors");
  return segments.const_data_ptr<int64_t>();
}

// A flat buffer: 1-D, contiguous, of `dtype`, on `device`.
inline void check_flat(const char* op, const char* name, const at::Tensor& t,
                       at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.is_contiguous() && t.scalar_type() == dtype,
              op, ": `", name, "` must be a contiguous 1-D ", dtype, " tensor, got ",
              t.defined() ? c10::toString(t.scalar_type()) : "an undefined tensor", " with shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  check_device(op, name, t, device);
}

// steps and v_sums (float64): one slot per tensor of the bucket. The step counters are
// float64 so that they stay exact (2^53; float32 stops counting at 2^24 steps).
inline void check_slots(const char* op, const at::Tensor& steps, const at::Tensor& v_sums,
                        const at::Device& device) {
  check_flat(op, "steps", steps, at::kDouble, device);
  check_flat(op, "v_sums", v_sums, at::kDouble, device);
  TORCH_CHECK(steps.numel() == v_sums.numel(), op, ": `steps` has ", steps.numel(),
              " slots but `v_sums` has ", v_sums.numel());
}

// The state buffers of `dtype` (any subset may be given; all of one length). Returns the length.
inline int64_t check_states(const char* op, const std::vector<const char*>& names,
                            const std::vector<const at::Tensor*>& states,
                            const at::Device& device, at::ScalarType dtype = at::kFloat) {
  int64_t len = -1;
  for (size_t k = 0; k < states.size(); ++k) {
    check_flat(op, names[k], *states[k], dtype, device);
    if (len < 0) len = states[k]->numel();
    TORCH_CHECK(states[k]->numel() == len, op, ": `", names[k], "` has ", states[k]->numel(),
                " elements but `", names[0], "` has ", len,
                "; the state buffers must have one length");
  }
  return len < 0 ? 0 : len;
}

// Row i of `segments`: numel equal to the tensor's (`expect_numel` >= 0), the span inside
// the state buffers (state_len < 0: no state buffers given), the slot inside steps / v_sums
// and not used by another tensor of the call (`seen` has one flag per slot).
inline void check_segment(const char* op, size_t i, const int64_t* row, int64_t expect_numel,
                          int64_t state_len, std::vector<char>& seen) {
  const int64_t offset = row[kOffset], numel = row[kNumel], slot = row[kSlot];
  TORCH_CHECK(expect_numel < 0 || numel == expect_numel, op, ": segments[", i, "] has numel ",
              numel, " but params[", i, "] has ", expect_numel, " elements");
  TORCH_CHECK(numel >= 0 && offset >= 0, op, ": segments[", i, "] = (offset ", offset,
              ", numel ", numel, ") has a negative entry");
  TORCH_CHECK(state_len < 0 || numel <= state_len - offset, op, ": segments[", i,
              "] = (offset ", offset, ", numel ", numel, ") is outside the state buffers of ",
              state_len, " elements");
  const int64_t n_slots = static_cast<int64_t>(seen.size());
  TORCH_CHECK(slot >= 0 && slot < n_slots, op, ": segments[", i, "] has slot ", slot,
              " but steps and v_sums have ", n_slots, " slots");
  TORCH_CHECK(!seen[slot], op, ": segments[", i, "] uses slot ", slot,
              ", which an earlier tensor of this call uses");
  seen[slot] = 1;
}

// An optional control tensor (grad_scale, found_inf, lr_tensor): float32 with one element,
// 0-dim or of shape (1,) (GradScaler's scale and found_inf come either way), on `device`.
// Returns its data (on `device`), or null when it is not given.
inline const float* check_control(const char* op, const char* name,
                                  const std::optional<at::Tensor>& t, const at::Device& device) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1 && t->dim() <= 1, op, ": `",
              name, "` must be a float32 tensor of one element (shape () or (1,)), got ",
              t->scalar_type(), " of shape ", t->sizes());
  check_device(op, name, *t, device);
  return t->const_data_ptr<float>();
}

// An optional fp32 master copy of bf16/fp16 params, laid out as the state buffers
// (state_len < 0: stats, which gets no state buffer to compare with). Returns its data.
inline float* check_master(const char* op, const std::optional<at::Tensor>& master,
                           at::ScalarType dtype, size_t n, int64_t state_len,
                           const at::Device& device) {
  if (!master.has_value() || !master->defined()) return nullptr;
  check_flat(op, "master", *master, at::kFloat, device);
  TORCH_CHECK(n == 0 || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": `master` is given but params are ", dtype,
              "; a master copy is kept only for bfloat16 or float16 params");
  TORCH_CHECK(state_len < 0 || master->numel() == state_len, op, ": `master` has ",
              master->numel(), " elements but `exp_avg` has ", state_len,
              "; the state buffers must have one length");
  return master->mutable_data_ptr<float>();
}

// `beta1_prod`: of the state dtype and the state buffers' length, or empty (freed: every
// tensor is done); `beta1_prod_max` (optional): float32 for any state, one slot per tensor.
// Returns the max's data or null.
inline float* check_beta1_prod(const char* op, const at::Tensor& beta1_prod,
                               const std::optional<at::Tensor>& beta1_prod_max,
                               const at::Tensor& steps, int64_t state_len,
                               at::ScalarType state_dtype, const at::Device& device) {
  check_flat(op, "beta1_prod", beta1_prod, state_dtype, device);
  TORCH_CHECK(beta1_prod.numel() == 0 || beta1_prod.numel() == state_len, op,
              ": `beta1_prod` has ", beta1_prod.numel(), " elements but `exp_avg` has ",
              state_len, "; the state buffers must have one length (or `beta1_prod` none: freed)");
  if (!beta1_prod_max.has_value() || !beta1_prod_max->defined()) return nullptr;
  check_flat(op, "beta1_prod_max", *beta1_prod_max, at::kFloat, device);
  TORCH_CHECK(beta1_prod_max->numel() == steps.numel(), op, ": `beta1_prod_max` has ",
              beta1_prod_max->numel(), " slots but `steps` has ", steps.numel());
  return beta1_prod_max->mutable_data_ptr<float>();
}

// Stochastic rounding: `rounding_seed` (int64, one element, on the device) and
// `rounding_index` (int64 CPU, one entry >= 0 per tensor) come together, for bf16 params
// without a master copy. Returns the index table, or null when not rounding stochastically.
inline const int64_t* check_rounding(const char* op, const std::optional<at::Tensor>& seed,
                                     const std::optional<at::Tensor>& index, bool has_master,
                                     at::ScalarType dtype, size_t n, const at::Device& device) {
  const bool has_seed = seed.has_value() && seed->defined();
  const bool has_index = index.has_value() && index->defined();
  if (!has_seed && !has_index) return nullptr;
  TORCH_CHECK(has_seed && has_index, op,
              ": `rounding_seed` and `rounding_index` must be given together");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->dim() <= 1, op,
              ": `rounding_seed` must be an int64 tensor of one element, got ",
              seed->scalar_type(), " of shape ", seed->sizes());
  check_device(op, "rounding_seed", *seed, device);
  TORCH_CHECK(index->scalar_type() == at::kLong && index->dim() == 1 &&
                  index->device().is_cpu() && static_cast<size_t>(index->numel()) == n &&
                  index->is_contiguous(),
              op, ": `rounding_index` must be an int64 CPU tensor of shape (", n,
              ",) (one first index per tensor), got ", index->scalar_type(), " on ",
              index->device(), " with shape ", index->sizes());
  TORCH_CHECK(n == 0 || dtype == at::kBFloat16, op,
              ": stochastic rounding (`rounding_seed`) is for bfloat16 params, not ", dtype);
  TORCH_CHECK(!has_master, op,
              ": `rounding_seed` and `master` exclude each other: a master copy is rounded to "
              "nearest");
  const int64_t* first = index->const_data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(first[i] >= 0, op, ": rounding_index[", i, "] is negative (", first[i], ")");
  }
  return first;
}

// No two non-empty segments overlap (a kernel writes each state element from one thread).
inline void check_disjoint(const char* op, const int64_t* rows, size_t n) {
  std::vector<size_t> order;
  order.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (rows[kSegmentColumns * i + kNumel] > 0) order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [rows](size_t a, size_t b) {
    return rows[kSegmentColumns * a + kOffset] < rows[kSegmentColumns * b + kOffset];
  });
  for (size_t k = 1; k < order.size(); ++k) {
    const int64_t* prev = rows + kSegmentColumns * order[k - 1];
    const int64_t* cur = rows + kSegmentColumns * order[k];
    TORCH_CHECK(prev[kOffset] + prev[kNumel] <= cur[kOffset], op, ": segments[", order[k - 1],
                "] and segments[", order[k], "] overlap in the state buffers");
  }
}

}  // namespace adai
