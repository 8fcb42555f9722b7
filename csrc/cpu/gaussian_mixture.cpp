// CPU kernels for the 3D Gaussian point encoder mixture (methods.md section 1):
//   phi_g(x) = exp(-1/2 (x - mu_g)^T P_g (x - mu_g)),  l_k(x) = sum_g W[k,g] phi_g(x) + b[k],
//   out = max over points of l (with the arg-max), or l itself (reduce "none").
//
// Forward: work items are (cloud, chunk of points), run with OpenMP. Each item walks
// its chunk in tiles of Tile points: it evaluates phi for the Gaussians that can reach the
// tile into a (G_active x Tile) buffer, mixes it into blocks of KB channels held in
// registers, and folds each block into the running max / arg-max. Neither (N, G) nor (N, K)
// exists for a whole cloud. With culling, a Gaussian whose box misses the tile's bounding
// box is skipped for the whole tile (exact: rounding is monotonic, so every point of the
// tile would fail the per-point test too), and the per-point test zeroes the rest.
// float32 on AVX-512 and on AVX2 with FMA (the common cases) runs forward_item_f32 instead:
// the same steps with channels in the lanes and tiles of 8 or 6 points, which folds the max
// vertically and culls per 8 or 6 points (see there).
//
// Ties: every fold of a maximum keeps the lowest point index among equal values, so the
// lowest point index attaining the max wins, as in every backend, whatever the visiting
// order (with culling, points are visited in a spatial order: see spatial_order).
//
// Backward (reduce max): phi is computed once at each distinct arg-max point, then two passes
// each own their outputs: over channels, weight/bias; over clouds (vectorised over the
// Gaussians), the points and per-cloud sums for means/precisions, added in cloud order. There
// are no atomics and the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include "../lucidops.h"
#include "parallel.h"
#include "vec_math.h"

// float32 forward with channels in the lanes (forward_item_f32), on AVX-512 or AVX2 with FMA.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define LUCIDOPS_CHANNEL_LANES 1
#endif
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define LUCIDOPS_HAS_MXCSR 1
#endif

namespace lucidops {
namespace cpu {
namespace {

// Smallest chunk of points per work item. Chunks are as long as the thread count allows:
// each chunk restarts the running maxima, and while they are fresh most tiles improve them
// (the costly path of fold_tile). The result does not depend on the chunking: the max and
// its lowest arg-max are the same however the points are split.
constexpr int64_t kMinChunk = 256;

// Far from a Gaussian, W * phi underflows into subnormals, which x86 cores handle in
// microcode at ~100x the cost: narrow Gaussians made the dense kernel 3x slower. Inside the
// kernel's threads only, flush subnormal results and inputs to zero, and restore the mode
// after. A flushed phi (below 1.2e-38) moves a channel by at most 1.2e-38 sum_g |W[k, g]|: far
// under float32 rounding of any output at ordinary weights, stated in the README for the rest.
class FlushSubnormals {
 public:
#ifdef LUCIDOPS_HAS_MXCSR
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// Tile sizes: Tile points (SIMD lanes) x KB channels of accumulators, two vectors of points
// per channel. Sized to leave a few of the target's vector registers free: 16 accumulators of
// AVX-512's 32; 12 of AVX2's 16, where 32 points x 8 channels (32 accumulators) spilled to
// the stack (measured on a Zen 3 EPYC, float32, B16 N2048 G32 K1024: 37.9 -> 32.7 ms, culled
// 22.9 -> 17.3 ms; 24 x 4, 16 x 4 and 8 x 8 fell between. float64, 16 x 8 -> 8 x 6: 74.5 -> 44.3 ms,
// culled 40.1 -> 26.1 ms). float32 takes this kernel only where forward_item_f32 is not built
// (neither AVX-512 nor AVX2 with FMA); float64 takes it everywhere.
template <typename T> struct Blocking;
#ifdef __AVX512F__
template <> struct Blocking<float> { static constexpr int Tile = 32; static constexpr int KB = 8; };
template <> struct Blocking<double> { static constexpr int Tile = 16; static constexpr int KB = 8; };
#else
template <> struct Blocking<float> { static constexpr int Tile = 16; static constexpr int KB = 6; };
template <> struct Blocking<double> { static constexpr int Tile = 8; static constexpr int KB = 6; };
#endif

inline float fast_exp(float v) { return vec_math::exp(v); }
inline double fast_exp(double v) { return std::exp(v); }

// Per-Gaussian parameters unpacked once: mean, the six precision entries, half-widths.
template <typename T>
struct GaussParams {
  T mu[3];
  T p[6];  // p00, p01, p02, p11, p12, p22
  T h[3];
};

template <typename T>
std::vector<GaussParams<T>> unpack(const T* means, const T* prec, const T* half, int64_t G) {
  std::vector<GaussParams<T>> out(G);
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < 3; ++i) out[g].mu[i] = means[g * 3 + i];
    for (int i = 0; i < 6; ++i) out[g].p[i] = prec[g * 6 + i];
    for (int i = 0; i < 3; ++i) out[g].h[i] = half[g * 3 + i];
  }
  return out;
}

// The quadratic form, written the same way everywhere (the reference uses the same order).
template <typename T>
inline T quad_form(const T* p, T d0, T d1, T d2) {
  return p[0] * d0 * d0 + p[3] * d1 * d1 + p[5] * d2 * d2 + T(2) * (p[1] * d0 * d1 + p[2] * d0 * d2 + p[4] * d1 * d2);
}

template <typename T>
inline bool outside(const GaussParams<T>& gp, T d0, T d1, T d2) {
  return std::fabs(d0) > gp.h[0] || std::fabs(d1) > gp.h[1] || std::fabs(d2) > gp.h[2];
}

// Scalar phi with the culling rule (used by the backward, libm exp).
template <typename T>
inline T phi_at(const GaussParams<T>& gp, const T* x, bool cull, T* d) {
  d[0] = x[0] - gp.mu[0];
  d[1] = x[1] - gp.mu[1];
  d[2] = x[2] - gp.mu[2];
  if (cull && outside(gp, d[0], d[1], d[2])) return T(0);
  return std::exp(T(-0.5) * quad_form(gp.p, d[0], d[1], d[2]));
}

// Folds a tile's maximum mx into the running (best, best_idx): the larger value wins, and
// among equal values the lowest point index (lanes may be in any point order).
template <typename T, int Tile>
inline void fold_max(const T (&acc)[Tile], T mx, const int64_t* lane_idx, T& best, int64_t& best_idx) {
  int64_t idx = std::numeric_limits<int64_t>::max();
#pragma omp simd reduction(min : idx)
  for (int t = 0; t < Tile; ++t) idx = std::min(idx, acc[t] == mx ? lane_idx[t] : std::numeric_limits<int64_t>::max());
  if (mx > best || idx < best_idx) {
    best = mx;
    best_idx = idx;
  }
}

// Folds one channel's tile of values into its running max: a cheap vector test first (does
// any lane reach the running max?), since after the first few tiles almost none does; the
// horizontal max and the index search only when one does.
//
// When no lane can win a tie (the tile's lowest point index is not below the running
// arg-max), only a lane above the max matters: testing >= there sent every tile that merely
// equals the max down the slow path, and with culling many do (lanes where every box is
// culled hold exactly the bias, often a channel's max).
template <typename T, int Tile>
inline bool tile_reaches(const T (&acc)[Tile], T b, bool can_tie) {
  int hit = 0;
  if (can_tie) {
#pragma omp simd reduction(| : hit)
    for (int t = 0; t < Tile; ++t) hit |= acc[t] >= b ? 1 : 0;
  } else {
#pragma omp simd reduction(| : hit)
    for (int t = 0; t < Tile; ++t) hit |= acc[t] > b ? 1 : 0;
  }
  return hit != 0;
}

template <typename T, int Tile>
inline void fold_tile(const T (&acc)[Tile], const int64_t* lane_idx, int64_t tile_min_idx, T& best, int64_t& best_idx) {
  if (!tile_reaches(acc, best, tile_min_idx < best_idx)) return;
  T mx = acc[0];
#pragma omp simd reduction(max : mx)
  for (int t = 0; t < Tile; ++t) mx = std::max(mx, acc[t]);
  // Equal maxima are common once culling zeroes whole tiles (l = bias there): fold them
  // only when this tile holds a lower point index.
  if (mx > best || (mx == best && tile_min_idx < best_idx)) fold_max(acc, mx, lane_idx, best, best_idx);
}

// The order in which a work item of n points visits its tiles of `lanes` points. For the max
// it is shuffled (fixed seed, from the item's first point n0): every tile that reaches a
// channel's running max takes the slow path of the fold, and a tile order that sweeps across
// the cloud (points in spatial or generation order, or a fixed stride through them) keeps
// raising the maxima; in random order a channel's maximum rises about ln(tiles) times.
inline std::vector<int64_t> tile_visit_order(int64_t n0, int64_t n, int lanes, bool shuffled) {
  std::vector<int64_t> tile_order((n + lanes - 1) / lanes);
  std::iota(tile_order.begin(), tile_order.end(), int64_t(0));
  if (shuffled) std::shuffle(tile_order.begin(), tile_order.end(), std::minstd_rand(static_cast<uint32_t>(n0 + 1)));
  return tile_order;
}

// Loads the m points of the tile starting at position t0 (through `order` when given) into
// lane_idx and the coordinate rows x0, x1, x2; padding lanes repeat the first point, so they
// tie with lane 0, which wins. Returns the tile's lowest point index.
template <typename T, int Lanes>
inline int64_t load_tile(const T* pts, const int64_t* order, int64_t t0, int m, int64_t* lane_idx, T* x0, T* x1, T* x2) {
  for (int t = 0; t < Lanes; ++t) {
    const int64_t pos = t0 + (t < m ? t : 0);
    lane_idx[t] = order ? order[pos] : pos;
    const T* p = pts + 3 * lane_idx[t];
    x0[t] = p[0];
    x1[t] = p[1];
    x2[t] = p[2];
  }
  int64_t min_idx = lane_idx[0];
  for (int t = 1; t < m; ++t) min_idx = std::min(min_idx, lane_idx[t]);
  return min_idx;
}

// The bounding box [lo, hi] of a tile's first m points (coordinates in x0, x1, x2).
template <typename T>
inline void tile_bounds(const T* x0, const T* x1, const T* x2, int m, T lo[3], T hi[3]) {
  lo[0] = hi[0] = x0[0];
  lo[1] = hi[1] = x1[0];
  lo[2] = hi[2] = x2[0];
  for (int t = 1; t < m; ++t) {
    lo[0] = std::min(lo[0], x0[t]); hi[0] = std::max(hi[0], x0[t]);
    lo[1] = std::min(lo[1], x1[t]); hi[1] = std::max(hi[1], x1[t]);
    lo[2] = std::min(lo[2], x2[t]); hi[2] = std::max(hi[2], x2[t]);
  }
}

// Whether culling drops Gaussian gp for every point of the box [lo, hi]: alpha_g <= t, or its
// box misses [lo, hi] (exact: rounding is monotonic, so every point fails the per-point test).
template <typename T>
inline bool culled_for_box(const GaussParams<T>& gp, const T lo[3], const T hi[3]) {
  if (gp.h[0] < 0) return true;  // alpha_g <= t: culled everywhere
  bool miss = false;
  for (int i = 0; i < 3; ++i) miss |= (lo[i] - gp.mu[i] > gp.h[i]) || (gp.mu[i] - hi[i] > gp.h[i]);
  return miss;
}

// phi of Gaussian gp at a tile's Lanes points (x0, x1, x2) into ph, culled lanes exactly 0.
// Returns whether any lane is nonzero.
template <typename T, int Lanes>
inline bool tile_phi(const GaussParams<T>& gp, const T* x0, const T* x1, const T* x2, bool cull, T* ph) {
  const T m0 = gp.mu[0], m1 = gp.mu[1], m2 = gp.mu[2];
  const T p00 = gp.p[0], p01 = gp.p[1], p02 = gp.p[2], p11 = gp.p[3], p12 = gp.p[4], p22 = gp.p[5];
  const T h0 = gp.h[0], h1 = gp.h[1], h2 = gp.h[2];
  int any = 0;
#pragma omp simd reduction(| : any)
  for (int t = 0; t < Lanes; ++t) {
    const T d0 = x0[t] - m0, d1 = x1[t] - m1, d2 = x2[t] - m2;
    const T q = p00 * d0 * d0 + p11 * d1 * d1 + p22 * d2 * d2 + T(2) * (p01 * d0 * d1 + p02 * d0 * d2 + p12 * d1 * d2);
    const T v = fast_exp(T(-0.5) * q);
    const bool out = cull && (std::fabs(d0) > h0 || std::fabs(d1) > h1 || std::fabs(d2) > h2);
    ph[t] = out ? T(0) : v;
    any |= ph[t] != T(0) ? 1 : 0;
  }
  return any != 0;
}

// The axis-aligned bounding box [lo, hi] of a cloud's N points.
template <typename T>
void cloud_bounds(const T* pts, int64_t N, T lo[3], T hi[3]) {
  for (int i = 0; i < 3; ++i) lo[i] = hi[i] = pts[i];
  for (int64_t n = 1; n < N; ++n)
    for (int i = 0; i < 3; ++i) {
      lo[i] = std::min(lo[i], pts[3 * n + i]);
      hi[i] = std::max(hi[i], pts[3 * n + i]);
    }
}

// Bits 0..9 of v spread to every third bit (bit i to bit 3 i), for Morton codes.
const std::array<uint32_t, 1024>& morton_spread_table() {
  static const std::array<uint32_t, 1024> table = [] {
    std::array<uint32_t, 1024> t{};
    for (uint32_t v = 0; v < 1024; ++v)
      for (int bit = 0; bit < 10; ++bit) t[v] |= ((v >> bit) & 1u) << (3 * bit);
    return t;
  }();
  return table;
}

// Point order for culling: by Morton code of the point in a 1024^3 grid over the cloud's
// bounding box [lo, hi], so that a tile holds nearby points and its bounding box misses most
// boxes. The 30-bit codes are sorted by a stable LSD radix sort in three passes of 10 bits
// (points with equal codes stay in index order), on 64-bit keys (code, index) so that each
// pass moves one word, with the three digit histograms counted in one sweep: std::sort of
// (code, index) pairs took about a tenth of a culled forward at N = 2048.
template <typename T>
void spatial_order(const T* pts, int64_t N, const T lo[3], const T hi[3], int64_t* order) {
  TORCH_CHECK(N <= std::numeric_limits<uint32_t>::max(), "spatial_order: at most 2^32 - 1 points per cloud");
  const auto& spread = morton_spread_table();
  constexpr int kBits = 10, kBuckets = 1 << kBits;
  std::vector<uint64_t> key(N), key_next(N);
  std::vector<uint32_t> count(3 * kBuckets, 0);  // the three digits' histograms
  for (int64_t n = 0; n < N; ++n) {
    uint32_t c = 0;
    for (int i = 0; i < 3; ++i) {
      const T extent = hi[i] - lo[i];
      const T u = extent > T(0) ? (pts[3 * n + i] - lo[i]) / extent : T(0);
      c |= spread[static_cast<uint32_t>(std::min(T(1023), std::max(T(0), u * T(1023))))] << i;
    }
    key[n] = static_cast<uint64_t>(c) << 32 | static_cast<uint64_t>(n);
    for (int d = 0; d < 3; ++d) ++count[d * kBuckets + ((c >> (kBits * d)) & (kBuckets - 1))];
  }
  for (int d = 0; d < 3; ++d) {
    uint32_t* start = count.data() + d * kBuckets;
    uint32_t sum = 0;
    for (int i = 0; i < kBuckets; ++i) sum += std::exchange(start[i], sum);  // counts -> first slot of each bucket
    const int shift = 32 + kBits * d;
    for (int64_t n = 0; n < N; ++n) key_next[start[(key[n] >> shift) & (kBuckets - 1)]++] = key[n];
    key.swap(key_next);
  }
  for (int64_t n = 0; n < N; ++n) order[n] = static_cast<int64_t>(key[n] & 0xffffffffu);
}

// Whether culling can drop a (point, Gaussian) pair of this cloud beyond the Gaussians
// dropped everywhere: false when every other box holds the cloud's bounding box (then every
// point passes every per-point test, rounding being monotonic), and the spatial order,
// which only serves to skip boxes per tile, would be pure overhead.
template <typename T>
bool culling_bites(const T lo[3], const T hi[3], const std::vector<GaussParams<T>>& gps) {
  for (const auto& gp : gps) {
    if (gp.h[0] < 0) continue;  // dropped everywhere, by the tile test
    for (int i = 0; i < 3; ++i)
      if (!(std::fabs(lo[i] - gp.mu[i]) <= gp.h[i] && std::fabs(hi[i] - gp.mu[i]) <= gp.h[i])) return true;
  }
  return false;
}

// One work item of the forward: cloud b, points [n0, n1). Writes either the chunk's
// max/arg-max per channel (reduce max) or the rows of out (reduce none).
template <typename T>
void forward_item(const T* pts, const int64_t* order, int64_t n0, int64_t n1, const std::vector<GaussParams<T>>& gps,
                  const T* wt, const T* bias, int64_t G, int64_t K, bool cull, bool reduce_max, T* out_max,
                  int64_t* out_idx, T* out_rows, T* phi, int64_t* active) {
  constexpr int Tile = Blocking<T>::Tile;
  constexpr int KB = Blocking<T>::KB;
  alignas(64) T x0[Tile], x1[Tile], x2[Tile];
  int64_t lane_idx[Tile];  // each lane's point index in the cloud
  if (reduce_max) {
    for (int64_t k = 0; k < K; ++k) {
      out_max[k] = -std::numeric_limits<T>::infinity();
      out_idx[k] = std::numeric_limits<int64_t>::max();
    }
  }
  for (const int64_t tile : tile_visit_order(n0, n1 - n0, Tile, reduce_max)) {
    const int64_t t0 = n0 + tile * Tile;
    const int m = static_cast<int>(std::min<int64_t>(Tile, n1 - t0));
    const int64_t tile_min_idx = load_tile<T, Tile>(pts, order, t0, m, lane_idx, x0, x1, x2);
    int64_t na = 0;
    if (cull) {
      T lo[3], hi[3];
      tile_bounds(x0, x1, x2, m, lo, hi);
      for (int64_t g = 0; g < G; ++g)
        if (!culled_for_box(gps[g], lo, hi)) active[na++] = g;
    } else {
      for (int64_t g = 0; g < G; ++g) active[na++] = g;
    }
    // phi for the active Gaussians over the tile's lanes. A Gaussian that is zero on every
    // lane (culled per point, or exp underflow) is dropped from the list: its products are
    // exact zeros, so the mix is the same without them.
    int64_t nz = 0;
    for (int64_t a = 0; a < na; ++a)
      if (tile_phi<T, Tile>(gps[active[a]], x0, x1, x2, cull, phi + nz * Tile)) active[nz++] = active[a];
    na = nz;
    if (na == 0 && reduce_max) {
      // Every lane is bias: fold bias[k] at the tile's lowest point index, no mixing.
      for (int64_t kk = 0; kk < K; ++kk) {
        const T v = bias[kk];
        if (v > out_max[kk] || (v == out_max[kk] && tile_min_idx < out_idx[kk])) {
          out_max[kk] = v;
          out_idx[kk] = tile_min_idx;
        }
      }
      continue;
    }
    // Mix: blocks of KB channels x Tile lanes in registers.
    const int64_t k_full = K / KB * KB;
    int64_t k = 0;
    for (; k + KB <= K; k += KB) {
      alignas(64) T acc[KB][Tile];
      for (int j = 0; j < KB; ++j) {
        const T bj = bias[k + j];
#pragma omp simd
        for (int t = 0; t < Tile; ++t) acc[j][t] = bj;
      }
      for (int64_t a = 0; a < na; ++a) {
        const T* ph = phi + a * Tile;
        const T* w = wt + k * G + active[a] * KB;  // block k / KB of the packed mixer
#pragma GCC unroll 8
        for (int j = 0; j < KB; ++j) {
          const T wj = w[j];
#pragma omp simd
          for (int t = 0; t < Tile; ++t) acc[j][t] += wj * ph[t];
        }
      }
      for (int j = 0; j < KB; ++j) {
        if (reduce_max) {
          fold_tile(acc[j], lane_idx, tile_min_idx, out_max[k + j], out_idx[k + j]);
        } else {
          for (int t = 0; t < m; ++t) out_rows[lane_idx[t] * K + k + j] = acc[j][t];
        }
      }
    }
    for (; k < K; ++k) {  // channel tail, one at a time
      alignas(64) T acc[Tile];
      for (int t = 0; t < Tile; ++t) acc[t] = bias[k];
      for (int64_t a = 0; a < na; ++a) {
        const T* ph = phi + a * Tile;
        const T wk = wt[k_full * G + active[a] * (K - k_full) + (k - k_full)];
#pragma omp simd
        for (int t = 0; t < Tile; ++t) acc[t] += wk * ph[t];
      }
      if (reduce_max) {
        fold_tile(acc, lane_idx, tile_min_idx, out_max[k], out_idx[k]);
      } else {
        for (int t = 0; t < m; ++t) out_rows[lane_idx[t] * K + k] = acc[t];
      }
    }
  }
}

// Register tiling of forward_item_f32 (below): kTilePts points x kBlockCh channels, two vectors
// of channels per point. AVX-512: 8 x 32, 16 of its 32 registers. AVX2: 6 x 16, 12 of its 16,
// with two more for the weights and one for the broadcast phi.
#ifdef __AVX512F__
constexpr int kTilePts = 8;
constexpr int kBlockCh = 32;
#else
constexpr int kTilePts = 6;
constexpr int kBlockCh = 16;
#endif
constexpr int kPhiLanes = 8;     // phi per Gaussian on 8 lanes: the tile's points, padded with its first
constexpr int kGroupTiles = 32;  // tiles sharing one pass over the mixer

// The mixer W (K, G) as blocks of `block` channels, zero-padded to whole blocks, for
// forward_item_f32: block c, Gaussian g at (c * G + g) * block.
template <typename T>
std::vector<T> pack_mixer_channel_blocks(const T* weight, int64_t G, int64_t K, int64_t block) {
  const int64_t blocks = (K + block - 1) / block;
  std::vector<T> packed(blocks * G * block, T(0));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t g = 0; g < G; ++g) packed[(k / block * G + g) * block + k % block] = weight[k * G + g];
  return packed;
}

#ifdef LUCIDOPS_CHANNEL_LANES
// ------------------------------------------------- float32 forward, channels in the lanes
// A second register layout for float32 on AVX-512 and AVX2: lanes hold channels, and the
// register tile is kTilePts points x kBlockCh channels. The portable forward_item puts points
// in the lanes (tiles of 32 or 16 points); this one wins twice. The max over points is vertical
// (a few vector maxima and one compare per vector of channels, where lanes-as-points needs a
// horizontal reduction per channel), and culling drops Gaussians per 8 or 6 points instead of
// per 32 or 16: on trained Gaussians a tile of 8 reaches 13 of 32 where a tile of 32 reaches
// 16.5. Tiles are taken in groups that share one pass over the mixer, so each block of its
// weights is read from L1 by every tile of the group.

struct PointTile {
  int64_t lane_idx[kPhiLanes];  // each lane's point index in the cloud (padding repeats lane 0)
  int64_t min_idx;              // the lowest point index of the tile
  int m;                        // points in the tile
  int na;                       // Gaussians with a nonzero phi somewhere in the tile
};

// Loads the tile's points and writes phi (na x kPhiLanes, Gaussian-major) for the Gaussians that
// reach the tile: with culling, those whose box meets the tile's bounding box, then (as in
// forward_item) only those nonzero on some lane.
inline void prepare_tile(const float* pts, const int64_t* order, int64_t t0, int m, const std::vector<GaussParams<float>>& gps,
                         bool cull, PointTile& tile, float* phi, int32_t* active) {
  alignas(32) float x0[kPhiLanes], x1[kPhiLanes], x2[kPhiLanes];
  tile.m = m;
  tile.min_idx = load_tile<float, kPhiLanes>(pts, order, t0, m, tile.lane_idx, x0, x1, x2);
  float lo[3], hi[3];
  if (cull) tile_bounds(x0, x1, x2, m, lo, hi);
  int na = 0;
  for (int32_t g = 0; g < static_cast<int32_t>(gps.size()); ++g) {
    if (cull && culled_for_box(gps[g], lo, hi)) continue;
    if (tile_phi<float, kPhiLanes>(gps[g], x0, x1, x2, cull, phi + na * kPhiLanes)) active[na++] = g;
  }
  tile.na = na;
}

// Named registers for the tile's points, not arrays: GCC kept an array of vectors in memory
// and stored every accumulator on every step of the mix.
#ifdef __AVX512F__
#define LUCIDOPS_POINTS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#else
#define LUCIDOPS_POINTS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#endif
#define LUCIDOPS_COUNT(p) +1
static_assert(kTilePts == 0 LUCIDOPS_POINTS(LUCIDOPS_COUNT), "LUCIDOPS_POINTS names every point of a tile");
#undef LUCIDOPS_COUNT

#ifdef __AVX512F__
// Which of 16 channels can change their running max (best, best_idx) given the tile's
// per-channel max mx. A lane equal to a running max can win only where the running arg-max
// is above the tile's lowest point index: with culling, points that every box misses hold
// exactly the bias, often a channel's max, and '>=' everywhere would send those channels to
// the index search on nearly every tile.
__attribute__((always_inline)) inline __mmask16 reaching_channels(__m512 mx, const PointTile& tile, const float* best,
                                                                const int64_t* best_idx) {
  const __m512 bv = _mm512_loadu_ps(best);
  const __m512i lowest = _mm512_set1_epi64(tile.min_idx);
  const __mmask16 tie = static_cast<__mmask16>(_mm512_cmplt_epi64_mask(lowest, _mm512_loadu_si512(best_idx)) |
                                               _mm512_cmplt_epi64_mask(lowest, _mm512_loadu_si512(best_idx + 8)) << 8);
  return _mm512_cmp_ps_mask(mx, bv, _CMP_GT_OQ) | _mm512_mask_cmp_ps_mask(tie, mx, bv, _CMP_GE_OQ);
}

// The index search for the channels in `hit`, all 16 at once: vals[p] holds the channels at
// the tile's point p, mx their max over the points. Per channel, the lowest point index
// attaining mx, and the running max takes it if mx is larger or that index lower.
__attribute__((always_inline)) inline void fold_hits(const float (&vals)[kTilePts][16], __m512 mx, __mmask16 hit,
                                                     const PointTile& tile, float* best, int64_t* best_idx) {
  __m512i idx_lo = _mm512_set1_epi64(std::numeric_limits<int64_t>::max()), idx_hi = idx_lo;
  for (int p = 0; p < kTilePts; ++p) {
    const __mmask16 eq = _mm512_mask_cmp_ps_mask(hit, _mm512_load_ps(vals[p]), mx, _CMP_EQ_OQ);
    const __m512i lane = _mm512_set1_epi64(tile.lane_idx[p]);
    idx_lo = _mm512_mask_min_epi64(idx_lo, static_cast<__mmask8>(eq), idx_lo, lane);
    idx_hi = _mm512_mask_min_epi64(idx_hi, static_cast<__mmask8>(eq >> 8), idx_hi, lane);
  }
  const __mmask16 larger = _mm512_mask_cmp_ps_mask(hit, mx, _mm512_loadu_ps(best), _CMP_GT_OQ);
  const __mmask16 lower = static_cast<__mmask16>(_mm512_cmplt_epi64_mask(idx_lo, _mm512_loadu_si512(best_idx)) |
                                                 _mm512_cmplt_epi64_mask(idx_hi, _mm512_loadu_si512(best_idx + 8)) << 8);
  const __mmask16 update = larger | (hit & lower);
  _mm512_mask_storeu_ps(best, update, mx);
  _mm512_mask_storeu_epi64(best_idx, static_cast<__mmask8>(update), idx_lo);
  _mm512_mask_storeu_epi64(best_idx + 8, static_cast<__mmask8>(update >> 8), idx_hi);
}

// Mixes one tile into one block of kBlockCh channels (wb: the block's packed weights, bias:
// its biases) and folds the result into the block's running maxima best / best_idx (reduce
// max) or writes it to channels k0.. of the tile's rows of out_rows.
__attribute__((always_inline)) inline void mix_block(const PointTile& tile, const float* phi, const int32_t* active,
                                                     const float* wb, const float* bias, bool reduce_max, float* best,
                                                     int64_t* best_idx, float* out_rows, int64_t K, int64_t k0) {
  const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
#define LUCIDOPS_DECLARE(p) __m512 lo##p = b0, hi##p = b1;
  LUCIDOPS_POINTS(LUCIDOPS_DECLARE)
  for (int a = 0; a < tile.na; ++a) {
    const float* w = wb + active[a] * kBlockCh;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    const float* f = phi + a * kPhiLanes;
#define LUCIDOPS_MIX(p)                     \
  {                                         \
    const __m512 fp = _mm512_set1_ps(f[p]); \
    lo##p = _mm512_fmadd_ps(w0, fp, lo##p); \
    hi##p = _mm512_fmadd_ps(w1, fp, hi##p); \
  }
    LUCIDOPS_POINTS(LUCIDOPS_MIX)
  }
  if (reduce_max) {
#define LUCIDOPS_MAX(v) \
  _mm512_max_ps(_mm512_max_ps(_mm512_max_ps(v##0, v##1), _mm512_max_ps(v##2, v##3)), _mm512_max_ps(_mm512_max_ps(v##4, v##5), _mm512_max_ps(v##6, v##7)))
#define LUCIDOPS_STORE_LO(p) _mm512_store_ps(vals[p], lo##p);
#define LUCIDOPS_STORE_HI(p) _mm512_store_ps(vals[p], hi##p);
    const __m512 mx_lo = LUCIDOPS_MAX(lo), mx_hi = LUCIDOPS_MAX(hi);
    const __mmask16 hit_lo = reaching_channels(mx_lo, tile, best, best_idx);
    const __mmask16 hit_hi = reaching_channels(mx_hi, tile, best + 16, best_idx + 16);
    alignas(64) float vals[kTilePts][16];
    if (hit_lo) {
      LUCIDOPS_POINTS(LUCIDOPS_STORE_LO)
      fold_hits(vals, mx_lo, hit_lo, tile, best, best_idx);
    }
    if (hit_hi) {
      LUCIDOPS_POINTS(LUCIDOPS_STORE_HI)
      fold_hits(vals, mx_hi, hit_hi, tile, best + 16, best_idx + 16);
    }
  } else {
    const int64_t valid = std::min<int64_t>(kBlockCh, K - k0);
    const __mmask16 m0 = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
    const __mmask16 m1 = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : static_cast<__mmask16>((1u << (valid - 16)) - 1);
    alignas(64) float vals[2][kTilePts][16];
#define LUCIDOPS_STORE_BOTH(p) _mm512_store_ps(vals[0][p], lo##p); _mm512_store_ps(vals[1][p], hi##p);
    LUCIDOPS_POINTS(LUCIDOPS_STORE_BOTH)
    for (int p = 0; p < tile.m; ++p) {
      float* row = out_rows + tile.lane_idx[p] * K + k0;
      _mm512_mask_storeu_ps(row, m0, _mm512_load_ps(vals[0][p]));
      _mm512_mask_storeu_ps(row + 16, m1, _mm512_load_ps(vals[1][p]));
    }
  }
}
#else  // AVX2 with FMA
// Which of 8 channels can change their running max (best, best_idx) given the tile's
// per-channel max mx, as a bit mask: above the running max, or equal to it where the tile's
// lowest point index is below the running arg-max (see the AVX-512 version). The tie test,
// on 64-bit indices, runs only when some lane is equal.
__attribute__((always_inline)) inline int reaching_channels(__m256 mx, const PointTile& tile, const float* best,
                                                          const int64_t* best_idx) {
  const __m256 bv = _mm256_loadu_ps(best);
  const int above = _mm256_movemask_ps(_mm256_cmp_ps(mx, bv, _CMP_GT_OQ));
  const int equal = _mm256_movemask_ps(_mm256_cmp_ps(mx, bv, _CMP_EQ_OQ));
  if (equal == 0) return above;
  const __m256i lowest = _mm256_set1_epi64x(tile.min_idx);
  auto above_lowest = [&](const int64_t* idx) {  // 4 bits: idx[j] > tile.min_idx
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
    return _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(v, lowest)));
  };
  const int tie = above_lowest(best_idx) | above_lowest(best_idx + 4) << 4;
  return above | (equal & tie);
}

// The index search for the channels in `hit`, one at a time (after the first tiles few
// channels reach their max): vals[p] holds the 8 channels at the tile's point p, mx their
// max over the points. Per channel, the lowest point index attaining mx, and the running max
// takes it if mx is larger or that index lower.
inline void fold_hits(const float (&vals)[kTilePts][8], __m256 mx, int hit, const PointTile& tile, float* best,
                      int64_t* best_idx) {
  alignas(32) float top[8];
  _mm256_store_ps(top, mx);
  for (; hit != 0; hit &= hit - 1) {
    const int j = __builtin_ctz(static_cast<unsigned>(hit));
    int64_t idx = std::numeric_limits<int64_t>::max();
    for (int p = 0; p < kTilePts; ++p)
      if (vals[p][j] == top[j]) idx = std::min(idx, tile.lane_idx[p]);
    if (top[j] > best[j] || idx < best_idx[j]) {
      best[j] = top[j];
      best_idx[j] = idx;
    }
  }
}

// Mixes one tile into one block of kBlockCh channels (wb: the block's packed weights, bias:
// its biases) and folds the result into the block's running maxima best / best_idx (reduce
// max) or writes it to channels k0.. of the tile's rows of out_rows.
__attribute__((always_inline)) inline void mix_block(const PointTile& tile, const float* phi, const int32_t* active,
                                                     const float* wb, const float* bias, bool reduce_max, float* best,
                                                     int64_t* best_idx, float* out_rows, int64_t K, int64_t k0) {
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
#define LUCIDOPS_DECLARE(p) __m256 lo##p = b0, hi##p = b1;
  LUCIDOPS_POINTS(LUCIDOPS_DECLARE)
  for (int a = 0; a < tile.na; ++a) {
    const float* w = wb + active[a] * kBlockCh;
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
    const float* f = phi + a * kPhiLanes;
#define LUCIDOPS_MIX(p)                          \
  {                                              \
    const __m256 fp = _mm256_broadcast_ss(f + p); \
    lo##p = _mm256_fmadd_ps(w0, fp, lo##p);      \
    hi##p = _mm256_fmadd_ps(w1, fp, hi##p);      \
  }
    LUCIDOPS_POINTS(LUCIDOPS_MIX)
  }
  if (reduce_max) {
#define LUCIDOPS_MAX(v) \
  _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(v##0, v##1), _mm256_max_ps(v##2, v##3)), _mm256_max_ps(v##4, v##5))
#define LUCIDOPS_STORE_LO(p) _mm256_store_ps(vals[p], lo##p);
#define LUCIDOPS_STORE_HI(p) _mm256_store_ps(vals[p], hi##p);
    const __m256 mx_lo = LUCIDOPS_MAX(lo), mx_hi = LUCIDOPS_MAX(hi);
    const int hit_lo = reaching_channels(mx_lo, tile, best, best_idx);
    const int hit_hi = reaching_channels(mx_hi, tile, best + 8, best_idx + 8);
    alignas(32) float vals[kTilePts][8];
    if (hit_lo) {
      LUCIDOPS_POINTS(LUCIDOPS_STORE_LO)
      fold_hits(vals, mx_lo, hit_lo, tile, best, best_idx);
    }
    if (hit_hi) {
      LUCIDOPS_POINTS(LUCIDOPS_STORE_HI)
      fold_hits(vals, mx_hi, hit_hi, tile, best + 8, best_idx + 8);
    }
  } else {
    const int64_t valid = std::min<int64_t>(kBlockCh, K - k0);
    alignas(32) float vals[kTilePts][kBlockCh];
#define LUCIDOPS_STORE_BOTH(p) _mm256_store_ps(vals[p], lo##p); _mm256_store_ps(vals[p] + 8, hi##p);
    LUCIDOPS_POINTS(LUCIDOPS_STORE_BOTH)
    for (int p = 0; p < tile.m; ++p) std::copy(vals[p], vals[p] + valid, out_rows + tile.lane_idx[p] * K + k0);
  }
}
#endif
#undef LUCIDOPS_POINTS
#undef LUCIDOPS_DECLARE
#undef LUCIDOPS_MIX
#undef LUCIDOPS_MAX
#undef LUCIDOPS_STORE_LO
#undef LUCIDOPS_STORE_HI
#undef LUCIDOPS_STORE_BOTH

// Scratch of one thread for forward_item_f32.
struct TileScratch {
  std::vector<float> phi;        // kGroupTiles x G x kPhiLanes
  std::vector<int32_t> active;   // kGroupTiles x G
  std::vector<float> best;       // running maxima, padded to whole channel blocks
  std::vector<int64_t> best_idx;
  TileScratch(int64_t G, int64_t k_padded)
      : phi(kGroupTiles * std::max<int64_t>(G, 1) * kPhiLanes), active(kGroupTiles * std::max<int64_t>(G, 1)),
        best(k_padded), best_idx(k_padded) {}
};

// forward_item for float32 with channels in the lanes (same arguments and results; wblocks
// from pack_mixer_channel_blocks, bias zero-padded to whole blocks).
void forward_item_f32(const float* pts, const int64_t* order, int64_t n0, int64_t n1,
                      const std::vector<GaussParams<float>>& gps, const float* wblocks, const float* bias_padded,
                      int64_t K, bool cull, bool reduce_max, float* out_max, int64_t* out_idx, float* out_rows,
                      TileScratch& scratch) {
  const int64_t G = static_cast<int64_t>(gps.size());
  const int64_t blocks = (K + kBlockCh - 1) / kBlockCh;
  float* best = scratch.best.data();
  int64_t* best_idx = scratch.best_idx.data();
  if (reduce_max) {
    std::fill(scratch.best.begin(), scratch.best.end(), -std::numeric_limits<float>::infinity());
    std::fill(scratch.best_idx.begin(), scratch.best_idx.end(), std::numeric_limits<int64_t>::max());
  }
  const std::vector<int64_t> tile_order = tile_visit_order(n0, n1 - n0, kTilePts, reduce_max);
  const int64_t tiles = static_cast<int64_t>(tile_order.size());
  PointTile group[kGroupTiles];
  for (int64_t g0 = 0; g0 < tiles; g0 += kGroupTiles) {
    const int gn = static_cast<int>(std::min<int64_t>(kGroupTiles, tiles - g0));
    for (int i = 0; i < gn; ++i) {
      const int64_t t0 = n0 + tile_order[g0 + i] * kTilePts;
      prepare_tile(pts, order, t0, static_cast<int>(std::min<int64_t>(kTilePts, n1 - t0)), gps, cull, group[i],
                   scratch.phi.data() + i * G * kPhiLanes, scratch.active.data() + i * G);
    }
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const int64_t k0 = cb * kBlockCh;
      for (int i = 0; i < gn; ++i)
        mix_block(group[i], scratch.phi.data() + i * G * kPhiLanes, scratch.active.data() + i * G,
                  wblocks + cb * G * kBlockCh, bias_padded + k0, reduce_max, best + k0, best_idx + k0, out_rows, K, k0);
    }
  }
  if (reduce_max) {
    std::copy(best, best + K, out_max);
    std::copy(best_idx, best_idx + K, out_idx);
  }
}
#endif

// The mixer W (K, G) packed for forward_item: for each block of KB channels, G rows of KB
// weights (block b, Gaussian g at (b * G + g) * KB), then the K % KB tail channels as (G, tail).
// One block's weights for every Gaussian then fill G * KB contiguous values. A plain (G, K)
// transpose puts the rows a block reads K values apart: at K = 1024 that is 4 KiB, so they all
// fall in one L1 set and evict each other.
template <typename T>
std::vector<T> pack_mixer(const T* weight, int64_t G, int64_t K, int64_t KB) {
  const int64_t k_full = K / KB * KB, tail = K - k_full;
  std::vector<T> packed(G * K);
  for (int64_t k = 0; k < k_full; ++k)
    for (int64_t g = 0; g < G; ++g) packed[(k / KB * G + g) * KB + k % KB] = weight[k * G + g];
  for (int64_t k = k_full; k < K; ++k)
    for (int64_t g = 0; g < G; ++g) packed[k_full * G + g * tail + (k - k_full)] = weight[k * G + g];
  return packed;
}

// Runs fn(begin, end) over [0, items) on the intra-op threads, handing out one item at a time
// from a shared counter: culled items differ in cost (a cloud whose points sit inside few boxes
// is cheap), and a fixed share per thread leaves one thread idle while another finishes. At
// most one thread per kMinParallelWork of ``work`` (all items together, dense).
template <typename Fn>
void for_each_item(int64_t items, int64_t work, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(
      1, std::min({items, static_cast<int64_t>(at::get_num_threads()), work / kMinParallelWork}));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t item = next++; item < items; item = next++) fn(item, item + 1);
  });
}

template <typename T>
void forward_impl(const T* pts, const T* means, const T* prec, const T* weight, const T* bias, const T* half,
                  int64_t B, int64_t N, int64_t G, int64_t K, bool cull, bool reduce_max, T* out, int64_t* argmax) {
  const auto gps = unpack(means, prec, half, G);
  // float32 on AVX-512 and AVX2 takes forward_item_f32 (channels in the lanes), the rest forward_item.
#ifdef LUCIDOPS_CHANNEL_LANES
  constexpr bool kChannelLanes = std::is_same<T, float>::value;
#else
  constexpr bool kChannelLanes = false;
#endif
  constexpr int kTile = kChannelLanes ? kTilePts : Blocking<T>::Tile;  // points per tile
  const int64_t k_padded = (K + kBlockCh - 1) / kBlockCh * kBlockCh;
  const auto wt = kChannelLanes ? pack_mixer_channel_blocks(weight, G, K, kBlockCh) : pack_mixer(weight, G, K, Blocking<T>::KB);
  std::vector<T> bias_padded(kChannelLanes ? k_padded : 0, T(0));  // zero channels up to whole blocks
  std::copy(bias, bias + (kChannelLanes ? K : 0), bias_padded.begin());
  // About four work items per thread in all, chunks of at least kMinChunk points.
  const int64_t want = (4 * static_cast<int64_t>(at::get_num_threads()) + B - 1) / std::max<int64_t>(B, 1);
  const int64_t chunk = std::max<int64_t>(kMinChunk, (N + want - 1) / std::max<int64_t>(want, 1));
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int64_t items = B * chunks;
  // Per-item maxima when a cloud spans several chunks; merged in point order below.
  std::vector<T> part_max(reduce_max && chunks > 1 ? items * K : 0);
  std::vector<int64_t> part_idx(part_max.size());
  // Culling pays off only when a tile's points are close together: visit them in spatial order.
  // With one chunk per cloud its work item sorts it: one parallel region less (each costs a
  // barrier, and a time slice when the cores are oversubscribed).
  std::vector<int64_t> order(cull && N > kTile ? B * N : 0);
  std::vector<char> sorted(order.empty() ? 0 : B, 0);  // per cloud: visit in spatial order
  auto sort_cloud = [&](int64_t b) {
    T lo[3], hi[3];
    cloud_bounds(pts + b * N * 3, N, lo, hi);
    sorted[b] = culling_bites(lo, hi, gps);
    if (sorted[b]) spatial_order(pts + b * N * 3, N, lo, hi, order.data() + b * N);
  };
  if (!order.empty() && chunks > 1) {
    at::parallel_for(0, B, grain_for(N * 16), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) sort_cloud(b);
    });
  }
  for_each_item(items, B * N * G * (K + 20), [&](int64_t begin, int64_t end) {
    // float32 only: float64 keeps its subnormals, as the reference does (flushing them moved a
    // channel with weights near 1e300 from 2.3e-9 to 0).
    std::optional<FlushSubnormals> flush;
    if constexpr (std::is_same<T, float>::value) flush.emplace();
    std::vector<T> phi(kChannelLanes ? 0 : std::max<int64_t>(G, 1) * Blocking<T>::Tile);
    std::vector<int64_t> active(kChannelLanes ? 0 : std::max<int64_t>(G, 1));
#ifdef LUCIDOPS_CHANNEL_LANES
    TileScratch scratch(kChannelLanes ? G : 0, kChannelLanes ? k_padded : 0);
#endif
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, c = item % chunks;
      if (!order.empty() && chunks == 1) sort_cloud(b);
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      T* omax = nullptr;
      int64_t* oidx = nullptr;
      T* rows = nullptr;
      if (reduce_max) {
        omax = chunks > 1 ? part_max.data() + item * K : out + b * K;
        oidx = chunks > 1 ? part_idx.data() + item * K : argmax + b * K;
      } else {
        rows = out + b * N * K;
      }
      const int64_t* cloud_order = order.empty() || !sorted[b] ? nullptr : order.data() + b * N;
#ifdef LUCIDOPS_CHANNEL_LANES
      if constexpr (kChannelLanes) {
        forward_item_f32(pts + b * N * 3, cloud_order, n0, n1, gps, wt.data(), bias_padded.data(), K, cull, reduce_max,
                         omax, oidx, rows, scratch);
      } else
#endif
      {
        forward_item<T>(pts + b * N * 3, cloud_order, n0, n1, gps, wt.data(), bias, G, K, cull, reduce_max, omax, oidx,
                        rows, phi.data(), active.data());
      }
    }
  });
  if (reduce_max && chunks > 1) {
    at::parallel_for(0, B, grain_for(chunks * K), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t kk = 0; kk < K; ++kk) {
          T best = part_max[(b * chunks) * K + kk];
          int64_t idx = part_idx[(b * chunks) * K + kk];
          for (int64_t c = 1; c < chunks; ++c) {
            const T v = part_max[(b * chunks + c) * K + kk];
            const int64_t i = part_idx[(b * chunks + c) * K + kk];
            if (v > best || (v == best && i < idx)) {
              best = v;
              idx = i;
            }
          }
          out[b * K + kk] = best;
          argmax[b * K + kk] = idx;
        }
      }
    });
  }
}

// Backward of reduce max. grad (B, K), argmax (B, K).
template <typename T>
void backward_max_impl(const T* grad, const T* pts, const T* means, const T* prec, const T* weight, const T* half,
                       const int64_t* argmax, int64_t B, int64_t N, int64_t G, int64_t K, bool cull, T* g_pts,
                       T* g_means, T* g_prec, T* g_weight, T* g_bias) {
  const auto gps = unpack(means, prec, half, G);
  // Pass 0, over clouds: phi at each distinct arg-max point, once. Many channels share an
  // arg-max point, and both passes below need phi there: this is most of the exps.
  // slot[b * K + k] is the row of channel k's arg-max point in the table of cloud b.
  const int64_t rows = std::min(N, K);
  std::vector<T> phi_tab(B * rows * G);
  std::vector<int64_t> slot(B * K);
  at::parallel_for(0, B, grain_for(rows * G * 30), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> row_of(N);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(row_of.begin(), row_of.end(), -1);
      int64_t used = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = argmax[b * K + k];
        if (row_of[n] < 0) {
          row_of[n] = used;
          T* ph = phi_tab.data() + (b * rows + used) * G;
          T d[3];
          for (int64_t g = 0; g < G; ++g) ph[g] = phi_at(gps[g], pts + (b * N + n) * 3, cull, d);
          ++used;
        }
        slot[b * K + k] = b * rows + row_of[n];
      }
    }
  });
  auto phi_of = [&](int64_t b, int64_t k) { return phi_tab.data() + slot[b * K + k] * G; };
  // Pass 1, over channels: grad_weight[k, g] = sum_b gy phi_g(x*), grad_bias[k] = sum_b gy.
  at::parallel_for(0, K, grain_for(B * G * 2), [&](int64_t begin, int64_t end) {
    std::vector<double> acc(G);
    for (int64_t k = begin; k < end; ++k) {
      std::fill(acc.begin(), acc.end(), 0.0);
      double gb = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const T gy = grad[b * K + k];
        gb += gy;
        if (gy == T(0)) continue;
        const T* ph = phi_of(b, k);
        for (int64_t g = 0; g < G; ++g) acc[g] += static_cast<double>(gy * ph[g]);
      }
      for (int64_t g = 0; g < G; ++g) g_weight[k * G + g] = static_cast<T>(acc[g]);
      g_bias[k] = static_cast<T>(gb);
    }
  });
  // Pass 2, over clouds, vectorised over the Gaussians: c_g = gy W[k,g] phi_g(x*) at channel
  // k's arg-max point x*, d = x* - mu_g; dmu_g += c P_g d, dP_g += -c/2 dq/dP, and x* gets
  // -sum_g c P_g d. A cloud owns its points; the Gaussians' gradients are summed per cloud and
  // the clouds added in order below, so the result does not depend on the thread count.
  // Parameters as rows of G (mu0, mu1, mu2, p00, p01, p02, p11, p12, p22) for the vector loop.
  std::vector<T> rows_of(9 * G);
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < 3; ++i) rows_of[i * G + g] = gps[g].mu[i];
    for (int i = 0; i < 6; ++i) rows_of[(3 + i) * G + g] = gps[g].p[i];
  }
  std::vector<double> per_cloud(B * 9 * G, 0.0);  // cloud b: rows dmu0..2, dp00..dp22 of G
  at::parallel_for(0, B, grain_for(K * G * 30), [&](int64_t begin, int64_t end) {
    std::vector<double> gx;
    const T *mu0 = rows_of.data(), *mu1 = mu0 + G, *mu2 = mu1 + G, *p00 = mu2 + G, *p01 = p00 + G, *p02 = p01 + G,
            *p11 = p02 + G, *p12 = p11 + G, *p22 = p12 + G;
    for (int64_t b = begin; b < end; ++b) {
      gx.assign(N * 3, 0.0);
      double* acc = per_cloud.data() + b * 9 * G;
      for (int64_t k = 0; k < K; ++k) {
        const T gy = grad[b * K + k];
        if (gy == T(0)) continue;
        const int64_t n = argmax[b * K + k];
        const T x0 = pts[(b * N + n) * 3], x1 = pts[(b * N + n) * 3 + 1], x2 = pts[(b * N + n) * 3 + 2];
        const T* ph = phi_of(b, k);
        const T* w = weight + k * G;
        double s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
        for (int64_t g = 0; g < G; ++g) {
          const T c = gy * w[g] * ph[g];  // 0 for culled pairs, not skipped: no branch to mispredict
          const T d0 = x0 - mu0[g], d1 = x1 - mu1[g], d2 = x2 - mu2[g];
          const T q0 = c * (p00[g] * d0 + p01[g] * d1 + p02[g] * d2);
          const T q1 = c * (p01[g] * d0 + p11[g] * d1 + p12[g] * d2);
          const T q2 = c * (p02[g] * d0 + p12[g] * d1 + p22[g] * d2);
          const T hc = T(-0.5) * c;
          acc[0 * G + g] += q0;
          acc[1 * G + g] += q1;
          acc[2 * G + g] += q2;
          acc[3 * G + g] += hc * d0 * d0;
          acc[4 * G + g] += hc * T(2) * d0 * d1;
          acc[5 * G + g] += hc * T(2) * d0 * d2;
          acc[6 * G + g] += hc * d1 * d1;
          acc[7 * G + g] += hc * T(2) * d1 * d2;
          acc[8 * G + g] += hc * d2 * d2;
          s0 += q0;
          s1 += q1;
          s2 += q2;
        }
        gx[n * 3 + 0] -= s0;
        gx[n * 3 + 1] -= s1;
        gx[n * 3 + 2] -= s2;
      }
      for (int64_t i = 0; i < N * 3; ++i) g_pts[b * N * 3 + i] = static_cast<T>(gx[i]);
    }
  });
  at::parallel_for(0, G, grain_for(9 * B), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int r = 0; r < 9; ++r) {
        double sum = 0.0;
        for (int64_t b = 0; b < B; ++b) sum += per_cloud[(b * 9 + r) * G + g];
        (r < 3 ? g_means[g * 3 + r] : g_prec[g * 6 + r - 3]) = static_cast<T>(sum);
      }
  });
}

// phi for M points (M, G), culled pairs 0. Used by the reduce "none" backward.
template <typename T>
void phi_impl(const T* pts, const T* means, const T* prec, const T* half, int64_t M, int64_t G, bool cull, T* out) {
  const auto gps = unpack(means, prec, half, G);
  at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T d[3];
      for (int64_t g = 0; g < G; ++g) out[i * G + g] = phi_at(gps[g], pts + i * 3, cull, d);
    }
  });
}

// Given coef[i, g] = dL/dphi_g(x_i) * phi_g(x_i) for M points: gradients of points, means, precisions.
template <typename T>
void phi_backward_impl(const T* coef, const T* pts, const T* means, const T* prec, int64_t M, int64_t G, T* g_pts,
                       T* g_means, T* g_prec) {
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double gx[3] = {0, 0, 0};
      const T* x = pts + i * 3;
      for (int64_t g = 0; g < G; ++g) {
        const T c = coef[i * G + g];
        if (c == T(0)) continue;
        const T* p = prec + g * 6;
        const T d0 = x[0] - means[g * 3], d1 = x[1] - means[g * 3 + 1], d2 = x[2] - means[g * 3 + 2];
        gx[0] -= c * (p[0] * d0 + p[1] * d1 + p[2] * d2);
        gx[1] -= c * (p[1] * d0 + p[3] * d1 + p[4] * d2);
        gx[2] -= c * (p[2] * d0 + p[4] * d1 + p[5] * d2);
      }
      for (int j = 0; j < 3; ++j) g_pts[i * 3 + j] = static_cast<T>(gx[j]);
    }
  });
  at::parallel_for(0, G, grain_for(M * 30), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const T* p = prec + g * 6;
      double gm[3] = {0, 0, 0}, gpr[6] = {0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < M; ++i) {
        const T c = coef[i * G + g];
        if (c == T(0)) continue;
        const T* x = pts + i * 3;
        const T d0 = x[0] - means[g * 3], d1 = x[1] - means[g * 3 + 1], d2 = x[2] - means[g * 3 + 2];
        gm[0] += c * (p[0] * d0 + p[1] * d1 + p[2] * d2);
        gm[1] += c * (p[1] * d0 + p[3] * d1 + p[4] * d2);
        gm[2] += c * (p[2] * d0 + p[4] * d1 + p[5] * d2);
        const T hc = T(-0.5) * c;
        gpr[0] += hc * d0 * d0;
        gpr[1] += hc * T(2) * d0 * d1;
        gpr[2] += hc * T(2) * d0 * d2;
        gpr[3] += hc * d1 * d1;
        gpr[4] += hc * T(2) * d1 * d2;
        gpr[5] += hc * d2 * d2;
      }
      for (int j = 0; j < 3; ++j) g_means[g * 3 + j] = static_cast<T>(gm[j]);
      for (int j = 0; j < 6; ++j) g_prec[g * 6 + j] = static_cast<T>(gpr[j]);
    }
  });
}

void check_params(const at::Tensor& points, const at::Tensor& means, const at::Tensor& precisions,
                  const at::Tensor& half_widths) {
  TORCH_CHECK(points.device().is_cpu(), "lucidops cpu kernel: points must be a CPU tensor");
  TORCH_CHECK(points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble,
              "lucidops cpu gaussian kernel: float32 or float64 only, got ", points.scalar_type());
  const int64_t G = means.size(0);
  TORCH_CHECK(means.dim() == 2 && means.size(1) == 3, "lucidops cpu kernel: means must be (G, 3)");
  TORCH_CHECK(precisions.dim() == 2 && precisions.size(0) == G && precisions.size(1) == 6,
              "lucidops cpu kernel: precisions must be (G, 6)");
  TORCH_CHECK(half_widths.dim() == 2 && half_widths.size(0) == G && half_widths.size(1) == 3,
              "lucidops cpu kernel: half_widths must be (G, 3)");
  for (const at::Tensor* t : {&means, &precisions, &half_widths})
    TORCH_CHECK(t->scalar_type() == points.scalar_type() && t->device().is_cpu(),
                "lucidops cpu kernel: parameters must be CPU tensors of points' dtype");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gaussian_mixture_forward(const at::Tensor& points_in, const at::Tensor& means_in,
                                                            const at::Tensor& precisions_in,
                                                            const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                            const at::Tensor& half_widths_in, bool cull,
                                                            bool reduce_max) {
  check_params(points_in, means_in, precisions_in, half_widths_in);
  TORCH_CHECK(points_in.dim() == 3 && points_in.size(2) == 3, "lucidops cpu kernel: points must be (B, N, 3)");
  const int64_t B = points_in.size(0), N = points_in.size(1), G = means_in.size(0), K = weight_in.size(0);
  TORCH_CHECK(N > 0, "lucidops cpu kernel: N must be > 0");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == G && bias_in.dim() == 1 && bias_in.size(0) == K,
              "lucidops cpu kernel: weight must be (K, G) and bias (K,)");
  TORCH_CHECK(weight_in.scalar_type() == points_in.scalar_type() && bias_in.scalar_type() == points_in.scalar_type(),
              "lucidops cpu kernel: weight and bias must have points' dtype");
  const at::Tensor points = points_in.contiguous(), means = means_in.contiguous(),
                   precisions = precisions_in.contiguous(), weight = weight_in.contiguous(),
                   bias = bias_in.contiguous(), half = half_widths_in.contiguous();
  at::Tensor out = reduce_max ? at::empty({B, K}, points.options()) : at::empty({B, N, K}, points.options());
  at::Tensor argmax = reduce_max ? at::empty({B, K}, points.options().dtype(at::kLong))
                                 : at::empty({0}, points.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "lucidops_gaussian_mixture_forward", [&] {
    forward_impl<scalar_t>(points.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(),
                           precisions.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                           bias.const_data_ptr<scalar_t>(), half.const_data_ptr<scalar_t>(), B, N, G, K, cull,
                           reduce_max, out.mutable_data_ptr<scalar_t>(),
                           reduce_max ? argmax.mutable_data_ptr<int64_t>() : nullptr);
  });
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_mixture_backward_max(
    const at::Tensor& grad_in, const at::Tensor& points_in, const at::Tensor& means_in,
    const at::Tensor& precisions_in, const at::Tensor& weight_in, const at::Tensor& argmax_in,
    const at::Tensor& half_widths_in, bool cull) {
  check_params(points_in, means_in, precisions_in, half_widths_in);
  TORCH_CHECK(points_in.dim() == 3 && points_in.size(2) == 3, "lucidops cpu kernel: points must be (B, N, 3)");
  const int64_t B = points_in.size(0), N = points_in.size(1), G = means_in.size(0), K = weight_in.size(0);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == G && weight_in.scalar_type() == points_in.scalar_type(),
              "lucidops cpu kernel: weight must be (K, G) of points' dtype");
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({B, K}) && grad_in.scalar_type() == points_in.scalar_type(),
              "lucidops cpu kernel: grad must be (B, K) of points' dtype");
  TORCH_CHECK(argmax_in.sizes() == at::IntArrayRef({B, K}) && argmax_in.scalar_type() == at::kLong,
              "lucidops cpu kernel: argmax must be (B, K) int64");
  const at::Tensor grad = grad_in.contiguous(), points = points_in.contiguous(), means = means_in.contiguous(),
                   precisions = precisions_in.contiguous(), weight = weight_in.contiguous(),
                   argmax = argmax_in.contiguous(), half = half_widths_in.contiguous();
  // Out-of-range indices would read out of bounds: check them (cheap, B*K).
  if (argmax.numel() > 0) {
    TORCH_CHECK(argmax.min().item<int64_t>() >= 0 && argmax.max().item<int64_t>() < N,
                "lucidops cpu kernel: argmax out of range");
  }
  at::Tensor g_pts = at::empty_like(points), g_means = at::empty_like(means), g_prec = at::empty_like(precisions),
             g_weight = at::empty_like(weight), g_bias = at::empty({K}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "lucidops_gaussian_mixture_backward", [&] {
    backward_max_impl<scalar_t>(grad.const_data_ptr<scalar_t>(), points.const_data_ptr<scalar_t>(),
                                means.const_data_ptr<scalar_t>(), precisions.const_data_ptr<scalar_t>(),
                                weight.const_data_ptr<scalar_t>(), half.const_data_ptr<scalar_t>(),
                                argmax.const_data_ptr<int64_t>(), B, N, G, K, cull,
                                g_pts.mutable_data_ptr<scalar_t>(), g_means.mutable_data_ptr<scalar_t>(),
                                g_prec.mutable_data_ptr<scalar_t>(), g_weight.mutable_data_ptr<scalar_t>(),
                                g_bias.mutable_data_ptr<scalar_t>());
  });
  return {g_pts, g_means, g_prec, g_weight, g_bias};
}

at::Tensor gaussian_phi(const at::Tensor& points_in, const at::Tensor& means_in, const at::Tensor& precisions_in,
                        const at::Tensor& half_widths_in, bool cull) {
  check_params(points_in, means_in, precisions_in, half_widths_in);
  TORCH_CHECK(points_in.dim() == 2 && points_in.size(1) == 3, "lucidops cpu kernel: points must be (M, 3)");
  const at::Tensor points = points_in.contiguous(), means = means_in.contiguous(),
                   precisions = precisions_in.contiguous(), half = half_widths_in.contiguous();
  const int64_t M = points.size(0), G = means.size(0);
  at::Tensor out = at::empty({M, G}, points.options());
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "lucidops_gaussian_phi", [&] {
    phi_impl<scalar_t>(points.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(),
                       precisions.const_data_ptr<scalar_t>(), half.const_data_ptr<scalar_t>(), M, G, cull,
                       out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_phi_backward(const at::Tensor& coef_in,
                                                                     const at::Tensor& points_in,
                                                                     const at::Tensor& means_in,
                                                                     const at::Tensor& precisions_in) {
  TORCH_CHECK(points_in.dim() == 2 && points_in.size(1) == 3, "lucidops cpu kernel: points must be (M, 3)");
  const int64_t M = points_in.size(0), G = means_in.size(0);
  TORCH_CHECK(coef_in.sizes() == at::IntArrayRef({M, G}) && coef_in.scalar_type() == points_in.scalar_type(),
              "lucidops cpu kernel: coef must be (M, G) of points' dtype");
  check_params(points_in, means_in, precisions_in, at::empty({G, 3}, points_in.options()));
  const at::Tensor coef = coef_in.contiguous(), points = points_in.contiguous(), means = means_in.contiguous(),
                   precisions = precisions_in.contiguous();
  at::Tensor g_pts = at::empty_like(points), g_means = at::empty_like(means), g_prec = at::empty_like(precisions);
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "lucidops_gaussian_phi_backward", [&] {
    phi_backward_impl<scalar_t>(coef.const_data_ptr<scalar_t>(), points.const_data_ptr<scalar_t>(),
                                means.const_data_ptr<scalar_t>(), precisions.const_data_ptr<scalar_t>(), M, G,
                                g_pts.mutable_data_ptr<scalar_t>(), g_means.mutable_data_ptr<scalar_t>(),
                                g_prec.mutable_data_ptr<scalar_t>());
  });
  return {g_pts, g_means, g_prec};
}

at::Tensor gaussian_spatial_order(const at::Tensor& points_in) {
  TORCH_CHECK(points_in.dim() == 2 && points_in.size(1) == 3 && points_in.size(0) > 0,
              "lucidops cpu kernel: points must be (N, 3) with N > 0");
  const at::Tensor points = points_in.contiguous();
  const int64_t N = points.size(0);
  at::Tensor order = at::empty({N}, points.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "lucidops_gaussian_spatial_order", [&] {
    const scalar_t* pts = points.const_data_ptr<scalar_t>();
    scalar_t lo[3], hi[3];
    cloud_bounds(pts, N, lo, hi);
    spatial_order(pts, N, lo, hi, order.mutable_data_ptr<int64_t>());
  });
  return order;
}

}  // namespace cpu
}  // namespace lucidops
