// The `adai` op schemas, declared once. Each backend adds only its TORCH_LIBRARY_IMPL
// (csrc/cpu/ for CPU, csrc/cuda/ for CUDA); fake kernels live in adai_kernels/_native.py.
// Semantics of the ops: docs/design.md ("Native op schemas").
//
// Optimizer state is passed as a bucket's flat buffers plus `segments`, an int64 CPU tensor
// of shape (n, 3) whose row i is (offset, numel, slot) of tensor i: its states are
// buffer[offset : offset + numel] in the memory order of params[i], its step counter and v_sum
// are steps[slot] and v_sums[slot]. Only params and grads are tensor lists (their conversion
// from Python is most of an op call's host cost with many tensors).
#include <torch/library.h>

TORCH_LIBRARY(adai, m) {
  m.def(
      "stats(Tensor[] params, Tensor[] grads, Tensor segments, Tensor(a!) steps, "
      "Tensor v_sums, Tensor? grad_scale, float beta2, float l2, Tensor(b!) out) -> ()");
  m.def(
      "update(Tensor(a!)[] params, Tensor[] grads, Tensor segments, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!) beta1_prod, Tensor(e!) v_sums, Tensor(f!) steps, "
      "Tensor stats, Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, float lr, "
      "float beta0, float beta2, float eps, float weight_decay, bool decoupled, "
      "float dampening, float max_grad_norm, bool skip_nonfinite) -> ()");
  m.def("sum_v(Tensor exp_avg_sq, Tensor segments, Tensor(a!) v_sums) -> ()");
}
