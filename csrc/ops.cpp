// The `adai` op schemas, declared once. Each backend adds only its TORCH_LIBRARY_IMPL
// (csrc/cpu/ for CPU, csrc/cuda/ for CUDA); fake kernels live in adai_kernels/_native.py.
// Semantics of both ops: docs/design.md.
#include <torch/library.h>

TORCH_LIBRARY(adai, m) {
  m.def(
      "stats(Tensor[] params, Tensor[] grads, Tensor(a!)[] steps, Tensor[] v_sums, "
      "float beta2, float l2, Tensor(b!) out) -> ()");
  m.def(
      "update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, "
      "Tensor(c!)[] exp_avg_sq, Tensor(d!)[] beta1_prod, Tensor(e!)[] v_sums, "
      "Tensor[] steps, Tensor stats, float numel, float lr, float beta0, float beta2, "
      "float eps, float weight_decay, bool decoupled, float dampening) -> ()");
  m.def("sum_v(Tensor[] exp_avg_sq, Tensor(a!)[] v_sums) -> ()");
}
