// CUDA kernels of the padding ops (schemas: _C/ops.cpp; specification: reference.py).
//
// Rows move as raw bytes in the widest vector (16, 8, 4, 2 or 1 bytes) that the row size,
// pointers and strides allow, so one code path serves every dtype and any trailing dims.
// Masks of any real dtype are read as raw bits (no conversion launch); a mask whose positions
// are contiguous and 16-byte aligned is read 16 bytes at a time. Index math is 64-bit.
//
// Positions p = b * seqlen + s are cut into tiles of consecutive positions (a tile may straddle
// rows). The mask is scanned in ONE pass with decoupled look-back: each block takes its tile id
// from an atomic ticket (so every tile it waits for belongs to a block that is already running),
// publishes its tile's (kept, valid) counts, reads its predecessors' published values until one
// holds an inclusive prefix, and publishes its own inclusive prefix. The last block to finish
// (a done counter) derives seqused, max_seqlen and nnz from the row starts. The ticket, the done
// counter and the tile flags are zeroed by one memset on the stream before the launch, so a
// call is graph-capturable and repeated calls start from a clean state.
//
// unpad:          memset -> _unpad_scan_kernel (tiles of kScanTile positions: cu_seqlens,
//                 seqused, the first output row of each kCopyTile positions, (nnz, max_seqlen))
//                 -> _unpad_fwd_kernel (each block compacts kCopyTile positions: indices +
//                 rows, into buffers of batch*seqlen rows) while the host does its ONE read
//                 of (nnz, max_seqlen); the outputs are the buffers' first nnz rows.
// unpad_capacity: memset -> _unpad_capacity_fwd_kernel: the same scan over tiles of
//                 kFusedTile positions, and each block copies its tile's rows as soon as its
//                 prefix is known; blocks past the last tile zero the rows from nnz to capacity.
//                 No host sync. capacity < nnz fails a device-side assert (raised at the next
//                 synchronisation), never writes out of bounds.
// unpad_concat:   _unpad_concat_scan_kernel -> one read of (nnz, samples+1, max_seqlen)
//                 -> _unpad_concat_cu_kernel + _unpad_fwd_kernel.
// pad:            _pad_map_kernel (source row of each output row) -> _pad_fwd_kernel
//                 (writes every output row exactly once: its source row or zeros).
// gather_rows:    _gather_rows_fwd_kernel.
//
// Portable to ROCm through torch.utils.hipify: ATen stream/guard/sync helpers, no warp
// intrinsics (block-level shared-memory scans only, so the wave size does not matter).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "padding_checks.h"

namespace varlen {
namespace {

constexpr int kThreads = 256;                     // threads per block of every kernel but the concat scan
constexpr int kCopyTile = 32;                     // positions compacted by one _unpad_fwd_kernel block
constexpr int kScanItems = 16;                    // consecutive positions per thread in _unpad_scan_kernel
constexpr int kScanTile = kThreads * kScanItems;  // positions per _unpad_scan_kernel block
constexpr int kFusedTile = 64;                    // positions per _unpad_capacity_fwd_kernel block (scan + copy)
constexpr int kTailRows = 128;                    // rows past nnz zeroed per tail block of the capacity kernel
constexpr int kWindow = 32;                       // predecessors' flags read at once in the look-back
constexpr int kScanThreads = 1024;                // threads of the single-block concat scan kernel
constexpr int kUnroll = 4;                        // vectors in flight per thread in a row copy
static_assert(kScanTile % kCopyTile == 0 && kCopyTile % kScanItems == 0, "copy tiles start on a thread's run");
static_assert(kFusedTile <= kThreads && kWindow <= kThreads, "one position / one flag per thread");

// ---------------------------------------------------------------- device helpers

// (kept, valid) token counts packed in one word: kept in bits [0, 31), valid in [31, 62).
// batch*seqlen < 2^31 (checked on the host), so sums of packed counts never carry between fields.
constexpr int kValidShift = 31;
constexpr uint64_t kFieldMask = (uint64_t{1} << kValidShift) - 1;
__device__ __forceinline__ uint64_t pack(uint64_t kept, uint64_t valid) { return (valid << kValidShift) | kept; }
__device__ __forceinline__ int64_t kept_of(uint64_t packed) { return static_cast<int64_t>(packed & kFieldMask); }
__device__ __forceinline__ int64_t valid_of(uint64_t packed) {
  return static_cast<int64_t>((packed >> kValidShift) & kFieldMask);
}

// Look-back status of one tile: flag << 62 | packed counts. Zero (memset) = not published yet.
constexpr uint64_t kAggregate = 1;  // the value is the tile's own counts
constexpr uint64_t kInclusive = 2;  // the value is the sum over this tile and all before it
constexpr int kFlagShift = 62;
constexpr uint64_t kValueMask = (uint64_t{1} << kFlagShift) - 1;

__device__ __forceinline__ uint64_t volatile_load(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
}

__device__ __forceinline__ void publish(unsigned long long* status, uint64_t flag, uint64_t value) {
  atomicExch(status, static_cast<unsigned long long>((flag << kFlagShift) | value));
}

// Spins until `status` is published (by a block that already took its ticket, so it runs).
__device__ __forceinline__ uint64_t wait_published(const unsigned long long* status) {
  uint64_t s;
  do {
    s = volatile_load(status);
  } while ((s >> kFlagShift) == 0);
  return s;
}

// Bits of n consecutive ES-byte mask elements at p (16-byte aligned), read 16 bytes at a time.
template <int ES, int N>
__device__ __forceinline__ void load_run(const char* p, uint64_t bits, bool (&out)[N]) {
  static_assert((N * ES) % 16 == 0, "whole 16-byte words");
  constexpr int kWords = N * ES / 4;
  uint32_t c[kWords];
#pragma unroll
  for (int k = 0; k < kWords / 4; ++k) {
    const uint4 w = reinterpret_cast<const uint4*>(p)[k];
    c[4 * k] = w.x;
    c[4 * k + 1] = w.y;
    c[4 * k + 2] = w.z;
    c[4 * k + 3] = w.w;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    uint64_t v;
    if constexpr (ES == 8) {
      v = (static_cast<uint64_t>(c[2 * i + 1]) << 32) | c[2 * i];
    } else if constexpr (ES == 4) {
      v = c[i];
    } else {  // 1 or 2 bytes, little-endian within a 32-bit word
      v = (c[i * ES / 4] >> (8 * ((i * ES) % 4))) & ((1u << (8 * ES)) - 1);
    }
    out[i] = (v & bits) != 0;
  }
}

// A (batch, seqlen) mask of any real dtype read as raw bits: an element is set when its bits,
// with the sign bit cleared for floating types (-0.0 is unset, NaN is set), are nonzero.
struct Mask {
  const char* data;  // nullptr: no mask (nothing set)
  int64_t stride_b;  // bytes
  int64_t stride_s;  // bytes
  int esize;
  uint64_t bits;
  bool flat;  // element p = b*seqlen + s lives at data + p*esize, and data is 16-byte aligned

