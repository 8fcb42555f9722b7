// Kernels with known defects, so that tests/test_cuda_emulated.py can show that the emulator
// catches each kind: a missing barrier, a write out of bounds, a warp collective in divergent
// code, and a deadlock. Plus the correct version of the first, which must pass.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;

// out[t] = in[(t + 1) % n] through shared memory; `synced` places the barrier the exchange needs.
__global__ void shift_kernel(const float* in, float* out, bool synced) {
  __shared__ float stage[kThreads];
  const int t = threadIdx.x;
  stage[t] = in[t];
  if (synced) __syncthreads();
  out[t] = stage[(t + 1) % kThreads];
}

__global__ void write_past_the_end_kernel(float* out, int n) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t <= n) out[t] = 1.0f;  // the defect: <= n
}

__global__ void divergent_shuffle_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) return;  // half of every warp leaves...
  v += __shfl_xor_sync(0xffffffffu, v, 1);  // ...and the other half shuffles with a full mask
  out[threadIdx.x] = v;
}

__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();  // thread 0 waits for the block; its warp waits for it in the shuffle
  } else if (threadIdx.x < 32) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

}  // namespace

extern "C" {
int emu_selftest_shift(const float* in, float* out, bool synced) {
  shift_kernel<<<1, kThreads, 0, nullptr>>>(in, out, synced);
  return cudaGetLastError();
}
int emu_selftest_write_past_the_end(float* out, int n) {
  write_past_the_end_kernel<<<(n + kThreads - 1) / kThreads, kThreads>>>(out, n);
  return cudaGetLastError();
}
int emu_selftest_divergent_shuffle(float* out) {
  divergent_shuffle_kernel<<<1, kThreads>>>(out);
  return cudaGetLastError();
}
int emu_selftest_deadlock(float* out) {
  deadlock_kernel<<<1, kThreads>>>(out);
  return cudaGetLastError();
}
}
