// Switching between the scheduler and the fibers that run the threads of a block. On x86-64
// a switch saves the callee-saved registers on the old stack and takes the new one (a few
// nanoseconds); ucontext elsewhere (swapcontext makes a system call per switch, which made
// emulated kernels several times slower).
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace adai {
namespace emu {

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Makes `c` start `entry` (which must never return) on the stack [stack, stack + size).
void context_init(Context& c, char* stack, size_t size, void (*entry)());

// Saves the running context in `from` and resumes `to`.
void context_switch(Context& from, Context& to);

}  // namespace emu
}  // namespace adai