  __device__ __forceinline__ bool at(int64_t b, int64_t s) const {
    const char* p = data + b * stride_b + s * stride_s;
    uint64_t v;
    switch (esize) {
      case 1: v = *reinterpret_cast<const uint8_t*>(p); break;
      case 2: v = *reinterpret_cast<const uint16_t*>(p); break;
      case 4: v = *reinterpret_cast<const uint32_t*>(p); break;
      default: v = *reinterpret_cast<const uint64_t*>(p); break;
    }
    return (v & bits) != 0;
  }

  // Bits of the N positions p0, p0+1, ... (false at and past `total`). p0 % N == 0.
  template <int N>
  __device__ __forceinline__ void run(int64_t p0, int64_t seqlen, int64_t total, bool (&out)[N]) const {
    if (data == nullptr) {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = false;
      return;
    }
    if constexpr (N % 16 == 0) {  // 16-byte words hold whole elements of every size
      if (flat && p0 + N <= total) {
        const char* p = data + p0 * esize;
        switch (esize) {
          case 1: load_run<1, N>(p, bits, out); break;
          case 2: load_run<2, N>(p, bits, out); break;
          case 4: load_run<4, N>(p, bits, out); break;
          default: load_run<8, N>(p, bits, out); break;
        }
        return;
      }
    }
    int64_t b = p0 / seqlen, s = p0 - b * seqlen;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      out[i] = p0 + i < total && at(b, s);
      if (++s == seqlen) {
        s = 0;
        ++b;
      }
    }
  }
};

// Exclusive scan over the block (blockDim.x == NT); `total` gets the block's sum.
template <int NT>
__device__ uint64_t block_exclusive_scan(uint64_t v, uint64_t* smem, uint64_t& total) {
  const int tid = threadIdx.x;
  smem[tid] = v;
  __syncthreads();
  for (int offset = 1; offset < NT; offset <<= 1) {
    const uint64_t add = tid >= offset ? smem[tid - offset] : 0;
    __syncthreads();
    smem[tid] += add;
    __syncthreads();
  }
  const uint64_t inclusive = smem[tid];
  total = smem[NT - 1];
  __syncthreads();
  return inclusive - v;
}

template <int NT>
__device__ int64_t block_max(int64_t v, uint64_t* smem) {
  const int tid = threadIdx.x;
  smem[tid] = static_cast<uint64_t>(v);
  __syncthreads();
  for (int offset = NT / 2; offset > 0; offset >>= 1) {
    if (tid < offset) {
      smem[tid] = max(static_cast<int64_t>(smem[tid]), static_cast<int64_t>(smem[tid + offset]));
    }
    __syncthreads();
  }
  const int64_t result = static_cast<int64_t>(smem[0]);
  __syncthreads();
  return result;
}

// One row of n vectors copied by the `group` threads that share it (lane = rank in the
// group); src == nullptr writes zeros. kUnroll independent loads are in flight per thread.
template <typename V>
__device__ __forceinline__ void copy_row(V* __restrict__ dst, const V* __restrict__ src, int64_t n,
                                         int lane, int group) {
  for (int64_t v0 = lane; v0 < n; v0 += static_cast<int64_t>(group) * kUnroll) {
    V r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * group;
      r[u] = (src != nullptr && v < n) ? src[v] : V{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * group;
      if (v < n) dst[v] = r[u];
    }
  }
}

// Where the rows go: the padded input and the packed output.
template <typename V>
struct Rows {
  const char* src;  // padded rows: position (b, s) at src + b*stride_b + s*stride_s
  int64_t stride_b, stride_s;  // bytes
  V* dst;            // packed rows, vectors_per_row V each
  int64_t* indices;  // position of each packed row
  int64_t rows;      // rows of dst and indices: nothing is written at or past it
  int64_t vectors_per_row;
  int group;  // threads sharing one row
};

// The n kept positions pos[0..n) (shared memory) of one tile go to packed rows first, first+1, ...
template <typename V>
__device__ void copy_kept(const Rows<V>& out, int64_t seqlen, const int64_t* pos, int n, int64_t first) {
  const int lane = threadIdx.x % out.group;
  const int groups = kThreads / out.group;
  for (int k = threadIdx.x; k < n; k += kThreads) {
    if (first + k < out.rows) out.indices[first + k] = pos[k];
  }
  for (int k = threadIdx.x / out.group; k < n; k += groups) {
    const int64_t r = first + k;
    if (r >= out.rows) break;
    const int64_t b = pos[k] / seqlen;
    const auto* row = reinterpret_cast<const V*>(out.src + b * out.stride_b + (pos[k] - b * seqlen) * out.stride_s);
    copy_row<V>(out.dst + r * out.vectors_per_row, row, out.vectors_per_row, lane, out.group);
  }
}

// ---------------------------------------------------------------- unpad

// Scan state of one call. ticket, done and status[0..n_tiles) are zeroed by a memset first.
struct ScanState {
  unsigned long long* ticket;  // next tile id
  unsigned long long* done;    // tiles whose row starts are written
  unsigned long long* status;  // per tile: look-back flag and value
  int64_t n_tiles;
};

struct ScanOutputs {
  Mask mask, unused;
  int64_t batch, seqlen;
  int32_t* cu_seqlens;    // batch+1
  int32_t* valid_starts;  // batch+1 (scratch): valid tokens before each row
  int32_t* seqused;       // batch
  int64_t* summary;       // [nnz, max_seqlen]
  int64_t* host_summary;  // the same, in mapped pinned memory (or nullptr)
  int64_t capacity;       // >= 0: asserts nnz <= capacity
};

__device__ __forceinline__ int64_t take_ticket(const ScanState& st) {
  __shared__ int64_t tile;
  if (threadIdx.x == 0) tile = static_cast<int64_t>(atomicAdd(st.ticket, 1ull));
  __syncthreads();
  return tile;
}

// Decoupled look-back for tile `tile` whose own packed counts are `aggregate`: returns the
// packed counts of all earlier tiles, and publishes this tile's inclusive prefix. All threads
// call it; threads [0, kWindow) read kWindow predecessors' flags at once.
__device__ uint64_t tile_exclusive_prefix(const ScanState& st, int64_t tile, uint64_t aggregate) {
  __shared__ uint64_t window[kWindow];
  __shared__ uint64_t prefix;
  __shared__ int64_t end;  // tiles [0, end) not yet summed
  __shared__ bool found;
  const int tid = threadIdx.x;
  if (tid == 0) {
    publish(st.status + tile, tile == 0 ? kInclusive : kAggregate, aggregate);
    prefix = 0;
    end = tile;
    found = tile == 0;
  }
  __syncthreads();
  while (!found) {
    const int64_t e = end;
    if (tid < kWindow) {
      const int64_t j = e - 1 - tid;
      window[tid] = j < 0 ? (kInclusive << kFlagShift) : wait_published(st.status + j);
    }
    __syncthreads();
    if (tid == 0) {
      uint64_t sum = 0;
      bool inclusive = false;
      for (int w = 0; w < kWindow && !inclusive; ++w) {
        sum += window[w] & kValueMask;
        inclusive = (window[w] >> kFlagShift) == kInclusive;
      }
      prefix += sum;
      end = e - kWindow;
      found = inclusive;
    }
    __syncthreads();
  }
  const uint64_t exclusive = prefix;
  if (tid == 0 && tile != 0) publish(st.status + tile, kInclusive, exclusive + aggregate);
  return exclusive;
}

// Row b starts at a position whose exclusive prefix is `before`.
__device__ __forceinline__ void row_start(const ScanOutputs& o, int64_t b, uint64_t before) {
  o.cu_seqlens[b] = static_cast<int32_t>(kept_of(before));
  o.valid_starts[b] = static_cast<int32_t>(valid_of(before));
}

// Called by all threads after the tile's row starts are written. The last tile to get here
// (all row starts written, all tiles' inclusive prefixes published) writes cu_seqlens[batch],
// seqused, summary and host_summary, and checks the capacity.
__device__ void finish_tile(const ScanState& st, const ScanOutputs& o, uint64_t* smem) {
  __shared__ bool last;
  __threadfence();  // this thread's row starts are visible device-wide ...
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(st.done, 1ull) == static_cast<unsigned long long>(st.n_tiles - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();  // ... before the last block reads them (volatile reads: no stale cache)
  const uint64_t total = volatile_load(st.status + st.n_tiles - 1) & kValueMask;
  const int64_t nnz = kept_of(total);
  const volatile int32_t* cu = o.cu_seqlens;
  const volatile int32_t* vs = o.valid_starts;
  int64_t longest = 0;
  for (int64_t b = threadIdx.x; b < o.batch; b += kThreads) {
    const bool end = b + 1 == o.batch;
    const int64_t next_cu = end ? nnz : cu[b + 1];
    const int64_t next_valid = end ? valid_of(total) : vs[b + 1];
    o.seqused[b] = static_cast<int32_t>(next_valid - vs[b]);
    longest = max(longest, next_cu - cu[b]);
  }
  longest = block_max<kThreads>(longest, smem);
  if (threadIdx.x == 0) {
    o.cu_seqlens[o.batch] = static_cast<int32_t>(nnz);
    o.summary[0] = nnz;
    o.summary[1] = longest;
    if (o.host_summary != nullptr) {
      o.host_summary[0] = nnz;
      o.host_summary[1] = longest;
    }
    if (o.capacity >= 0) {
      CUDA_KERNEL_ASSERT_MSG(nnz <= o.capacity,
                             "varlen::unpad_capacity: capacity is smaller than the number of kept tokens");
    }
  }
}

// Eager unpad, pass 1: one tile of kScanTile positions per block, kScanItems per thread.
// Writes cu_seqlens, seqused, summary and copy_first[q] = first packed row of the kCopyTile
// positions starting at q*kCopyTile.
__global__ void __launch_bounds__(kThreads)
    _unpad_scan_kernel(ScanState st, ScanOutputs o, int32_t* __restrict__ copy_first) {
  __shared__ uint64_t smem[kThreads];
  const int64_t tile = take_ticket(st);
  const int64_t total = o.batch * o.seqlen;
  const int64_t p0 = tile * kScanTile + static_cast<int64_t>(threadIdx.x) * kScanItems;
  bool valid[kScanItems], extra[kScanItems];
  o.mask.run<kScanItems>(p0, o.seqlen, total, valid);
  o.unused.run<kScanItems>(p0, o.seqlen, total, extra);
  uint64_t mine = 0;
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) mine += pack(valid[i] || extra[i], valid[i]);
  uint64_t aggregate;
  const uint64_t local = block_exclusive_scan<kThreads>(mine, smem, aggregate);
  uint64_t before = tile_exclusive_prefix(st, tile, aggregate) + local;
  int64_t b = p0 / o.seqlen, s = p0 - b * o.seqlen;
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int64_t p = p0 + i;
    if (p < total) {
      if (p % kCopyTile == 0) copy_first[p / kCopyTile] = static_cast<int32_t>(kept_of(before));
      if (s == 0) row_start(o, b, before);
    }
    before += pack(valid[i] || extra[i], valid[i]);
    if (++s == o.seqlen) {
      s = 0;
      ++b;
    }
  }
  finish_tile(st, o, smem);
}

// Which positions a tile of kCopyTile positions [tile*kCopyTile, ...) keeps and where its
// first packed row goes.
struct MaskTiles {  // unpad: mask | unused, first rows from _unpad_scan_kernel
  Mask mask, unused;
  const int32_t* copy_first;
  __device__ bool keep(int64_t b, int64_t s) const {
    return mask.at(b, s) || (unused.data != nullptr && unused.at(b, s));
  }
  __device__ int64_t first_row(int64_t tile, int64_t) const { return copy_first[tile]; }
};

struct PrefixTiles {  // unpad_concat: the first row_len[b] positions of each row
  const int32_t* row_starts;
  const int32_t* row_lens;
  __device__ bool keep(int64_t b, int64_t s) const { return s < row_lens[b]; }
  __device__ int64_t first_row(int64_t tile, int64_t seqlen) const {
    const int64_t p0 = tile * kCopyTile, b = p0 / seqlen;
    return row_starts[b] + min(static_cast<int64_t>(row_lens[b]), p0 - b * seqlen);
  }
};

// Block `tile` compacts the kept positions among [tile*kCopyTile, +kCopyTile) of the
// batch*seqlen positions: their indices and rows.
template <typename V, typename Tiles>
__global__ void __launch_bounds__(kThreads)
    _unpad_fwd_kernel(Tiles tiles, Rows<V> out, int64_t batch, int64_t seqlen) {
  __shared__ bool flag[kCopyTile];
  __shared__ int64_t pos[kCopyTile];
  __shared__ int num_kept;
  const int64_t tile = blockIdx.x;
  const int64_t p0 = tile * kCopyTile;
  const int64_t first = tiles.first_row(tile, seqlen);  // loaded while the mask loads
  if (threadIdx.x < kCopyTile) {
    const int64_t p = p0 + threadIdx.x, b = p / seqlen;
    flag[threadIdx.x] = p < batch * seqlen && tiles.keep(b, p - b * seqlen);
  }
  __syncthreads();
  if (threadIdx.x < kCopyTile) {
    int rank = 0;
    for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += flag[j];
    if (flag[threadIdx.x]) pos[rank] = p0 + threadIdx.x;
    if (threadIdx.x == kCopyTile - 1) num_kept = rank + flag[threadIdx.x];
  }
  __syncthreads();
  copy_kept<V>(out, seqlen, pos, num_kept, first);
}

