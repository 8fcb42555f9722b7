// CPU attention for many small heads (methods.md section 2), forward and backward.
//
// PyTorch's CPU flash kernel works in blocks through GEMM calls whose fixed cost dominates
// when the head dim is small (measured: this kernel is 2x-3x faster at d = 8, and as fast
// or faster up to d = 128 in float32). Here a head's keys and values are transposed once
// into (d, padded Nk) buffers, and four query rows at a time (six in the forward on AVX2)
// go over their keys with the keys in vector lanes: each K^T or V^T vector loaded feeds
// every row's accumulators, which stay in registers across the head dim (rows_times_keys,
// accumulate_outer). Contractions over the keys put the head dim in lanes when it fills a
// vector (rows_contract_rows), the keys otherwise (rows_contract_keys). The forward takes
// 64 query rows at a time through L1-sized chunks of keys (forward_task), the backward a
// head's rows (backward_task), so each chunk of K and V serves many blocks of rows before
// the next is loaded. With at most 8 query rows per head (a class token, a decoding step) no
// K^T is formed: scores come from the keys' rows (rows_dot_keys). The forward runs heads and
// chunks of 64 query rows in parallel, the backward heads and ranges of keys, each task owning
// its keys' dK and dV (backward_kernel).
// Tasks follow from the shapes alone: the result does not depend on the thread count. q, k,
// v and grad_out may have any strides with a unit one along d (a model's views of its qkv
// projection); the output is (B, H, Nq, d) laid out as (B, Nq, H, d), SDPA's layout.
//
// Contract (lucidops.reference.attention): top-left causal (key j visible to query i iff
// j <= i), key_padding_mask True = key takes part, a query with no visible key gets
// out = 0, lse = -inf and zero gradient. float32 and float64; float16 and bfloat16 are read
// and written as they are and computed in float32 (rows convert as they are loaded into the
// per-thread buffers, results as they are stored), with the same results, bit for bit, as
// the float32 kernel on inputs converted by torch and outputs rounded by torch. A bfloat16
// output comes with its rounding residual out_lo (lucidops.reference.attention.low_part).
// Attention dropout regenerates its mask from (seed, head, query, key) with the hash of
// lucidops.reference.attention_dropout, bit for bit, in forward and backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../lucidops.h"
#include "half_convert.h"
#include "parallel.h"
#include "vec_math.h"

namespace lucidops {
namespace cpu {
namespace {

// The dropout hash of lucidops/reference/attention_dropout.py (wrapping uint32 arithmetic).
constexpr uint32_t kGolden = 0x9E3779B9u, kHeadOffset = 0x7F4A7C15u, kRowOffset = 0x2545F491u,
                   kKeyMult = 0x85EBCA77u;
constexpr int kKeepShift = 8;  // 32 - 24 kept bits

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// Query rows per register block: each K^T / V^T vector loaded feeds this many rows.
constexpr int64_t kRows = 4;
// Query rows per forward register block: AVX2 takes six, whose products then hold 12
// accumulators (of 16 registers) and feed each vector loaded to 12 FMAs instead of 8
// (measured 13% faster forward at N = 1024, d = 64). AVX-512 keeps four.
constexpr int64_t kForwardRows = vec_math::kVecBytes == 32 ? 6 : kRows;
// The widest register block; wider blocks (the backward's) run kRows rows at a time.
constexpr int64_t kRegisterRowsMax = std::max(kRows, kForwardRows);
// Query rows per backward block. The block's dK^T and dV^T updates (accumulate_outer) load and
// store their accumulators once per block, so wider blocks cut that traffic: on the AVX2 EPYC,
// one thread, 32 rows took the backward at B2 H3 N1024 d64 from 72 ms (8 rows) to 61, and
// 3%-16% off the other cases measured (README); 64 rows measured slower than 32. The other products
// still run four rows at a time (register blocks), and accumulate_outer sums each element's
// rows in order, so the result is the same, bit for bit, as with four-row blocks.
constexpr int64_t kBackwardRows = 32;
// Key counts are padded to a multiple of this: whole vectors on every target (at most 16 lanes).
constexpr int64_t kKeyPad = 16;

inline float exp_of(float v) { return vec_math::exp(v); }
inline double exp_of(double v) { return vec_math::exp(v); }
// exp of a score minus its row's max (never above 0). The backward's exp(s - lse) keeps
// exp_of: its lse is an input.
inline float exp_of_shifted(float v) { return vec_math::exp_nonpositive(v); }
inline double exp_of_shifted(double v) { return vec_math::exp_nonpositive(v); }

// Key vectors per pass of rows_times_keys. With one, a block's R = 4 accumulators are four
// chains of dependent FMAs, and at four cycles each two FMA units need eight: on AVX2 two
// vectors per pass (8 of its 16 registers). AVX-512 keeps one (its vectors hold 16 keys).
constexpr int kKeyVectors = vec_math::kVecBytes >= 64 ? 1 : 2;

// out[r][j] = sum_c x[r][c] mat_t[c][j] for R rows, keys [0, keys) rounded up to whole passes
// of kKeyVectors vectors: at most to a multiple of kKeyPad, so within ld (the columns past keys
// are padding, or keys the caller hides). x: R x d; mat_t: d x ld; out: R x ld.
template <typename T, int R>
void rows_times_keys(const T* x, const T* mat_t, int64_t d, int64_t ld, int64_t keys, T* out) {
  using V = vec_math::Vec<T>;
  constexpr int64_t step = kKeyVectors * V::kLanes;
  static_assert(kKeyPad % step == 0, "a pass never runs past the padded keys");
  for (int64_t j = 0; j < keys; j += step) {
    typename V::type acc[R][kKeyVectors] = {};
    for (int64_t c = 0; c < d; ++c) {
      typename V::type m[kKeyVectors];
#pragma GCC unroll 2
      for (int u = 0; u < kKeyVectors; ++u) {
        m[u] = V::load(mat_t + c * ld + j + u * V::kLanes);
        if constexpr (kKeyVectors > 1) m[u] = V::reused(m[u]);  // as in rows_contract_rows_tile
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const T xr = x[r * d + c];
#pragma GCC unroll 2
        for (int u = 0; u < kKeyVectors; ++u) acc[r][u] += xr * m[u];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int u = 0; u < kKeyVectors; ++u) V::store(out + r * ld + j + u * V::kLanes, acc[r][u]);
    }
  }
}

// y[r][c] += sum_j p[r][j] mat_t[c][j] for R rows over keys [j0, j1), both whole vectors.
// p: R x ld; y: R x dpad.
template <typename T, int R>
void rows_contract_keys(const T* p, const T* mat_t, int64_t d, int64_t dpad, int64_t ld, int64_t j0, int64_t j1,
                        T* y) {
  using V = vec_math::Vec<T>;
  for (int64_t c = 0; c < d; ++c) {
    typename V::type acc[R] = {};
    for (int64_t j = j0; j < j1; j += V::kLanes) {
      const typename V::type m = V::load(mat_t + c * ld + j);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] += V::load(p + r * ld + j) * m;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) y[r * dpad + c] += V::sum(acc[r]);
  }
}

// y[r][c0 + ..] += sum_j p[r][j] rows[j][c0 + ..] for R rows over keys [j0, j1) and C vectors
// of the head dim: each broadcast of p[r][j] feeds C vectors, which stay in registers when
// C > 1 (GCC would otherwise fold their loads into every multiply; left to fold when C = 1,
// where the broadcasts fold instead: forcing it there was slower at d = 16). rows[j] starts
// j * row_stride values in; y: R x dpad.
template <typename T, int R, int C>
inline void rows_contract_rows_tile(const T* p, const T* rows, int64_t row_stride, int64_t dpad, int64_t ld,
                                    int64_t j0, int64_t j1, int64_t c0, T* y) {
  using V = vec_math::Vec<T>;
  typename V::type acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < C; ++u) acc[r][u] = V::load(y + r * dpad + c0 + u * V::kLanes);
  }
  for (int64_t j = j0; j < j1; ++j) {
    typename V::type m[C];
#pragma GCC unroll 4
    for (int u = 0; u < C; ++u) {
      m[u] = V::load(rows + j * row_stride + c0 + u * V::kLanes);
      if constexpr (C > 1) m[u] = V::reused(m[u]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T pr = p[r * ld + j];
#pragma GCC unroll 4
      for (int u = 0; u < C; ++u) acc[r][u] += pr * m[u];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < C; ++u) V::store(y + r * dpad + c0 + u * V::kLanes, acc[r][u]);
  }
}

// Four vectors of the head dim per pass of rows_contract_rows where 32 registers hold their 16
// accumulators (AVX-512); two elsewhere, where 16 accumulators would spill.
constexpr bool kWideContraction = vec_math::kVecBytes >= 64;

// y[r][c] += sum_j p[r][j] rows[j][c] for R rows over keys [j0, j1), with rows in natural
// layout (keys, dpad values each, row_stride apart), dpad a whole number of vectors: the head
// dim in lanes, so nothing needs the horizontal sums of rows_contract_keys (which cost about
// half as much as the multiplies themselves at d = 16, N = 197). Up to four vectors of the head
// dim per pass over the keys (measured 4%-5% faster forward than one at d = 64 and 128). p: R x ld;
// y: R x dpad. Never inlined: inlined into the forward's task loop, its AVX2 six-row tile
// (12 accumulators) had been kept in registers until an unrelated change to that loop made
// GCC spill them to the stack (forward 1.4x slower at d = 64); on its own, the tile has
// the registers to itself.
template <typename T, int R>
__attribute__((noinline)) void rows_contract_rows(const T* p, const T* rows, int64_t row_stride, int64_t dpad,
                                                  int64_t ld, int64_t j0, int64_t j1, T* y) {
  constexpr int64_t lanes = vec_math::Vec<T>::kLanes;
  int64_t c0 = 0;
  if constexpr (kWideContraction)
    for (; c0 + 4 * lanes <= dpad; c0 += 4 * lanes)
      rows_contract_rows_tile<T, R, 4>(p, rows, row_stride, dpad, ld, j0, j1, c0, y);
  for (; c0 + 2 * lanes <= dpad; c0 += 2 * lanes)
    rows_contract_rows_tile<T, R, 2>(p, rows, row_stride, dpad, ld, j0, j1, c0, y);
  if (c0 < dpad) rows_contract_rows_tile<T, R, 1>(p, rows, row_stride, dpad, ld, j0, j1, c0, y);
}

// acc_t[c + u][j + ..] += sum_r x[r][c + u] p[r][j + ..] for C head-dim rows and J vectors of
// keys: C x J accumulators held across the R rows, each element summing its R terms in order.
// Each broadcast of x feeds J vectors and each loaded vector of p feeds C rows.
template <typename T, int R, int C, int J>
inline void accumulate_outer_tile(const T* x, const T* p, int64_t d, int64_t ld, int64_t c, int64_t j, T* acc_t) {
  using V = vec_math::Vec<T>;
  typename V::type a[C][J];
#pragma GCC unroll 8
  for (int u = 0; u < C; ++u) {
#pragma GCC unroll 2
    for (int v = 0; v < J; ++v) a[u][v] = V::load(acc_t + (c + u) * ld + j + v * V::kLanes);
  }
  // Unrolled whole (R is at most kBackwardRows): with R = 32 left a loop, GCC 12 turned the
  // single-accumulator tile's FMAs into separate multiplies and adds (other rounding).
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    typename V::type pr[J];
#pragma GCC unroll 2
    for (int v = 0; v < J; ++v) {
      pr[v] = V::load(p + r * ld + j + v * V::kLanes);
      if constexpr (C > 1) pr[v] = V::reused(pr[v]);  // one load per row, not one per FMA
    }
#pragma GCC unroll 8
    for (int u = 0; u < C; ++u) {
      const T xr = x[r * d + c + u];
#pragma GCC unroll 2
      for (int v = 0; v < J; ++v) a[u][v] += xr * pr[v];
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < C; ++u) {
#pragma GCC unroll 2
    for (int v = 0; v < J; ++v) V::store(acc_t + (c + u) * ld + j + v * V::kLanes, a[u][v]);
  }
}

// Accumulators per register tile of accumulate_outer, each a chain of R dependent FMAs (two
// FMA units at four cycles' latency need eight in flight). As 4 rows x 2 key vectors they take
// 11 of AVX2's 16 registers with the two vectors of p and a broadcast. The tile before held
// the vectors of p of every row of the block (8 registers for 8 rows) and 4 accumulators, so
// blocks could not grow; alone, on data in L1 (one thread, AVX2 EPYC), this one ran 70 GFLOP/s
// against its 57, though in the kernel with 8-row blocks the two measured the same.
constexpr int kOuterChains = 8;

// acc_t[c][j] += sum_r x[r][c] p[r][j] for keys [0, keys), whole vectors. x: R x d; p: R x ld;
// acc_t: d x ld. Tiles of 4 head-dim rows x 2 key vectors, then 8 x 1 on a last odd vector
// (the keys past `keys` may be another block's and must not be touched), single rows at the
// end of the head dim.
template <typename T, int R>
void accumulate_outer(const T* x, const T* p, int64_t d, int64_t ld, int64_t keys, T* acc_t) {
  constexpr int64_t lanes = vec_math::Vec<T>::kLanes;
  int64_t j = 0;
  for (; j + 2 * lanes <= keys; j += 2 * lanes) {
    int64_t c = 0;
    for (; c + kOuterChains / 2 <= d; c += kOuterChains / 2)
      accumulate_outer_tile<T, R, kOuterChains / 2, 2>(x, p, d, ld, c, j, acc_t);
    for (; c < d; ++c) accumulate_outer_tile<T, R, 1, 2>(x, p, d, ld, c, j, acc_t);
  }
  for (; j < keys; j += lanes) {
    int64_t c = 0;
    for (; c + kOuterChains <= d; c += kOuterChains)
      accumulate_outer_tile<T, R, kOuterChains, 1>(x, p, d, ld, c, j, acc_t);
    for (; c < d; ++c) accumulate_outer_tile<T, R, 1, 1>(x, p, d, ld, c, j, acc_t);
  }
}

// A (B, H, N, d) tensor with any strides but a unit one along d (a model's q, k, v are
// usually views of one qkv projection): where row i of head bh starts.
template <typename T>
struct Rows {
  const T* data;
  int64_t stride_b, stride_h, stride_n, heads;
  const T* row(int64_t bh, int64_t i) const {
    return data + bh / heads * stride_b + bh % heads * stride_h + i * stride_n;
  }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && (t.stride(3) == 1 || t.size(3) <= 1), "lucidops cpu attention kernel: ", name,
              " must be 4-D with a unit stride along the head dim");
  return Rows<T>{t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.size(1)};
}

// The shapes and raw pointers of one call: inputs stored as S, computed in T (S itself, or
// float32 for the half types).
template <typename T, typename S>
struct Problem {
  int64_t batch, heads, nq, nk, d;
  bool causal;
  T scale;
  Rows<S> q;             // (B, H, Nq, d)
  Rows<S> k;             // (B, H, Nk, d)
  Rows<S> v;             // (B, H, Nk, d)
  const bool* key_mask;  // (B, Nk) or null
  // Dropout: a probability is kept when its 24-bit hash >= threshold (0: no dropout), then
  // multiplied by keep_scale.
  uint32_t seed, threshold;
  T keep_scale;

  // Keys rounded up to whole vectors, plus one cache line if that makes an even number of
  // lines: the (d, ld) buffers are walked down their columns, and a stride of a power of two
  // lines (N = 1024 floats is 4 KiB) puts every row in one L1 set, which measured 1.4x slower
  // forward at N = 1024, d = 16.
  int64_t padded_keys() const {
    constexpr int64_t kLine = 64 / sizeof(T);
    const int64_t whole = (nk + kKeyPad - 1) / kKeyPad * kKeyPad;
    return (whole / kLine) % 2 == 0 ? whole + kLine : whole;
  }
  int64_t visible_end(int64_t i) const { return causal ? std::min(nk, i + 1) : nk; }
  // Whether scores come from the keys' rows (rows_dot_keys) rather than K^T: few query rows, and
  // a head dim of a vector or more (below it the contraction reads keys in lanes and the
  // transposes are short). One answer for forward and backward, which must form the same sums.
  bool direct_scores() const { return nq <= kAttentionDirectScoreRows && d >= vec_math::Vec<T>::kLanes; }
  bool dropout() const { return threshold != 0; }
  uint32_t row_key(int64_t bh, int64_t i) const {
    const uint32_t head_key = fmix32(seed ^ fmix32(static_cast<uint32_t>(bh) * kGolden + kHeadOffset));
    return fmix32(head_key ^ fmix32(static_cast<uint32_t>(i) * kGolden + kRowOffset));
  }
  // Offset of query i of head bh in the output, which is (B, H, Nq, d) laid out as (B, Nq, H, d)
  // (SDPA's layout: merging the heads back into tokens is then a view).
  int64_t out_offset(int64_t bh, int64_t i) const { return ((bh / heads * nq + i) * heads + bh % heads) * d; }
};

// Calls with at most kAttentionDirectScoreRows (8) query rows per head (a class token attending
// to its image's tokens, one decoding step against cached keys; Problem::direct_scores) form
// their scores from the keys' own rows (rows_dot_keys), forward and backward: transposing a
// head's keys into K^T, which rows_times_keys reads, then cost more than the scores it served
// (forward, 1 query, 300 keys, d = 64: 0.65x the time; 4 and 8 queries 0.96x and 0.92x; AVX2,
// one thread). The backward
// recomputes P = exp(s - lse) from the same sums, bit for bit: scores of 1e8 rounded apart by
// one ulp (8) would make P up to e^8.

// Keys per pass of rows_dot_keys for R rows: R x kDirectKeys<R> accumulators, each a chain of
// FMAs over the head dim, with eight in flight for two FMA units at four cycles' latency.
template <int R>
constexpr int kDirectKeys = R >= 8 ? 1 : 8 / R;
constexpr int64_t kDirectKeysMax = kDirectKeys<1>;

// out[r][u] = sum_c x[r][c] kj[u][c] for R rows and J keys, the head dim in lanes: each vector
// of a key feeds R rows. Never inlined, so that each (T, R, J) is one instance of code whatever
// the input dtype: GCC contracts multiplies and adds differently in different instances (a
// float16 call converting one key per pass, against float32's eight, rounded its scores
// otherwise than the float32 kernel on the converted inputs). x: R x d; out: R x ld.
template <typename T, int R, int J>
__attribute__((noinline)) void dot_keys_pass(const T* x, const T* const* kj, int64_t d, int64_t ld, T* out) {
  using V = vec_math::Vec<T>;
  const int64_t whole = d / V::kLanes * V::kLanes;
  typename V::type acc[R][J] = {};
  for (int64_t c = 0; c < whole; c += V::kLanes) {
    typename V::type m[J];
#pragma GCC unroll 8
    for (int u = 0; u < J; ++u) m[u] = V::reused(V::load(kj[u] + c));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename V::type xr = V::load(x + r * d + c);
#pragma GCC unroll 8
      for (int u = 0; u < J; ++u) acc[r][u] += xr * m[u];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int u = 0; u < J; ++u) {
      T sum = V::sum(acc[r][u]);
      for (int64_t c = whole; c < d; ++c) sum = std::fma(x[r * d + c], kj[u][c], sum);
      out[r * ld + u] = sum;
    }
  }
}

// out[r][j] = sum_c x[r][c] k_j[c] for R rows and keys [j0, j1) of head bh (dot_keys_pass,
// kDirectKeys<R> keys at a time, then one): each key's row is read where it is (half rows are
// converted into `rows`, kDirectKeys<R> x d values). Its sums run in another order than
// rows_times_keys', so a row's scores round differently there; which one runs follows from the
// shapes alone, and keys are grouped from j0, a multiple of kKeyPad in every call (forward:
// 0; backward: ranges and chunks of whole kKeyPad), so the backward recomputes the forward's
// scores exactly. out: R x ld.
template <typename T, typename S, int R>
void rows_dot_keys(const T* x, const Rows<S>& k, int64_t bh, int64_t d, int64_t ld, int64_t j0, int64_t j1, T* rows,
                   T* out) {
  const auto pass = [&](int64_t j, auto keys_in_pass) {
    constexpr int J = decltype(keys_in_pass)::value;
    const T* kj[J];
    for (int u = 0; u < J; ++u) {
      if constexpr (std::is_same_v<S, T>) {
        kj[u] = k.row(bh, j + u);
      } else {
        to_opmath(k.row(bh, j + u), rows + u * d, d);
        kj[u] = rows + u * d;
      }
    }
    dot_keys_pass<T, R, J>(x, kj, d, ld, out + j);
  };
  constexpr int KJ = kDirectKeys<R>;
  int64_t j = j0;
  for (; j + KJ <= j1; j += KJ) pass(j, std::integral_constant<int, KJ>{});
  for (; j < j1; ++j) pass(j, std::integral_constant<int, 1>{});
}

// Keys [j0, j1) of head bh's keys or values transposed into columns j0..j1 of dst (d, ld),
// zeros in the padding keys; row: d values of scratch for a half row's conversion.
template <typename T, typename S>
void transpose_head(const Rows<S>& src, int64_t bh, int64_t nk, int64_t d, int64_t ld, int64_t j0, int64_t j1, T* row,
                    T* dst) {
  const int64_t padding = std::max(j0, std::min(nk, j1));  // only the padding keys need zeros
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * ld + padding, dst + c * ld + j1, T(0));
  for (int64_t j = j0; j < std::min(nk, j1); ++j) {
    const T* values = row;
    if constexpr (std::is_same_v<S, T>) {
      values = src.row(bh, j);
    } else {
      to_opmath(src.row(bh, j), row, d);
    }
    for (int64_t c = 0; c < d; ++c) dst[c * ld + j] = values[c];
  }
}

// Keys [j0, j1) of head bh's keys or values as rows j0..j1 of dst (ld, dpad), zeros in the
// padding.
template <typename T, typename S>
void pad_head_rows(const Rows<S>& src, int64_t bh, int64_t nk, int64_t d, int64_t dpad, int64_t j0, int64_t j1,
                   T* dst) {
  const int64_t padding = std::max(j0, std::min(nk, j1));  // zeros: the padding keys and lanes only
  for (int64_t j = j0; j < padding; ++j) {
    to_opmath(src.row(bh, j), dst + j * dpad, d);
    std::fill(dst + j * dpad + d, dst + (j + 1) * dpad, T(0));
  }
  std::fill(dst + padding * dpad, dst + j1 * dpad, T(0));
}

// Query rows per forward task. Tasks are fixed ranges of rows, so a row's register block
// (and with it its rounding) does not depend on how tasks fall to threads; small enough
// that a head splits across threads (a ViT's batch-1 inference has as few as 3 heads); large
// enough that reloading a head's K and V per task (two Nk x d copies) costs little against
// the task's 64 x Nk x d multiply-adds, twice, and that each chunk of keys (forward_task)
// serves many register blocks.
constexpr int64_t kForwardChunk = 64;

// Per-thread buffers of one head. Scores need K^T (d x ld), unless formed from the keys' rows
// (direct_scores, forward calls with few query rows); the backward's dP = dO V^T needs
// V^T. The contraction over the keys (P V forward, dS K backward) reads the other operand as
// padded rows (ld x dpad) when the head dim fills a vector, so its sums stay within lanes,
// and transposed otherwise. Also the contractions of a forward task's or the backward's head's
// rows (rows x dpad); the forward task's scaled q (rows x d), scores and probabilities (rows x
// ld); the backward's scores for one block (kBackwardRows x ld, with dS) and dK^T, dV^T (d x
// ld); one row's dropout multipliers (ld); and a row (d; 2 d in the backward, whose
// delta_of_row also reads a bfloat16 output's residual) for conversions to and from half
// types. The backward's per-row inputs are BackwardRows, kept apart from these (a split
// head's are shared by its tasks).
template <typename T>
struct HeadScratch {
  int64_t d, ld, dpad;
  bool backward, by_rows;
  std::vector<T> k_t, v_t, contracted, rows_a, rows_b, keys_a, keys_b, keys_z, grad_k_t, grad_v_t, row, key_rows;
  // What the contraction over the keys reads when the head dim is in lanes (by_rows): the
  // loaded head's rows of `contracted`, or of the input itself (rows_in_place), and how many
  // of its keys it may read.
  const T* contract_rows = nullptr;
  int64_t contract_stride = 0, contract_keys = 0;

  // direct_scores: no K^T (rows_dot_keys). rows_in_place: the forward's P V reads V's rows where
  // they are (its dtype is T and its head dim whole vectors), never copied into `contracted`.
  HeadScratch(int64_t d_, int64_t ld_, bool backward_, int64_t task_rows, bool direct_scores = false,
              bool rows_in_place = false)
      : d(d_),
        ld(ld_),
        dpad((d_ + vec_math::Vec<T>::kLanes - 1) / vec_math::Vec<T>::kLanes * vec_math::Vec<T>::kLanes),
        backward(backward_),
        by_rows(d_ >= vec_math::Vec<T>::kLanes),
        k_t(direct_scores ? 0 : d * ld),
        v_t(backward || !by_rows ? d * ld : 0),
        contracted(by_rows && !rows_in_place ? ld * dpad : 0),
        rows_a(backward ? 0 : task_rows * d),
        rows_b(task_rows * dpad),
        keys_a((backward ? kBackwardRows : task_rows) * ld),
        keys_b(backward ? kBackwardRows * ld : 0),
        keys_z(ld),
        grad_k_t(backward ? d * ld : 0),
        grad_v_t(backward ? d * ld : 0),
        row(backward ? 2 * d : d),
        key_rows(direct_scores ? kDirectKeysMax * d : 0) {}

  // Head bh's keys [j0, j1) (all of them by default) into the buffers' same columns or rows.
  template <typename S>
  void load(const Problem<T, S>& pb, int64_t bh, int64_t j0 = 0, int64_t j1 = -1) {
    if (j1 < 0) j1 = ld;
    if (!k_t.empty()) transpose_head(pb.k, bh, pb.nk, d, ld, j0, j1, row.data(), k_t.data());
    if (!v_t.empty()) transpose_head(pb.v, bh, pb.nk, d, ld, j0, j1, row.data(), v_t.data());
    if (!by_rows) return;
    if (!contracted.empty()) {
      pad_head_rows(backward ? pb.k : pb.v, bh, pb.nk, d, dpad, j0, j1, contracted.data());
      contract_rows = contracted.data(), contract_stride = dpad, contract_keys = ld;
    } else if constexpr (std::is_same_v<S, T>) {
      contract_rows = pb.v.row(bh, 0), contract_stride = pb.v.stride_n, contract_keys = pb.nk;
    }
  }

  // y += P M over keys [j0, j1) (whole vectors) for R rows of p (R x ld): M is V in the
  // forward, K in the backward; y: R x dpad. Blocks wider than a register block run kRows
  // rows at a time.
  template <int R>
  void contract(const T* p, int64_t j0, int64_t j1, T* y) const {
    if constexpr (R > kRegisterRowsMax) {
      static_assert(R % kRows == 0, "wide blocks are whole register blocks");
      for (int s = 0; s < R; s += kRows) contract<kRows>(p + s * ld, j0, j1, y + s * dpad);
    } else if (by_rows) {
      // Keys past contract_keys are padding, with p = 0; in place there are no rows for them.
      rows_contract_rows<T, R>(p, contract_rows, contract_stride, dpad, ld, j0, std::min(j1, contract_keys), y);
    } else {
      rows_contract_keys<T, R>(p, (backward ? k_t : v_t).data(), d, dpad, ld, j0, j1, y);
    }
  }
};

// rows_times_keys for a block of R rows, kRows at a time (the register block) when R is wider.
template <typename T, int R>
void block_times_keys(const T* x, const T* mat_t, int64_t d, int64_t ld, int64_t keys, T* out) {
  if constexpr (R > kRegisterRowsMax) {
    static_assert(R % kRows == 0, "wide blocks are whole register blocks");
    for (int s = 0; s < R; s += kRows) rows_times_keys<T, kRows>(x + s * d, mat_t, d, ld, keys, out + s * ld);
  } else {
    rows_times_keys<T, R>(x, mat_t, d, ld, keys, out);
  }
}

// Masks a score row of batch element b whose visible keys end at `end` (causal) on keys
// [j0, j1): -inf where the mask or the end hides them, padding keys included.
template <typename T, typename S>
void hide_keys(const Problem<T, S>& pb, int64_t b, int64_t end, int64_t j0, int64_t j1, T* s) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t shown_end = std::max(j0, std::min(end, j1));
  if (pb.key_mask) {
    const bool* mask = pb.key_mask + b * pb.nk;
#pragma omp simd
    for (int64_t j = j0; j < shown_end; ++j) s[j] = mask[j] ? s[j] : neg_inf;
  }
  std::fill(s + shown_end, s + j1, neg_inf);
}

// keep_scale where key j's probability is kept in this row, 0 where dropped; for j in [j0, j1).
template <typename T, typename S>
void dropout_multipliers(const Problem<T, S>& pb, int64_t bh, int64_t i, int64_t j0, int64_t j1, T* z) {
  const uint32_t key = pb.row_key(bh, i), cut = pb.threshold;
  const T kept = pb.keep_scale;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j)
    z[j] = (fmix32(key ^ (static_cast<uint32_t>(j) * kKeyMult)) >> kKeepShift) >= cut ? kept : T(0);
}

template <typename T>
T row_max(const T* s, int64_t end) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < end; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// scale q_i for rows [i0, i0 + rows) of head bh, side by side in dst (rows x d).
template <typename T, typename S>
void scaled_queries(const Problem<T, S>& pb, int64_t bh, int64_t i0, int64_t rows, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    T* scaled = dst + r * pb.d;
    to_opmath(pb.q.row(bh, i0 + r), scaled, pb.d);
    for (int64_t c = 0; c < pb.d; ++c) scaled[c] *= pb.scale;
  }
}

// How many keys the block of rows [i0, i0 + R) spans: its last row's visible end (every row
// of the block ends at or before it) rounded up to whole vectors.
template <typename T, typename S>
int64_t block_keys(const Problem<T, S>& pb, int64_t i0, int64_t R) {
  constexpr int64_t lanes = vec_math::Vec<T>::kLanes;
  return (pb.visible_end(i0 + R - 1) + lanes - 1) / lanes * lanes;
}

// Where the forward writes: out (S, token-major), lse (T), and for bfloat16 out_lo (bfloat16,
// (B, H, Nq, d) contiguous), the residual out - out rounded, else null.
template <typename T, typename S>
struct ForwardOutputs {
  S* out;
  T* lse;
  S* out_lo;
};

// Query row i of head bh: y (d values of T, used as scratch) stored to out, and out_lo if any.
template <typename T, typename S>
void store_output_row(const Problem<T, S>& pb, const ForwardOutputs<T, S>& to, int64_t bh, int64_t i, T* y,
                      T* scratch) {
  S* out_row = to.out + pb.out_offset(bh, i);
  from_opmath(y, out_row, pb.d);
  if (to.out_lo == nullptr) return;
  to_opmath(out_row, scratch, pb.d);
  for (int64_t c = 0; c < pb.d; ++c) scratch[c] = y[c] - scratch[c];
  from_opmath(scratch, to.out_lo + (bh * pb.nq + i) * pb.d, pb.d);
}

// Bytes of a (d x chunk) buffer per chunk of keys. The forward's register blocks pass over one
// chunk of K^T or V in turn, then the next, so each chunk comes from L2 once per task rather
// than once per block (a head's K and V outgrow L1 from N = 128 at d = 64): 16 KiB, half of a
// 32 KiB L1. The backward's head goes by one chunk of K^T, V^T, dK^T, dV^T and K at a time,
// five buffers where the whole head's (1.3 MiB at N = 1024, d = 64) passed by every block:
// 16 KiB each. With 32-row blocks, 16 KiB measured 3%-7% faster than 8 KiB at d = 64 and 128
// (N = 512, 1024) and no different below; 32 KiB slower.
constexpr int64_t kForwardChunkBytes = 16 * 1024;
constexpr int64_t kBackwardChunkBytes = 16 * 1024;

// Keys per chunk: whole passes of kKeyPad keys filling `bytes` at head dim d. With the keys in
// lanes (head dims below one vector) the contraction over the keys sums lanes at its end, so
// all `keys` take one chunk there.
template <typename T>
int64_t keys_per_chunk(int64_t d, int64_t bytes, bool by_rows, int64_t keys) {
  if (!by_rows) return std::max<int64_t>(keys, 1);
  return std::max<int64_t>(kKeyPad, bytes / (d * static_cast<int64_t>(sizeof(T))) / kKeyPad * kKeyPad);
}

// Calls f(std::integral_constant<int, R>{}, r0) for the blocks [r0, r0 + R) of rows [0, rows):
// kWide rows at a time, then kRows, then single rows.
template <int kWide, typename F>
void for_each_block(int64_t rows, F&& f) {
  int64_t r0 = 0;
  for (; r0 + kWide <= rows; r0 += kWide) f(std::integral_constant<int, kWide>{}, r0);
  if constexpr (kWide != kRows)
    for (; r0 + kRows <= rows; r0 += kRows) f(std::integral_constant<int, kRows>{}, r0);
  for (; r0 < rows; ++r0) f(std::integral_constant<int, 1>{}, r0);
}

// Chunk by chunk of the keys [key_begin, key_end), calls f(std::integral_constant<int, R>{},
// r0, j0, j1) for each block [r0, r0 + R) of rows [i0, i0 + rows) (as for_each_block, r0
// relative to i0) on the keys [j0, j1) of the chunk that it spans (block_keys): a causal
// block skips what it hides.
template <int kWide, typename T, typename S, typename F>
void for_each_block_by_chunks(const Problem<T, S>& pb, int64_t i0, int64_t rows, int64_t key_begin, int64_t key_end,
                              int64_t chunk, F&& f) {
  const int64_t all_keys = std::min(key_end, block_keys(pb, i0, rows));  // the last row's: the widest
  for (int64_t kc = key_begin; kc < all_keys; kc += chunk)
    for_each_block<kWide>(rows, [&](auto block, int64_t r0) {
      const int64_t end = std::min({block_keys(pb, i0 + r0, decltype(block)::value), kc + chunk, key_end});
      if (end > kc) f(block, r0, kc, end);
    });
}

// Softmax of score row i of head bh over its block's keys, in place; its lse stored. Returns
// the row's sum of exponentials (0 for a row without a visible key).
template <typename T, typename S>
T softmax_row(const Problem<T, S>& pb, int64_t bh, int64_t i, int64_t keys, T* s, T* lse, T* dropout_row) {
  hide_keys(pb, bh / pb.heads, pb.visible_end(i), 0, keys, s);
  const T m = row_max(s, keys);  // NaN scores lose every comparison: -inf if all are NaN
  const T shift = m == -std::numeric_limits<T>::infinity() ? T(0) : m;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < keys; ++j) {
    s[j] = exp_of_shifted(s[j] - shift);  // hidden keys: exp(-inf) = 0
    sum += s[j];
  }
  // No visible key: every score -inf, sum 0. A row of NaN scores (a NaN query) has sum NaN
  // and must stay NaN, as in the reference, rather than pass for a row without a key.
  lse[bh * pb.nq + i] = sum == T(0) ? -std::numeric_limits<T>::infinity() : m + std::log(sum);
  if (pb.dropout()) {  // after the sum: the softmax normalises over every visible key
    dropout_multipliers(pb, bh, i, 0, keys, dropout_row);
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) s[j] *= dropout_row[j];
  }
  return sum;
}

// Rows [i0, i0 + rows) of head bh: S = scale Q K^T, P = softmax(S), O = P V / rowsum. Both
// products go key chunk by key chunk (keys_per_chunk) over all of the task's register
// blocks; each block spans its own keys (block_keys), so a causal task skips what its
// blocks hide. Splitting P V at chunks keeps its sums: they run over the keys in order either
// way, in registers within a chunk and through y between chunks. The keys-in-lanes
// contraction (head dims below one vector) sums lanes at its end, so it takes one chunk.
template <typename T, typename S>
void forward_task(const Problem<T, S>& pb, int64_t bh, int64_t i0, int64_t rows, HeadScratch<T>& hs,
                  const ForwardOutputs<T, S>& to) {
  const int64_t d = pb.d, ld = hs.ld, dpad = hs.dpad;
  T* scores = hs.keys_a.data();
  scaled_queries(pb, bh, i0, rows, hs.rows_a.data());
  if (hs.k_t.empty()) {  // direct scores (Problem::direct_scores): a few rows
    for_each_block<kRows>(rows, [&](auto block, int64_t r0) {
      constexpr int R = decltype(block)::value;
      // Keys past nk are padding, which softmax_row hides whatever their scores.
      const int64_t keys = std::min(pb.nk, block_keys(pb, i0 + r0, R));
      rows_dot_keys<T, S, R>(hs.rows_a.data() + r0 * d, pb.k, bh, d, ld, 0, keys, hs.key_rows.data(),
                             scores + r0 * ld);
    });
  } else {
    // Scores are sums over the head dim: any chunk of keys gives the same ones.
    const int64_t score_chunk = keys_per_chunk<T>(d, kForwardChunkBytes, true, 0);
    for_each_block_by_chunks<kForwardRows>(pb, i0, rows, 0, ld, score_chunk, [&](auto block, int64_t r0, int64_t j0,
                                                                          int64_t j1) {
      constexpr int R = decltype(block)::value;
      rows_times_keys<T, R>(hs.rows_a.data() + r0 * d, hs.k_t.data() + j0, d, ld, j1 - j0, scores + r0 * ld + j0);
    });
  }
  T sums[kForwardChunk];
  for_each_block<kForwardRows>(rows, [&](auto block, int64_t r0) {
    constexpr int R = decltype(block)::value;
    const int64_t keys = block_keys(pb, i0 + r0, R);
    for (int64_t r = r0; r < r0 + R; ++r)
      sums[r] = softmax_row(pb, bh, i0 + r, keys, scores + r * ld, to.lse, hs.keys_z.data());
  });
  T* y = hs.rows_b.data();
  std::fill(y, y + rows * dpad, T(0));
  const int64_t pv_chunk = keys_per_chunk<T>(d, kForwardChunkBytes, hs.by_rows, block_keys(pb, i0, rows));
  for_each_block_by_chunks<kForwardRows>(pb, i0, rows, 0, ld, pv_chunk, [&](auto block, int64_t r0, int64_t j0,
                                                                     int64_t j1) {
    hs.template contract<decltype(block)::value>(scores + r0 * ld, j0, j1, y + r0 * dpad);  // P V
  });
  for (int64_t r = 0; r < rows; ++r) {
    T* yr = y + r * dpad;
    for (int64_t c = 0; c < d; ++c) yr[c] = sums[r] == T(0) ? T(0) : yr[c] / sums[r];
    store_output_row(pb, to, bh, i0 + r, yr, hs.row.data());
  }
}

template <typename T, typename S>
void forward_kernel(const Problem<T, S>& pb, const ForwardOutputs<T, S>& to) {
  const int64_t ld = pb.padded_keys();
  const int64_t chunks = (pb.nq + kForwardChunk - 1) / kForwardChunk;
  // A task's multiply-adds: QK^T and PV for up to kForwardChunk rows.
  const int64_t task_work = 4 * std::min(pb.nq, kForwardChunk) * pb.nk * pb.d;
  at::parallel_for(0, pb.batch * pb.heads * chunks, grain_for(task_work), [&](int64_t task_begin, int64_t task_end) {
    const bool direct_scores = pb.direct_scores();
    // Read in place, V's rows are read by so few rows that copying them cost as much as the
    // product (only where no conversion or padding is needed).
    const bool rows_in_place = direct_scores && std::is_same_v<S, T> && pb.d % vec_math::Vec<T>::kLanes == 0;
    HeadScratch<T> hs(pb.d, ld, false, std::min(pb.nq, kForwardChunk), direct_scores, rows_in_place);
    int64_t loaded = -1;  // tasks run head by head: a thread reloads K and V when the head changes
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t bh = task / chunks;
      if (bh != loaded) {
        hs.load(pb, bh);
        loaded = bh;
      }
      const int64_t i0 = task % chunks * kForwardChunk;
      forward_task(pb, bh, i0, std::min(pb.nq, i0 + kForwardChunk) - i0, hs, to);
    }
  });
}

// What the backward reads besides q, k, v, and where it writes dq: grad_out and out (any
// strides with a unit one along d), out_lo (bfloat16's residual, (B, H, Nq, d) contiguous, or
// null), lse and grad_lse ((B, H, Nq) in T; grad_lse null when no loss uses the lse).
template <typename T, typename S>
struct BackwardInputs {
  Rows<S> grad_out, out;
  const S* out_lo;
  const T* lse;
  const T* grad_lse;
  S* grad_q;
};

// delta = rowsum(dO (O + O_lo)) - dL/dlse for query row i of head bh, with dO's row given in T:
// O + O_lo is the output as accurate as the forward computed it (float32 for bfloat16).
template <typename T, typename S>
T delta_of_row(const Problem<T, S>& pb, const BackwardInputs<T, S>& in, int64_t bh, int64_t i, const T* do_row,
                T* scratch) {
  const int64_t d = pb.d, row = bh * pb.nq + i;
  T* o = scratch;
  to_opmath(in.out.row(bh, i), o, d);
  if (in.out_lo != nullptr) {
    T* lo = scratch + d;
    to_opmath(in.out_lo + row * d, lo, d);
    for (int64_t c = 0; c < d; ++c) o[c] += lo[c];
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < d; ++c) sum += do_row[c] * o[c];
  return in.grad_lse != nullptr ? sum - in.grad_lse[row] : sum;
}

// What a head's backward reads per query row, in T: scale q and dO (nq x d each, side by
// side, as rows_times_keys and accumulate_outer read them), delta and lse (nq each).
template <typename T>
struct BackwardRows {
  T* q;
  T* dout;
  T* deltas;
  T* lses;

  // How many values of T one head's rows take, laid out as below.
  static int64_t size(int64_t nq, int64_t d) { return 2 * nq * d + 2 * nq; }
  // One head's rows in `size` values from base.
  static BackwardRows at(T* base, int64_t nq, int64_t d) {
    return {base, base + nq * d, base + 2 * nq * d, base + 2 * nq * d + nq};
  }
};

// The BackwardRows of head bh; scratch: 2 d values.
template <typename T, typename S>
void prepare_backward_rows(const Problem<T, S>& pb, const BackwardInputs<T, S>& in, int64_t bh,
                           const BackwardRows<T>& rows, T* scratch) {
  const int64_t d = pb.d, nq = pb.nq;
  scaled_queries(pb, bh, 0, nq, rows.q);
  for (int64_t i = 0; i < nq; ++i) {
    T* do_row = rows.dout + i * d;
    to_opmath(in.grad_out.row(bh, i), do_row, d);
    rows.deltas[i] = delta_of_row(pb, in, bh, i, do_row, scratch);
    // A row without a visible key has lse = -inf: P = 0 there, so no gradient flows.
    const T lse = in.lse[bh * nq + i];
    rows.lses[i] = lse == -std::numeric_limits<T>::infinity() ? T(0) : lse;
  }
}

// One block of rows [i0, i0 + R) of head bh on keys [j0, j1): dP = dO V^T, P = exp(s - lse)
// recomputed, dS = P (dP - delta), then dV^T += dO^T P, dK^T += (scale Q)^T dS and
// dQ / scale += dS K into the block's rows of rows_b. Scores, P and dS live in keys_a and
// keys_b at the keys' own columns.
template <typename T, typename S, int R>
void backward_block(const Problem<T, S>& pb, int64_t bh, int64_t i0, int64_t j0, int64_t j1,
                    const BackwardRows<T>& rows, HeadScratch<T>& hs) {
  const int64_t d = pb.d, ld = hs.ld;
  const T* q_rows = rows.q + i0 * d;
  const T* do_rows = rows.dout + i0 * d;
  T* p = hs.keys_a.data();
  T* ds = hs.keys_b.data();
  if (hs.k_t.empty()) {  // direct scores, as the forward formed them; keys past nk are hidden below
    static_assert(R <= kRows || R % kRows == 0, "wide blocks are whole register blocks");
    constexpr int kBlock = R <= kRows ? R : kRows;
    for (int s = 0; s < R; s += kBlock)
      rows_dot_keys<T, S, kBlock>(q_rows + s * d, pb.k, bh, d, ld, j0, std::min(j1, pb.nk), hs.key_rows.data(),
                                  p + s * ld);
  } else {
    block_times_keys<T, R>(q_rows, hs.k_t.data() + j0, d, ld, j1 - j0, p + j0);  // s = scale Q K^T
  }
  block_times_keys<T, R>(do_rows, hs.v_t.data() + j0, d, ld, j1 - j0, ds + j0);  // dP = dO V^T
  for (int r = 0; r < R; ++r) {
    T* pr = p + r * ld;
    T* dsr = ds + r * ld;
    hide_keys(pb, bh / pb.heads, pb.visible_end(i0 + r), j0, j1, pr);
    const T row_lse = rows.lses[i0 + r], row_delta = rows.deltas[i0 + r];
    if (pb.dropout()) {  // dS = P (Z dP - delta); dV takes P Z
      T* z = hs.keys_z.data();
      dropout_multipliers(pb, bh, i0 + r, j0, j1, z);
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const T pj = exp_of(pr[j] - row_lse);
        dsr[j] = pj * (z[j] * dsr[j] - row_delta);
        pr[j] = pj * z[j];
      }
      continue;
    }
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      pr[j] = exp_of(pr[j] - row_lse);
      dsr[j] = pr[j] * (dsr[j] - row_delta);
    }
  }
  accumulate_outer<T, R>(do_rows, p + j0, d, ld, j1 - j0, hs.grad_v_t.data() + j0);  // dV^T += dO^T P
  accumulate_outer<T, R>(q_rows, ds + j0, d, ld, j1 - j0, hs.grad_k_t.data() + j0);  // dK^T += (s Q)^T dS
  hs.template contract<R>(ds, j0, j1, hs.rows_b.data() + i0 * hs.dpad);             // dS K
}

// Key ranges of a head's backward. One task per (head, range), so that a few heads (a
// batch-1 ViT has 3 to 12) still spread over the threads: with one task per head, one head
// ran on one thread (B1 H1 N1024 d64, forward+backward, 2 threads: 14.4 ms against aten's
// 8.65). Ranges follow from the shapes alone, never from the thread count, so neither do the
// results: about kBackwardTasks tasks per call when the heads are fewer, ranges of at least
// kMinRangeKeys keys and at most kMaxKeyRanges ranges. A split is not free: each task reads
// all of its head's rows and keeps a partial dQ (backward_kernel), which measured 4%-7% slower
// at B1 H2 and B2 H3, N197 d64, on 2 threads, where the heads alone kept both busy; so calls
// with kBackwardTasks heads or more are not split.
constexpr int64_t kBackwardTasks = 16;
constexpr int64_t kMinRangeKeys = 64;
constexpr int64_t kMaxKeyRanges = 16;

// How the keys [0, ld) of every head split into ranges (the count described above), each of
// whole units: chunks of the backward (keys_per_chunk) where the head dim fills a vector, so
// that a range's chunks are the unsplit head's, kKeyPad passes otherwise. Ranges differ by
// at most one unit.
struct KeyRanges {
  int64_t count, unit, units, ld;  // units: whole units covering [0, ld)
  int64_t begin(int64_t r) const { return std::min(ld, r * units / count * unit); }
  int64_t end(int64_t r) const { return r + 1 == count ? ld : begin(r + 1); }
};

template <typename T>
KeyRanges backward_key_ranges(int64_t heads_total, int64_t ld, int64_t d) {
  const int64_t unit = d >= vec_math::Vec<T>::kLanes ? keys_per_chunk<T>(d, kBackwardChunkBytes, true, 0) : kKeyPad;
  const int64_t units = (ld + unit - 1) / unit;
  const int64_t wanted = (kBackwardTasks + heads_total - 1) / heads_total;
  const int64_t count = std::max<int64_t>(1, std::min({wanted, ld / kMinRangeKeys, kMaxKeyRanges, units}));
  return KeyRanges{count, unit, units, ld};
}

// Keys [k0, k1) of head bh: dV = P^T dO, dS = P (dO V^T - delta), dQ = dS K (unscaled, left in
// rows_b), dK = scale dS^T Q (left in grad_k_t's columns k0..k1, as dV in grad_v_t's), with
// P = exp(s - lse) recomputed and delta = rowsum(dO O) - dL/dlse (delta_of_row), read from
// rows (prepare_backward_rows). Key chunk by key chunk (keys_per_chunk), every block of rows
// in turn: each sum still runs over the rows (dK, dV) or keys (dQ, through rows_b between
// chunks) in order.
template <typename T, typename S>
void backward_task(const Problem<T, S>& pb, int64_t bh, int64_t k0, int64_t k1, const BackwardRows<T>& rows,
                   HeadScratch<T>& hs) {
  const int64_t d = pb.d, nq = pb.nq, ld = hs.ld;
  hs.load(pb, bh, k0, k1);
  for (int64_t c = 0; c < d; ++c) {
    std::fill(hs.grad_k_t.begin() + c * ld + k0, hs.grad_k_t.begin() + c * ld + k1, T(0));
    std::fill(hs.grad_v_t.begin() + c * ld + k0, hs.grad_v_t.begin() + c * ld + k1, T(0));
  }
  std::fill(hs.rows_b.begin(), hs.rows_b.begin() + nq * hs.dpad, T(0));
  const int64_t chunk = keys_per_chunk<T>(d, kBackwardChunkBytes, hs.by_rows, block_keys(pb, 0, nq));
  for_each_block_by_chunks<kBackwardRows>(pb, 0, nq, k0, k1, chunk, [&](auto block, int64_t i0, int64_t j0,
                                                                        int64_t j1) {
    backward_block<T, S, decltype(block)::value>(pb, bh, i0, j0, j1, rows, hs);
  });
}

// dQ's row from y = dQ / scale, summed over every key (y is scaled in place).
template <typename T, typename S>
void store_dq_row(const Problem<T, S>& pb, T* y, S* grad_q_row) {
  for (int64_t c = 0; c < pb.d; ++c) y[c] *= pb.scale;
  from_opmath(y, grad_q_row, pb.d);
}

// dQ, dK, dV. Tasks are (head, key range) pairs (backward_key_ranges). A task stores its
// keys' dK and dV. An unsplit head's task prepares its rows and stores dQ. A split head's
// rows are prepared once, beforehand, for all of its tasks; dQ sums over every key, so each
// task keeps its rows' partial dQ over its own keys, and a last pass adds a row's partials
// in range order (then scales them), whatever thread ran them.
template <typename T, typename S>
void backward_kernel(const Problem<T, S>& pb, const BackwardInputs<T, S>& in, S* grad_k, S* grad_v) {
  const int64_t ld = pb.padded_keys(), d = pb.d, nq = pb.nq, nk = pb.nk, heads_total = pb.batch * pb.heads;
  const KeyRanges ranges = backward_key_ranges<T>(heads_total, ld, d);
  const int64_t nr = ranges.count;
  const bool split = nr > 1;
  const int64_t rows_size = BackwardRows<T>::size(nq, d);
  std::vector<T> shared_rows(split ? heads_total * rows_size : 0);
  std::vector<T> partial_dq(split ? heads_total * nr * nq * d : 0);  // (head, range, row, d)
  if (split) {
    at::parallel_for(0, heads_total, grain_for(4 * nq * d), [&](int64_t bh_begin, int64_t bh_end) {
      std::vector<T> scratch(2 * d);
      for (int64_t bh = bh_begin; bh < bh_end; ++bh)
        prepare_backward_rows(pb, in, bh, BackwardRows<T>::at(shared_rows.data() + bh * rows_size, nq, d),
                              scratch.data());
    });
  }
  // A task's work: five Nq x range x d products.
  const int64_t task_work = 10 * nq * std::min(ranges.end(0), nk) * d;
  at::parallel_for(0, heads_total * nr, grain_for(task_work), [&](int64_t task_begin, int64_t task_end) {
    HeadScratch<T> hs(d, ld, true, nq, pb.direct_scores());
    std::vector<T> own_rows(split ? 0 : rows_size);  // an unsplit head's task prepares its rows itself
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t bh = task / nr, range = task % nr;
      const int64_t k0 = ranges.begin(range), k1 = ranges.end(range);
      const BackwardRows<T> rows =
          BackwardRows<T>::at(split ? shared_rows.data() + bh * rows_size : own_rows.data(), nq, d);
      if (!split) prepare_backward_rows(pb, in, bh, rows, hs.row.data());
      backward_task(pb, bh, k0, k1, rows, hs);
      for (int64_t i = 0; i < nq; ++i) {
        T* y = hs.rows_b.data() + i * hs.dpad;
        if (split) {
          std::copy(y, y + d, partial_dq.data() + ((bh * nr + range) * nq + i) * d);
        } else {
          store_dq_row(pb, y, in.grad_q + (bh * nq + i) * d);
        }
      }
      S* dk = grad_k + bh * nk * d;
      S* dv = grad_v + bh * nk * d;
      T* row = hs.row.data();
      for (int64_t j = k0; j < std::min(nk, k1); ++j) {
        for (int64_t c = 0; c < d; ++c) row[c] = hs.grad_k_t[c * ld + j];
        from_opmath(row, dk + j * d, d);
        for (int64_t c = 0; c < d; ++c) row[c] = hs.grad_v_t[c * ld + j];
        from_opmath(row, dv + j * d, d);
      }
    }
  });
  if (!split) return;
  at::parallel_for(0, heads_total * nq, grain_for(nr * d), [&](int64_t row_begin, int64_t row_end) {
    std::vector<T> sum(d);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const int64_t bh = r / nq, i = r % nq;
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t range = 0; range < nr; ++range) {
        const T* part = partial_dq.data() + ((bh * nr + range) * nq + i) * d;
        for (int64_t c = 0; c < d; ++c) sum[c] += part[c];
      }
      store_dq_row(pb, sum.data(), in.grad_q + r * d);
    }
  });
}

// The dropout arguments of one call, as lucidops.reference.attention_dropout defines them.
struct Dropout {
  int64_t seed, threshold;
  double keep_scale;
};

template <typename T, typename S>
Problem<T, S> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& key_padding_mask, bool causal, double scale, const Dropout& dropout) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "lucidops cpu attention kernel: q, k and v must be CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "lucidops cpu attention kernel: 4-D tensors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "lucidops cpu attention kernel: q, k and v must share a dtype");
  const int64_t b = q.size(0), h = q.size(1), nq = q.size(2), d = q.size(3), nk = k.size(2);
  TORCH_CHECK(k.sizes() == at::IntArrayRef({b, h, nk, d}) && v.sizes() == k.sizes(),
              "lucidops cpu attention kernel: k and v must be (B, H, Nk, d)");
  const bool masked = key_padding_mask.numel() > 0;
  if (masked)
    TORCH_CHECK(key_padding_mask.scalar_type() == at::kBool && key_padding_mask.is_contiguous() &&
                    key_padding_mask.sizes() == at::IntArrayRef({b, nk}),
                "lucidops cpu attention kernel: key_padding_mask must be a contiguous bool (B, Nk) or empty");
  const bool* mask = masked ? key_padding_mask.const_data_ptr<bool>() : nullptr;
  TORCH_CHECK(dropout.threshold >= 0 && dropout.threshold < (int64_t{1} << (32 - kKeepShift)),
              "lucidops cpu attention kernel: dropout threshold must be in [0, 2^24), got ", dropout.threshold);
  return Problem<T, S>{b, h, nq, nk, d, causal, static_cast<T>(scale), rows_of<S>(q, "q"), rows_of<S>(k, "k"),
                       rows_of<S>(v, "v"), mask, static_cast<uint32_t>(dropout.seed),
                       static_cast<uint32_t>(dropout.threshold), static_cast<T>(dropout.keep_scale)};
}

void check_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || q.scalar_type() == at::kHalf ||
                  q.scalar_type() == at::kBFloat16,
              "lucidops cpu attention kernel: float16, bfloat16, float32 or float64 only, got ", q.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const at::Tensor& key_padding_mask, bool causal,
                                                                 double scale, int64_t dropout_seed,
                                                                 int64_t dropout_threshold, double dropout_scale) {
  check_dtype(q);
  const int64_t b = q.size(0), h = q.size(1), nq = q.size(2), d = q.size(3);
  at::Tensor out = at::empty({b, nq, h, d}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({b, h, nq}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  const bool has_low_part = q.scalar_type() == at::kBFloat16;
  at::Tensor out_lo = has_low_part ? at::empty({b, h, nq, d}, q.options()) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lucidops_attention_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const ForwardOutputs<opmath_t, scalar_t> to{out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<opmath_t>(),
                                                has_low_part ? out_lo.mutable_data_ptr<scalar_t>() : nullptr};
    forward_kernel(make_problem<opmath_t, scalar_t>(q, k, v, key_padding_mask, causal, scale,
                                                    Dropout{dropout_seed, dropout_threshold, dropout_scale}),
                   to);
  });
  return {out, lse, out_lo};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& out_lo,
                                                                  const at::Tensor& lse, const at::Tensor& grad_lse,
                                                                  const at::Tensor& key_padding_mask, bool causal,
                                                                  double scale, int64_t dropout_seed,
                                                                  int64_t dropout_threshold, double dropout_scale) {
  check_dtype(q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes() &&
                  out.scalar_type() == q.scalar_type(),
              "lucidops cpu attention kernel: grad_out and out must be of q's shape and dtype");
  const bool has_low_part = out_lo.numel() > 0;
  TORCH_CHECK(!has_low_part || (out_lo.sizes() == q.sizes() && out_lo.scalar_type() == q.scalar_type() &&
                                out_lo.is_contiguous()),
              "lucidops cpu attention kernel: out_lo must be empty or contiguous of q's shape and dtype");
  const std::vector<int64_t> rows{q.size(0), q.size(1), q.size(2)};
  // float32 for the half types (their lse and accumulators), else q's dtype.
  const at::ScalarType compute = at::toOpMathType(q.scalar_type());
  const bool has_grad_lse = grad_lse.numel() > 0;
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(rows) && lse.scalar_type() == compute && lse.is_contiguous() &&
                  (!has_grad_lse || (grad_lse.sizes() == at::IntArrayRef(rows) &&
                                     grad_lse.scalar_type() == compute && grad_lse.is_contiguous())),
              "lucidops cpu attention kernel: lse (and grad_lse, unless empty) must be contiguous (B, H, Nq) in ",
              compute, " (q's compute dtype)");
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), q.options());
  at::Tensor grad_v = at::empty(grad_k.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lucidops_attention_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const BackwardInputs<opmath_t, scalar_t> in{
        rows_of<scalar_t>(grad_out, "grad_out"), rows_of<scalar_t>(out, "out"),
        has_low_part ? out_lo.const_data_ptr<scalar_t>() : nullptr, lse.const_data_ptr<opmath_t>(),
        has_grad_lse ? grad_lse.const_data_ptr<opmath_t>() : nullptr, grad_q.mutable_data_ptr<scalar_t>()};
    backward_kernel(make_problem<opmath_t, scalar_t>(q, k, v, key_padding_mask, causal, scale,
                                                     Dropout{dropout_seed, dropout_threshold, dropout_scale}),
                    in, grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace cpu
}  // namespace lucidops
