// The `adai` op schemas (csrc/op_schemas.h). Each backend adds only its TORCH_LIBRARY_IMPL
// (csrc/cpu/ for CPU, csrc/cuda/ for CUDA); fake kernels live in adai_kernels/fakes.py.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(adai, m) {
  m.def(adai::schema::kStats);
  m.def(adai::schema::kUpdate);
  m.def(adai::schema::kSumV);
}