// unpad with a capacity, in one launch: blocks with ticket < n_tiles scan a tile of kFusedTile
// positions (one per thread) as _unpad_scan_kernel does, then copy its kept rows; the blocks
// after them (tail) each own kTailRows packed rows and zero those at or past nnz (index
// batch*seqlen), once the last tile's inclusive prefix (nnz) is published.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    _unpad_capacity_fwd_kernel(ScanState st, ScanOutputs o, Rows<V> out) {
  __shared__ uint64_t smem[kThreads];
  __shared__ int64_t pos[kFusedTile];
  __shared__ int64_t nnz;
  const int64_t tile = take_ticket(st);
  const int64_t total = o.batch * o.seqlen;
  if (tile >= st.n_tiles) {
    if (threadIdx.x == 0) {
      uint64_t s;
      do {
        s = wait_published(st.status + st.n_tiles - 1);
      } while ((s >> kFlagShift) != kInclusive);
      nnz = kept_of(s & kValueMask);
    }
    __syncthreads();
    const int64_t r0 = (tile - st.n_tiles) * kTailRows;
    for (int k = threadIdx.x; k < kTailRows; k += kThreads) {
      const int64_t r = r0 + k;
      if (r >= nnz && r < out.rows) out.indices[r] = total;
    }
    const int lane = threadIdx.x % out.group;
    for (int k = threadIdx.x / out.group; k < kTailRows; k += kThreads / out.group) {
      const int64_t r = r0 + k;
      if (r >= nnz && r < out.rows) {
        copy_row<V>(out.dst + r * out.vectors_per_row, nullptr, out.vectors_per_row, lane, out.group);
      }
    }
    return;
  }
  const int64_t p = tile * kFusedTile + threadIdx.x;
  const int64_t b = p / o.seqlen, s = p - b * o.seqlen;
  const bool here = threadIdx.x < kFusedTile && p < total;
  const bool valid = here && o.mask.at(b, s);
  const bool keep = valid || (here && o.unused.data != nullptr && o.unused.at(b, s));
  uint64_t aggregate;
  const uint64_t local = block_exclusive_scan<kThreads>(pack(keep, valid), smem, aggregate);
  const uint64_t prefix = tile_exclusive_prefix(st, tile, aggregate);
  if (keep) pos[kept_of(local)] = p;
  if (here && s == 0) row_start(o, b, prefix + local);
  finish_tile(st, o, smem);  // its __syncthreads also publish pos[] to the block
  copy_kept<V>(out, o.seqlen, pos, static_cast<int>(kept_of(aggregate)), kept_of(prefix));
}

// ---------------------------------------------------------------- unpad_concat

// One block. lengths (batch, seqlen) int64 contiguous: per row its token count (row_lens),
// first packed row (row_starts) and first sample (sample_starts); summary = [nnz, samples+1,
// longest sample]. Asserts entries >= 0 and row sums <= seqlen.
__global__ void __launch_bounds__(kScanThreads)
    _unpad_concat_scan_kernel(const int64_t* __restrict__ lengths, int64_t batch, int64_t seqlen,
                              int32_t* __restrict__ row_starts, int32_t* __restrict__ sample_starts,
                              int32_t* __restrict__ row_lens, int64_t* __restrict__ summary,
                              int64_t* host_summary) {
  __shared__ uint64_t smem[kScanThreads];
  uint64_t carry = 0;  // (samples << 32) | tokens
  int64_t longest = 0;
  for (int64_t round = 0; round < batch; round += kScanThreads) {
    const int64_t b = round + threadIdx.x;
    int64_t tokens = 0, samples = 0;
    if (b < batch) {
      for (int64_t s = 0; s < seqlen; ++s) {
        const int64_t n = lengths[b * seqlen + s];
        CUDA_KERNEL_ASSERT_MSG(n >= 0, "varlen::unpad_concat: attention_mask_in_length must be >= 0");
        if (n > 0) {
          tokens += n;
          ++samples;
          longest = max(longest, n);
        }
      }
      CUDA_KERNEL_ASSERT_MSG(tokens <= seqlen,
                             "varlen::unpad_concat: a row of attention_mask_in_length sums to more than seqlen");
      tokens = min(tokens, seqlen);
    }
    const uint64_t v = (static_cast<uint64_t>(samples) << 32) | static_cast<uint64_t>(tokens);
    uint64_t total;
    const uint64_t start = carry + block_exclusive_scan<kScanThreads>(v, smem, total);
    if (b < batch) {
      row_starts[b] = static_cast<int32_t>(start & 0xFFFFFFFFu);
      sample_starts[b] = static_cast<int32_t>(start >> 32);
      row_lens[b] = static_cast<int32_t>(tokens);
    }
    carry += total;
  }
  longest = block_max<kScanThreads>(longest, smem);
  if (threadIdx.x == 0) {
    row_starts[batch] = static_cast<int32_t>(carry & 0xFFFFFFFFu);
    sample_starts[batch] = static_cast<int32_t>(carry >> 32);
    summary[0] = static_cast<int64_t>(carry & 0xFFFFFFFFu);
    summary[1] = static_cast<int64_t>(carry >> 32) + 1;
    summary[2] = longest;
    if (host_summary != nullptr) {
      for (int i = 0; i < 3; ++i) host_summary[i] = summary[i];
    }
  }
}

// One thread per row: cu_seqlens entries of the row's samples (cu_seqlens has num_cu entries).
__global__ void _unpad_concat_cu_kernel(const int64_t* __restrict__ lengths, int64_t batch,
                                        int64_t seqlen, const int32_t* __restrict__ row_starts,
                                        const int32_t* __restrict__ sample_starts,
                                        int32_t* __restrict__ cu_seqlens, int64_t num_cu) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b == 0) cu_seqlens[0] = 0;
  if (b >= batch) return;
  int64_t pos = row_starts[b];
  int64_t sample = sample_starts[b];
  for (int64_t s = 0; s < seqlen; ++s) {
    const int64_t n = lengths[b * seqlen + s];
    if (n > 0) {
      pos += n;
      ++sample;
      if (sample < num_cu) cu_seqlens[sample] = static_cast<int32_t>(pos);
    }
  }
}

// ---------------------------------------------------------------- pad and gather_rows

// source[r] = i for indices[i] = r < limit. `source` starts uninitialised: _pad_fwd_kernel
// trusts an entry only when indices[source[r]] == r (a sparse-set lookup), so no fill pass.
__global__ void _pad_map_kernel(const int64_t* __restrict__ indices, int64_t n, int64_t limit,
                                int64_t* __restrict__ source) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = indices[i];
    CUDA_KERNEL_ASSERT_MSG(r >= 0 && r <= limit, "varlen::pad: indices must be in [0, batch*seqlen]");
    if (r >= 0 && r < limit) source[r] = i;
  }
}

// Every output row written once: its source row of hidden_unpad, or zeros.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    _pad_fwd_kernel(const char* __restrict__ src, int64_t src_stride, int64_t n,
                    const int64_t* __restrict__ indices, const int64_t* __restrict__ source,
                    int64_t limit, V* __restrict__ dst, int64_t vectors_per_row, int group,
                    int rows_per_block) {
  const int lane = threadIdx.x % group;
  const int groups = kThreads / group;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  for (int k = threadIdx.x / group; k < rows_per_block; k += groups) {
    const int64_t r = r0 + k;
    if (r >= limit) break;
    const int64_t i = source[r];
    const bool hit = i >= 0 && i < n && indices[i] == r;
    const auto* row = hit ? reinterpret_cast<const V*>(src + i * src_stride) : nullptr;
    copy_row<V>(dst + r * vectors_per_row, row, vectors_per_row, lane, group);
  }
}

// out[i] = padded row indices[i], or zeros for indices[i] == batch*seqlen.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    _gather_rows_fwd_kernel(const char* __restrict__ src, int64_t stride_b, int64_t stride_s,
                            int64_t seqlen, int64_t limit, const int64_t* __restrict__ indices,
                            int64_t n, V* __restrict__ dst, int64_t vectors_per_row, int group,
                            int rows_per_block) {
  const int lane = threadIdx.x % group;
  const int groups = kThreads / group;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  for (int k = threadIdx.x / group; k < rows_per_block; k += groups) {
    const int64_t i = i0 + k;
    if (i >= n) break;
    const int64_t p = indices[i];
    CUDA_KERNEL_ASSERT_MSG(p >= 0 && p <= limit, "varlen::gather_rows: indices must be in [0, batch*seqlen]");
    const bool hit = p >= 0 && p < limit;
    const auto* row = hit ? reinterpret_cast<const V*>(src + (p / seqlen) * stride_b + (p % seqlen) * stride_s)
                          : nullptr;
    copy_row<V>(dst + i * vectors_per_row, row, vectors_per_row, lane, group);
  }
}

