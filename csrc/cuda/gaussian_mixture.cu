// CUDA kernels for the 3D Gaussian point encoder mixture (methods.md section 1):
//   phi_g(x) = exp(-1/2 (x - mu_g)^T P_g (x - mu_g)),  l_k(x) = sum_g W[k,g] phi_g(x) + b[k],
//   out = max over points of l with the arg-max (reduce max), or l itself (reduce none).
// They mirror csrc/cpu/gaussian_mixture.cpp: the same quadratic form, the same culling rule
// (a Gaussian whose box misses a tile's bounding box is skipped for the tile, then the per-point
// test zeroes the remaining pairs outside the box), the same tie rule (the lowest point index
// attaining a channel's max) and the same backward formulas.
//
// Forward: a block owns one chunk of kChunk points of one cloud and kKB channels. It walks the
// chunk in tiles of kTN points; per tile and per tile of Gaussians it compacts the Gaussians that
// can reach the tile (a warp ballot keeps their ascending order), evaluates phi for them into
// shared memory, stages their mixer weights in shared memory, and accumulates a (kTN x kKB) block
// of l in registers. reduce max folds l into a running max per channel, so neither (N, G) nor
// (N, K) is ever written; the per-chunk maxima (B, N / kChunk, K) are merged in point order by a
// second kernel. reduce none writes l directly.
//
// Backward, reduce max: phi is recomputed at the arg-max points only. Every output is reduced
// without atomics, in a fixed order, so gradients are bitwise reproducible: per-block partial
// sums (summed by the binding with torch, whose reductions are deterministic) and a gather
// kernel that sums each point's contributions in channel order.
//
// Inputs are float32 or float64 (the Python wrapper upcasts half inputs, as for the cpp backend).
#include <cuda_runtime.h>

#include <cstdint>

#include "gaussian_mixture.h"

namespace lucidops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// Forward tiling: thread (ty, tx) of a 16 x 16 grid holds kPT x kKT accumulators, points ty + 16 i
// and channels tx + 16 j of the block's tile; strided so that a warp's shared-memory reads are
// broadcasts (phi) or consecutive (weights), free of bank conflicts.
constexpr int kTY = 16, kTX = 16;
constexpr int kPT = 4, kKT = 8;
constexpr int kTN = kTY * kPT;  // 64 points per tile
constexpr int kKB = kTX * kKT;  // 128 channels per block
constexpr int kChunk = 256;     // points per block, as the CPU kernel's work items
static_assert(kTY * kTX == kThreads, "the forward thread grid is the block");
static_assert(kKB <= kThreads && kTN <= kThreads, "one thread per point / channel in the staging loops");
static_assert(kTN == 64, "the bounding box is reduced by one warp over two points per lane");

// Gaussians per shared-memory tile: fits a warp's ballot; 16 for float64 keeps shared memory
// under the 48 KiB static limit.
template <typename T> struct GaussTile { static constexpr int value = 32; };
template <> struct GaussTile<double> { static constexpr int value = 16; };

// Backward tiling: lane = Gaussian of a 32-wide tile, 8 warps x 4 channels = 32 channels per block.
constexpr int kWarps = kThreads / 32;
constexpr int kPerWarp = 4;
constexpr int kBwdKB = kWarps * kPerWarp;
constexpr int kMaxSplits = 64;  // cloud slices of the max backward: partials (splits, K, G)
constexpr int kRowsPerBlock = kWarps * 8;  // phi backward: 8 rows per warp

template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(static_cast<int>(0xff800000u)); }
template <> __device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
}

__device__ __forceinline__ float exp_t(float v) { return expf(v); }
__device__ __forceinline__ double exp_t(double v) { return exp(v); }

