// CPU varlen attention math, forward and backward (no torch in here; attention.cpp binds it).
//
// Layout (DESIGN.md "Semantics"): q (total_q, H, D), k (total_k, Hk, D), v (total_k, Hk, Dv),
// any row/head strides, unit stride along the head dim; out / grads written through their
// own strides. Sequence b has Lq = cu_q[b+1]-cu_q[b] queries starting at row start_q[b] and
// Lk keys starting at start_k[b]; query i sees key j when lo(i) <= j < hi(i) (key_range).
//
// The work is split into independent items that the caller runs with at::parallel_for:
//   forward   (b, h, query block)   blocked online softmax, O(block) scratch per thread
//   dK/dV     (b, hk, key block)    sums over the heads of its group and the query blocks
//   dQ        (b, h, query block)
// Every output row is written by exactly one item, so there are no atomics and the result
// is bitwise reproducible. Tiles are converted into acc_t scratch (float, or double for
// float64) and multiplied by a small register-blocked GEMM written with GCC vector
// extensions, so one source serves every instruction set. The GEMM reads its left operand
// through (row, column) strides, so a transposed operand costs nothing; the forward and dQ
// passes compute the transposed scores S^T = K Q^T (keys x queries, Q transposed once per
// item), which puts the queries along the vector lanes: the online-softmax statistics
// (max, sum, rescale) are then plain vertical vector operations. The dK/dV pass keeps
// queries x keys (K and V transposed once per item) and reads P and dS transposed.
//
// This file has two parts:
//  * a common part (include-guarded): parameters, work items, band arithmetic, sizes;
//  * an ISA part, included once per instruction set inside `namespace VARLEN_ISA_NS`, with
//    VARLEN_VEC_BYTES (vector width), VARLEN_GEMM_MR (rows) and VARLEN_GEMM_NV (vectors per
//    row) of the GEMM register tile defined by the includer, which also sets the target
//    (attention.cpp: #pragma GCC target); the ISA part undefines them at its end. Each ISA gets its own namespace, so no inline
//    function is compiled for two targets under one name. With VARLEN_AMX also defined (an
//    x86 AVX-512 + AMX build), the bfloat16 forward multiplies on AMX tiles.

#ifndef VARLEN_ATTENTION_KERNEL_COMMON
#define VARLEN_ATTENTION_KERNEL_COMMON

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

namespace varlen {
namespace attn {

// Query and key tile sizes. Multiples of 64 so that every ISA's GEMM tile divides them.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;
// Head dims are rounded up to this in scratch buffers (zero-filled columns).
constexpr int64_t kPadTo = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename scalar_t, typename acc_t>
struct Params {
  // inputs; strides in elements (row, head); the head dim is contiguous
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1;
  const int32_t* cu_q;     // (batch+1,) logical: lengths and dropout row numbers
  const int32_t* cu_k;
  const int32_t* start_q;  // (batch+1,) physical starts (cu_q unless padded)
  const int32_t* start_k;
  int64_t batch, nheads, nheads_k, headdim, headdim_v, total_q;
  acc_t scale;             // softmax_scale
  acc_t softcap;           // 0 = off
  int64_t window_left, window_right;  // -1 = unbounded
  const float* alibi;      // nullptr, or (nheads,) / (batch, nheads) contiguous
  int64_t alibi_batch_stride;  // 0 for (nheads,)
  bool dropout;
  uint64_t seed, offset;
  uint32_t dropout_threshold;
  acc_t dropout_scale;     // 1 / (1 - p)
  bool amx_bf16;           // bfloat16 forward on AMX tiles (only in the VARLEN_AMX build)
  const acc_t* sink;       // nullptr, or (nheads,) contiguous: one learnable logit per head
                           // in every row's softmax denominator (forward only: the backward
                           // reads it through the saved lse)

  // forward outputs: out (total_q, H, Dv) contiguous, lse (H, total_q) contiguous
  scalar_t* out;
  acc_t* lse;

  // backward: grad_out and out with strides; lse (H, total_q) contiguous; delta (H, total_q)
  // holds D - dlse = rowsum(dO * O) - grad_lse; grads written through their strides.
  const scalar_t* dout;
  int64_t dout_s0, dout_s1;
  const scalar_t* out_saved;
  int64_t out_s0, out_s1;
  const acc_t* lse_saved;
  const acc_t* delta;
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
  int64_t dq_s0, dq_s1, dq_s2, dk_s0, dk_s1, dk_s2, dv_s0, dv_s1, dv_s2;

