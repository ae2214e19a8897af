// Shadow of the CUDA header for the CPU emulator: the built-ins of csrc/emu/device.h.
#pragma once
#include "../device.h"
