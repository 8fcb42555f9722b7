// The emulated runtime's stand-in for c10's current stream: kernels run when launched.
#pragma once
#include <cuda_runtime_api.h>

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