  int64_t group() const { return nheads / nheads_k; }
  int64_t len_q(int64_t b) const { return int64_t(cu_q[b + 1]) - cu_q[b]; }
  int64_t len_k(int64_t b) const { return int64_t(cu_k[b + 1]) - cu_k[b]; }
};

// A work item: rows [start, start + kBlockM) of the queries (or kBlockN of the keys) of
// sequence b, head h (a kv head for the dK/dV pass). Lists are ordered by (b, h, start) so
// that a thread's consecutive items reuse one head's keys and values from cache.
struct Block {
  int32_t b;
  int32_t h;
  int32_t start;
};

// Keys that query i (0-based in its sequence) sees: [*lo, *hi), clipped to [0, Lk).
// off = Lk - Lq aligns the band bottom-right.
inline void key_range(int64_t i, int64_t off, int64_t Lk, int64_t left, int64_t right,
                      int64_t* lo, int64_t* hi) {
  *lo = left < 0 ? 0 : imax(0, i + off - left);
  *hi = right < 0 ? Lk : imin(Lk, i + off + right + 1);
}

// Queries that see at least one key of [n0, n1): [*lo, *hi), clipped to [0, Lq).
inline void query_range(int64_t n0, int64_t n1, int64_t off, int64_t Lq, int64_t left,
                        int64_t right, int64_t* lo, int64_t* hi) {
  *lo = right < 0 ? 0 : imax(0, n0 - off - right);
  *hi = left < 0 ? Lq : imin(Lq, n1 - 1 - off + left + 1);
}

// A (sequence b, query head h, query block) work item of the forward and dQ passes: kv head
// hk, rows [m0, m0 + rows) of the Lq queries, physical starts sq / sk of the sequence's query
// and key rows, and the keys [klo, khi) that at least one of those rows sees.
struct QueryTile {
  int64_t b, h, hk, m0, rows, sq, sk, klo, khi;
};

template <typename P>
QueryTile query_tile(const P& p, const Block& blk) {
  const int64_t b = blk.b, Lq = p.len_q(b), Lk = p.len_k(b), off = Lk - Lq;
  const int64_t m0 = blk.start, rows = imin(kBlockM, Lq - m0);
  int64_t klo, khi, unused;
  key_range(m0, off, Lk, p.window_left, p.window_right, &klo, &unused);
  key_range(m0 + rows - 1, off, Lk, p.window_left, p.window_right, &unused, &khi);
  return {b, blk.h, blk.h / p.group(), m0, rows, p.start_q[b], p.start_k[b], klo, khi};
}

// Scratch sizes in acc_t elements (one buffer per thread); layouts in the item functions.
inline int64_t forward_scratch(int64_t D, int64_t Dv) {
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  return Dp * kBlockM + kBlockN * Dp + kBlockN * Dvp + kBlockN * kBlockM + kBlockM * Dvp +
         3 * kBlockM + kBlockN * kBlockM / 2;
}
inline int64_t backward_dkdv_scratch(int64_t D, int64_t Dv) {
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  return kBlockM * Dp + kBlockM * Dvp + Dp * kBlockN + Dvp * kBlockN + 2 * kBlockM * kBlockN +
         kBlockN + kBlockN * Dp + kBlockN * Dvp + 2 * kBlockM;
}
inline int64_t backward_dq_scratch(int64_t D, int64_t Dv) {
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  return Dp * kBlockM + Dvp * kBlockM + kBlockN * Dp + kBlockN * Dvp + 3 * kBlockN * kBlockM +
         kBlockM * Dp + 2 * kBlockM;
}

}  // namespace attn
}  // namespace varlen

#endif  // VARLEN_ATTENTION_KERNEL_COMMON


// ------------------------------------------------------------------------------ ISA part
#ifdef VARLEN_ISA_NS

namespace varlen {
namespace attn {
namespace VARLEN_ISA_NS {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float V __attribute__((vector_size(VARLEN_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(VARLEN_VEC_BYTES)));
  static constexpr int W = VARLEN_VEC_BYTES / 4;
};
template <>
struct VecOf<double> {
  typedef double V __attribute__((vector_size(VARLEN_VEC_BYTES)));
  static constexpr int W = VARLEN_VEC_BYTES / 8;
};

template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V>
inline V vmax(const V& a, const V& b) {
  return a > b ? a : b;
}

// exp(x) for float vectors: Cephes' polynomial on [-ln2/2, ln2/2] times 2^n, about 2 ulp;
// x below -87.3 (and -inf) gives exactly 0.
inline VecOf<float>::V vexp(VecOf<float>::V x) {
  using V = VecOf<float>::V;
  using I = VecOf<float>::I;
  const V xc = x > 88.0f ? V{} + 88.0f : x;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (xc * 1.44269504088896341f + magic) - magic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  const V y = p * (V)e;
  return x < -87.3f ? V{} : y;
}
inline VecOf<double>::V vexp(VecOf<double>::V x) {
  for (int c = 0; c < VecOf<double>::W; ++c) x[c] = std::exp(x[c]);
  return x;
}

// Columns one register tile of the GEMM covers; N extents are rounded up to this.
template <typename T>
constexpr int64_t gemm_cols() {
  return int64_t(VARLEN_GEMM_NV) * VecOf<T>::W;
}

// C[M, N] (+)= A[M, K] B[K, N]: A(i, k) = A[i * a_rs + k * a_cs], B and C row-major.
// M must be a multiple of VARLEN_GEMM_MR and N of gemm_cols<T>() (callers pad their
// scratch tiles with finite values).
template <typename T, bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
          int64_t ldb, T* C, int64_t ldc) {
  using V = typename VecOf<T>::V;
  constexpr int W = VecOf<T>::W, MR = VARLEN_GEMM_MR, NV = VARLEN_GEMM_NV;
  for (int64_t j0 = 0; j0 < N; j0 += NV * W) {
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      V acc[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NV; ++c)
          acc[r][c] = kAccumulate ? vload<V>(C + (i0 + r) * ldc + j0 + c * W) : V{};
      const T* a = A + i0 * a_rs;
      const T* bp = B + j0;
      for (int64_t kk = 0; kk < K; ++kk, a += a_cs, bp += ldb) {
        V bv[NV];
        for (int c = 0; c < NV; ++c) bv[c] = vload<V>(bp + c * W);
        for (int r = 0; r < MR; ++r) {
          const T ar = a[r * a_rs];
          for (int c = 0; c < NV; ++c) acc[r][c] += ar * bv[c];
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NV; ++c) vstore(C + (i0 + r) * ldc + j0 + c * W, acc[r][c]);
    }
  }
}

// dst[r][c] = mul * src row r, column c (rows r < rows, columns c < cols); rows [rows,
// rows_pad) become 0. Columns past `cols` keep their zero fill.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, int64_t s0, int64_t rows, int64_t rows_pad, int64_t cols,
               acc_t mul, acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * s0;
    acc_t* d = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]) * mul;
  }
  for (int64_t r = rows; r < rows_pad; ++r) std::memset(dst + r * ld, 0, sizeof(acc_t) * cols);
}