// The quadratic form, written as in the CPU kernel and the reference.
template <typename T>
__device__ __forceinline__ T quad_form(const T* p, T d0, T d1, T d2) {
  return p[0] * d0 * d0 + p[3] * d1 * d1 + p[5] * d2 * d2 + T(2) * (p[1] * d0 * d1 + p[2] * d0 * d2 + p[4] * d1 * d2);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  // xor butterfly: a fixed order, and every lane ends with the same sum.
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// ---------------------------------------------------------------- forward

template <typename T, int GT>
struct ForwardShared {
  T x[3][kTN];       // the tile's points, by axis
  T par[GT][12];     // mu[3], p[6], h[3] of the tile's active Gaussians, compacted
  int active[GT];    // their Gaussian indices, ascending
  int count;
  union {
    struct {
      T phi[GT][kTN];
      T w[GT][kKB];
    } mix;
    struct {  // the final cross-thread max of each channel
      T val[kTY][kKB];
      int idx[kTY][kKB];
    } red;
  } u;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ pts, const T* __restrict__ means, const T* __restrict__ prec,
                   const T* __restrict__ half, const T* __restrict__ wt, const T* __restrict__ bias, int64_t N, int G,
                   int K, int chunks, bool cull, bool reduce_max, T* __restrict__ rows, T* __restrict__ part_max,
                   int64_t* __restrict__ part_idx) {
  constexpr int GT = GaussTile<T>::value;
  __shared__ ForwardShared<T, GT> s;
  const int tid = threadIdx.x, tx = tid % kTX, ty = tid / kTX, lane = tid & 31;
  const int64_t b = blockIdx.x / chunks;
  const int c = blockIdx.x % chunks;
  const int k0 = blockIdx.y * kKB;
  const int64_t n_begin = static_cast<int64_t>(c) * kChunk;
  const int64_t n_end = min(N, n_begin + kChunk);
  const T* xb = pts + b * N * 3;

  T bias_r[kKT], best[kKT];
  int best_n[kKT];  // offset from n_begin of the best point this thread has seen per channel
#pragma unroll
  for (int j = 0; j < kKT; ++j) {
    const int k = k0 + tx + kTX * j;
    bias_r[j] = k < K ? bias[k] : T(0);
    best[j] = neg_inf<T>();
    best_n[j] = 0;
  }

  for (int64_t t0 = n_begin; t0 < n_end; t0 += kTN) {
    const int m = static_cast<int>(min(static_cast<int64_t>(kTN), n_end - t0));
    __syncthreads();  // the previous tile is done with s.x
    if (tid < kTN) {
      // Padding slots repeat the tile's first point: the bounding box stays that of the valid points.
      const int64_t n = t0 + (tid < m ? tid : 0);
      for (int i = 0; i < 3; ++i) s.x[i][tid] = xb[n * 3 + i];
    }
    __syncthreads();
    // Warp 0 decides which Gaussians reach the tile; it alone needs the bounding box.
    T lo[3] = {T(0), T(0), T(0)}, hi[3] = {T(0), T(0), T(0)};
    if (cull && tid < 32) {
      for (int i = 0; i < 3; ++i) {
        lo[i] = min(s.x[i][lane], s.x[i][lane + 32]);
        hi[i] = max(s.x[i][lane], s.x[i][lane + 32]);
        for (int offset = 16; offset > 0; offset >>= 1) {
          lo[i] = min(lo[i], __shfl_xor_sync(kFullMask, lo[i], offset));
          hi[i] = max(hi[i], __shfl_xor_sync(kFullMask, hi[i], offset));
        }
      }
    }
    T acc[kPT][kKT];
#pragma unroll
    for (int i = 0; i < kPT; ++i)
#pragma unroll
      for (int j = 0; j < kKT; ++j) acc[i][j] = bias_r[j];

    for (int g0 = 0; g0 < G; g0 += GT) {
      if (tid < 32) {
        const int g = g0 + lane;
        bool keep = lane < GT && g < G;
        T par[12];
        if (keep) {
          for (int i = 0; i < 3; ++i) par[i] = means[g * 3 + i];
          for (int i = 0; i < 6; ++i) par[3 + i] = prec[g * 6 + i];
          for (int i = 0; i < 3; ++i) par[9 + i] = half[g * 3 + i];
          if (cull) {
            // alpha_g <= t (negative half-widths): culled everywhere. Otherwise the tile-level
            // skip, exact because rounding is monotonic: if the box misses the tile's bounding
            // box on an axis, every point of the tile fails the per-point test on that axis.
            keep = par[9] >= T(0);
            for (int i = 0; i < 3; ++i)
              keep = keep && !(lo[i] - par[i] > par[9 + i]) && !(par[i] - hi[i] > par[9 + i]);
          }
        }
        const unsigned mask = __ballot_sync(kFullMask, keep);
        if (keep) {
          const int slot = __popc(mask & ((1u << lane) - 1u));  // ascending g order
          for (int q = 0; q < 12; ++q) s.par[slot][q] = par[q];
          s.active[slot] = g;
        }
        if (lane == 0) s.count = __popc(mask);
      }
      __syncthreads();
      const int na = s.count;  // block-uniform
      if (na > 0) {
        for (int e = tid; e < na * kTN; e += kThreads) {
          const int a = e / kTN, p = e % kTN;
          const T* q = s.par[a];
          const T d0 = s.x[0][p] - q[0], d1 = s.x[1][p] - q[1], d2 = s.x[2][p] - q[2];
          const T v = exp_t(T(-0.5) * quad_form(q + 3, d0, d1, d2));
          const bool out = cull && (fabs(d0) > q[9] || fabs(d1) > q[10] || fabs(d2) > q[11]);
          s.u.mix.phi[a][p] = out ? T(0) : v;
        }
        for (int e = tid; e < na * kKB; e += kThreads) {
          const int a = e / kKB, kk = e % kKB;
          const int k = k0 + kk;
          s.u.mix.w[a][kk] = k < K ? wt[static_cast<int64_t>(s.active[a]) * K + k] : T(0);
        }
        __syncthreads();
        for (int a = 0; a < na; ++a) {
          T ph[kPT], w[kKT];
#pragma unroll
          for (int i = 0; i < kPT; ++i) ph[i] = s.u.mix.phi[a][ty + kTY * i];
#pragma unroll
          for (int j = 0; j < kKT; ++j) w[j] = s.u.mix.w[a][tx + kTX * j];
#pragma unroll
          for (int i = 0; i < kPT; ++i)
#pragma unroll
            for (int j = 0; j < kKT; ++j) acc[i][j] += w[j] * ph[i];
        }
      }
      __syncthreads();  // s.par, s.count and the phi / weight tiles are rewritten next
    }

    if (reduce_max) {
      // A thread visits its points in increasing index order: a strict > keeps the lowest index.
#pragma unroll
      for (int i = 0; i < kPT; ++i) {
        const int p = ty + kTY * i;
        if (p < m) {
          const int off = static_cast<int>(t0 - n_begin) + p;
#pragma unroll
          for (int j = 0; j < kKT; ++j) {
            if (acc[i][j] > best[j]) {
              best[j] = acc[i][j];
              best_n[j] = off;
            }
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPT; ++i) {
        const int p = ty + kTY * i;
        if (p < m) {
          T* row = rows + (b * N + t0 + p) * K;
#pragma unroll
          for (int j = 0; j < kKT; ++j) {
            const int k = k0 + tx + kTX * j;
            if (k < K) row[k] = acc[i][j];
          }
        }
      }
    }
  }
  if (!reduce_max) return;  // block-uniform

  // Across the 16 threads sharing a channel: the larger value, then the lower point index.
  __syncthreads();  // the union switches from the mixing tiles to the reduction
#pragma unroll
  for (int j = 0; j < kKT; ++j) {
    s.u.red.val[ty][tx + kTX * j] = best[j];
    s.u.red.idx[ty][tx + kTX * j] = best_n[j];
  }
  __syncthreads();
  if (tid < kKB && k0 + tid < K) {
    T bv = s.u.red.val[0][tid];
    int bi = s.u.red.idx[0][tid];
    for (int r = 1; r < kTY; ++r) {
      const T v = s.u.red.val[r][tid];
      const int i = s.u.red.idx[r][tid];
      if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
      }
    }
    const int64_t o = (b * chunks + c) * K + k0 + tid;
    part_max[o] = bv;
    part_idx[o] = n_begin + bi;
  }
}

// Merges the per-chunk maxima of each (cloud, channel) in chunk order (ties: the lower index).
template <typename T>
__global__ void merge_kernel(const T* __restrict__ part_max, const int64_t* __restrict__ part_idx, int64_t BK, int K,
                             int chunks, T* __restrict__ out, int64_t* __restrict__ argmax) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < BK; e += stride) {
    const int64_t b = e / K, k = e % K;
    const int64_t base = b * chunks * K + k;
    T bv = part_max[base];
    int64_t bi = part_idx[base];
    for (int c = 1; c < chunks; ++c) {
      const T v = part_max[base + static_cast<int64_t>(c) * K];
      const int64_t i = part_idx[base + static_cast<int64_t>(c) * K];
      if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
      }
    }
    out[e] = bv;
    argmax[e] = bi;
  }
}

