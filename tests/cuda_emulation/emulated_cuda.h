// A CPU stand-in for the parts of the CUDA runtime and device language that lucidops' kernels
// use, so that csrc/cuda/*.cu runs on a machine without a GPU (tests/cuda_emulator.py builds it).
//
// Every thread of a block is a fiber (ucontext) with its own stack, run on the calling OS thread.
// __syncthreads is a barrier over the block's fibers; warp shuffles and ballots exchange values
// through a per-warp buffer between two barriers over the warp's lanes. Between barriers the
// scheduler runs the fibers in an order drawn from the schedule seed (seed 0: thread order), so a
// kernel whose result depends on that order (a missing barrier, a race on shared memory) gives
// different results under different seeds. A barrier that some threads never reach is reported
// as a deadlock. Blocks run one after another; __shared__ variables are function statics.
//
// Not emulated: the memory model beyond barriers, the exact libdevice results of expf/exp (the
// host's libm differs by an ulp or two), resource limits (the AOT build checks those).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

// ---------------------------------------------------------------- the language's keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---------------------------------------------------------------- runtime types
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace lucidops_emulation {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "emulated CUDA: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 thread;
  bool done = false;
  bool waiting = false;
  const char* waits_for = "";
};

// One block's fibers and the scheduler that runs them.
class Scheduler {
 public:
  static constexpr size_t kStack = 256 * 1024;

  // Runs body() as every thread of one block; returns when all have returned.
  void run_block(dim3 block, uint64_t seed, const std::function<void()>& body) {
    const unsigned threads = block.x * block.y * block.z;
    fibers_.resize(threads);
    body_ = &body;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
      if (!f.stack) f.stack.reset(new char[kStack]);
      f.thread = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      f.done = f.waiting = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &Scheduler::trampoline, 0);
    }
    std::mt19937_64 rng(seed);
    std::vector<unsigned> order;
    for (;;) {
      order.clear();
      for (unsigned t = 0; t < threads; ++t)
        if (!fibers_[t].done && !fibers_[t].waiting) order.push_back(t);
      if (order.empty()) break;
      if (seed != 0) std::shuffle(order.begin(), order.end(), rng);
      for (unsigned t : order) {
        if (fibers_[t].done || fibers_[t].waiting) continue;
        current_ = t;
        threadIdx = fibers_[t].thread;
        swapcontext(&scheduler_, &fibers_[t].context);
      }
    }
    for (unsigned t = 0; t < threads; ++t)
      if (!fibers_[t].done)
        fail("deadlock: thread " + std::to_string(t) + " waits forever in " + fibers_[t].waits_for +
             " (a barrier or warp collective inside divergent code?)");
  }

  unsigned current() const { return current_; }

  // The running fiber waits until release() wakes it.
  void block_current(const char* what) {
    Fiber& f = fibers_[current_];
    f.waiting = true;
    f.waits_for = what;
    swapcontext(&f.context, &scheduler_);
  }
  void wake(unsigned t) { fibers_[t].waiting = false; }
  // The running fiber lets the others run before it goes on.
  void yield() { swapcontext(&fibers_[current_].context, &scheduler_); }

 private:
  static void trampoline();
  std::vector<Fiber> fibers_;
  ucontext_t scheduler_;
  unsigned current_ = 0;
  const std::function<void()>* body_ = nullptr;
};

inline Scheduler& scheduler() {
  static thread_local Scheduler instance;
  return instance;
}

inline void Scheduler::trampoline() {
  Scheduler& s = scheduler();
  (*s.body_)();
  s.fibers_[s.current_].done = true;  // returning resumes the scheduler through uc_link
}

// A barrier whose threads may leave for good: a returned CUDA thread no longer takes part.
class Barrier {
 public:
  explicit Barrier(int participants) : expected_(participants) {}

  void arrive_and_wait(const char* what) {
    Scheduler& s = scheduler();
    if (++arrived_ == expected_) {
      release();
      s.yield();  // the others may now run first
      return;
    }
    waiting_.push_back(s.current());
    s.block_current(what);
  }