// Transposed: dst[c][r] = mul * src row r, column c; columns [rows, rows_pad) of dst become 0.
template <typename scalar_t, typename acc_t>
void load_rows_t(const scalar_t* src, int64_t s0, int64_t rows, int64_t rows_pad, int64_t cols,
                 acc_t mul, acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * s0;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = static_cast<acc_t>(s[c]) * mul;
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = rows; r < rows_pad; ++r) dst[c * ld + r] = 0;
}

template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t mul,
                scalar_t* dst, int64_t s0, int64_t s2) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * s0 + c * s2] = static_cast<scalar_t>(src[r * ld + c] * mul);
}

template <typename acc_t>
inline void fill(acc_t* x, int64_t begin, int64_t end, acc_t value) {
  for (int64_t i = begin; i < end; ++i) x[i] = value;
}

template <typename scalar_t, typename acc_t>
acc_t alibi_slope(const Params<scalar_t, acc_t>& p, int64_t b, int64_t h) {
  return p.alibi ? static_cast<acc_t>(p.alibi[b * p.alibi_batch_stride + h]) : acc_t(0);
}

// Softcap and ALiBi on the visible entries x[lo, hi) of a score row or column, whose entry
// e is at distance |diag0 + e * dir| from the aligned diagonal; t (if given) gets tanh(x/c).
template <typename scalar_t, typename acc_t>
void softcap_alibi(const Params<scalar_t, acc_t>& p, acc_t* x, acc_t* t, int64_t lo, int64_t hi,
                   acc_t slope, int64_t diag0, int64_t dir) {
  if (p.softcap > 0) {
    const acc_t c = p.softcap, inv_c = acc_t(1) / p.softcap;
    for (int64_t e = lo; e < hi; ++e) {
      const acc_t th = std::tanh(x[e] * inv_c);
      if (t) t[e] = th;
      x[e] = c * th;
    }
  }
  if (p.alibi) {
    for (int64_t e = lo; e < hi; ++e) {
      const int64_t dist = diag0 + e * dir;
      x[e] -= slope * static_cast<acc_t>(dist < 0 ? -dist : dist);
    }
  }
}

// Scores of a keys x queries tile ST[j][r] (key n0 + j, query m0 + r; ld kBlockM), holding
// scale * q.k: applies softcap and ALiBi, sets entries that are not visible (and query
// columns [rows, qn)) to -inf, and stores each key row's visible query range in lo/hi.
// With tt, tt[j][r] receives tanh(x / softcap).
template <typename scalar_t, typename acc_t>
void scores_keys_by_queries(const Params<scalar_t, acc_t>& p, acc_t* ST, acc_t* tt, int64_t b,
                            int64_t h, int64_t m0, int64_t rows, int64_t qn, int64_t n0,
                            int64_t cols, int64_t* lo, int64_t* hi) {
  const int64_t Lq = p.len_q(b), off = p.len_k(b) - Lq;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t slope = alibi_slope(p, b, h);
  for (int64_t j = 0; j < cols; ++j) {
    int64_t a, z;
    query_range(n0 + j, n0 + j + 1, off, Lq, p.window_left, p.window_right, &a, &z);
    lo[j] = imin(imax(a - m0, 0), rows);
    hi[j] = imax(imin(z - m0, rows), lo[j]);
    acc_t* s = ST + j * kBlockM;
    fill(s, 0, lo[j], ninf);
    fill(s, hi[j], qn, ninf);
    // distance of query m0 + r from key n0 + j: |m0 + r + off - n0 - j|
    softcap_alibi(p, s, tt ? tt + j * kBlockM : nullptr, lo[j], hi[j], slope, m0 + off - n0 - j, 1);
  }
}

// ---------------------------------------------------------------------------- forward

#ifdef VARLEN_AMX
// bfloat16 forward on AMX tiles (TMUL): products in fp32 from bf16 pairs. B operands are
// "pairs along the reduction dim" (uint32 = lo | hi << 16, the VNNI layout). Eight tiles of
// 16 rows x 64 bytes: C 0-3 (2 x 2 blocks of 16 x 16 floats), A 4-5, B 6-7.