// ---------------------------------------------------------------- host side

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor here, got ", t.device());
}

// Widest vector (16, 8, 4, 2 or 1 bytes) dividing every byte quantity (sizes, strides, addresses).
int64_t vector_width(std::initializer_list<int64_t> quantities) {
  int64_t width = 16;
  for (int64_t q : quantities) {
    while (width > 1 && q % width != 0) width >>= 1;
  }
  return width;
}

int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

// Calls f(V{}) with V the unsigned type of `width` bytes.
template <typename F>
void with_vector(int64_t width, F&& f) {
  switch (width) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

// Threads sharing one row: enough for the row's vectors, at most a warp's worth.
int threads_per_row(int64_t vectors_per_row) {
  int group = 1;
  while (group < 32 && group < vectors_per_row) group <<= 1;
  return group;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Mask make_mask(const at::Tensor& m) {
  const int64_t es = static_cast<int64_t>(m.element_size());
  const bool floating = at::isFloatingType(m.scalar_type());
  const uint64_t all = es == 8 ? ~uint64_t{0} : ((uint64_t{1} << (8 * es)) - 1);
  const uint64_t bits = floating ? (all >> 1) : all;  // drop the sign bit of floats
  const int64_t batch = m.size(0), seqlen = m.size(1);
  const bool flat = (seqlen == 1 || m.stride(1) == 1) && (batch == 1 || m.stride(0) == seqlen) &&
                    address(m.const_data_ptr()) % 16 == 0;
  return {static_cast<const char*>(m.const_data_ptr()), m.stride(0) * es, m.stride(1) * es,
          static_cast<int>(es), bits, flat};
}

constexpr Mask kNoMask{nullptr, 0, 0, 1, 0, false};

// Masks the raw-bit reader cannot take (complex) become bool first.
at::Tensor readable_mask(const at::Tensor& m) {
  const int64_t es = static_cast<int64_t>(m.element_size());
  const bool ok = !at::isComplexType(m.scalar_type()) && (es == 1 || es == 2 || es == 4 || es == 8);
  return ok ? m : m.ne(0);
}

void check_token_count(int64_t batch, int64_t seqlen) {
  TORCH_CHECK(batch * seqlen <= std::numeric_limits<int32_t>::max(), "batch*seqlen (", batch * seqlen,
              ") must fit cu_seqlens' int32 on CUDA");
}

// The op's one host read: n int64 values that a kernel writes. Where pinned memory is mapped
// into the device's address space (unified addressing), the kernel writes them straight into
// it; elsewhere request() queues one device-to-host copy. request() goes on the stream right
// after that kernel and wait() blocks only until then, so work queued in between (the eager
// unpad's row copy) runs on the GPU while the host waits.
struct HostRead {
  at::Tensor pinned;
  int64_t* mapped = nullptr;  // device address of `pinned`, nullptr when not mapped
  cudaEvent_t ready = nullptr;

  explicit HostRead(int64_t n)
      : pinned(at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true))) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    void* device_address = nullptr;
    if (cudaHostGetDevicePointer(&device_address, pinned.data_ptr(), 0) == cudaSuccess) {
      mapped = static_cast<int64_t*>(device_address);
    } else {
      (void)cudaGetLastError();  // not mapped: clear the error, copy instead
    }
  }

  void request(const int64_t* device_values, const c10::cuda::CUDAStream& stream) {
    if (mapped == nullptr) {
      C10_CUDA_CHECK(cudaMemcpyAsync(pinned.data_ptr(), device_values, pinned.nbytes(),
                                     cudaMemcpyDeviceToHost, stream));
    }
    C10_CUDA_CHECK(cudaEventRecord(ready, stream));
  }

  const int64_t* wait() {
    // A host sync, reported like c10's own (torch.cuda.set_sync_debug_mode).
    if (C10_UNLIKELY(c10::cuda::warning_state().get_sync_debug_mode() != c10::cuda::SyncDebugMode::L_DISABLED)) {
      c10::cuda::warn_or_error_on_sync();
    }
    C10_CUDA_CHECK(cudaEventSynchronize(ready));
    return pinned.const_data_ptr<int64_t>();
  }

  HostRead(const HostRead&) = delete;
  HostRead& operator=(const HostRead&) = delete;
  ~HostRead() { (void)cudaEventDestroy(ready); }
};

// Row layout of a packed copy from src (batch, seqlen, ...) into out (rows, ...), and the V it
// allows: f(Rows<V>) is called with the widest vector that sizes, strides and pointers allow.
template <typename F>
void with_rows(const at::Tensor& src, at::Tensor& out, at::Tensor& indices, F&& f) {
  const int64_t rows = out.size(0);
  const int64_t es = static_cast<int64_t>(src.element_size());
  const int64_t row_bytes = out.numel() == 0 ? 0 : out.nbytes() / rows;
  const int64_t width = vector_width({row_bytes, address(src.const_data_ptr()), src.stride(0) * es,
                                      src.stride(1) * es, address(out.data_ptr())});
  with_vector(width, [&](auto tag) {
    using V = decltype(tag);
    const int64_t vectors = row_bytes / static_cast<int64_t>(sizeof(V));
    f(Rows<V>{static_cast<const char*>(src.const_data_ptr()), src.stride(0) * es, src.stride(1) * es,
              static_cast<V*>(out.data_ptr()), indices.data_ptr<int64_t>(), rows, vectors,
              threads_per_row(vectors)});
  });
}

