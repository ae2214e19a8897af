// Context switches of the CPU emulator's fibers (context.h).
#include "context.h"

#include <cstring>

#if defined(__x86_64__)
// adai_emu_switch(void** save_sp, void* load_sp): pushes rbp, rbx, r12-r15 and the SSE / x87
// control words, stores rsp in *save_sp, loads load_sp and pops the same from there.
asm(R"(
  .text
  .globl adai_emu_switch
  .hidden adai_emu_switch
  .type adai_emu_switch, @function
adai_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size adai_emu_switch, .-adai_emu_switch
)");
extern "C" void adai_emu_switch(void** save_sp, void* load_sp);
#endif

namespace adai {
namespace emu {

#if defined(__x86_64__)

void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  // The frame adai_emu_switch pops, from the top of the stack down: a null return address
  // for `entry` (it never returns), `entry` itself, six zero registers, and the control
  // words of this thread. After the `ret` into `entry`, rsp is 8 mod 16, as after a call.
  auto top = (reinterpret_cast<uintptr_t>(stack) + size) & ~static_cast<uintptr_t>(15);
  auto* frame = reinterpret_cast<uint64_t*>(top) - 9;
  std::memset(frame, 0, 9 * sizeof(uint64_t));
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(frame, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(frame) + 4, &fpucw, 2);
  frame[7] = reinterpret_cast<uint64_t>(entry);
  c.sp = frame;
}

void context_switch(Context& from, Context& to) { adai_emu_switch(&from.sp, to.sp); }

#else

void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

}  // namespace emu
}  // namespace adai