// ---------------------------------------------------------------- backward

// One lane's Gaussian. Lanes past G hold zeros and valid = false: they contribute nothing.
template <typename T>
struct Gauss {
  T mu[3], p[6], h[3];
  int g;
  bool valid;
};

template <typename T>
__device__ __forceinline__ Gauss<T> load_gauss(const T* means, const T* prec, const T* half, int G, int g) {
  Gauss<T> q;
  q.g = g;
  q.valid = g < G;
  for (int i = 0; i < 3; ++i) q.mu[i] = q.valid ? means[g * 3 + i] : T(0);
  for (int i = 0; i < 6; ++i) q.p[i] = q.valid ? prec[g * 6 + i] : T(0);
  for (int i = 0; i < 3; ++i) q.h[i] = (q.valid && half != nullptr) ? half[g * 3 + i] : T(0);
  return q;
}

// phi with the culling rule, as phi_at of the CPU kernel; d receives x - mu.
template <typename T>
__device__ __forceinline__ T phi_at(const Gauss<T>& q, const T* x, bool cull, T* d) {
  d[0] = x[0] - q.mu[0];
  d[1] = x[1] - q.mu[1];
  d[2] = x[2] - q.mu[2];
  if (!q.valid) return T(0);
  if (cull && (fabs(d[0]) > q.h[0] || fabs(d[1]) > q.h[1] || fabs(d[2]) > q.h[2])) return T(0);
  return exp_t(T(-0.5) * quad_form(q.p, d[0], d[1], d[2]));
}

