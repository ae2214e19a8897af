// The CPU emulator's scheduler: runs a grid block by block, the threads of a block as fibers
// (context.h), and implements the scheduling points of device.h with their checks.
#include "scheduler.h"

#include <dlfcn.h>
#include <elf.h>
#include <signal.h>
#include <sys/mman.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <mutex>
#include <random>
#include <sstream>

#include "context.h"
#include "device.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ADAI_EMU_ASAN 1
#endif

namespace adai {
namespace emu {

const Coords* g_coords = nullptr;

namespace {

#if defined(ADAI_EMU_ASAN)
constexpr size_t kStackBytes = 512 * 1024;  // ASan's redzones make frames larger
#else
constexpr size_t kStackBytes = 256 * 1024;  // write_payload_kernel takes 32 KB by value
#endif
constexpr int kWarp = 32;

enum class State { kReady, kBarrier, kShuffle, kDone, kFailed };

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  State state = State::kReady;
  Coords coords{};
  const char* file = nullptr;  // call site of the barrier / shuffle it waits at
  int line = 0;
  uint64_t barriers = 0;  // __syncthreads passed
  uint64_t shuffles = 0;  // __shfl_down_sync passed
  unsigned int mask = 0, delta = 0;
  int width = kWarp;
  uint64_t in = 0, out = 0;  // shuffled bits
  void* fake_stack = nullptr;
};

struct Grid {
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  Context main;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  std::string error;
  std::mt19937_64 rng;
  int priority_warp = 0;
  size_t last = 0;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  void* main_fake = nullptr;
};

std::mutex g_lock;  // one emulated launch at a time: shared memory is process-wide
Config g_config;
Grid* g_grid = nullptr;
int64_t g_launches = 0, g_blocks = 0, g_switches = 0;
std::vector<char*> g_stacks;
bool g_abandoned = false;  // a block was left with fibers that did not finish

std::string where(const Fiber& f) {
  std::ostringstream s;
  s << "thread " << f.coords.thread.x << " of block " << f.coords.block.x;
  return s.str();
}

std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t slash = f.rfind('/');
  return (slash == std::string::npos ? f : f.substr(slash + 1)) + ":" + std::to_string(line);
}

// ---- context switches (with ASan's fiber annotations) -----------------------------------

void to_main(Fiber& f, bool dying) {
  Grid& g = *g_grid;
#if defined(ADAI_EMU_ASAN)
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, g.main_bottom, g.main_size);
#else
  (void)dying;
#endif
  context_switch(f.ctx, g.main);
#if defined(ADAI_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, &g.main_bottom, &g.main_size);
#endif
  g_coords = &f.coords;
}

void to_fiber(Fiber& f) {
  Grid& g = *g_grid;
  g.current = &f;
  g_coords = &f.coords;
  ++g_switches;
#if defined(ADAI_EMU_ASAN)
  __sanitizer_start_switch_fiber(&g.main_fake, f.stack, kStackBytes);
#endif
  context_switch(g.main, f.ctx);
#if defined(ADAI_EMU_ASAN)
  __sanitizer_finish_switch_fiber(g.main_fake, nullptr, nullptr);
#endif
  g.current = nullptr;
  g_coords = nullptr;
}

void fiber_main() {
  Grid& g = *g_grid;
#if defined(ADAI_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g.main_bottom, &g.main_size);
#endif
  g.body(g.ctx);
  Fiber& f = *g.current;
  f.state = State::kDone;
  to_main(f, /*dying=*/true);  // never resumed
}

// Records the first failure and leaves the fiber for good (the block is abandoned).
[[noreturn]] void fail(const std::string& what) {
  Grid& g = *g_grid;
  Fiber& f = *g.current;
  if (g.error.empty()) g.error = what + " (" + where(f) + ")";
  f.state = State::kFailed;
  to_main(f, /*dying=*/false);
  std::abort();  // unreachable: a failed fiber is never resumed
}

Fiber& current(const char* what) {
  TORCH_CHECK(g_grid != nullptr && g_grid->current != nullptr, "adai emulator: ", what,
              " called outside an emulated kernel");
  return *g_grid->current;
}

// ---- faults --------------------------------------------------------------------------------

