// The CPU emulator as a device for the host launch code (csrc/cuda/device.h), and the ops
// `adai_emu::*`: the schemas of `adai::*` (csrc/op_schemas.h) on CPU tensors, run by the real
// host launch code (csrc/cuda/ops_host.cpp) and the real kernels (csrc/cuda/*.cu, executed
// by scheduler.cpp). Plus the emulator's own controls:
//   _configure(order, policy, seed, yield_prob): block order ("forward", "reverse",
//       "shuffled"), thread policy ("round_robin", "random", "warp_first"), the seed of
//       every random choice, and the chance that a memory built-in yields;
//   _set_capturing(on): the stream reports capture, so that tables travel as kernel
//       arguments (copy_as_arguments, upload.cu) as under CUDA-graph capture;
//   _counters() -> [launches, blocks, thread switches]; _shared_variables() -> names;
//   _selftest(name, blocks): a kernel with a deliberate bug (selftest.cpp).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "../cuda/device.h"
#include "../cuda/ops_host.h"
#include "../op_schemas.h"
#include "scheduler.h"
#include "selftest.h"

namespace adai {
namespace cuda {
namespace device {

namespace {
std::atomic<bool> g_capturing{false};
}

const char* const kName = "CPU";

bool holds(const at::Tensor& t) { return t.device().is_cpu(); }

Stream current_stream(const at::Device&) { return Stream{nullptr, g_capturing.load()}; }

at::Tensor staging(size_t bytes, bool) {
  return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
}

}  // namespace device
}  // namespace cuda

namespace emu {
namespace {

template <typename E>
E parse(const std::string& what, const std::string& value,
        std::initializer_list<std::pair<const char*, E>> names) {
  std::string known;
  for (const auto& [name, e] : names) {
    if (value == name) return e;
    known += std::string(known.empty() ? "" : ", ") + name;
  }
  TORCH_CHECK(false, "adai_emu::_configure: unknown ", what, " '", value, "' (one of ", known,
              ")");
}

void configure_op(const std::string& order, const std::string& policy, int64_t seed,
                  double yield_prob) {
  TORCH_CHECK(yield_prob >= 0.0 && yield_prob <= 1.0,
              "adai_emu::_configure: yield_prob must be in [0, 1], got ", yield_prob);
  Config c;
  c.order = parse<BlockOrder>("order", order, {{"forward", BlockOrder::kForward},
                                               {"reverse", BlockOrder::kReverse},
                                               {"shuffled", BlockOrder::kShuffled}});
  c.policy = parse<Policy>("policy", policy, {{"round_robin", Policy::kRoundRobin},
                                              {"random", Policy::kRandom},
                                              {"warp_first", Policy::kWarpFirst}});
  c.seed = static_cast<uint64_t>(seed);
  c.yield_prob = yield_prob;
  configure(c);
}

void set_capturing(bool on) { cuda::device::g_capturing = on; }

}  // namespace
}  // namespace emu
}  // namespace adai

TORCH_LIBRARY(adai_emu, m) {
  m.def(adai::schema::kStats);
  m.def(adai::schema::kUpdate);
  m.def(adai::schema::kSumV);
  m.def(adai::schema::kChunkTable, &adai::cuda::chunk_table);
  m.def(adai::schema::kUpload);
  m.def("_configure(str order, str policy, int seed, float yield_prob) -> ()",
        &adai::emu::configure_op);
  m.def("_set_capturing(bool on) -> ()", &adai::emu::set_capturing);
  m.def("_counters() -> int[]", &adai::emu::counters);
  m.def("_shared_variables() -> str[]", &adai::emu::shared_variables);
  m.def("_selftest(str name, int blocks) -> Tensor", &adai::emu::selftest);
}

TORCH_LIBRARY_IMPL(adai_emu, CPU, m) {
  m.impl("stats", &adai::cuda::stats_op);
  m.impl("update", &adai::cuda::update_op);
  m.impl("v_sum", &adai::cuda::v_sum_op);
  m.impl("_upload", &adai::cuda::upload_op);
}
