// Grain sizes for at::parallel_for. A parallel region costs a barrier (microseconds) and,
// when the cores are busy with other work (a DataLoader's workers, a second process), a
// scheduler time slice per waiting thread (milliseconds): a one-cloud backward with 4
// channels took 30 us on the calling thread and 2 ms on average with 2 threads on a loaded
// 2-core machine. So a loop whose items hold little work runs on the calling thread.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lucidops {
namespace cpu {

// Arithmetic operations worth a parallel region: each thread's share holds at least this many.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

// The grain (items per share) for items of about ``work_per_item`` operations each.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(work_per_item, 1));
}

}  // namespace cpu
}  // namespace lucidops