// A kernel that dereferences an invalid address (a garbage shared pointer, an index past the
// end of its allocation) faults as on a GPU ("illegal memory access"): the fault in a fiber
// fails the launch instead of killing the process. SA_NODEFER: the failed fiber never returns
// from the handler, so the signal must not stay blocked.
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void*) {
  if (g_grid == nullptr || g_grid->current == nullptr) {  // not in a kernel: as before
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    raise(sig);
    return;
  }
  std::ostringstream s;
  s << "illegal memory access: " << (sig == SIGSEGV ? "SIGSEGV" : "SIGBUS") << " at address "
    << info->si_addr;
  fail(s.str());
}

struct FaultHandler {
  FaultHandler() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  }
  ~FaultHandler() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
  }
};

// ---- __shared__ variables -----------------------------------------------------------------

struct SharedVar {
  std::string name;
  unsigned char* address;
  size_t size;
};

// The function-local statics of adai::cuda functions in this module: with __shared__ defined
// as `static` (device.h), exactly the kernels' shared variables. Read from the module's ELF
// symbol table (GCC ignores section attributes on statics of templates, so no linker
// section can collect them).
std::vector<SharedVar> find_shared() {
  Dl_info info;
  TORCH_CHECK(dladdr(reinterpret_cast<void*>(&find_shared), &info) != 0 && info.dli_fname,
              "adai emulator: cannot locate its own module");
  std::ifstream in(info.dli_fname, std::ios::binary);
  const std::vector<char> file((std::istreambuf_iterator<char>(in)),
                               std::istreambuf_iterator<char>());
  TORCH_CHECK(file.size() > sizeof(Elf64_Ehdr) && std::memcmp(file.data(), ELFMAG, SELFMAG) == 0,
              "adai emulator: ", info.dli_fname, " is not an ELF file");
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(file.data());
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(file.data() + eh->e_shoff);
  std::vector<SharedVar> out;
  const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const char* names = file.data() + sh[sh[i].sh_link].sh_offset;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(file.data() + sh[i].sh_offset);
    for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
      const char* name = names + sym[k].st_name;
      if (ELF64_ST_TYPE(sym[k].st_info) == STT_OBJECT && sym[k].st_size > 0 &&
          std::strncmp(name, "_ZZN4adai4cuda", 14) == 0) {
        out.push_back({name, reinterpret_cast<unsigned char*>(base + sym[k].st_value),
                       static_cast<size_t>(sym[k].st_size)});
      }
    }
  }
  TORCH_CHECK(!out.empty(), "adai emulator: no __shared__ variables found in ", info.dli_fname,
              " (is its symbol table stripped?)");
  return out;
}

const std::vector<SharedVar>& shared_vars() {
  static const std::vector<SharedVar> vars = find_shared();
  return vars;
}

void fill_garbage(std::mt19937_64& rng) {
  for (const SharedVar& v : shared_vars()) {
    for (size_t i = 0; i < v.size; ++i) v.address[i] = static_cast<unsigned char>(rng());
  }
}

// ---- running a block ----------------------------------------------------------------------

bool chance(Grid& g, double p) {
  return p > 0.0 && static_cast<double>(g.rng() >> 11) * 0x1.0p-53 < p;
}

// The first ready thread at or after `from` (cyclically), or -1.
int scan_ready(const Grid& g, size_t from) {
  const size_t n = g.fibers.size();
  for (size_t k = 0; k < n; ++k) {
    const size_t i = (from + k) % n;
    if (g.fibers[i].state == State::kReady) return static_cast<int>(i);
  }
  return -1;
}

// The next thread to run (-1: none is ready). Random picks start a cyclic scan at a random
// thread: cheap, and every ready thread can be chosen.
int pick_ready(Grid& g) {
  const size_t n = g.fibers.size();
  int next = -1;
  switch (g_config.policy) {
    case Policy::kRoundRobin:
      next = scan_ready(g, g.last + 1);
      break;
    case Policy::kWarpFirst: {
      const size_t w0 = static_cast<size_t>(g.priority_warp) * kWarp;
      const size_t lanes = std::min<size_t>(kWarp, n - w0);
      const size_t r = g.rng() % lanes;
      for (size_t k = 0; k < lanes && next < 0; ++k) {
        const size_t i = w0 + (r + k) % lanes;
        if (g.fibers[i].state == State::kReady) next = static_cast<int>(i);
      }
      if (next < 0) next = scan_ready(g, g.rng() % n);
      break;
    }
    case Policy::kRandom:
      next = scan_ready(g, g.rng() % n);
      break;
  }
  if (next >= 0) g.last = static_cast<size_t>(next);
  return next;
}

