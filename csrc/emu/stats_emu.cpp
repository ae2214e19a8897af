// The CUDA kernels of csrc/cuda/stats.cu, compiled as C++ for the CPU emulator (device.h).
#include "../cuda/stats.cu"
