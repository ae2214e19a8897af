// The CUDA kernels of csrc/cuda/update.cu, compiled as C++ for the CPU emulator (device.h).
#include "../cuda/update.cu"