// Given c = dL/dphi * phi for one pair: pd = P d, gm += c P d, gp += -c/2 dq/dp.
template <typename T>
__device__ __forceinline__ void pair_terms(const Gauss<T>& q, const T* d, T c, T* gm, T* gp, T* pd) {
  const T* p = q.p;
  pd[0] = p[0] * d[0] + p[1] * d[1] + p[2] * d[2];
  pd[1] = p[1] * d[0] + p[3] * d[1] + p[4] * d[2];
  pd[2] = p[2] * d[0] + p[4] * d[1] + p[5] * d[2];
  for (int i = 0; i < 3; ++i) gm[i] += c * pd[i];
  const T hc = T(-0.5) * c;
  gp[0] += hc * d[0] * d[0];
  gp[1] += hc * T(2) * d[0] * d[1];
  gp[2] += hc * T(2) * d[0] * d[2];
  gp[3] += hc * d[1] * d[1];
  gp[4] += hc * T(2) * d[1] * d[2];
  gp[5] += hc * d[2] * d[2];
}

// Sums the 8 warps' mean/precision partials of each lane's Gaussian, in warp order, into out[g * 9 + v].
template <typename T>
__device__ __forceinline__ void block_reduce_gmp(T (*red)[32][9], const Gauss<T>& q, const T* gm, const T* gp,
                                                 T* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = 0; i < 3; ++i) red[warp][lane][i] = gm[i];
  for (int i = 0; i < 6; ++i) red[warp][lane][3 + i] = gp[i];
  __syncthreads();
  if (warp == 0 && q.valid) {
    for (int v = 0; v < 9; ++v) {
      T sum = T(0);
      for (int w = 0; w < kWarps; ++w) sum += red[w][lane][v];
      out[static_cast<int64_t>(q.g) * 9 + v] = sum;
    }
  }
  __syncthreads();
}

