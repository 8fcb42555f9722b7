// The emulated runtime's own C entry points; linked into every emulation library.
#include <cuda_runtime.h>

#include <cstdint>

// The order in which the emulator runs a block's threads between barriers (0: thread order).
extern "C" void emu_set_schedule_seed(uint64_t seed) { lucidops_emulation::schedule_seed = seed; }
