// Counter-based dropout mask shared by every backend (no torch in here).
//
// keep(seed, offset, head, row, col) is a pure function:
//   Philox4x32-10 with key = (seed & 0xffffffff, seed >> 32) and
//   counter = (col, row, head, offset & 0xffffffff); the first output word r is kept when
//   r >= threshold(p) = min(floor(p * 2^32), 2^32 - 1).
// row is the logical packed query index cu_seqlens_q[b] + i; col the key index j inside its
// sequence; head the query head. torch_varlen/reference.py (philox_keep) is the Python
// spelling of the same function and Triton's tl.philox computes the same words.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VARLEN_HD __host__ __device__ __forceinline__
#else
#define VARLEN_HD inline
#endif

namespace varlen {

VARLEN_HD uint32_t philox_word0(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// threshold(p) as above; p in [0, 1).
VARLEN_HD uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

VARLEN_HD bool dropout_keep(uint64_t seed, uint64_t offset, int64_t head, int64_t row,
                            int64_t col, uint32_t threshold) {
  return philox_word0(seed, static_cast<uint32_t>(col), static_cast<uint32_t>(row),
                      static_cast<uint32_t>(head), static_cast<uint32_t>(offset)) >= threshold;
}

}  // namespace varlen
