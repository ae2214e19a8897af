// The parameter dtypes every kernel takes (float32, float16, bfloat16), listed once: the check
// of the ops' inputs (csrc/op_checks.h) and the dispatch from a dtype to a kernel template
// (the CPU kernels, csrc/cuda's launchers). Host code only.
#pragma once

#include <ATen/Dispatch_v2.h>
#include <c10/core/ScalarType.h>

#define ADAI_PARAM_DTYPES at::kFloat, at::kHalf, at::kBFloat16

namespace adai {

inline bool is_param_dtype(at::ScalarType t) {
  for (const at::ScalarType d : {ADAI_PARAM_DTYPES}) {
    if (t == d) return true;
  }
  return false;
}

// Calls f(T{}) with T the C++ type of `dtype` (float, c10::Half, c10::BFloat16). The ops check
// is_param_dtype first, so the dispatch's own error (NotImplementedError) is not reached.
template <typename F>
void dispatch_param_dtype(at::ScalarType dtype, const F& f) {
  AT_DISPATCH_V2(dtype, "adai", AT_WRAP([&] { f(scalar_t{}); }), AT_EXPAND(ADAI_PARAM_DTYPES));
}

}  // namespace adai