struct TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void amx_begin() {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// C[M, N] (+)= A[M, K] B[K, N]: A bf16 row-major, B pairs [K / 2][N], C float; leading dims
// in bytes. M, N and K multiples of 32.
template <bool kAccumulate>
void amx_gemm(int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B,
              int64_t ldb, float* C, int64_t ldc) {
  const char* a = static_cast<const char*>(A);
  const char* b = static_cast<const char*>(B);
  char* c = reinterpret_cast<char*>(C);
  for (int64_t i0 = 0; i0 < M; i0 += 32) {
    for (int64_t j0 = 0; j0 < N; j0 += 32) {
      char* c0 = c + i0 * ldc + j0 * 4;
      char* c1 = c0 + 16 * ldc;
      if (kAccumulate) {
        _tile_loadd(0, c0, ldc);
        _tile_loadd(1, c0 + 64, ldc);
        _tile_loadd(2, c1, ldc);
        _tile_loadd(3, c1 + 64, ldc);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, a + i0 * lda + k0 * 2, lda);
        _tile_loadd(5, a + (i0 + 16) * lda + k0 * 2, lda);
        _tile_loadd(6, b + (k0 / 2) * ldb + j0 * 4, ldb);
        _tile_loadd(7, b + (k0 / 2) * ldb + j0 * 4 + 64, ldb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0, ldc);
      _tile_stored(1, c0 + 64, ldc);
      _tile_stored(2, c1, ldc);
      _tile_stored(3, c1 + 64, ldc);
    }
  }
}

inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// dst[c2][r] = pair (src row r, columns 2 c2 and 2 c2 + 1) for r < rows; columns [rows,
// rows_pad) of dst become 0. An odd last column pairs with 0.
inline void load_pairs_t(const uint16_t* src, int64_t s0, int64_t rows, int64_t rows_pad,
                         int64_t cols, uint32_t* dst, int64_t ld) {
  const int64_t c2n = (cols + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = src + r * s0;
    for (int64_t c2 = 0; c2 < cols / 2; ++c2) dst[c2 * ld + r] = bf16_pair(s[2 * c2], s[2 * c2 + 1]);
    if (cols & 1) dst[(c2n - 1) * ld + r] = bf16_pair(s[cols - 1], 0);
  }
  for (int64_t c2 = 0; c2 < c2n; ++c2)
    for (int64_t r = rows; r < rows_pad; ++r) dst[c2 * ld + r] = 0;
}

// dst[c][r] = src row r, column c (16-bit values) for r < rows; columns [rows, rows_pad) of
// dst become 0.
inline void load_u16_t(const uint16_t* src, int64_t s0, int64_t rows, int64_t rows_pad,
                       int64_t cols, uint16_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = src + r * s0;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = s[c];
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = rows; r < rows_pad; ++r) dst[c * ld + r] = 0;
}

// In-register transpose of a 16 x 16 block of 32-bit values (row i of the result holds
// column i of the input).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Vt[d][j] = v row j, column d (16-bit values) for j < cols, d < Dv; keys [cols, cols32)
// give 0. Full tiles (cols a multiple of 32, Dv of 32) pair the keys with vpermt2w and
// transpose the pairs 16 x 16 at a time; others go element by element.
inline void load_v_t(const uint16_t* v, int64_t s0, int64_t cols, int64_t cols32, int64_t Dv,
                     uint16_t* Vt, int64_t ld) {
  if (cols != cols32 || Dv % 32 != 0) {
    load_u16_t(v, s0, cols, cols32, Dv, Vt, ld);
    return;
  }
  uint16_t lo_idx[32], hi_idx[32];
  for (int i = 0; i < 16; ++i) {  // (a[i], b[i]) pairs of the low and the high 16 columns
    lo_idx[2 * i] = uint16_t(i), lo_idx[2 * i + 1] = uint16_t(32 + i);
    hi_idx[2 * i] = uint16_t(16 + i), hi_idx[2 * i + 1] = uint16_t(48 + i);
  }
  const __m512i lo_sel = _mm512_loadu_si512(lo_idx), hi_sel = _mm512_loadu_si512(hi_idx);
  for (int64_t j0 = 0; j0 < cols; j0 += 32) {
    for (int64_t d0 = 0; d0 < Dv; d0 += 32) {
      __m512i lo[16], hi[16];
      for (int j2 = 0; j2 < 16; ++j2) {
        const __m512i a = _mm512_loadu_si512(v + (j0 + 2 * j2) * s0 + d0);
        const __m512i b = _mm512_loadu_si512(v + (j0 + 2 * j2 + 1) * s0 + d0);
        lo[j2] = _mm512_permutex2var_epi16(a, lo_sel, b);
        hi[j2] = _mm512_permutex2var_epi16(a, hi_sel, b);
      }
      transpose16(lo);
      transpose16(hi);
      for (int i = 0; i < 16; ++i) {
        _mm512_storeu_si512(Vt + (d0 + i) * ld + j0, lo[i]);
        _mm512_storeu_si512(Vt + (d0 + 16 + i) * ld + j0, hi[i]);
      }
    }
  }
}

// P2[j2][r] = pair (bf16(P[2 j2][r]), bf16(P[2 j2 + 1][r])) from the keys x queries tile P,
// rounded to nearest even, for j2 < rows2_pad; keys past `cols` give 0.
typedef uint32_t U32x16 __attribute__((vector_size(64)));
inline U32x16 bf16_bits(U32x16 x) { return (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16; }

inline void pack_probs(const float* P, int64_t cols, int64_t qn, int64_t rows2_pad, uint32_t* P2) {
  typedef U32x16 U;
  for (int64_t j2 = 0; j2 < rows2_pad; ++j2) {
    const float* a = P + 2 * j2 * kBlockM;
    for (int64_t c = 0; c < qn; c += 16) {
      const U lo = 2 * j2 < cols ? bf16_bits(vload<U>(a + c)) : U{};
      const U hi = 2 * j2 + 1 < cols ? bf16_bits(vload<U>(a + kBlockM + c)) : U{};
      vstore(P2 + j2 * kBlockM + c, lo | (hi << 16));
    }
  }
}
#endif  // VARLEN_AMX

// One key tile of the online softmax over the keys x queries tile ST (cols keys, qn query
// columns): ST becomes exp(S - m_new), m/l are updated and alpha = exp(m_old - m_new).
template <typename acc_t>
void online_softmax(acc_t* ST, int64_t cols, int64_t qn, acc_t* mrow, acc_t* lrow, acc_t* alpha) {
  using V = typename VecOf<acc_t>::V;
  constexpr int W = VecOf<acc_t>::W;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < qn; c += W) {
    const V m_old = vload<V>(mrow + c);
    V mx = m_old;
    for (int64_t j = 0; j < cols; ++j) mx = vmax(mx, vload<V>(ST + j * kBlockM + c));
    const V m_safe = mx == ninf ? V{} : mx;  // a column that saw nothing yet stays 0
    const V a = vexp(m_old - m_safe);
    V sum{};
    for (int64_t j = 0; j < cols; ++j) {
      const V e = vexp(vload<V>(ST + j * kBlockM + c) - m_safe);
      vstore(ST + j * kBlockM + c, e);
      sum += e;
    }
    vstore(lrow + c, vload<V>(lrow + c) * a + sum);
    vstore(mrow + c, mx);
    vstore(alpha + c, a);
  }
}

