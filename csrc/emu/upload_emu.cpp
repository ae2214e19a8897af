// The CUDA kernels of csrc/cuda/upload.cu, compiled as C++ for the CPU emulator (device.h).
#include "../cuda/upload.cu"
