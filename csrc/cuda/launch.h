// The one seam between the kernels and what runs them. ADAI_LAUNCH(grid, block, stream,
// kernel)(args...) is `kernel<<<grid, block, 0, stream>>>(args...)` under nvcc, and a launch
// of the CPU emulator (csrc/emu/device.h) when the sources are compiled as C++ with
// ADAI_CUDA_EMU.
#pragma once

#if defined(ADAI_CUDA_EMU)
#define ADAI_LAUNCH(grid, block, stream, ...) ::adai::emu::launch(grid, block, stream, __VA_ARGS__)
#else
#define ADAI_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif
