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
// extensions, so one source serves every instruction set.
//
// This file has two parts:
//  * a common part (include-guarded): parameters, work items, band arithmetic, sizes;
//  * an ISA part, included once per instruction set inside `namespace VARLEN_ISA_NS`, with
//    VARLEN_VEC_BYTES (vector width), VARLEN_GEMM_MR (rows) and VARLEN_GEMM_NV (vectors per
//    row) of the GEMM register tile defined by the includer, which also sets the target
//    (attention.cpp: #pragma GCC target). Each ISA gets its own namespace, so no inline
//    function is compiled for two targets under one name.

#ifndef VARLEN_ATTENTION_KERNEL_COMMON
#define VARLEN_ATTENTION_KERNEL_COMMON

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../philox.h"

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

// A block of one sequence: rows [start, start + kBlockM) of queries or kBlockN of keys.
struct Block {
  int32_t b;
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

// Scratch sizes in acc_t elements (one buffer per thread).
inline int64_t forward_scratch(int64_t D, int64_t Dv) {
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  return kBlockM * Dp + Dp * kBlockN + kBlockN * Dvp + kBlockM * kBlockN + kBlockM * Dvp +
         2 * kBlockM;
}
inline int64_t backward_dkdv_scratch(int64_t D, int64_t Dv) {
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  return kBlockM * Dp + kBlockM * Dvp + Dp * kBlockN + Dvp * kBlockN + 4 * kBlockM * kBlockN +
         kBlockN * Dp + kBlockN * Dvp + 2 * kBlockM + kBlockN;
}
inline int64_t backward_dq_scratch(int64_t D, int64_t Dv) {
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  return kBlockM * Dp + kBlockM * Dvp + Dp * kBlockN + Dvp * kBlockN + kBlockN * Dp +
         2 * kBlockM * kBlockN + kBlockN + kBlockM * Dp + 2 * kBlockM;
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

// Columns a GEMM call covers per register tile; N extents are rounded up to this.
template <typename T>
constexpr int64_t gemm_cols() {
  return int64_t(VARLEN_GEMM_NV) * VecOf<T>::W;
}

// C[M, N] (+)= A[M, K] * B[K, N], row-major with leading dims. M must be a multiple of
// VARLEN_GEMM_MR and N of gemm_cols<T>() (callers pad their scratch tiles with zeros).
template <typename T, bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
          T* C, int64_t ldc) {
  using V = typename VecOf<T>::V;
  constexpr int W = VecOf<T>::W, MR = VARLEN_GEMM_MR, NV = VARLEN_GEMM_NV;
  for (int64_t j0 = 0; j0 < N; j0 += NV * W) {
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      V acc[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NV; ++c)
          acc[r][c] = kAccumulate ? vload<V>(C + (i0 + r) * ldc + j0 + c * W) : V{};
      const T* a = A + i0 * lda;
      const T* bp = B + j0;
      for (int64_t kk = 0; kk < K; ++kk, bp += ldb) {
        V bv[NV];
        for (int c = 0; c < NV; ++c) bv[c] = vload<V>(bp + c * W);
        for (int r = 0; r < MR; ++r) {
          const T ar = a[r * lda + kk];
          for (int c = 0; c < NV; ++c) acc[r][c] += ar * bv[c];
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NV; ++c) vstore(C + (i0 + r) * ldc + j0 + c * W, acc[r][c]);
    }
  }
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

// x[j] = exp(x[j] - m) for j < n (n a multiple of the vector width); returns the sum.
inline float exp_sub(float* x, int64_t n, float m) {
  using V = VecOf<float>::V;
  constexpr int W = VecOf<float>::W;
  V sum{};
  for (int64_t j = 0; j < n; j += W) {
    const V e = vexp(vload<V>(x + j) - m);
    vstore(x + j, e);
    sum += e;
  }
  float s = 0;
  for (int c = 0; c < W; ++c) s += sum[c];
  return s;
}
inline double exp_sub(double* x, int64_t n, double m) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    s += x[j];
  }
  return s;
}

// Copies rows [r0, r0 + rows) of one head into dst[rows_pad][ld] as acc_t times mul;
// rows [rows, rows_pad) become 0. Columns past `cols` keep their zero fill.
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

// Transposed copy: dst[c][r] = src row r, column c, for r < rows; columns [rows, rows_pad)
// of dst become 0.
template <typename scalar_t, typename acc_t>
void load_rows_t(const scalar_t* src, int64_t s0, int64_t rows, int64_t rows_pad, int64_t cols,
                 acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * s0;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = static_cast<acc_t>(s[c]);
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

// The scores of one tile row after softcap and ALiBi, with entries outside [jlo, jhi) set
// to -inf. s holds scale * q.k on entry. With softcap, t (if given) receives tanh(x / c).
template <typename scalar_t, typename acc_t>
void transform_scores(const Params<scalar_t, acc_t>& p, acc_t* s, acc_t* t, int64_t ncols_pad,
                      int64_t jlo, int64_t jhi, acc_t slope, int64_t diag_minus_n0) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < jlo; ++j) s[j] = ninf;
  if (p.softcap > 0) {
    const acc_t c = p.softcap, inv_c = acc_t(1) / p.softcap;
    for (int64_t j = jlo; j < jhi; ++j) {
      const acc_t th = std::tanh(s[j] * inv_c);
      if (t) t[j] = th;
      s[j] = c * th;
    }
  }
  if (p.alibi) {
    // s -= slope * |i + Lk - Lq - j|, with diag_minus_n0 = i + Lk - Lq - n0
    for (int64_t j = jlo; j < jhi; ++j) {
      const int64_t dist = diag_minus_n0 - j;
      s[j] -= slope * static_cast<acc_t>(dist < 0 ? -dist : dist);
    }
  }
  for (int64_t j = jhi; j < ncols_pad; ++j) s[j] = ninf;
}

// Visible columns of tile row i: [*jlo, *jhi) relative to n0, within [0, ncols).
inline void tile_row_range(int64_t i, int64_t off, int64_t Lk, int64_t left, int64_t right,
                           int64_t n0, int64_t ncols, int64_t* jlo, int64_t* jhi) {
  int64_t lo, hi;
  key_range(i, off, Lk, left, right, &lo, &hi);
  *jlo = imin(imax(lo - n0, 0), ncols);
  *jhi = imax(imin(hi - n0, ncols), *jlo);
}

template <typename scalar_t, typename acc_t>
acc_t alibi_slope(const Params<scalar_t, acc_t>& p, int64_t b, int64_t h) {
  return p.alibi ? static_cast<acc_t>(p.alibi[b * p.alibi_batch_stride + h]) : acc_t(0);
}

// Multiplies the kept entries of row [jlo, jhi) by 1/(1-p) and zeroes the dropped ones.
template <typename scalar_t, typename acc_t>
void apply_dropout(const Params<scalar_t, acc_t>& p, acc_t* x, int64_t h, int64_t row,
                   int64_t n0, int64_t jlo, int64_t jhi) {
  for (int64_t j = jlo; j < jhi; ++j) {
    const bool keep = dropout_keep(p.seed, p.offset, h, row, n0 + j, p.dropout_threshold);
    x[j] = keep ? x[j] * p.dropout_scale : acc_t(0);
  }
}

// ---------------------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t>
void forward_items(const Params<scalar_t, acc_t>& p, const Block* blocks, int64_t begin,
                   int64_t end, acc_t* scratch) {
  constexpr int64_t BM = kBlockM, BN = kBlockN, MR = VARLEN_GEMM_MR;
  constexpr int64_t NT = gemm_cols<acc_t>();
  const int64_t D = p.headdim, Dv = p.headdim_v, H = p.nheads;
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  const int64_t Dv_nt = round_up(Dv, NT);
  acc_t* Qs = scratch;          // [BM][Dp]   scale * q
  acc_t* Kt = Qs + BM * Dp;     // [Dp][BN]   k transposed
  acc_t* Vb = Kt + Dp * BN;     // [BN][Dvp]
  acc_t* S = Vb + BN * Dvp;     // [BM][BN]   scores, then probabilities
  acc_t* O = S + BM * BN;       // [BM][Dvp]  unnormalised output
  acc_t* mrow = O + BM * Dvp;   // [BM] running max
  acc_t* lrow = mrow + BM;      // [BM] running sum
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  for (int64_t item = begin; item < end; ++item) {
    const Block blk = blocks[item / H];
    const int64_t h = item % H, b = blk.b, hk = h / p.group();
    const int64_t Lq = p.len_q(b), Lk = p.len_k(b), off = Lk - Lq;
    const int64_t m0 = blk.start, rows = imin(BM, Lq - m0), rows_pad = round_up(rows, MR);
    const int64_t sq = p.start_q[b], sk = p.start_k[b];
    int64_t klo, khi_unused, klo_unused, khi;
    key_range(m0, off, Lk, p.window_left, p.window_right, &klo, &khi_unused);
    key_range(m0 + rows - 1, off, Lk, p.window_left, p.window_right, &klo_unused, &khi);
    const acc_t slope = alibi_slope(p, b, h);

    load_rows(p.q + (sq + m0) * p.q_s0 + h * p.q_s1, p.q_s0, rows, rows_pad, D, p.scale, Qs, Dp);
    for (int64_t r = 0; r < rows_pad; ++r) {
      mrow[r] = ninf;
      lrow[r] = 0;
      std::memset(O + r * Dvp, 0, sizeof(acc_t) * Dv_nt);
    }
    for (int64_t n0 = klo; n0 < khi; n0 += BN) {
      const int64_t cols = imin(BN, khi - n0), cols_pad = round_up(cols, NT);
      load_rows_t(p.k + (sk + n0) * p.k_s0 + hk * p.k_s1, p.k_s0, cols, cols_pad, D, Kt, BN);
      load_rows(p.v + (sk + n0) * p.v_s0 + hk * p.v_s1, p.v_s0, cols, cols, Dv, acc_t(1), Vb, Dvp);
      gemm<acc_t, false>(rows_pad, cols_pad, D, Qs, Dp, Kt, BN, S, BN);
      for (int64_t r = 0; r < rows_pad; ++r) {
        acc_t* s = S + r * BN;
        const int64_t i = m0 + r;
        int64_t jlo = 0, jhi = 0;
        if (r < rows) tile_row_range(i, off, Lk, p.window_left, p.window_right, n0, cols, &jlo, &jhi);
        if (jlo == jhi) {  // nothing visible in this tile: the row's state is unchanged
          std::memset(s, 0, sizeof(acc_t) * cols_pad);
          continue;
        }
        transform_scores(p, s, static_cast<acc_t*>(nullptr), cols_pad, jlo, jhi, slope, i + off - n0);
        acc_t mx = ninf;
        for (int64_t j = jlo; j < jhi; ++j) mx = s[j] > mx ? s[j] : mx;
        const acc_t m_new = mx > mrow[r] ? mx : mrow[r];
        const acc_t alpha = mrow[r] == ninf ? acc_t(0) : std::exp(mrow[r] - m_new);
        lrow[r] = lrow[r] * alpha + exp_sub(s, cols_pad, m_new);
        mrow[r] = m_new;
        if (p.dropout) apply_dropout(p, s, h, p.cu_q[b] + i, n0, jlo, jhi);
        if (alpha != acc_t(1)) {
          acc_t* o = O + r * Dvp;
          for (int64_t c = 0; c < Dv_nt; ++c) o[c] *= alpha;
        }
      }
      gemm<acc_t, true>(rows_pad, Dv_nt, cols, S, BN, Vb, Dvp, O, Dvp);
    }
    scalar_t* out = p.out + ((sq + m0) * H + h) * Dv;
    acc_t* lse = p.lse + h * p.total_q + sq + m0;
    for (int64_t r = 0; r < rows; ++r) {
      const bool seen = lrow[r] > 0;
      const acc_t inv_l = seen ? acc_t(1) / lrow[r] : acc_t(0);
      for (int64_t c = 0; c < Dv; ++c) out[r * H * Dv + c] = static_cast<scalar_t>(O[r * Dvp + c] * inv_l);
      lse[r] = seen ? mrow[r] + std::log(lrow[r]) : ninf;
    }
  }
}

// ---------------------------------------------------------------------------- backward

// delta[h][row] = rowsum(dO * O) - grad_lse for the rows [row_begin, row_end) of q's buffer
// (the caller passes only rows inside sequences); grad_lse may be null.
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

// One (query block x key block) tile of the backward: from S = scale * q.k (in s) and
// dP = dO.v (in dp), leaves P after dropout in s (if pd_t is null) or transposed in pd_t,
// and dS (the gradient w.r.t. scale * q.k) in dp, or transposed in ds_t.
template <typename scalar_t, typename acc_t>
void backward_tile(const Params<scalar_t, acc_t>& p, acc_t* S, acc_t* dP, int64_t b, int64_t h,
                   int64_t m0, int64_t rows, int64_t rows_pad, int64_t n0, int64_t cols,
                   int64_t cols_pad, const acc_t* lse, const acc_t* delta, acc_t* pd_t,
                   acc_t* ds_t, acc_t* tanh_buf) {
  constexpr int64_t BN = kBlockN, BM = kBlockM;
  const int64_t Lq = p.len_q(b), Lk = p.len_k(b), off = Lk - Lq;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t slope = alibi_slope(p, b, h);
  for (int64_t r = 0; r < rows_pad; ++r) {
    acc_t* s = S + r * BN;
    acc_t* dp = dP + r * BN;
    const int64_t i = m0 + r;
    int64_t jlo = 0, jhi = 0;
    if (r < rows && lse[r] != ninf)
      tile_row_range(i, off, Lk, p.window_left, p.window_right, n0, cols, &jlo, &jhi);
    if (jlo == jhi) {
      std::memset(s, 0, sizeof(acc_t) * cols_pad);
      std::memset(dp, 0, sizeof(acc_t) * cols_pad);
    } else {
      transform_scores(p, s, tanh_buf, cols_pad, jlo, jhi, slope, i + off - n0);
      exp_sub(s, cols_pad, lse[r]);  // P (before dropout); 0 outside [jlo, jhi)
      const acc_t dl = delta[r];
      if (p.dropout) {
        const int64_t row = p.cu_q[b] + i;
        for (int64_t j = jlo; j < jhi; ++j) {
          const bool keep = dropout_keep(p.seed, p.offset, h, row, n0 + j, p.dropout_threshold);
          const acc_t kd = keep ? p.dropout_scale : acc_t(0);
          dp[j] = s[j] * (dp[j] * kd - dl);
          s[j] *= kd;
        }
      } else {
        for (int64_t j = jlo; j < jhi; ++j) dp[j] = s[j] * (dp[j] - dl);
      }
      if (p.softcap > 0)
        for (int64_t j = jlo; j < jhi; ++j) dp[j] *= acc_t(1) - tanh_buf[j] * tanh_buf[j];
      for (int64_t j = 0; j < jlo; ++j) dp[j] = 0;
      for (int64_t j = jhi; j < cols_pad; ++j) dp[j] = 0;
    }
    if (pd_t)
      for (int64_t j = 0; j < cols_pad; ++j) pd_t[j * BM + r] = s[j];
    if (ds_t)
      for (int64_t j = 0; j < cols_pad; ++j) ds_t[j * BM + r] = dp[j];
  }
}

// dK, dV for (b, hk, key block) items: blocks[item / Hk], hk = item % Hk.
template <typename scalar_t, typename acc_t>
void backward_dkdv_items(const Params<scalar_t, acc_t>& p, const Block* blocks, int64_t begin,
                         int64_t end, acc_t* scratch) {
  constexpr int64_t BM = kBlockM, BN = kBlockN, MR = VARLEN_GEMM_MR;
  constexpr int64_t NT = gemm_cols<acc_t>();
  const int64_t D = p.headdim, Dv = p.headdim_v, Hk = p.nheads_k, G = p.group();
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  const int64_t D_nt = round_up(D, NT), Dv_nt = round_up(Dv, NT);
  acc_t* Qs = scratch;           // [BM][Dp]
  acc_t* dO = Qs + BM * Dp;      // [BM][Dvp]
  acc_t* Kt = dO + BM * Dvp;     // [Dp][BN]
  acc_t* Vt = Kt + Dp * BN;      // [Dvp][BN]
  acc_t* S = Vt + Dvp * BN;      // [BM][BN]
  acc_t* dP = S + BM * BN;       // [BM][BN]
  acc_t* PdT = dP + BM * BN;     // [BN][BM]
  acc_t* dST = PdT + BN * BM;    // [BN][BM]
  acc_t* dK = dST + BN * BM;     // [BN][Dp]
  acc_t* dV = dK + BN * Dp;      // [BN][Dvp]
  acc_t* lse = dV + BN * Dvp;    // [BM]
  acc_t* dl = lse + BM;          // [BM]
  acc_t* th = dl + BM;           // [BN] tanh(x / softcap) of one row

  for (int64_t item = begin; item < end; ++item) {
    const Block blk = blocks[item / Hk];
    const int64_t hk = item % Hk, b = blk.b;
    const int64_t Lq = p.len_q(b), Lk = p.len_k(b), off = Lk - Lq;
    const int64_t n0 = blk.start, cols = imin(BN, Lk - n0), cols_pad = round_up(cols, NT);
    const int64_t sq = p.start_q[b], sk = p.start_k[b];
    load_rows_t(p.k + (sk + n0) * p.k_s0 + hk * p.k_s1, p.k_s0, cols, cols_pad, D, Kt, BN);
    load_rows_t(p.v + (sk + n0) * p.v_s0 + hk * p.v_s1, p.v_s0, cols, cols_pad, Dv, Vt, BN);
    for (int64_t r = 0; r < cols_pad; ++r) {
      std::memset(dK + r * Dp, 0, sizeof(acc_t) * D_nt);
      std::memset(dV + r * Dvp, 0, sizeof(acc_t) * Dv_nt);
    }
    int64_t qlo, qhi;
    query_range(n0, n0 + cols, off, Lq, p.window_left, p.window_right, &qlo, &qhi);
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (int64_t m0 = qlo; m0 < qhi; m0 += BM) {
        const int64_t rows = imin(BM, qhi - m0), rows_pad = round_up(rows, MR);
        const int64_t row0 = sq + m0;
        load_rows(p.q + row0 * p.q_s0 + h * p.q_s1, p.q_s0, rows, rows_pad, D, p.scale, Qs, Dp);
        load_rows(p.dout + row0 * p.dout_s0 + h * p.dout_s1, p.dout_s0, rows, rows_pad, Dv,
                  acc_t(1), dO, Dvp);
        for (int64_t r = 0; r < rows; ++r) {
          lse[r] = p.lse_saved[h * p.total_q + row0 + r];
          dl[r] = p.delta[h * p.total_q + row0 + r];
        }
        gemm<acc_t, false>(rows_pad, cols_pad, D, Qs, Dp, Kt, BN, S, BN);
        gemm<acc_t, false>(rows_pad, cols_pad, Dv, dO, Dvp, Vt, BN, dP, BN);
        backward_tile(p, S, dP, b, h, m0, rows, rows_pad, n0, cols, cols_pad, lse, dl, PdT, dST, th);
        gemm<acc_t, true>(cols_pad, Dv_nt, rows_pad, PdT, BM, dO, Dvp, dV, Dvp);
        gemm<acc_t, true>(cols_pad, D_nt, rows_pad, dST, BM, Qs, Dp, dK, Dp);
      }
    }
    const int64_t krow = sk + n0;
    store_rows(dK, Dp, cols, D, acc_t(1), p.dk + krow * p.dk_s0 + hk * p.dk_s1, p.dk_s0, p.dk_s2);
    store_rows(dV, Dvp, cols, Dv, acc_t(1), p.dv + krow * p.dv_s0 + hk * p.dv_s1, p.dv_s0, p.dv_s2);
  }
}