// Forward items (b, h, query block): blocked online softmax over the key blocks in the band.
// Tiles are keys x queries: S^T = K (scale Q)^T, then O += P V with P read transposed. With
// p.amx_bf16 (bfloat16, VARLEN_AMX), both products run on AMX tiles and the output is
// accumulated transposed: O^T += V^T P^T.
template <typename scalar_t, typename acc_t>
void forward_items(const Params<scalar_t, acc_t>& p, const Block* blocks, int64_t begin,
                   int64_t end, acc_t* scratch) {
  using V [[maybe_unused]] = typename VecOf<acc_t>::V;
  [[maybe_unused]] constexpr int W = VecOf<acc_t>::W;
  constexpr int64_t BM = kBlockM, BN = kBlockN, MR = VARLEN_GEMM_MR, NT = gemm_cols<acc_t>();
  const int64_t D = p.headdim, Dv = p.headdim_v, H = p.nheads;
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo), Dv_nt = round_up(Dv, NT);
  acc_t* Qt = scratch;          // [Dp][BM]   scale * q, transposed
  acc_t* Kb = Qt + Dp * BM;     // [BN][Dp]
  acc_t* Vb = Kb + BN * Dp;     // [BN][Dvp]
  acc_t* ST = Vb + BN * Dvp;    // [BN][BM]   scores, then probabilities, keys x queries
  acc_t* O = ST + BN * BM;      // [BM][Dvp]  unnormalised output
  acc_t* mrow = O + BM * Dvp;   // [BM] running max
  acc_t* lrow = mrow + BM;      // [BM] running sum
  acc_t* alpha = lrow + BM;     // [BM] rescale factor of this key block
  int64_t lo[BN], hi[BN];
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kMayAmx = sizeof(scalar_t) == 2 && sizeof(acc_t) == 4;
  const bool amx = kMayAmx && p.amx_bf16;
#ifdef VARLEN_AMX
  // the same scratch, other types: bf16 bits and pairs
  uint32_t* Q2 = reinterpret_cast<uint32_t*>(Qt);       // [Dp / 2][BM] q pairs, transposed
  uint16_t* K16 = reinterpret_cast<uint16_t*>(Kb);      // [BN][Dp]     k
  uint16_t* Vt16 = reinterpret_cast<uint16_t*>(Vb);     // [Dvp][BN]    v transposed
  uint32_t* P2 = reinterpret_cast<uint32_t*>(alpha + BM);  // [BN / 2][BM] p pairs of keys
  acc_t* OT = O;                                        // [Dvp][BM]    output transposed
  const int64_t Dp32 = round_up(D, 32), Dv32 = round_up(Dv, 32);
  if constexpr (kMayAmx)
    if (amx) amx_begin();
