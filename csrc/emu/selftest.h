// Kernels with one deliberate bug each (selftest.cpp), registered as adai_emu::_selftest.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace adai {
namespace emu {

// Runs kernel `name` on `blocks` blocks of 64 threads; returns one float64 per thread.
at::Tensor selftest(const std::string& name, int64_t blocks);

}  // namespace emu
}  // namespace adai