// Whether the `lanes` lanes of the warp starting at fiber w0, all waiting at a shuffle, wait
// at the same one with the same arguments; else sets g.error.
bool same_shuffle(Grid& g, int w0, int lanes) {
  const Fiber& first = g.fibers[w0];
  const unsigned int full = lanes == kWarp ? 0xffffffffu : (1u << lanes) - 1u;
  for (int l = 0; l < lanes; ++l) {
    const Fiber& f = g.fibers[w0 + l];
    if (f.file != first.file || f.line != first.line || f.shuffles != first.shuffles) {
      g.error = "__shfl_down_sync: lanes of warp " + std::to_string(w0 / kWarp) +
                " of block " + std::to_string(first.coords.block.x) + " meet at different "
                "calls (" + where(first) + " at " + site(first.file, first.line) + " #" +
                std::to_string(first.shuffles) + ", " + where(f) + " at " +
                site(f.file, f.line) + " #" + std::to_string(f.shuffles) + ")";
      return false;
    }
    if (f.mask != full || f.delta != first.delta || f.width != first.width) {
      g.error = "__shfl_down_sync at " + site(f.file, f.line) + ": " + where(f) +
                " passes mask/delta/width that differ from the warp's active lanes";
      return false;
    }
  }
  return true;
}

// Completes a warp's shuffle when all its lanes wait at it. Returns true when it did.
bool resolve_shuffles(Grid& g) {
  const int n = static_cast<int>(g.fibers.size());
  bool progress = false;
  for (int w0 = 0; w0 < n; w0 += kWarp) {
    const int lanes = std::min(kWarp, n - w0);
    bool any = false, all = true;
    const Fiber* exited = nullptr;
    for (int l = 0; l < lanes; ++l) {
      const State s = g.fibers[w0 + l].state;
      any = any || s == State::kShuffle;
      all = all && s == State::kShuffle;
      if (s == State::kDone) exited = &g.fibers[w0 + l];
    }
    if (any && exited != nullptr) {
      for (int l = 0; l < lanes; ++l) {
        const Fiber& f = g.fibers[w0 + l];
        if (f.state != State::kShuffle) continue;
        g.error = "__shfl_down_sync at " + site(f.file, f.line) + " (" + where(f) +
                  ") waits for " + where(*exited) + ", which has exited";
        return false;
      }
    }
    if (!any || !all) continue;
    if (!same_shuffle(g, w0, lanes)) return false;
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = g.fibers[w0 + l];
      const int w = f.width;
      const int src = (l % w) + static_cast<int>(f.delta) < w ? l + static_cast<int>(f.delta) : l;
      f.out = src < lanes ? g.fibers[w0 + src].in : f.in;
      f.state = State::kReady;
      ++f.shuffles;
    }
    progress = true;
  }
  return progress;
}

// Releases a block barrier when every thread waits at the same one.
bool resolve_barrier(Grid& g) {
  const Fiber* first = nullptr;
  for (const Fiber& f : g.fibers) {
    if (f.state == State::kBarrier) {
      first = &f;
      break;
    }
  }
  if (first == nullptr) return false;
  for (const Fiber& f : g.fibers) {
    if (f.state == State::kDone) {
      g.error = "__syncthreads at " + site(first->file, first->line) + " waits for " + where(f) +
                ", which has exited";
      return false;
    }
    if (f.state != State::kBarrier) return false;  // a warp waits at a shuffle: diverged
    if (f.file != first->file || f.line != first->line || f.barriers != first->barriers) {
      g.error = "__syncthreads: threads wait at different barriers (" + where(*first) + " at " +
                site(first->file, first->line) + " #" + std::to_string(first->barriers) + ", " +
                where(f) + " at " + site(f.file, f.line) + " #" + std::to_string(f.barriers) +
                ")";
      return false;
    }
  }
  for (Fiber& f : g.fibers) {
    f.state = State::kReady;
    ++f.barriers;
  }
  return true;
}

std::string describe_stuck(const Grid& g) {
  std::ostringstream s;
  s << "threads of block " << g.fibers[0].coords.block.x << " can make no progress:";
  int shown = 0;
  for (const Fiber& f : g.fibers) {
    if (f.state == State::kDone || shown >= 4) continue;
    s << " " << where(f) << (f.state == State::kBarrier ? " at __syncthreads " : " at __shfl ")
      << site(f.file, f.line) << ";";
    ++shown;
  }
  return s.str();
}

