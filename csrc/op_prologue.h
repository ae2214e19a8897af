// The prologue of each op, written once for every backend (csrc/cpu/adai_cpu.cpp and the host
// launch code csrc/cuda/ops_host.cpp): every argument check of the op (op_checks.h), in one
// order, and the parsed `segments` table. Nothing is written before it returns, so a refused
// call changes nothing. A backend decides only its Target (op_checks.h): where the op runs,
// whether the params of one call may mix dtypes, and whether it steps float64.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "op_checks.h"

namespace adai {

// What an op's prologue found.
struct OpArgs {
  size_t n = 0;                        // tensors of the call
  const int64_t* rows = nullptr;       // segments: row i = (offset, numel, slot) of tensor i
  at::ScalarType dtype = at::kFloat;   // params[0]'s (stats, update; float32 without params)
  at::ScalarType state_dtype = at::kFloat;  // the state buffers': float64 for float64 params
  int64_t state_len = -1;              // the state buffers' length (update, v_sum)
  const float* grad_scale = nullptr;   // the control tensors' data on the device, or null
  const float* found_inf = nullptr;
  const float* lr_tensor = nullptr;
  float* beta1_prod_max = nullptr;     // update: the per-slot max |b|, or null (no elision)
  bool has_beta1_prod = true;          // update: false when `beta1_prod` is empty (freed)
  float* master = nullptr;             // the fp32 master weights, or null
  const int64_t* rounding_seed = nullptr;   // update: the seed on the device, or null
  const int64_t* rounding_index = nullptr;  // update: each tensor's first rounding index
};

// Entry kSegmentColumns * i + col of the rows.
inline int64_t segment(const OpArgs& a, size_t i, SegmentColumn col) {
  return a.rows[kSegmentColumns * i + col];
}

// How stats and update begin: the list lengths and the segments table (one row per tensor).
inline OpArgs params_call(const char* op, at::TensorList params, at::TensorList grads,
                          const at::Tensor& segments) {
  OpArgs a;
  a.n = params.size();
  check_len(op, "grads", grads.size(), a.n);
  a.rows = segment_rows(op, segments, a.n);
  if (a.n > 0 && params[0].defined()) a.dtype = params[0].scalar_type();
  return a;
}

// params[i], grads[i] and segments[i] of every tensor (a.state_len < 0: no state buffers).
inline void check_params(const char* op, at::TensorList params, at::TensorList grads,
                         OpArgs& a, int64_t n_slots, const Target& t) {
  std::vector<char> seen(static_cast<size_t>(n_slots), 0);
  for (size_t i = 0; i < a.n; ++i) {
    check_param(op, i, params[i], grads[i], a.dtype, t);
    check_segment(op, i, a.rows + kSegmentColumns * i, params[i].numel(), a.state_len, seen);
  }
}

// stats(params, grads, segments, steps, v_sums, master, grad_scale, beta2, l2, out).
inline OpArgs stats_prologue(const char* op, at::TensorList params, at::TensorList grads,
                             const at::Tensor& segments, const at::Tensor& steps,
                             const at::Tensor& v_sums, const std::optional<at::Tensor>& master,
                             const std::optional<at::Tensor>& grad_scale, const at::Tensor& out,
                             const Target& t) {
  const at::Device& device = t.device;
  OpArgs a = params_call(op, params, grads, segments);
  a.state_dtype = state_dtype(a.dtype, t);
  check_device(op, "out", out, device);
  check_stats_row(op, out);
  check_slots(op, steps, v_sums, device);
  a.grad_scale = check_control(op, "grad_scale", grad_scale, device);
  // stats reads no state buffer: only numel and slot of a segment matter.
  check_params(op, params, grads, a, steps.numel(), t);
  a.master = check_master(op, master, a.dtype, a.n, /*state_len=*/-1, device);
  if (a.master != nullptr) {  // the spans must lie inside the master copy
    std::vector<char> seen(static_cast<size_t>(steps.numel()), 0);
    for (size_t i = 0; i < a.n; ++i) {
      check_segment(op, i, a.rows + kSegmentColumns * i, params[i].numel(), master->numel(),
                    seen);
    }
  }
  return a;
}

// The optional arguments of update (op_schemas.h).
struct UpdateOptionals {
  const std::optional<at::Tensor>& beta1_prod_max;
  const std::optional<at::Tensor>& master;
  const std::optional<at::Tensor>& rounding_seed;
  const std::optional<at::Tensor>& rounding_index;
};

// update(params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps,
//        beta1_prod_max, master, stats, grad_scale, found_inf, lr_tensor, rounding_seed,
//        rounding_index, ...).
inline OpArgs update_prologue(const char* op, at::TensorList params, at::TensorList grads,
                              const at::Tensor& segments, const at::Tensor& exp_avg,
                              const at::Tensor& exp_avg_sq, const at::Tensor& beta1_prod,
                              const at::Tensor& v_sums, const at::Tensor& steps,
                              const at::Tensor& stats,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              const std::optional<at::Tensor>& lr_tensor,
                              const UpdateOptionals& opt, const Target& t) {
  const at::Device& device = t.device;
  OpArgs a = params_call(op, params, grads, segments);
  a.state_dtype = state_dtype(a.dtype, t);
  check_device(op, "stats", stats, device);
  check_stats_matrix(op, stats);
  a.state_len = check_states(op, {"exp_avg", "exp_avg_sq"}, {&exp_avg, &exp_avg_sq}, device,
                             a.state_dtype);
  a.beta1_prod_max = check_beta1_prod(op, beta1_prod, opt.beta1_prod_max, steps, a.state_len,
                                      a.state_dtype, device);
  a.has_beta1_prod = beta1_prod.numel() == a.state_len;
  check_slots(op, steps, v_sums, device);
  a.grad_scale = check_control(op, "grad_scale", grad_scale, device);
  a.found_inf = check_control(op, "found_inf", found_inf, device);
  a.lr_tensor = check_control(op, "lr_tensor", lr_tensor, device);
  check_params(op, params, grads, a, steps.numel(), t);
  check_disjoint(op, a.rows, a.n);
  a.master = check_master(op, opt.master, a.dtype, a.n, a.state_len, device);
  a.rounding_index = check_rounding(op, opt.rounding_seed, opt.rounding_index,
                                    a.master != nullptr, a.dtype, a.n, device);
  if (a.rounding_index != nullptr) a.rounding_seed = opt.rounding_seed->const_data_ptr<int64_t>();
  return a;
}

// What a backend does not implement (yet): a clear refusal rather than a silent default.
inline void refuse_optionals(const char* op, const OpArgs& a, const char* backend) {
  TORCH_CHECK(a.beta1_prod_max == nullptr && a.has_beta1_prod, op,
              ": `beta1_prod_max` (and a freed `beta1_prod`) is not supported by the ", backend);
  TORCH_CHECK(a.master == nullptr, op, ": `master` is not supported by the ", backend);
  TORCH_CHECK(a.rounding_seed == nullptr, op, ": `rounding_seed` is not supported by the ",
              backend);
}

// v_sum(exp_avg_sq, segments, v_sums): the rows name the tensors to sum, so their number is
// the table's; the state dtype is exp_avg_sq's where the target steps float64.
inline OpArgs v_sum_prologue(const char* op, const at::Tensor& exp_avg_sq,
                             const at::Tensor& segments, const at::Tensor& v_sums,
                             const Target& t) {
  const at::Device& device = t.device;
  OpArgs a;
  if (exp_avg_sq.defined()) a.state_dtype = state_dtype(exp_avg_sq.scalar_type(), t);
  a.state_len = check_states(op, {"exp_avg_sq"}, {&exp_avg_sq}, device, a.state_dtype);
  check_flat(op, "v_sums", v_sums, at::kDouble, device);
  a.n = segments.defined() && segments.dim() == 2 ? static_cast<size_t>(segments.size(0)) : 0;
  a.rows = segment_rows(op, segments, a.n);
  std::vector<char> seen(static_cast<size_t>(v_sums.numel()), 0);
  for (size_t i = 0; i < a.n; ++i) {
    check_segment(op, i, a.rows + kSegmentColumns * i, /*expect_numel=*/-1, a.state_len, seen);
  }
  check_disjoint(op, a.rows, a.n);
  return a;
}

}  // namespace adai
