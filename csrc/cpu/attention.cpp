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
// 64 query rows at a time through L1-sized chunks of keys (forward_task); the backward's
// blocks of rows keep their scores, probabilities and score gradients in per-thread
// buffers. The forward runs heads and chunks of 64 query rows in parallel, the backward
// heads, one task accumulating a head's dK and dV: the result does not depend on the thread
// count. q, k, v and grad_out may have any strides with a unit one along d (a model's views
// of its qkv projection); the output is (B, H, Nq, d) laid out as (B, Nq, H, d), SDPA's
// layout.
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
// Query rows per backward block. The block's dK^T and dV^T updates (accumulate_outer) pass over
// a d x Nk accumulator that lives in L2, not L1, at N = 1024; eight rows per pass halve that
// traffic. The other products still run four rows at a time (register blocks), so the
// arithmetic, and the result, is the same as with four-row blocks.
constexpr int64_t kBackwardRows = 8;
// Key counts are padded to a multiple of this: whole vectors on every target (at most 16 lanes).
constexpr int64_t kKeyPad = 16;

inline float exp_of(float v) { return vec_math::exp(v); }
inline double exp_of(double v) { return vec_math::exp(v); }

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
// where the broadcasts fold instead: forcing it there was slower at d = 16). y: R x dpad.
template <typename T, int R, int C>
inline void rows_contract_rows_tile(const T* p, const T* rows, int64_t dpad, int64_t ld, int64_t j0, int64_t j1,
                                    int64_t c0, T* y) {
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
      m[u] = V::load(rows + j * dpad + c0 + u * V::kLanes);
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
// (keys, dpad) layout, dpad a whole number of vectors: the head dim in lanes, so nothing
// needs the horizontal sums of rows_contract_keys (which cost about half as much as the
// multiplies themselves at d = 16, N = 197). Up to four vectors of the head dim per pass
// over the keys (measured 4%-5% faster forward than one at d = 64 and 128). p: R x ld;
// y: R x dpad.
template <typename T, int R>
void rows_contract_rows(const T* p, const T* rows, int64_t dpad, int64_t ld, int64_t j0, int64_t j1, T* y) {
  constexpr int64_t lanes = vec_math::Vec<T>::kLanes;
  int64_t c0 = 0;
  if constexpr (kWideContraction)
    for (; c0 + 4 * lanes <= dpad; c0 += 4 * lanes) rows_contract_rows_tile<T, R, 4>(p, rows, dpad, ld, j0, j1, c0, y);
  for (; c0 + 2 * lanes <= dpad; c0 += 2 * lanes) rows_contract_rows_tile<T, R, 2>(p, rows, dpad, ld, j0, j1, c0, y);
  if (c0 < dpad) rows_contract_rows_tile<T, R, 1>(p, rows, dpad, ld, j0, j1, c0, y);
}

// acc_t[c][j] += sum_r x[r][c] p[r][j] for keys [0, keys). x: R x d; p: R x ld; acc_t: d x ld.
template <typename T, int R>
void accumulate_outer(const T* x, const T* p, int64_t d, int64_t ld, int64_t keys, T* acc_t) {
  using V = vec_math::Vec<T>;
  for (int64_t j = 0; j < keys; j += V::kLanes) {
    typename V::type pr[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) pr[r] = V::load(p + r * ld + j);
    for (int64_t c = 0; c < d; ++c) {
      typename V::type a = V::load(acc_t + c * ld + j);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a += x[r * d + c] * pr[r];
      V::store(acc_t + c * ld + j, a);
    }
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
  bool dropout() const { return threshold != 0; }
  uint32_t row_key(int64_t bh, int64_t i) const {
    const uint32_t head_key = fmix32(seed ^ fmix32(static_cast<uint32_t>(bh) * kGolden + kHeadOffset));
    return fmix32(head_key ^ fmix32(static_cast<uint32_t>(i) * kGolden + kRowOffset));
  }
  // Offset of query i of head bh in the output, which is (B, H, Nq, d) laid out as (B, Nq, H, d)
  // (SDPA's layout: merging the heads back into tokens is then a view).
  int64_t out_offset(int64_t bh, int64_t i) const { return ((bh / heads * nq + i) * heads + bh % heads) * d; }
};

// Head bh's keys or values transposed to (d, ld), zeros in the padding keys; row: d values
// of scratch for a half row's conversion.
template <typename T, typename S>
void transpose_head(const Rows<S>& src, int64_t bh, int64_t nk, int64_t d, int64_t ld, T* row, T* dst) {
  std::fill(dst, dst + d * ld, T(0));
  for (int64_t j = 0; j < nk; ++j) {
    const T* values = row;
    if constexpr (std::is_same_v<S, T>) {
      values = src.row(bh, j);
    } else {
      to_opmath(src.row(bh, j), row, d);
    }
    for (int64_t c = 0; c < d; ++c) dst[c * ld + j] = values[c];
  }
}

// Head bh's keys or values as (ld, dpad) rows, zeros in the padding.
template <typename T, typename S>
void pad_head_rows(const Rows<S>& src, int64_t bh, int64_t nk, int64_t d, int64_t dpad, int64_t ld, T* dst) {
  std::fill(dst, dst + ld * dpad, T(0));
  for (int64_t j = 0; j < nk; ++j) to_opmath(src.row(bh, j), dst + j * dpad, d);
}

// Query rows per forward task. Tasks are fixed ranges of rows, so a row's register block
// (and with it its rounding) does not depend on how tasks fall to threads; small enough
// that a head splits across threads (a ViT's batch-1 inference has as few as 3 heads); large
// enough that reloading a head's K and V per task (two Nk x d copies) costs little against
// the task's 64 x Nk x d multiply-adds, twice, and that each chunk of keys (forward_task)
// serves many register blocks.
constexpr int64_t kForwardChunk = 64;

// Per-thread buffers of one head. Scores need K^T (d x ld); the backward's dP = dO V^T needs
// V^T. The contraction over the keys (P V forward, dS K backward) reads the other operand as
// padded rows (ld x dpad) when the head dim fills a vector, so its sums stay within lanes,
// and transposed otherwise. Also the rows of a forward task or backward block: scaled q
// (rows x d), their scores and probabilities (rows x ld) and contractions (rows x dpad); the
// backward's dO rows, dS and dK^T, dV^T (d x ld); one row's dropout multipliers (ld); and
// rows (d) for conversions to and from half types and the backward's output row (row_lo:
// its bfloat16 residual).
template <typename T>
struct HeadScratch {
  int64_t d, ld, dpad;
  bool backward, by_rows;
  std::vector<T> k_t, v_t, contracted, rows_a, rows_b, rows_do, keys_a, keys_b, keys_z, grad_k_t, grad_v_t, row,
      row_lo;

  HeadScratch(int64_t d_, int64_t ld_, bool backward_)
      : d(d_),
        ld(ld_),
        dpad((d_ + vec_math::Vec<T>::kLanes - 1) / vec_math::Vec<T>::kLanes * vec_math::Vec<T>::kLanes),
        backward(backward_),
        by_rows(d_ >= vec_math::Vec<T>::kLanes),
        k_t(d * ld),
        v_t(backward || !by_rows ? d * ld : 0),
        contracted(by_rows ? ld * dpad : 0),
        rows_a(task_rows() * d),
        rows_b(task_rows() * dpad),
        rows_do(backward ? task_rows() * d : 0),
        keys_a(task_rows() * ld),
        keys_b(backward ? task_rows() * ld : 0),
        keys_z(ld),
        grad_k_t(backward ? d * ld : 0),
        grad_v_t(backward ? d * ld : 0),
        row(d),
        row_lo(backward ? d : 0) {}

  template <typename S>
  void load(const Problem<T, S>& pb, int64_t bh) {
    transpose_head(pb.k, bh, pb.nk, d, ld, row.data(), k_t.data());
    if (!v_t.empty()) transpose_head(pb.v, bh, pb.nk, d, ld, row.data(), v_t.data());
    if (by_rows) pad_head_rows(backward ? pb.k : pb.v, bh, pb.nk, d, dpad, ld, contracted.data());
  }

  int64_t task_rows() const { return backward ? kBackwardRows : kForwardChunk; }

  // y += P M over keys [j0, j1) (whole vectors) for R rows of p (R x ld): M is V in the
  // forward, K in the backward; y: R x dpad. Blocks wider than a register block run kRows
  // rows at a time.
  template <int R>
  void contract(const T* p, int64_t j0, int64_t j1, T* y) const {
    if constexpr (R > kRegisterRowsMax) {
      static_assert(R % kRows == 0, "wide blocks are whole register blocks");
      for (int s = 0; s < R; s += kRows) contract<kRows>(p + s * ld, j0, j1, y + s * dpad);
    } else if (by_rows) {
      rows_contract_rows<T, R>(p, contracted.data(), dpad, ld, j0, j1, y);
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

// Masks a score row beyond its visible keys and padding keys: -inf on [0, ld) where hidden.
template <typename T, typename S>
void hide_keys(const Problem<T, S>& pb, int64_t b, int64_t end, int64_t ld, T* s) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  if (pb.key_mask) {
    const bool* mask = pb.key_mask + b * pb.nk;
#pragma omp simd
    for (int64_t j = 0; j < end; ++j) s[j] = mask[j] ? s[j] : neg_inf;
  }
  std::fill(s + end, s + ld, neg_inf);
}

// keep_scale where key j's probability is kept in this row, 0 where dropped; for j in [0, keys).
template <typename T, typename S>
void dropout_multipliers(const Problem<T, S>& pb, int64_t bh, int64_t i, int64_t keys, T* z) {
  const uint32_t key = pb.row_key(bh, i), cut = pb.threshold;
  const T kept = pb.keep_scale;
#pragma omp simd
  for (int64_t j = 0; j < keys; ++j)
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

// Scores of rows [i0, i0 + R) of head bh into keys_a (R x ld): scale q_i . k_j, -inf where
// hidden; rows_a gets scale q. Returns block_keys.
template <typename T, typename S, int R>
int64_t block_scores(const Problem<T, S>& pb, int64_t bh, int64_t i0, HeadScratch<T>& hs) {
  scaled_queries(pb, bh, i0, R, hs.rows_a.data());
  const int64_t keys = block_keys(pb, i0, R);
  block_times_keys<T, R>(hs.rows_a.data(), hs.k_t.data(), pb.d, hs.ld, keys, hs.keys_a.data());
  for (int r = 0; r < R; ++r) hide_keys(pb, bh / pb.heads, pb.visible_end(i0 + r), hs.ld, hs.keys_a.data() + r * hs.ld);
  return keys;
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

// Keys per chunk of a forward task's products: the task's register blocks pass over one chunk
// of K^T (d x chunk) or V (chunk x dpad) in turn, then the next, so each chunk comes from L2
// once per task rather than once per block (a head's K and V outgrow L1 from N = 128 at
// d = 64). 16 KiB of either, half of a 32 KiB L1.
template <typename T>
int64_t forward_key_chunk(int64_t d) {
  constexpr int64_t kChunkBytes = 16 * 1024;
  return std::max<int64_t>(kKeyPad, kChunkBytes / (d * static_cast<int64_t>(sizeof(T))) / kKeyPad * kKeyPad);
}

// Calls f(std::integral_constant<int, R>{}, r0) for the register blocks [r0, r0 + R) of a
// task's rows: kForwardRows at a time, then kRows, then single rows.
template <typename F>
void for_each_block(int64_t rows, F&& f) {
  int64_t r0 = 0;
  for (; r0 + kForwardRows <= rows; r0 += kForwardRows) f(std::integral_constant<int, kForwardRows>{}, r0);
  if constexpr (kForwardRows != kRows)
    for (; r0 + kRows <= rows; r0 += kRows) f(std::integral_constant<int, kRows>{}, r0);
  for (; r0 < rows; ++r0) f(std::integral_constant<int, 1>{}, r0);
}

// Softmax of score row i of head bh over its block's keys, in place; its lse stored. Returns
// the row's sum of exponentials (0 for a row without a visible key).
template <typename T, typename S>
T softmax_row(const Problem<T, S>& pb, int64_t bh, int64_t i, int64_t keys, T* s, T* lse, T* dropout_row) {
  hide_keys(pb, bh / pb.heads, pb.visible_end(i), keys, s);
  const T m = row_max(s, keys);  // NaN scores lose every comparison: -inf if all are NaN
  const T shift = m == -std::numeric_limits<T>::infinity() ? T(0) : m;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < keys; ++j) {
    s[j] = exp_of(s[j] - shift);  // hidden keys: exp(-inf) = 0
    sum += s[j];
  }
  // No visible key: every score -inf, sum 0. A row of NaN scores (a NaN query) has sum NaN
  // and must stay NaN, as in the reference, rather than pass for a row without a key.
  lse[bh * pb.nq + i] = sum == T(0) ? -std::numeric_limits<T>::infinity() : m + std::log(sum);
  if (pb.dropout()) {  // after the sum: the softmax normalises over every visible key
    dropout_multipliers(pb, bh, i, keys, dropout_row);
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) s[j] *= dropout_row[j];
  }
  return sum;
}

// Rows [i0, i0 + rows) of head bh: S = scale Q K^T, P = softmax(S), O = P V / rowsum. Both
// products go key chunk by key chunk (forward_key_chunk) over all of the task's register
// blocks; each block spans its own keys (block_keys), so a causal task skips what its
// blocks hide. Splitting P V at chunks keeps its sums: they run over the keys in order either
// way, in registers within a chunk and through y between chunks. The keys-in-lanes
// contraction (head dims below one vector) sums lanes at its end, so it takes one chunk.
template <typename T, typename S>
void forward_task(const Problem<T, S>& pb, int64_t bh, int64_t i0, int64_t rows, HeadScratch<T>& hs,
                  const ForwardOutputs<T, S>& to) {
  const int64_t d = pb.d, ld = hs.ld, dpad = hs.dpad, chunk = forward_key_chunk<T>(d);
  const int64_t task_keys = block_keys(pb, i0, rows);  // the last row's: the widest
  T* scores = hs.keys_a.data();
  scaled_queries(pb, bh, i0, rows, hs.rows_a.data());
  for (int64_t kc = 0; kc < task_keys; kc += chunk)
    for_each_block(rows, [&](auto block, int64_t r0) {
      constexpr int R = decltype(block)::value;
      const int64_t end = std::min(block_keys(pb, i0 + r0, R), kc + chunk);
      if (end > kc)
        rows_times_keys<T, R>(hs.rows_a.data() + r0 * d, hs.k_t.data() + kc, d, ld, end - kc, scores + r0 * ld + kc);
    });
  T sums[kForwardChunk];
  for_each_block(rows, [&](auto block, int64_t r0) {
    constexpr int R = decltype(block)::value;
    const int64_t keys = block_keys(pb, i0 + r0, R);
    for (int64_t r = r0; r < r0 + R; ++r)
      sums[r] = softmax_row(pb, bh, i0 + r, keys, scores + r * ld, to.lse, hs.keys_z.data());
  });
  T* y = hs.rows_b.data();
  std::fill(y, y + rows * dpad, T(0));
  const int64_t pv_chunk = hs.by_rows ? chunk : std::max<int64_t>(task_keys, 1);
  for (int64_t kc = 0; kc < task_keys; kc += pv_chunk)
    for_each_block(rows, [&](auto block, int64_t r0) {
      constexpr int R = decltype(block)::value;
      const int64_t end = std::min(block_keys(pb, i0 + r0, R), kc + pv_chunk);
      if (end > kc) hs.template contract<R>(scores + r0 * ld, kc, end, y + r0 * dpad);  // P V
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
    HeadScratch<T> hs(pb.d, ld, false);
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
                HeadScratch<T>& hs) {
  const int64_t d = pb.d, row = bh * pb.nq + i;
  T* o = hs.row.data();
  to_opmath(in.out.row(bh, i), o, d);
  if (in.out_lo != nullptr) {
    T* lo = hs.row_lo.data();
    to_opmath(in.out_lo + row * d, lo, d);
    for (int64_t c = 0; c < d; ++c) o[c] += lo[c];
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < d; ++c) sum += do_row[c] * o[c];
  return in.grad_lse != nullptr ? sum - in.grad_lse[row] : sum;
}

// dV = P^T dO, dS = P (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q, with
// P = exp(s - lse) recomputed and delta = rowsum(dO O) - dL/dlse (delta_of_row).
template <typename T, typename S, int R>
void backward_block(const Problem<T, S>& pb, int64_t bh, int64_t i0, HeadScratch<T>& hs,
                    const BackwardInputs<T, S>& in) {
  const int64_t d = pb.d, ld = hs.ld;
  const T* lse = in.lse;
  const int64_t keys = block_scores<T, S, R>(pb, bh, i0, hs);  // rows_a = scale q, keys_a = s
  for (int r = 0; r < R; ++r)  // dO rows side by side, as rows_times_keys and accumulate_outer read them
    to_opmath(in.grad_out.row(bh, i0 + r), &hs.rows_do[r * d], d);
  const T* do_rows = hs.rows_do.data();
  block_times_keys<T, R>(do_rows, hs.v_t.data(), d, ld, keys, hs.keys_b.data());  // dP = dO V^T
  for (int r = 0; r < R; ++r) {
    const int64_t row = bh * pb.nq + i0 + r;
    T* p = hs.keys_a.data() + r * ld;
    T* ds = hs.keys_b.data() + r * ld;
    // A row without a visible key has lse = -inf: P = 0 there, so no gradient flows.
    const bool empty = lse[row] == -std::numeric_limits<T>::infinity();
    const T row_lse = empty ? T(0) : lse[row];
    const T row_delta = delta_of_row(pb, in, bh, i0 + r, do_rows + r * d, hs);
    if (pb.dropout()) {  // dS = P (Z dP - delta); dV takes P Z
      T* z = hs.keys_z.data();
      dropout_multipliers(pb, bh, i0 + r, keys, z);
#pragma omp simd
      for (int64_t j = 0; j < keys; ++j) {
        const T pj = exp_of(p[j] - row_lse);
        ds[j] = pj * (z[j] * ds[j] - row_delta);
        p[j] = pj * z[j];
      }
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) {
      p[j] = exp_of(p[j] - row_lse);
      ds[j] = p[j] * (ds[j] - row_delta);
    }
  }
  accumulate_outer<T, R>(do_rows, hs.keys_a.data(), d, ld, keys, hs.grad_v_t.data());        // dV^T += dO^T P
  accumulate_outer<T, R>(hs.rows_a.data(), hs.keys_b.data(), d, ld, keys, hs.grad_k_t.data());  // dK^T += (s Q)^T dS
  T* y = hs.rows_b.data();
  std::fill(y, y + R * hs.dpad, T(0));
  hs.template contract<R>(hs.keys_b.data(), 0, keys, y);  // dS K
  for (int r = 0; r < R; ++r) {
    T* yr = y + r * hs.dpad;
    for (int64_t c = 0; c < d; ++c) yr[c] *= pb.scale;
    from_opmath(yr, in.grad_q + (bh * pb.nq + i0 + r) * d, d);
  }
}

template <typename T, typename S>
void backward_kernel(const Problem<T, S>& pb, const BackwardInputs<T, S>& in, S* grad_k, S* grad_v) {
  const int64_t ld = pb.padded_keys(), d = pb.d, nk = pb.nk;
  // A head's backward: five Nq x Nk x d products.
  at::parallel_for(0, pb.batch * pb.heads, grain_for(10 * pb.nq * nk * d), [&](int64_t bh_begin, int64_t bh_end) {
    HeadScratch<T> hs(d, ld, true);
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      hs.load(pb, bh);
      std::fill(hs.grad_k_t.begin(), hs.grad_k_t.end(), T(0));
      std::fill(hs.grad_v_t.begin(), hs.grad_v_t.end(), T(0));
      int64_t i0 = 0;
      for (; i0 + kBackwardRows <= pb.nq; i0 += kBackwardRows)
        backward_block<T, S, kBackwardRows>(pb, bh, i0, hs, in);
      for (; i0 + kRows <= pb.nq; i0 += kRows) backward_block<T, S, kRows>(pb, bh, i0, hs, in);
      for (; i0 < pb.nq; ++i0) backward_block<T, S, 1>(pb, bh, i0, hs, in);
      S* dk = grad_k + bh * nk * d;
      S* dv = grad_v + bh * nk * d;
      T* row = hs.row.data();
      for (int64_t j = 0; j < nk; ++j) {
        for (int64_t c = 0; c < d; ++c) row[c] = hs.grad_k_t[c * ld + j];
        from_opmath(row, dk + j * d, d);
        for (int64_t c = 0; c < d; ++c) row[c] = hs.grad_v_t[c * ld + j];
        from_opmath(row, dv + j * d, d);
      }
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