// Launches _unpad_fwd_kernel: one block per kCopyTile positions.
template <typename Tiles>
void launch_unpad_copy(const Tiles& tiles, const at::Tensor& src, at::Tensor& out, at::Tensor& indices) {
  const int64_t batch = src.size(0), seqlen = src.size(1);
  if (out.size(0) == 0) return;
  with_rows(src, out, indices, [&](auto rows) {
    using V = std::remove_pointer_t<decltype(rows.dst)>;
    _unpad_fwd_kernel<V, Tiles><<<ceil_div(batch * seqlen, kCopyTile), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(tiles, rows, batch, seqlen);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// unpad and unpad_capacity (capacity < 0: exact size, one host read).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, at::Tensor> unpad_impl(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask,
    const std::optional<at::Tensor>& unused_mask, int64_t capacity) {
  check_hidden(hidden_states);
  check_cuda(hidden_states, "hidden_states");
  check_mask("attention_mask", attention_mask, hidden_states);
  check_optional_mask("unused_mask", unused_mask, hidden_states);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = hidden_states.size(0), seqlen = hidden_states.size(1);
  check_token_count(batch, seqlen);
  const auto src = dense_rows(hidden_states, 2);
  const auto int_opts = hidden_states.options().dtype(at::kInt);
  const auto long_opts = hidden_states.options().dtype(at::kLong);
  auto cu_seqlens = at::empty({batch + 1}, int_opts);
  auto seqused = at::empty({batch}, int_opts);

  const int64_t total = batch * seqlen;
  if (total == 0) {
    const int64_t rows = std::max<int64_t>(capacity, 0);
    cu_seqlens.zero_();
    seqused.zero_();
    return {at::zeros(packed_shape(src, rows, 2), src.options()), at::zeros({rows}, long_opts),
            cu_seqlens, 0, seqused};
  }
  const auto mask = readable_mask(attention_mask);
  const auto unused = unused_mask.has_value() ? readable_mask(*unused_mask) : at::Tensor();
  const Mask m = make_mask(mask);
  const Mask u = unused.defined() ? make_mask(unused) : kNoMask;

  const bool eager = capacity < 0;
  const int64_t n_tiles = ceil_div(total, eager ? kScanTile : kFusedTile);
  const int64_t n_copy_tiles = eager ? ceil_div(total, kCopyTile) : 0;
  // scratch: ticket, done (u64) | status (n_tiles u64) | summary (2 i64) | valid_starts
  // (batch+1 i32) | copy_first (n_copy_tiles i32). Only the first (2 + n_tiles) words are zeroed.
  const int64_t zeroed = (2 + n_tiles) * 8;
  auto scratch = at::empty({zeroed + 16 + (batch + 1 + n_copy_tiles) * 4}, hidden_states.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  auto* words = reinterpret_cast<unsigned long long*>(base);
  auto* summary = reinterpret_cast<int64_t*>(base + zeroed);
  auto* valid_starts = reinterpret_cast<int32_t*>(base + zeroed + 16);
  auto* copy_first = valid_starts + batch + 1;
  C10_CUDA_CHECK(cudaMemsetAsync(base, 0, zeroed, stream));
  const ScanState state{words, words + 1, words + 2, n_tiles};
  std::optional<HostRead> host_read;
  if (eager) host_read.emplace(2);
  const ScanOutputs outputs{m, u, batch, seqlen, cu_seqlens.data_ptr<int32_t>(), valid_starts,
                            seqused.data_ptr<int32_t>(), summary,
                            host_read ? host_read->mapped : nullptr, capacity};

  if (!eager) {  // one launch: scan, row copy, zeroed tail; no host sync
    auto out = at::empty(packed_shape(src, capacity, 2), src.options());
    auto indices = at::empty({capacity}, long_opts);
    with_rows(src, out, indices, [&](auto rows) {
      using V = std::remove_pointer_t<decltype(rows.dst)>;
      _unpad_capacity_fwd_kernel<V><<<n_tiles + ceil_div(capacity, kTailRows), kThreads, 0, stream>>>(
          state, outputs, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {out, indices, cu_seqlens, seqlen, seqused};
  }
  _unpad_scan_kernel<<<n_tiles, kThreads, 0, stream>>>(state, outputs, copy_first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  host_read->request(summary, stream);
  // The copy goes into buffers sized for every position kept and is queued before the host
  // waits for nnz, so the GPU copies rows during the host's round trip instead of idling; the
  // buffers are then shrunk in place to their first nnz rows (resize_ keeps the storage of
  // batch*seqlen rows; the outputs are plain tensors, not views, so autograd lets users modify
  // them in place).
  auto out = at::empty(packed_shape(src, total, 2), src.options());
  auto indices = at::empty({total}, long_opts);
  launch_unpad_copy(MaskTiles{m, u, copy_first}, src, out, indices);
  const int64_t* host = host_read->wait();
  const int64_t nnz = host[0], max_seqlen = host[1];
  out.resize_(packed_shape(src, nnz, 2));
  indices.resize_({nnz});
  return {out, indices, cu_seqlens, max_seqlen, seqused};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt, at::Tensor> unpad_cuda(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask,
    const std::optional<at::Tensor>& unused_mask) {
  auto [out, indices, cu_seqlens, max_seqlen, seqused] =
      unpad_impl(hidden_states, attention_mask, unused_mask, -1);
  return {out, indices, cu_seqlens, c10::SymInt(max_seqlen), seqused};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unpad_capacity_cuda(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask,
    const std::optional<at::Tensor>& unused_mask, int64_t capacity) {
  check_capacity(capacity);
  auto [out, indices, cu_seqlens, max_seqlen, seqused] =
      unpad_impl(hidden_states, attention_mask, unused_mask, capacity);
  return {out, indices, cu_seqlens, seqused};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt> unpad_concat_cuda(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask_in_length) {
  check_hidden(hidden_states);
  check_cuda(hidden_states, "hidden_states");
  check_concat_lengths(attention_mask_in_length, hidden_states);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = hidden_states.size(0), seqlen = hidden_states.size(1);
  check_token_count(batch, seqlen);
  const auto src = dense_rows(hidden_states, 2);
  const auto long_opts = hidden_states.options().dtype(at::kLong);
  if (batch * seqlen == 0) {
    return {at::empty(packed_shape(src, 0, 2), src.options()), at::empty({0}, long_opts),
            at::zeros({1}, hidden_states.options().dtype(at::kInt)), c10::SymInt(0)};
  }
  const auto lengths = attention_mask_in_length.to(at::kLong).contiguous();
  // scratch: summary (3 i64) | row_starts, sample_starts (batch+1 i32 each) | row_lens (batch i32)
  auto scratch = at::empty({24 + (3 * batch + 2) * 4}, hidden_states.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  auto* summary = reinterpret_cast<int64_t*>(base);
  auto* row_starts = reinterpret_cast<int32_t*>(base + 24);
  auto* sample_starts = row_starts + batch + 1;
  auto* row_lens = sample_starts + batch + 1;
  HostRead host_read(3);
  _unpad_concat_scan_kernel<<<1, kScanThreads, 0, stream>>>(lengths.const_data_ptr<int64_t>(), batch,
                                                            seqlen, row_starts, sample_starts, row_lens,
                                                            summary, host_read.mapped);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  host_read.request(summary, stream);
  const int64_t* host = host_read.wait();
  const int64_t nnz = host[0], num_cu = host[1], max_seqlen = host[2];

  auto cu_seqlens = at::empty({num_cu}, hidden_states.options().dtype(at::kInt));
  _unpad_concat_cu_kernel<<<ceil_div(batch, kThreads), kThreads, 0, stream>>>(
      lengths.const_data_ptr<int64_t>(), batch, seqlen, row_starts, sample_starts,
      cu_seqlens.data_ptr<int32_t>(), num_cu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto out = at::empty(packed_shape(src, nnz, 2), src.options());
  auto indices = at::empty({nnz}, long_opts);
  launch_unpad_copy(PrefixTiles{row_starts, row_lens}, src, out, indices);
  return {out, indices, cu_seqlens, c10::SymInt(max_seqlen)};
}

at::Tensor pad_cuda(const at::Tensor& hidden_unpad, const at::Tensor& indices_in, int64_t batch,
                    int64_t seqlen) {
  check_pad_args(hidden_unpad, indices_in, batch, seqlen);
  check_cuda(hidden_unpad, "hidden_unpad");
  const c10::cuda::CUDAGuard guard(hidden_unpad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto src = dense_rows(hidden_unpad, 1);
  const auto indices = indices_in.contiguous();
  const int64_t n = src.size(0), limit = batch * seqlen;
  std::vector<int64_t> shape{batch, seqlen};
  for (int64_t d = 1; d < src.dim(); ++d) shape.push_back(src.size(d));
  auto out = at::empty(shape, src.options());
  if (limit == 0) return out;
  const int64_t es = static_cast<int64_t>(src.element_size());
  const int64_t row_bytes = out.nbytes() / limit;
  const int64_t width = vector_width({row_bytes, address(src.const_data_ptr()), src.stride(0) * es,
                                      address(out.data_ptr())});
  const auto source = at::empty({limit}, indices.options());
  if (n > 0) {
    _pad_map_kernel<<<std::min<int64_t>(ceil_div(n, kThreads), 65536), kThreads, 0, stream>>>(
        indices.const_data_ptr<int64_t>(), n, limit, source.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  with_vector(width, [&](auto tag) {
    using V = decltype(tag);
    const int64_t vectors = row_bytes / static_cast<int64_t>(sizeof(V));
    const int group = threads_per_row(vectors);
    const int rows_per_block = (kThreads / group) * 4;
    _pad_fwd_kernel<V><<<ceil_div(limit, rows_per_block), kThreads, 0, stream>>>(
        static_cast<const char*>(src.const_data_ptr()), src.stride(0) * es, n,
        indices.const_data_ptr<int64_t>(), source.const_data_ptr<int64_t>(), limit,
        static_cast<V*>(out.data_ptr()), vectors, group, rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_rows_cuda(const at::Tensor& padded, const at::Tensor& indices_in) {
  check_gather_args(padded, indices_in);
  check_cuda(padded, "padded");
  const c10::cuda::CUDAGuard guard(padded.device());
  const auto src = dense_rows(padded, 2);
  const auto indices = indices_in.contiguous();
  const int64_t n = indices.size(0), seqlen = src.size(1), limit = src.size(0) * seqlen;
  auto out = at::empty(packed_shape(src, n, 2), src.options());
  if (n == 0 || out.numel() == 0) return out;
  const int64_t es = static_cast<int64_t>(src.element_size());
  const int64_t row_bytes = out.nbytes() / n;
  const int64_t width = vector_width({row_bytes, address(src.const_data_ptr()), src.stride(0) * es,
                                      src.stride(1) * es, address(out.data_ptr())});
  with_vector(width, [&](auto tag) {
    using V = decltype(tag);
    const int64_t vectors = row_bytes / static_cast<int64_t>(sizeof(V));
    const int group = threads_per_row(vectors);
    const int rows_per_block = (kThreads / group) * 4;
    _gather_rows_fwd_kernel<V><<<ceil_div(n, rows_per_block), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const char*>(src.const_data_ptr()), src.stride(0) * es, src.stride(1) * es,
        std::max<int64_t>(seqlen, 1), limit, indices.const_data_ptr<int64_t>(), n,
        static_cast<V*>(out.data_ptr()), vectors, group, rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen, CUDA, m) {
  m.impl("unpad", &unpad_cuda);
  m.impl("unpad_capacity", &unpad_capacity_cuda);
  m.impl("unpad_concat", &unpad_concat_cuda);
  m.impl("pad", &pad_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
}

}  // namespace varlen
