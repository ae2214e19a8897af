// Checks shared by every backend's kernels: the tensor lists of one op call are aligned
// (entry i of each list belongs to parameter i). Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>

namespace adai {

inline void check_len(const char* op, const char* name, size_t got, size_t want) {
  TORCH_CHECK(got == want, op, ": `", name, "` has ", got, " tensors but `params` has ", want,
              "; the tensor lists must have the same length");
}

inline void check_stats_lists(const char* op, at::TensorList params, at::TensorList grads,
                              at::TensorList steps, at::TensorList v_sums) {
  const size_t n = params.size();
  check_len(op, "grads", grads.size(), n);
  check_len(op, "steps", steps.size(), n);
  check_len(op, "v_sums", v_sums.size(), n);
}

inline void check_update_lists(const char* op, at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avg, at::TensorList exp_avg_sq,
                               at::TensorList beta1_prod, at::TensorList v_sums,
                               at::TensorList steps) {
  check_stats_lists(op, params, grads, steps, v_sums);
  const size_t n = params.size();
  check_len(op, "exp_avg", exp_avg.size(), n);
  check_len(op, "exp_avg_sq", exp_avg_sq.size(), n);
  check_len(op, "beta1_prod", beta1_prod.size(), n);
}

}  // namespace adai