#endif

  for (int64_t item = begin; item < end; ++item) {
    const auto [b, h, hk, m0, rows, sq, sk, klo, khi] = query_tile(p, blocks[item]);
    const int64_t rows_mr = round_up(rows, MR), qn = round_up(rows, NT);
    const scalar_t* qp = p.q + (sq + m0) * p.q_s0 + h * p.q_s1;

    fill(mrow, 0, qn, ninf);
    fill(lrow, 0, qn, acc_t(0));
    if (!amx) {
      load_rows_t(qp, p.q_s0, rows, qn, D, p.scale, Qt, BM);
      for (int64_t r = 0; r < rows_mr; ++r) fill(O + r * Dvp, 0, Dv_nt, acc_t(0));
    }
#ifdef VARLEN_AMX
    if constexpr (kMayAmx) {
      if (amx) {
        load_pairs_t(reinterpret_cast<const uint16_t*>(qp), p.q_s0, rows, qn, D, Q2, BM);
        for (int64_t d = 0; d < Dv32; ++d) fill(OT + d * BM, 0, qn, acc_t(0));
      }
    }
#endif
    for (int64_t n0 = klo; n0 < khi; n0 += BN) {
      const int64_t cols = imin(BN, khi - n0), cols_mr = round_up(cols, MR);
      const scalar_t* kp = p.k + (sk + n0) * p.k_s0 + hk * p.k_s1;
      const scalar_t* vp = p.v + (sk + n0) * p.v_s0 + hk * p.v_s1;
      if (!amx) {
        load_rows(kp, p.k_s0, cols, cols_mr, D, acc_t(1), Kb, Dp);
        load_rows(vp, p.v_s0, cols, cols, Dv, acc_t(1), Vb, Dvp);
        gemm<acc_t, false>(cols_mr, qn, D, Kb, Dp, 1, Qt, BM, ST, BM);
      }
#ifdef VARLEN_AMX
      const int64_t cols32 = round_up(cols, 32);
      if constexpr (kMayAmx) {
        if (amx) {
          // K is read in place when the tile is whole, else through a zero-padded copy
          const bool k_in_place = cols == cols32 && D == Dp32;
          if (!k_in_place) {
            for (int64_t j = 0; j < cols32; ++j) {
              if (j < cols)
                std::memcpy(K16 + j * Dp, kp + j * p.k_s0, sizeof(uint16_t) * D);
              else
                std::memset(K16 + j * Dp, 0, sizeof(uint16_t) * D);
            }
          }
          load_v_t(reinterpret_cast<const uint16_t*>(vp), p.v_s0, cols, cols32, Dv, Vt16, BN);
          amx_gemm<false>(cols32, qn, Dp32, k_in_place ? static_cast<const void*>(kp) : K16,
                          k_in_place ? p.k_s0 * 2 : Dp * 2, Q2, BM * 4, ST, BM * 4);
          for (int64_t j = 0; j < cols; ++j)
            for (int64_t c = 0; c < qn; ++c) ST[j * BM + c] *= p.scale;
        }
      }
#endif
      scores_keys_by_queries(p, ST, static_cast<acc_t*>(nullptr), b, h, m0, rows, qn, n0, cols, lo, hi);
      online_softmax(ST, cols, qn, mrow, lrow, alpha);
      if (p.dropout) {
        for (int64_t j = 0; j < cols; ++j) {
          acc_t* s = ST + j * BM;
          for (int64_t r = lo[j]; r < hi[j]; ++r) {
            const bool keep = dropout_keep(p.seed, p.offset, h, p.cu_q[b] + m0 + r, n0 + j, p.dropout_threshold);
            s[r] = keep ? s[r] * p.dropout_scale : acc_t(0);
          }
        }
      }
      if (!amx) {
        for (int64_t r = 0; r < rows; ++r) {
          if (alpha[r] == acc_t(1)) continue;
          acc_t* o = O + r * Dvp;
          for (int64_t c = 0; c < Dv_nt; ++c) o[c] *= alpha[r];
        }
        // O += P V with P read transposed from ST
        gemm<acc_t, true>(rows_mr, Dv_nt, cols, ST, 1, BM, Vb, Dvp, O, Dvp);
      }
#ifdef VARLEN_AMX
      if constexpr (kMayAmx) {
        if (amx) {
          for (int64_t d = 0; d < Dv; ++d)
            for (int64_t c = 0; c < qn; c += W) vstore(OT + d * BM + c, vload<V>(OT + d * BM + c) * vload<V>(alpha + c));
          pack_probs(ST, cols, qn, cols32 / 2, P2);
          amx_gemm<true>(Dv32, qn, cols32, Vt16, BN * 2, P2, BM * 4, OT, BM * 4);
        }
      }
#endif
    }
    scalar_t* out = p.out + ((sq + m0) * H + h) * Dv;
    acc_t* lse = p.lse + h * p.total_q + sq + m0;
    // O[r][c] at o_r * r + o_c * c
    const int64_t o_r = amx ? 1 : Dvp, o_c = amx ? BM : 1;
    for (int64_t r = 0; r < rows; ++r) {
      const bool seen = lrow[r] > 0;
      acc_t m = seen ? mrow[r] : ninf, l = seen ? lrow[r] : acc_t(0), o_scale = 1;
      if (p.sink) {  // the sink joins the denominator: l = exp(m - mx) * l + exp(sink - mx)
        const acc_t sink = p.sink[h], mx = std::max(m, sink);
        if (mx != ninf) {
          o_scale = std::exp(m - mx);  // 0 for a row that saw no key
          l = l * o_scale + std::exp(sink - mx);
          m = mx;
        }
      }
      const acc_t inv_l = seen ? o_scale / l : acc_t(0);
      for (int64_t c = 0; c < Dv; ++c) out[r * H * Dv + c] = static_cast<scalar_t>(O[r * o_r + c * o_c] * inv_l);
      lse[r] = l > 0 ? m + std::log(l) : ninf;
    }
  }
#ifdef VARLEN_AMX
  if constexpr (kMayAmx)
    if (amx) _tile_release();
#endif
}

// ---------------------------------------------------------------------------- backward

// delta[h][row] = rowsum(dO * O) - grad_lse for the rows [row_begin, row_end) of q's buffer;
// grad_lse may be null.
template <typename scalar_t, typename acc_t>
void delta_rows(const Params<scalar_t, acc_t>& p, const acc_t* grad_lse, int64_t glse_s0,
                int64_t glse_s1, acc_t* delta, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row)
    for (int64_t h = 0; h < p.nheads; ++h) {
      const scalar_t* o = p.out_saved + row * p.out_s0 + h * p.out_s1;
      const scalar_t* g = p.dout + row * p.dout_s0 + h * p.dout_s1;
      acc_t d = 0;
      for (int64_t c = 0; c < p.headdim_v; ++c) d += static_cast<acc_t>(o[c]) * static_cast<acc_t>(g[c]);
      if (grad_lse) d -= grad_lse[h * glse_s0 + row * glse_s1];
      delta[h * p.total_q + row] = d;
    }
}

// lse and delta of rows [row0, row0 + rows) of head h into lse/dl [BM]. Rows that see no
// key (lse -inf) and rows past `rows` get lse 0: all their scores are -inf, so P = 0 and
// dS = 0 (never -inf - -inf); rows past `rows` also get delta 0.
template <typename scalar_t, typename acc_t>
void load_row_stats(const Params<scalar_t, acc_t>& p, int64_t h, int64_t row0, int64_t rows,
                    acc_t* lse, acc_t* dl) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < kBlockM; ++r) {
    const acc_t l = r < rows ? p.lse_saved[h * p.total_q + row0 + r] : ninf;
    lse[r] = l == ninf ? acc_t(0) : l;
    dl[r] = r < rows ? p.delta[h * p.total_q + row0 + r] : acc_t(0);
  }
}

