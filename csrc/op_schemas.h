// The op schemas, written once: csrc/ops.cpp declares them in the `adai` namespace, and the
// CPU emulator of the CUDA kernels (csrc/emu/) in `adai_emu`. Semantics: docs/design.md
// ("Native op schemas").
//
// Optimizer state is passed as a bucket's flat buffers plus `segments`, an int64 CPU tensor
// of shape (n, 3) whose row i is (offset, numel, slot) of tensor i: its states are
// buffer[offset : offset + numel] in the memory order of params[i], its step counter and v_sum
// are steps[slot] and v_sums[slot]. Only params and grads are tensor lists (their conversion
// from Python is most of an op call's host cost with many tensors).
//
// Optional state, last and defaulting to None (docs/design.md): `beta1_prod_max` (float32,
// one slot per tensor: the max |beta1_prod| after the last write; a tensor with max <= 2^-25
// (2^-54 for float64 state) is done and its b is neither read nor written; `beta1_prod` may
// then be empty, freed), `master` (the fp32 master weights of bf16/fp16 params, laid out as
// the states), `rounding_seed` + `rounding_index` (stochastic rounding of bf16 params: an
// int64 seed on the device, and an int64 CPU tensor with each tensor's first rounding index,
// csrc/adai_random.h).
//
// The state buffers are float32, or float64 for float64 params (the CPU kernel only).
#pragma once

namespace adai {
namespace schema {

constexpr const char* kStats =
    "stats(Tensor[] params, Tensor[] grads, Tensor segments, Tensor(a!) steps, "
    "Tensor v_sums, Tensor? grad_scale, float beta2, float l2, Tensor(b!) out, "
    "Tensor? master=None) -> ()";
constexpr const char* kUpdate =
    "update(Tensor(a!)[] params, Tensor[] grads, Tensor segments, Tensor(b!) exp_avg, "
    "Tensor(c!) exp_avg_sq, Tensor(d!) beta1_prod, Tensor(e!) v_sums, Tensor(f!) steps, "
    "Tensor stats, Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, float lr, "
    "float beta0, float beta2, float eps, float weight_decay, bool decoupled, "
    "float dampening, float max_grad_norm, bool skip_nonfinite, "
    "Tensor(g!)? beta1_prod_max=None, Tensor(h!)? master=None, Tensor? rounding_seed=None, "
    "Tensor? rounding_index=None) -> ()";
constexpr const char* kSumV = "v_sum(Tensor exp_avg_sq, Tensor segments, Tensor(a!) v_sums) -> ()";

// The CUDA kernels' host code (csrc/cuda/ops_host.cpp): the chunk table the kernels use (a
// test hook, no tensor arguments) and the capture-safe host-to-device copy. Declared in every
// build; their kernels exist only in CUDA builds.
constexpr const char* kChunkTable = "_chunk_table(int[] numels, int chunk=-1) -> Tensor";
constexpr const char* kUpload = "_upload(Tensor src, Tensor(a!) dst) -> ()";

}  // namespace schema
}  // namespace adai
