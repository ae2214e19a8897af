// The `adai` op schemas (csrc/op_schemas.h), declared in every build. Each backend adds only
// its TORCH_LIBRARY_IMPL (csrc/cpu/ for CPU, csrc/cuda/ for CUDA); fake kernels live in
// adai_kernels/fakes.py. A build without CUDA has the schemas of _chunk_table and _upload but
// no kernel for them (a call raises NotImplementedError).
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(adai, m) {
  m.def(adai::schema::kStats);
  m.def(adai::schema::kUpdate);
  m.def(adai::schema::kSumV);
  m.def(adai::schema::kChunkTable);
  m.def(adai::schema::kUpload);
}