  void drop() {
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

  int participants() const { return expected_; }

 private:
  void release() {
    for (unsigned t : waiting_) scheduler().wake(t);
    waiting_.clear();
    arrived_ = 0;
  }
  int expected_;
  int arrived_ = 0;
  std::vector<unsigned> waiting_;
};

struct Warp {
  explicit Warp(int lanes) : barrier(lanes), size(lanes) {}
  Barrier barrier;
  int size;
  uint64_t slots[32] = {};
};

struct Block {
  explicit Block(int threads) : barrier(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Warp(std::min(32, threads - 32 * w)));
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* current_block = nullptr;
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local uint64_t schedule_seed = 0;

inline int linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline Warp& my_warp() { return *current_block->warps[linear_thread() / 32]; }

// Every lane publishes a 64-bit word and gets the words of all 32 lanes.
inline std::array<uint64_t, 32> warp_gather(unsigned mask, uint64_t word, const char* what) {
  Warp& warp = my_warp();
  if (mask != 0xffffffffu || warp.size != 32) fail("only full-warp masks over 32-lane warps are emulated");
  if (warp.barrier.participants() != 32) fail(std::string(what) + " after some of the warp's lanes returned");
  warp.slots[linear_thread() % 32] = word;
  warp.barrier.arrive_and_wait(what);
  std::array<uint64_t, 32> words;
  std::copy(warp.slots, warp.slots + 32, words.begin());
  warp.barrier.arrive_and_wait(what);  // nobody overwrites a slot before every lane has read
  return words;
}

template <typename T>
uint64_t to_word(T v) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 64 bits");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  return w;
}
template <typename T>
T from_word(uint64_t w) {
  T v;
  std::memcpy(&v, &w, sizeof(T));
  return v;
}

// Runs kernel(args...) over the grid, block after block.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t,
                   Args... args) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 || dynamic_shared != 0)
    return last_error = cudaErrorInvalidConfiguration;
  uint64_t block_number = 0;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx, ++block_number) {
        Block state(static_cast<int>(threads));
        blockIdx = {bx, by, bz};
        blockDim = block;
        gridDim = grid;
        current_block = &state;
        const std::function<void()> body = [&] {
          kernel(static_cast<Params>(args)...);
          my_warp().barrier.drop();  // a returned thread leaves its warp and block barriers
          state.barrier.drop();
        };
        const uint64_t seed = schedule_seed == 0 ? 0 : schedule_seed * 0x9E3779B97F4A7C15ull + block_number + 1;
        scheduler().run_block(block, seed, body);
        current_block = nullptr;
      }
  return last_error = cudaSuccess;
}

// kernel<<<grid, block, shared, stream>>>(args) is rewritten to launcher(kernel, grid, block, shared, stream)(args).
template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;
  template <typename... Args>
  void operator()(Args... args) const {
    launch(kernel, grid, block, shared, stream, args...);
  }
};
template <typename... Params>
Launcher<Params...> launcher(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared = 0,
                             cudaStream_t stream = nullptr) {
  return {kernel, grid, block, shared, stream};
}

}  // namespace lucidops_emulation

// ---------------------------------------------------------------- device functions
inline void __syncthreads() { lucidops_emulation::current_block->barrier.arrive_and_wait("__syncthreads"); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  using namespace lucidops_emulation;
  const int lane = linear_thread() % 32;
  return from_word<T>(warp_gather(mask, to_word(v), "__shfl_xor_sync")[(lane ^ lane_mask) & 31]);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  using namespace lucidops_emulation;
  const unsigned lane = linear_thread() % 32;
  // A lane whose source is past the warp's end keeps its own value, as on the GPU.
  return from_word<T>(warp_gather(mask, to_word(v), "__shfl_down_sync")[lane + delta < 32 ? lane + delta : lane]);
}

inline unsigned __ballot_sync(unsigned mask, bool predicate) {
  const auto words = lucidops_emulation::warp_gather(mask, predicate ? 1 : 0, "__ballot_sync");
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane) bits |= static_cast<unsigned>(words[lane] != 0) << lane;
  return bits;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __int_as_float(int v) { return lucidops_emulation::from_word<float>(static_cast<uint32_t>(v)); }
inline double __longlong_as_double(long long v) {
  return lucidops_emulation::from_word<double>(static_cast<uint64_t>(v));
}

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}
using std::exp;
using std::fabs;
using std::copysign;  // CUDA's device math, global there
using std::isinf;

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = lucidops_emulation::last_error;
  lucidops_emulation::last_error = cudaSuccess;
  return err;
}