// grid (channel blocks, splits). Lane = Gaussian, warp w owns channels kb * 32 + w + 8 j; the block
// walks the clouds split, split + splits, ... For each (cloud, channel) pair, phi at the arg-max point.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_max_kernel(const T* __restrict__ grad, const T* __restrict__ pts, const int64_t* __restrict__ argmax,
                        const T* __restrict__ means, const T* __restrict__ prec, const T* __restrict__ half,
                        const T* __restrict__ weight, int64_t B, int64_t N, int G, int K, bool cull,
                        T* __restrict__ gw_part, T* __restrict__ gmp_part, T* __restrict__ gx_part) {
  __shared__ T red[kWarps][32][9];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kb = blockIdx.x, split = blockIdx.y, splits = gridDim.y, kblocks = gridDim.x;
  for (int g0 = 0, gt = 0; g0 < G; g0 += 32, ++gt) {
    const Gauss<T> q = load_gauss(means, prec, half, G, g0 + lane);
    T gm[3] = {T(0), T(0), T(0)}, gp[6] = {T(0), T(0), T(0), T(0), T(0), T(0)};
    T gw[kPerWarp];
#pragma unroll
    for (int j = 0; j < kPerWarp; ++j) gw[j] = T(0);
    for (int64_t b = split; b < B; b += splits) {
#pragma unroll
      for (int j = 0; j < kPerWarp; ++j) {
        const int k = kb * kBwdKB + warp + kWarps * j;
        if (k < K) {  // warp-uniform
          const int64_t bk = b * K + k;
          const T gy = grad[bk];
          const T* x = pts + (b * N + argmax[bk]) * 3;
          T d[3], pd[3];
          const T phi = phi_at(q, x, cull, d);
          gw[j] += gy * phi;
          const T c = gy * (q.valid ? weight[static_cast<int64_t>(k) * G + q.g] : T(0)) * phi;
          pair_terms(q, d, c, gm, gp, pd);
          for (int i = 0; i < 3; ++i) {
            const T sum = warp_sum(c * pd[i]);
            if (lane == 0) gx_part[((static_cast<int64_t>(gt) * B * K) + bk) * 3 + i] = -sum;
          }
        }
      }
    }
    if (q.valid) {
#pragma unroll
      for (int j = 0; j < kPerWarp; ++j) {
        const int k = kb * kBwdKB + warp + kWarps * j;
        if (k < K) gw_part[(static_cast<int64_t>(split) * K + k) * G + q.g] = gw[j];
      }
    }
    block_reduce_gmp(red, q, gm, gp, gmp_part + (static_cast<int64_t>(split) * kblocks + kb) * G * 9);
  }
}

// grid (B * point blocks). Thread = point n; channels are staged through shared memory in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scatter_points_kernel(const T* __restrict__ gx_bk, const int64_t* __restrict__ argmax, int64_t N, int K,
                          int64_t point_blocks, T* __restrict__ gx) {
  __shared__ int64_t arg_s[kThreads];
  __shared__ T val_s[kThreads][3];
  const int64_t b = blockIdx.x / point_blocks;
  const int64_t n = (blockIdx.x % point_blocks) * kThreads + threadIdx.x;
  T acc[3] = {T(0), T(0), T(0)};
  for (int k0 = 0; k0 < K; k0 += kThreads) {
    const int cnt = min(kThreads, K - k0);
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < cnt) {
      const int64_t bk = b * K + k0 + threadIdx.x;
      arg_s[threadIdx.x] = argmax[bk];
      for (int i = 0; i < 3; ++i) val_s[threadIdx.x][i] = gx_bk[bk * 3 + i];
    }
    __syncthreads();
    for (int t = 0; t < cnt; ++t) {
      if (arg_s[t] == n) {
        for (int i = 0; i < 3; ++i) acc[i] += val_s[t][i];
      }
    }
  }
  if (n < N) {
    for (int i = 0; i < 3; ++i) gx[(b * N + n) * 3 + i] = acc[i];
  }
}

template <typename T>
__global__ void phi_kernel(const T* __restrict__ pts, const T* __restrict__ means, const T* __restrict__ prec,
                           const T* __restrict__ half, int64_t M, int G, bool cull, T* __restrict__ out) {
  const int64_t total = M * G;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / G;
    const int g = static_cast<int>(e % G);
    const T* x = pts + i * 3;
    const T* p = prec + g * 6;
    const T d0 = x[0] - means[g * 3], d1 = x[1] - means[g * 3 + 1], d2 = x[2] - means[g * 3 + 2];
    T v = exp_t(T(-0.5) * quad_form(p, d0, d1, d2));
    if (cull && (fabs(d0) > half[g * 3] || fabs(d1) > half[g * 3 + 1] || fabs(d2) > half[g * 3 + 2])) v = T(0);
    out[e] = v;
  }
}