// dK, dV for (b, hk, key block) items. Tiles are queries x keys: S = Qs Kt, dP = dO Vt;
// dV += P^T dO and dK += dS^T Qs read P, dS transposed.
template <typename scalar_t, typename acc_t>
void backward_dkdv_items(const Params<scalar_t, acc_t>& p, const Block* blocks, int64_t begin,
                         int64_t end, acc_t* scratch) {
  using V = typename VecOf<acc_t>::V;
  constexpr int W = VecOf<acc_t>::W;
  constexpr int64_t BM = kBlockM, BN = kBlockN, MR = VARLEN_GEMM_MR, NT = gemm_cols<acc_t>();
  const int64_t D = p.headdim, Dv = p.headdim_v, G = p.group();
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  const int64_t D_nt = round_up(D, NT), Dv_nt = round_up(Dv, NT);
  acc_t* Qs = scratch;           // [BM][Dp]   scale * q
  acc_t* dO = Qs + BM * Dp;      // [BM][Dvp]
  acc_t* Kt = dO + BM * Dvp;     // [Dp][BN]
  acc_t* Vt = Kt + Dp * BN;      // [Dvp][BN]
  acc_t* S = Vt + Dvp * BN;      // [BM][BN]   scores, then P after dropout
  acc_t* dP = S + BM * BN;       // [BM][BN]   dO.v, then dS
  acc_t* th = dP + BM * BN;      // [BN]       tanh(x / softcap) of one row
  acc_t* dK = th + BN;           // [BN][Dp]
  acc_t* dV = dK + BN * Dp;      // [BN][Dvp]
  acc_t* lse = dV + BN * Dvp;    // [BM]
  acc_t* dl = lse + BM;          // [BM]
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  for (int64_t item = begin; item < end; ++item) {
    const Block blk = blocks[item];
    const int64_t hk = blk.h, b = blk.b;
    const int64_t Lq = p.len_q(b), Lk = p.len_k(b), off = Lk - Lq;
    const int64_t n0 = blk.start, cols = imin(BN, Lk - n0), cols_nt = round_up(cols, NT);
    const int64_t sq = p.start_q[b], sk = p.start_k[b];
    load_rows_t(p.k + (sk + n0) * p.k_s0 + hk * p.k_s1, p.k_s0, cols, cols_nt, D, acc_t(1), Kt, BN);
    load_rows_t(p.v + (sk + n0) * p.v_s0 + hk * p.v_s1, p.v_s0, cols, cols_nt, Dv, acc_t(1), Vt, BN);
    for (int64_t j = 0; j < cols_nt; ++j) {
      fill(dK + j * Dp, 0, D_nt, acc_t(0));
      fill(dV + j * Dvp, 0, Dv_nt, acc_t(0));
    }
    int64_t qlo, qhi;
    query_range(n0, n0 + cols, off, Lq, p.window_left, p.window_right, &qlo, &qhi);
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      const acc_t slope = alibi_slope(p, b, h);
      for (int64_t m0 = qlo; m0 < qhi; m0 += BM) {
        const int64_t rows = imin(BM, qhi - m0), rows_mr = round_up(rows, MR);
        const int64_t row0 = sq + m0;
        load_rows(p.q + row0 * p.q_s0 + h * p.q_s1, p.q_s0, rows, rows_mr, D, p.scale, Qs, Dp);
        load_rows(p.dout + row0 * p.dout_s0 + h * p.dout_s1, p.dout_s0, rows, rows_mr, Dv, acc_t(1), dO, Dvp);
        load_row_stats(p, h, row0, rows, lse, dl);
        gemm<acc_t, false>(rows_mr, cols_nt, D, Qs, Dp, 1, Kt, BN, S, BN);
        gemm<acc_t, false>(rows_mr, cols_nt, Dv, dO, Dvp, 1, Vt, BN, dP, BN);
        for (int64_t r = 0; r < rows_mr; ++r) {
          acc_t* s = S + r * BN;
          acc_t* dp = dP + r * BN;
          const int64_t i = m0 + r;
          int64_t jlo = 0, jhi = 0;
          if (r < rows) {
            int64_t a, z;
            key_range(i, off, Lk, p.window_left, p.window_right, &a, &z);
            jlo = imin(imax(a - n0, 0), cols);
            jhi = imax(imin(z - n0, cols), jlo);
          }
          if (jlo == jhi) {  // also rows that see no key at all
            fill(s, 0, cols_nt, acc_t(0));
            fill(dp, 0, cols_nt, acc_t(0));
            continue;
          }
          fill(s, 0, jlo, ninf);
          fill(s, jhi, cols_nt, ninf);
          // distance of key n0 + j from query i: |i + off - n0 - j|
          softcap_alibi(p, s, th, jlo, jhi, slope, i + off - n0, -1);
          const acc_t l = lse[r], d = dl[r];
          for (int64_t j = 0; j < cols_nt; j += W) vstore(s + j, vexp(vload<V>(s + j) - l));
          if (p.dropout) {
            const int64_t row = p.cu_q[b] + i;
            for (int64_t j = jlo; j < jhi; ++j) {
              const bool keep = dropout_keep(p.seed, p.offset, h, row, n0 + j, p.dropout_threshold);
              const acc_t kd = keep ? p.dropout_scale : acc_t(0);
              dp[j] = s[j] * (dp[j] * kd - d);
              s[j] *= kd;
            }
          } else {
            for (int64_t j = jlo; j < jhi; ++j) dp[j] = s[j] * (dp[j] - d);
          }
          if (p.softcap > 0)
            for (int64_t j = jlo; j < jhi; ++j) dp[j] *= acc_t(1) - th[j] * th[j];
          fill(dp, 0, jlo, acc_t(0));
          fill(dp, jhi, cols_nt, acc_t(0));
        }
        gemm<acc_t, true>(cols_nt, Dv_nt, rows_mr, S, 1, BN, dO, Dvp, dV, Dvp);
        gemm<acc_t, true>(cols_nt, D_nt, rows_mr, dP, 1, BN, Qs, Dp, dK, Dp);
      }
    }
    const int64_t krow = sk + n0;
    store_rows(dK, Dp, cols, D, acc_t(1), p.dk + krow * p.dk_s0 + hk * p.dk_s1, p.dk_s0, p.dk_s2);
    store_rows(dV, Dvp, cols, Dv, acc_t(1), p.dv + krow * p.dv_s0 + hk * p.dv_s1, p.dv_s0, p.dv_s2);
  }
}

