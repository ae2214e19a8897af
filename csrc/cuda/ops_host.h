// The ops implemented by the host launch code (ops_host.cpp), registered by device_cuda.cpp
// for CUDA tensors and by csrc/emu/device_emu.cpp for the CPU emulator.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace adai {
namespace cuda {

void stats_op(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
              const at::Tensor& steps, const at::Tensor& v_sums,
              const std::optional<at::Tensor>& grad_scale, double beta2, double l2,
              const at::Tensor& out,
              const std::optional<at::Tensor>& master);

void update_op(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
               const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
               const at::Tensor& beta1_prod, const at::Tensor& v_sums, const at::Tensor& steps,
               const at::Tensor& stats,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& lr_tensor, double lr, double beta0,
               double beta2, double eps, double weight_decay, bool decoupled, double dampening,
               double max_grad_norm, bool skip_nonfinite,
               const std::optional<at::Tensor>& beta1_prod_max,
               const std::optional<at::Tensor>& master,
               const std::optional<at::Tensor>& rounding_seed,
               const std::optional<at::Tensor>& rounding_index);

void v_sum_op(const at::Tensor& exp_avg_sq, const at::Tensor& segments,
              const at::Tensor& v_sums);

at::Tensor chunk_table(at::IntArrayRef numels, int64_t chunk);

void upload_op(const at::Tensor& src, const at::Tensor& dst);

}  // namespace cuda
}  // namespace adai
