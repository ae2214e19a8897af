// Shadow of c10's CUDA error checks for the CPU emulator: an emulated launch runs to its end
// inside the launch call and throws c10::Error itself when a check fails.
#pragma once
#include <c10/util/Exception.h>

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