// dQ for (b, h, query block) items, as forward_items: tiles are keys x queries,
// S^T = K Qt, dP^T = V dOt, dQ += dS K reads dS^T transposed.
template <typename scalar_t, typename acc_t>
void backward_dq_items(const Params<scalar_t, acc_t>& p, const Block* blocks, int64_t begin,
                       int64_t end, acc_t* scratch) {
  using V = typename VecOf<acc_t>::V;
  constexpr int W = VecOf<acc_t>::W;
  constexpr int64_t BM = kBlockM, BN = kBlockN, MR = VARLEN_GEMM_MR, NT = gemm_cols<acc_t>();
  const int64_t D = p.headdim, Dv = p.headdim_v;
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo), D_nt = round_up(D, NT);
  acc_t* Qt = scratch;           // [Dp][BM]   scale * q, transposed
  acc_t* dOt = Qt + Dp * BM;     // [Dvp][BM]
  acc_t* Kb = dOt + Dvp * BM;    // [BN][Dp]
  acc_t* Vb = Kb + BN * Dp;      // [BN][Dvp]
  acc_t* ST = Vb + BN * Dvp;     // [BN][BM]   scores, then P
  acc_t* dPT = ST + BN * BM;     // [BN][BM]   v.dO, then dS
  acc_t* TT = dPT + BN * BM;     // [BN][BM]   tanh(x / softcap)
  acc_t* dQ = TT + BN * BM;      // [BM][Dp]
  acc_t* lse = dQ + BM * Dp;     // [BM]
  acc_t* dl = lse + BM;          // [BM]
  int64_t lo[BN], hi[BN];

  for (int64_t item = begin; item < end; ++item) {
    const auto [b, h, hk, m0, rows, sq, sk, klo, khi] = query_tile(p, blocks[item]);
    const int64_t rows_mr = round_up(rows, MR), qn = round_up(rows, NT), row0 = sq + m0;
    load_rows_t(p.q + row0 * p.q_s0 + h * p.q_s1, p.q_s0, rows, qn, D, p.scale, Qt, BM);
    load_rows_t(p.dout + row0 * p.dout_s0 + h * p.dout_s1, p.dout_s0, rows, qn, Dv, acc_t(1), dOt, BM);
    load_row_stats(p, h, row0, rows, lse, dl);
    for (int64_t r = 0; r < rows_mr; ++r) fill(dQ + r * Dp, 0, D_nt, acc_t(0));
    for (int64_t n0 = klo; n0 < khi; n0 += BN) {
      const int64_t cols = imin(BN, khi - n0), cols_mr = round_up(cols, MR);
      load_rows(p.k + (sk + n0) * p.k_s0 + hk * p.k_s1, p.k_s0, cols, cols_mr, D, acc_t(1), Kb, Dp);
      load_rows(p.v + (sk + n0) * p.v_s0 + hk * p.v_s1, p.v_s0, cols, cols_mr, Dv, acc_t(1), Vb, Dvp);
      gemm<acc_t, false>(cols_mr, qn, D, Kb, Dp, 1, Qt, BM, ST, BM);
      gemm<acc_t, false>(cols_mr, qn, Dv, Vb, Dvp, 1, dOt, BM, dPT, BM);
      scores_keys_by_queries(p, ST, p.softcap > 0 ? TT : nullptr, b, h, m0, rows, qn, n0, cols, lo, hi);
      for (int64_t j = 0; j < cols; ++j) {
        acc_t* s = ST + j * BM;
        acc_t* dp = dPT + j * BM;
        if (p.dropout) {  // dP of the kept weights, before the softmax's own chain rule
          for (int64_t r = lo[j]; r < hi[j]; ++r) {
            const bool keep = dropout_keep(p.seed, p.offset, h, p.cu_q[b] + m0 + r, n0 + j, p.dropout_threshold);
            dp[r] = keep ? dp[r] * p.dropout_scale : acc_t(0);
          }
        }
        for (int64_t c = 0; c < qn; c += W) {
          const V pr = vexp(vload<V>(s + c) - vload<V>(lse + c));  // 0 where not visible
          vstore(dp + c, pr * (vload<V>(dp + c) - vload<V>(dl + c)));
        }
        if (p.softcap > 0) {
          const acc_t* t = TT + j * BM;
          for (int64_t r = lo[j]; r < hi[j]; ++r) dp[r] *= acc_t(1) - t[r] * t[r];
        }
      }
      gemm<acc_t, true>(rows_mr, D_nt, cols, dPT, 1, BM, Kb, Dp, dQ, Dp);
    }
    store_rows(dQ, Dp, rows, D, p.scale, p.dq + row0 * p.dq_s0 + h * p.dq_s1, p.dq_s0, p.dq_s2);
  }
}

}  // namespace VARLEN_ISA_NS
}  // namespace attn
}  // namespace varlen

// The ISA part consumes its parameters, so the next inclusion defines them afresh.
#undef VARLEN_ISA_NS
#undef VARLEN_VEC_BYTES
#undef VARLEN_GEMM_MR
#undef VARLEN_GEMM_NV
#undef VARLEN_AMX
#endif  // VARLEN_ISA_NS
