// How the CPU emulator runs a grid (scheduler.cpp): set by the tests through the
// adai_emu::_configure op (device_emu.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace adai {
namespace emu {

enum class BlockOrder { kForward, kReverse, kShuffled };
// Which ready thread runs next: in thread order from the last one, any at random, or the
// threads of one warp (chosen at random per block) before all others.
enum class Policy { kRoundRobin, kRandom, kWarpFirst };

struct Config {
  BlockOrder order = BlockOrder::kForward;
  Policy policy = Policy::kRandom;
  uint64_t seed = 0;
  double yield_prob = 0.05;  // chance that a memory built-in yields to another thread
};

void configure(const Config& config);

// Counters since the module was loaded: launches, blocks, thread switches.
std::vector<int64_t> counters();

// The `__shared__` variables found in this module (mangled name and size), which are filled
// with garbage before every block.
std::vector<std::string> shared_variables();

}  // namespace emu
}  // namespace adai