// grid (ceil(M / 64)). Lane = Gaussian, warp w owns rows block * 64 + w + 8 r.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    phi_backward_kernel(const T* __restrict__ coef, const T* __restrict__ pts, const T* __restrict__ means,
                        const T* __restrict__ prec, int64_t M, int G, T* __restrict__ gx_part,
                        T* __restrict__ gmp_part) {
  __shared__ T red[kWarps][32][9];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int g0 = 0, gt = 0; g0 < G; g0 += 32, ++gt) {
    const Gauss<T> q = load_gauss<T>(means, prec, nullptr, G, g0 + lane);
    T gm[3] = {T(0), T(0), T(0)}, gp[6] = {T(0), T(0), T(0), T(0), T(0), T(0)};
    for (int r = 0; r < kRowsPerBlock / kWarps; ++r) {
      const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp + kWarps * r;
      if (row >= M) break;  // warp-uniform
      const T* x = pts + row * 3;
      const T d[3] = {x[0] - q.mu[0], x[1] - q.mu[1], x[2] - q.mu[2]};
      const T c = q.valid ? coef[row * G + q.g] : T(0);
      T pd[3];
      pair_terms(q, d, c, gm, gp, pd);
      for (int i = 0; i < 3; ++i) {
        const T sum = warp_sum(c * pd[i]);
        if (lane == 0) gx_part[(static_cast<int64_t>(gt) * M + row) * 3 + i] = -sum;
      }
    }
    block_reduce_gmp(red, q, gm, gp, gmp_part + static_cast<int64_t>(blockIdx.x) * G * 9);
  }
}

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

// ---------------------------------------------------------------- typed launchers