void run_block(Grid& g, const dim3& grid, const dim3& block, unsigned int linear) {
  const unsigned int n = block.x * block.y * block.z;
  const uint3 bidx{linear % grid.x, (linear / grid.x) % grid.y, linear / (grid.x * grid.y)};
  fill_garbage(g.rng);
  ++g_blocks;
  g.fibers.assign(n, Fiber());
  while (g_stacks.size() < n) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "adai emulator: cannot allocate a fiber stack");
    g_stacks.push_back(static_cast<char*>(p));
  }
  for (unsigned int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    f.stack = g_stacks[i];
#if defined(ADAI_EMU_ASAN)
    // Frames of fibers abandoned by a failed block keep their redzones poisoned; frames that
    // returned were unpoisoned by the code that left them.
    if (g_abandoned) __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    f.coords.thread = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f.coords.block = bidx;
    f.coords.block_dim = uint3{block.x, block.y, block.z};
    f.coords.grid_dim = uint3{grid.x, grid.y, grid.z};
    context_init(f.ctx, f.stack, kStackBytes, fiber_main);
  }
  g_abandoned = false;
  g.priority_warp = static_cast<int>(g.rng() % ((n + kWarp - 1) / kWarp));
  g.last = g_config.policy == Policy::kRoundRobin ? n - 1 : g.rng() % n;  // round robin: 0 first
  while (g.error.empty()) {
    const int next = pick_ready(g);
    if (next >= 0) {
      to_fiber(g.fibers[next]);
      continue;
    }
    if (std::all_of(g.fibers.begin(), g.fibers.end(),
                    [](const Fiber& f) { return f.state == State::kDone; })) {
      return;
    }
    if (resolve_shuffles(g) || resolve_barrier(g)) continue;
    if (g.error.empty()) g.error = describe_stuck(g);
  }
}

}  // namespace

// ---- the built-ins (device.h) ---------------------------------------------------------------

void syncthreads(const char* file, int line) {
  Fiber& f = current("__syncthreads");
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  to_main(f, false);
}

uint64_t shfl_down(const char* file, int line, unsigned int mask, uint64_t bits,
                   unsigned int delta, int width) {
  Fiber& f = current("__shfl_down_sync");
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) {
    fail("__shfl_down_sync at " + site(file, line) + ": width " + std::to_string(width) +
         " is not a power of two <= 32");
  }
  f.state = State::kShuffle;
  f.file = file;
  f.line = line;
  f.mask = mask;
  f.delta = delta;
  f.width = width;
  f.in = bits;
  to_main(f, false);
  return f.out;
}

void memory_op(const char* what, const void* address, size_t size, size_t align) {
  Fiber& f = current(what);
  if (reinterpret_cast<uintptr_t>(address) % align != 0) {
    std::ostringstream s;
    s << "misaligned address: " << what << " of " << size << " bytes at " << address
      << " needs " << align << "-byte alignment";
    fail(s.str());
  }
  if (chance(*g_grid, g_config.yield_prob)) to_main(f, false);  // stays ready
}

void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_lock);
  const unsigned int blocks = grid.x * grid.y * grid.z;
  const unsigned int threads = block.x * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && blocks >= 1,
              "adai emulator: invalid launch of ", blocks, " blocks of ", threads, " threads");
  Grid g;
  g.body = body;
  g.ctx = ctx;
  g.rng.seed(g_config.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(++g_launches));
  std::vector<unsigned int> order(blocks);
  for (unsigned int b = 0; b < blocks; ++b) order[b] = b;
  if (g_config.order == BlockOrder::kReverse) std::reverse(order.begin(), order.end());
  if (g_config.order == BlockOrder::kShuffled) std::shuffle(order.begin(), order.end(), g.rng);
  g_grid = &g;
  const FaultHandler faults;
  for (unsigned int b : order) {
    run_block(g, grid, block, b);
    if (!g.error.empty()) {
      g_abandoned = true;
      break;
    }
  }
  g_grid = nullptr;
  g_coords = nullptr;
  TORCH_CHECK(g.error.empty(), "emulated CUDA kernel failed: ", g.error);
}

void configure(const Config& config) {
  std::lock_guard<std::mutex> lock(g_lock);
  g_config = config;
}

std::vector<int64_t> counters() { return {g_launches, g_blocks, g_switches}; }

std::vector<std::string> shared_variables() {
  std::vector<std::string> out;
  for (const SharedVar& v : shared_vars()) out.push_back(v.name + " " + std::to_string(v.size));
  return out;
}

}  // namespace emu
}  // namespace adai
