// Force-included into csrc/bindings.cpp when it is built against the emulated kernels
// (tests/cuda_emulator.py): torch's headers first, then the CUDA section's device checks
// accept the CPU tensors that stand in for device memory.
#pragma once
#include <torch/extension.h>

#define is_cuda is_cpu