template <typename T>
cudaError_t forward_typed(const void* points, const void* means, const void* prec, const void* half,
                          const void* weight_t, const void* bias, int64_t B, int64_t N, int64_t G, int64_t K, bool cull,
                          bool reduce_max, void* rows, void* out_max, int64_t* argmax, void* part_max,
                          int64_t* part_idx, cudaStream_t stream) {
  if (B == 0 || N == 0 || K == 0) return cudaSuccess;
  const int64_t chunks = gaussian_forward_chunks(N);
  const int64_t kblocks = (K + kKB - 1) / kKB;
  if (B * chunks > 0x7fffffff || kblocks > 65535) return cudaErrorInvalidConfiguration;
  // One chunk: the block's maximum is the cloud's, written straight to the outputs.
  T* pmax = static_cast<T*>(reduce_max && chunks == 1 ? out_max : part_max);
  int64_t* pidx = reduce_max && chunks == 1 ? argmax : part_idx;
  const dim3 grid(static_cast<unsigned>(B * chunks), static_cast<unsigned>(kblocks));
  forward_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(points), static_cast<const T*>(means), static_cast<const T*>(prec),
      static_cast<const T*>(half), static_cast<const T*>(weight_t), static_cast<const T*>(bias), N,
      static_cast<int>(G), static_cast<int>(K), static_cast<int>(chunks), cull, reduce_max, static_cast<T*>(rows),
      pmax, pidx);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !reduce_max || chunks == 1) return err;
  merge_kernel<T><<<blocks_for(B * K), kThreads, 0, stream>>>(pmax, pidx, B * K, static_cast<int>(K),
                                                                static_cast<int>(chunks), static_cast<T*>(out_max),
                                                                argmax);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_max_typed(const void* grad, const void* points, const int64_t* argmax, const void* means,
                               const void* prec, const void* half, const void* weight, int64_t B, int64_t N,
                               int64_t G, int64_t K, bool cull, void* gw_part, void* gmp_part, void* gx_part,
                               cudaStream_t stream) {
  if (B == 0 || K == 0 || G == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(gaussian_backward_channel_blocks(K)),
                  static_cast<unsigned>(gaussian_backward_splits(B)));
  backward_max_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<const T*>(points), argmax, static_cast<const T*>(means),
      static_cast<const T*>(prec), static_cast<const T*>(half), static_cast<const T*>(weight), B, N,
      static_cast<int>(G), static_cast<int>(K), cull, static_cast<T*>(gw_part), static_cast<T*>(gmp_part),
      static_cast<T*>(gx_part));
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_typed(const void* gx_bk, const int64_t* argmax, int64_t B, int64_t N, int64_t K, void* gx,
                          cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  const int64_t point_blocks = (N + kThreads - 1) / kThreads;
  if (B * point_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  scatter_points_kernel<T><<<static_cast<unsigned>(B * point_blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(gx_bk), argmax, N, static_cast<int>(K), point_blocks, static_cast<T*>(gx));
  return cudaGetLastError();
}

template <typename T>
cudaError_t phi_typed(const void* points, const void* means, const void* prec, const void* half, int64_t M, int64_t G,
                      bool cull, void* out, cudaStream_t stream) {
  if (M == 0 || G == 0) return cudaSuccess;
  phi_kernel<T><<<blocks_for(M * G), kThreads, 0, stream>>>(
      static_cast<const T*>(points), static_cast<const T*>(means), static_cast<const T*>(prec),
      static_cast<const T*>(half), M, static_cast<int>(G), cull, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t phi_backward_typed(const void* coef, const void* points, const void* means, const void* prec, int64_t M,
                               int64_t G, void* gx_part, void* gmp_part, cudaStream_t stream) {
  if (M == 0 || G == 0) return cudaSuccess;
  const int64_t blocks = gaussian_phi_backward_blocks(M);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  phi_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(coef), static_cast<const T*>(points), static_cast<const T*>(means),
      static_cast<const T*>(prec), M, static_cast<int>(G), static_cast<T*>(gx_part), static_cast<T*>(gmp_part));
  return cudaGetLastError();
}

}  // namespace

int64_t gaussian_forward_chunks(int64_t N) { return N <= 0 ? 1 : (N + kChunk - 1) / kChunk; }
int64_t gaussian_backward_splits(int64_t B) { return B < 1 ? 1 : (B < kMaxSplits ? B : kMaxSplits); }
int64_t gaussian_backward_channel_blocks(int64_t K) { return K < 1 ? 1 : (K + kBwdKB - 1) / kBwdKB; }
int64_t gaussian_gauss_tiles(int64_t G) { return G < 1 ? 1 : (G + 31) / 32; }
int64_t gaussian_phi_backward_blocks(int64_t M) { return M < 1 ? 1 : (M + kRowsPerBlock - 1) / kRowsPerBlock; }

cudaError_t gaussian_mixture_forward(DType dtype, const void* points, const void* means, const void* precisions,
                                     const void* half_widths, const void* weight_t, const void* bias, int64_t B,
                                     int64_t N, int64_t G, int64_t K, bool cull, bool reduce_max, void* rows,
                                     void* out_max, int64_t* argmax, void* part_max, int64_t* part_idx,
                                     cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(points, means, precisions, half_widths, weight_t, bias, B, N, G, K, cull,
                                  reduce_max, rows, out_max, argmax, part_max, part_idx, stream);
    case DType::kFloat64:
      return forward_typed<double>(points, means, precisions, half_widths, weight_t, bias, B, N, G, K, cull,
                                   reduce_max, rows, out_max, argmax, part_max, part_idx, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t gaussian_mixture_backward_max(DType dtype, const void* grad, const void* points, const int64_t* argmax,
                                          const void* means, const void* precisions, const void* half_widths,
                                          const void* weight, int64_t B, int64_t N, int64_t G, int64_t K, bool cull,
                                          void* gw_part, void* gmp_part, void* gx_part, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_max_typed<float>(grad, points, argmax, means, precisions, half_widths, weight, B, N, G, K, cull,
                                       gw_part, gmp_part, gx_part, stream);
    case DType::kFloat64:
      return backward_max_typed<double>(grad, points, argmax, means, precisions, half_widths, weight, B, N, G, K,
                                        cull, gw_part, gmp_part, gx_part, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t gaussian_scatter_point_grads(DType dtype, const void* gx_bk, const int64_t* argmax, int64_t B, int64_t N,
                                         int64_t K, void* gx, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return scatter_typed<float>(gx_bk, argmax, B, N, K, gx, stream);
    case DType::kFloat64: return scatter_typed<double>(gx_bk, argmax, B, N, K, gx, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t gaussian_phi(DType dtype, const void* points, const void* means, const void* precisions,
                         const void* half_widths, int64_t M, int64_t G, bool cull, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return phi_typed<float>(points, means, precisions, half_widths, M, G, cull, out, stream);
    case DType::kFloat64: return phi_typed<double>(points, means, precisions, half_widths, M, G, cull, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t gaussian_phi_backward(DType dtype, const void* coef, const void* points, const void* means,
                                  const void* precisions, int64_t M, int64_t G, void* gx_part, void* gmp_part,
                                  cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return phi_backward_typed<float>(coef, points, means, precisions, M, G, gx_part, gmp_part, stream);
    case DType::kFloat64:
      return phi_backward_typed<double>(coef, points, means, precisions, M, G, gx_part, gmp_part, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lucidops