// dQ for (b, h, query block) items, as forward_items.
template <typename scalar_t, typename acc_t>
void backward_dq_items(const Params<scalar_t, acc_t>& p, const Block* blocks, int64_t begin,
                       int64_t end, acc_t* scratch) {
  constexpr int64_t BM = kBlockM, BN = kBlockN, MR = VARLEN_GEMM_MR;
  constexpr int64_t NT = gemm_cols<acc_t>();
  const int64_t D = p.headdim, Dv = p.headdim_v, H = p.nheads;
  const int64_t Dp = round_up(D, kPadTo), Dvp = round_up(Dv, kPadTo);
  const int64_t D_nt = round_up(D, NT);
  acc_t* Qs = scratch;           // [BM][Dp]
  acc_t* dO = Qs + BM * Dp;      // [BM][Dvp]
  acc_t* Kt = dO + BM * Dvp;     // [Dp][BN]
  acc_t* Vt = Kt + Dp * BN;      // [Dvp][BN]
  acc_t* Kb = Vt + Dvp * BN;     // [BN][Dp]
  acc_t* S = Kb + BN * Dp;       // [BM][BN]
  acc_t* dP = S + BM * BN;       // [BM][BN]
  acc_t* th = dP + BM * BN;      // [BN] tanh(x / softcap) of one row
  acc_t* dQ = th + BN;           // [BM][Dp]
  acc_t* lse = dQ + BM * Dp;     // [BM]
  acc_t* dl = lse + BM;          // [BM]

  for (int64_t item = begin; item < end; ++item) {
    const Block blk = blocks[item / H];
    const int64_t h = item % H, b = blk.b, hk = h / p.group();
    const int64_t Lq = p.len_q(b), Lk = p.len_k(b), off = Lk - Lq;
    const int64_t m0 = blk.start, rows = imin(BM, Lq - m0), rows_pad = round_up(rows, MR);
    const int64_t sq = p.start_q[b], sk = p.start_k[b], row0 = sq + m0;
    int64_t klo, khi, unused;
    key_range(m0, off, Lk, p.window_left, p.window_right, &klo, &unused);
    key_range(m0 + rows - 1, off, Lk, p.window_left, p.window_right, &unused, &khi);
    load_rows(p.q + row0 * p.q_s0 + h * p.q_s1, p.q_s0, rows, rows_pad, D, p.scale, Qs, Dp);
    load_rows(p.dout + row0 * p.dout_s0 + h * p.dout_s1, p.dout_s0, rows, rows_pad, Dv, acc_t(1), dO, Dvp);
    for (int64_t r = 0; r < rows; ++r) {
      lse[r] = p.lse_saved[h * p.total_q + row0 + r];
      dl[r] = p.delta[h * p.total_q + row0 + r];
    }
    for (int64_t r = 0; r < rows_pad; ++r) std::memset(dQ + r * Dp, 0, sizeof(acc_t) * D_nt);
    for (int64_t n0 = klo; n0 < khi; n0 += BN) {
      const int64_t cols = imin(BN, khi - n0), cols_pad = round_up(cols, NT);
      const scalar_t* kp = p.k + (sk + n0) * p.k_s0 + hk * p.k_s1;
      load_rows_t(kp, p.k_s0, cols, cols_pad, D, Kt, BN);
      load_rows_t(p.v + (sk + n0) * p.v_s0 + hk * p.v_s1, p.v_s0, cols, cols_pad, Dv, Vt, BN);
      load_rows(kp, p.k_s0, cols, cols, D, acc_t(1), Kb, Dp);
      gemm<acc_t, false>(rows_pad, cols_pad, D, Qs, Dp, Kt, BN, S, BN);
      gemm<acc_t, false>(rows_pad, cols_pad, Dv, dO, Dvp, Vt, BN, dP, BN);
      backward_tile(p, S, dP, b, h, m0, rows, rows_pad, n0, cols, cols_pad, lse, dl,
                    static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), th);
      gemm<acc_t, true>(rows_pad, D_nt, cols, dP, BN, Kb, Dp, dQ, Dp);
    }
    store_rows(dQ, Dp, rows, D, p.scale, p.dq + row0 * p.dq_s0 + h * p.dq_s1, p.dq_s0, p.dq_s2);
  }
}

}  // namespace VARLEN_ISA_NS
}  // namespace attn
}  // namespace varlen

#endif  // VARLEN_ISA_NS
