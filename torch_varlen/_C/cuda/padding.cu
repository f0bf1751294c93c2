// CUDA kernels of the padding ops (schemas: _C/ops.cpp; specification: reference.py).
//
// Rows move as raw bytes in the widest vector (16, 8, 4, 2 or 1 bytes) that the row size,
// pointers and strides allow, so one code path serves every dtype and any trailing dims.
// Masks of any real dtype are read as raw bits (no conversion launch). Index math is 64-bit.
//
// unpad:          _unpad_count_kernel (kept/valid tokens per tile of kTile positions)
//                 -> _unpad_scan_kernel (one block: tile offsets, cu_seqlens, seqused,
//                    max_seqlen, nnz) -> [eager only: ONE device-to-host read of (nnz,
//                    max_seqlen)] -> _unpad_fwd_kernel (compacts each tile: indices + rows;
//                    with a capacity, extra blocks zero the rows past nnz).
// unpad_capacity: the same three launches and no host sync; capacity < nnz fails a
//                 device-side assert (raised at the next synchronisation), never writes
//                 out of bounds.
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
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "padding_checks.h"

namespace varlen {
namespace {

constexpr int kThreads = 256;       // threads per block of the copy and count kernels
constexpr int kTile = 32;           // positions of one batch row handled by one unpad block
constexpr int kScanThreads = 1024;  // threads of the single-block scan kernels
constexpr int kScanItems = 4;       // consecutive tiles per thread in one scan round
constexpr int kUnroll = 4;          // vectors in flight per thread in a row copy

// ---------------------------------------------------------------- device helpers

// A (batch, seqlen) mask of any real dtype read as raw bits: an element is set when its bits,
// with the sign bit cleared for floating types (-0.0 is unset, NaN is set), are nonzero.
struct Mask {
  const char* data;  // nullptr: no mask
  int64_t stride_b;  // bytes
  int64_t stride_s;  // bytes
  int esize;
  uint64_t bits;

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

// ---------------------------------------------------------------- unpad

// counts[t] for tile t = (row b, positions [j*kTile, (j+1)*kTile)): low 32 bits the kept
// positions (mask | unused), high 32 bits the valid ones (mask only, for seqused).
__global__ void _unpad_count_kernel(Mask mask, Mask unused, int64_t batch, int64_t seqlen,
                                    int64_t tiles_per_row, uint64_t* __restrict__ counts) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= batch * tiles_per_row) return;
  const int64_t b = t / tiles_per_row;
  const int64_t s0 = (t % tiles_per_row) * kTile;
  const int64_t s1 = min(seqlen, s0 + kTile);
  uint32_t kept = 0, valid = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const bool v = mask.at(b, s);
    valid += v;
    kept += v || (unused.data != nullptr && unused.at(b, s));
  }
  counts[t] = (static_cast<uint64_t>(valid) << 32) | kept;
}

// One block. Exclusive scan of the tile counts: tile_offsets (first output row of each tile),
// cu_seqlens, seqused, and summary = [nnz, max_seqlen]. capacity >= 0: asserts nnz <= capacity.
__global__ void __launch_bounds__(kScanThreads)
    _unpad_scan_kernel(const uint64_t* __restrict__ counts, int64_t batch, int64_t tiles_per_row,
                       int64_t capacity, int32_t* __restrict__ tile_offsets,
                       int32_t* __restrict__ cu_seqlens, int32_t* __restrict__ valid_starts,
                       int32_t* __restrict__ seqused, int64_t* __restrict__ summary,
                       int64_t* host_summary) {
  __shared__ uint64_t smem[kScanThreads];
  const int64_t n_tiles = batch * tiles_per_row;
  uint64_t carry = 0;  // (valid << 32) | kept, summed over earlier rounds
  for (int64_t round = 0; round < n_tiles; round += kScanThreads * kScanItems) {
    const int64_t first = round + static_cast<int64_t>(threadIdx.x) * kScanItems;
    uint64_t v[kScanItems];
    uint64_t sum = 0;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      v[i] = first + i < n_tiles ? counts[first + i] : 0;
      sum += v[i];
    }
    uint64_t total;
    uint64_t run = carry + block_exclusive_scan<kScanThreads>(sum, smem, total);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int64_t t = first + i;
      if (t < n_tiles) {
        tile_offsets[t] = static_cast<int32_t>(run & 0xFFFFFFFFu);
        if (t % tiles_per_row == 0) {
          cu_seqlens[t / tiles_per_row] = static_cast<int32_t>(run & 0xFFFFFFFFu);
          valid_starts[t / tiles_per_row] = static_cast<int32_t>(run >> 32);
        }
      }
      run += v[i];
    }
    carry += total;
  }
  const int64_t nnz = static_cast<int64_t>(carry & 0xFFFFFFFFu);
  if (threadIdx.x == 0) {
    cu_seqlens[batch] = static_cast<int32_t>(nnz);
    valid_starts[batch] = static_cast<int32_t>(carry >> 32);
  }
  __syncthreads();  // makes this block's global writes above visible to all its threads
  int64_t longest = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kScanThreads) {
    seqused[b] = valid_starts[b + 1] - valid_starts[b];
    longest = max(longest, static_cast<int64_t>(cu_seqlens[b + 1] - cu_seqlens[b]));
  }
  longest = block_max<kScanThreads>(longest, smem);
  if (threadIdx.x == 0) {
    summary[0] = nnz;
    summary[1] = longest;
    if (host_summary != nullptr) {
      host_summary[0] = nnz;
      host_summary[1] = longest;
    }
    if (capacity >= 0) {
      CUDA_KERNEL_ASSERT_MSG(nnz <= capacity,
                             "varlen::unpad_capacity: capacity is smaller than the number of kept tokens");
    }
  }
}

// Which positions a tile keeps and where its first output row goes.
struct MaskTiles {  // unpad: mask | unused, offsets from _unpad_scan_kernel
  Mask mask, unused;
  const int32_t* tile_offsets;
  __device__ bool keep(int64_t b, int64_t s) const {
    return mask.at(b, s) || (unused.data != nullptr && unused.at(b, s));
  }
  __device__ int64_t first_row(int64_t tile, int64_t, int64_t) const { return tile_offsets[tile]; }
};

struct PrefixTiles {  // unpad_concat: the first row_len[b] positions of each row
  const int32_t* row_starts;
  const int32_t* row_lens;
  __device__ bool keep(int64_t b, int64_t s) const { return s < row_lens[b]; }
  __device__ int64_t first_row(int64_t, int64_t b, int64_t s0) const {
    return row_starts[b] + min(static_cast<int64_t>(row_lens[b]), s0);
  }
};

// Block `tile` < n_tiles compacts the kept positions of its tile: indices and rows. Blocks
// past n_tiles (capacity mode) each own kTile output rows and zero those at or past nnz
// (= summary[0]), setting their index to batch*seqlen. No write ever reaches past `rows`.
template <typename V, typename Tiles>
__global__ void __launch_bounds__(kThreads)
    _unpad_fwd_kernel(Tiles tiles, const char* __restrict__ src, int64_t stride_b, int64_t stride_s,
                      int64_t batch, int64_t seqlen, int64_t tiles_per_row,
                      const int64_t* __restrict__ summary, V* __restrict__ dst,
                      int64_t* __restrict__ indices, int64_t rows, int64_t vectors_per_row,
                      int group) {
  __shared__ bool flag[kTile];
  __shared__ int32_t kept[kTile];
  __shared__ int num_kept;
  const int64_t n_tiles = batch * tiles_per_row;
  const int64_t tile = blockIdx.x;
  const int lane = threadIdx.x % group;
  const int groups = kThreads / group;
  if (tile >= n_tiles) {
    const int64_t nnz = summary[0];
    const int64_t r0 = (tile - n_tiles) * kTile;
    for (int k = threadIdx.x; k < kTile; k += kThreads) {
      const int64_t r = r0 + k;
      if (r >= nnz && r < rows) indices[r] = batch * seqlen;
    }
    for (int k = threadIdx.x / group; k < kTile; k += groups) {
      const int64_t r = r0 + k;
      if (r >= nnz && r < rows) copy_row<V>(dst + r * vectors_per_row, nullptr, vectors_per_row, lane, group);
    }
    return;
  }
  const int64_t b = tile / tiles_per_row;
  const int64_t s0 = (tile % tiles_per_row) * kTile;
  const int64_t first = tiles.first_row(tile, b, s0);  // loaded while the mask loads
  if (threadIdx.x < kTile) {
    const int64_t s = s0 + threadIdx.x;
    flag[threadIdx.x] = s < seqlen && tiles.keep(b, s);
  }
  __syncthreads();
  if (threadIdx.x < kTile) {
    int rank = 0;
    for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += flag[j];
    if (flag[threadIdx.x]) kept[rank] = threadIdx.x;
    if (threadIdx.x == kTile - 1) num_kept = rank + flag[threadIdx.x];
  }
  __syncthreads();
  const int n = num_kept;
  if (static_cast<int>(threadIdx.x) < n && first + threadIdx.x < rows) {
    indices[first + threadIdx.x] = b * seqlen + s0 + kept[threadIdx.x];
  }
  for (int k = threadIdx.x / group; k < n; k += groups) {
    const int64_t r = first + k;
    if (r >= rows) break;
    const auto* row = reinterpret_cast<const V*>(src + b * stride_b + (s0 + kept[k]) * stride_s);
    copy_row<V>(dst + r * vectors_per_row, row, vectors_per_row, lane, group);
  }
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

// The zero-fill + scatter alternative (TORCH_VARLEN_PAD_STRATEGY=scatter, kept to measure):
// dst was zeroed; each source row is copied to its index.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    _pad_scatter_kernel(const char* __restrict__ src, int64_t src_stride, int64_t n,
                        const int64_t* __restrict__ indices, int64_t limit, V* __restrict__ dst,
                        int64_t vectors_per_row, int group, int rows_per_block) {
  const int lane = threadIdx.x % group;
  const int groups = kThreads / group;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  for (int k = threadIdx.x / group; k < rows_per_block; k += groups) {
    const int64_t i = i0 + k;
    if (i >= n) break;
    const int64_t r = indices[i];
    CUDA_KERNEL_ASSERT_MSG(r >= 0 && r <= limit, "varlen::pad: indices must be in [0, batch*seqlen]");
    if (r < 0 || r >= limit) continue;
    copy_row<V>(dst + r * vectors_per_row, reinterpret_cast<const V*>(src + i * src_stride),
                vectors_per_row, lane, group);
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
  return {static_cast<const char*>(m.const_data_ptr()), m.stride(0) * es, m.stride(1) * es,
          static_cast<int>(es), bits};
}

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
// it and the host only waits for the stream; elsewhere one device-to-host copy brings them.
struct HostRead {
  at::Tensor pinned;
  int64_t* mapped = nullptr;  // device address of `pinned`, nullptr when not mapped

  explicit HostRead(int64_t n)
      : pinned(at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true))) {
    void* device_address = nullptr;
    if (cudaHostGetDevicePointer(&device_address, pinned.data_ptr(), 0) == cudaSuccess) {
      mapped = static_cast<int64_t*>(device_address);
    } else {
      (void)cudaGetLastError();  // not mapped: clear the error, copy instead
    }
  }

  const int64_t* wait(const int64_t* device_values, cudaStream_t stream) {
    if (mapped != nullptr) {
      c10::cuda::stream_synchronize(stream);
    } else {
      c10::cuda::memcpy_and_sync(pinned.data_ptr(), device_values, pinned.nbytes(),
                                 cudaMemcpyDeviceToHost, stream);
    }
    return pinned.const_data_ptr<int64_t>();
  }
};

// Launches _unpad_fwd_kernel over n_tiles tiles (+ tail blocks zeroing rows past nnz).
template <typename Tiles>
void launch_unpad_copy(const Tiles& tiles, const at::Tensor& src, int64_t tiles_per_row,
                       const int64_t* summary, at::Tensor& out, at::Tensor& indices,
                       int64_t tail_blocks) {
  const int64_t batch = src.size(0), seqlen = src.size(1), rows = out.size(0);
  const int64_t es = static_cast<int64_t>(src.element_size());
  const int64_t row_bytes = out.numel() == 0 ? 0 : out.nbytes() / rows;
  const int64_t width = vector_width({row_bytes, address(src.const_data_ptr()), src.stride(0) * es,
                                      src.stride(1) * es, address(out.data_ptr())});
  const int64_t grid = batch * tiles_per_row + tail_blocks;
  if (grid == 0 || rows == 0) return;
  with_vector(width, [&](auto tag) {
    using V = decltype(tag);
    const int64_t vectors = row_bytes / static_cast<int64_t>(sizeof(V));
    _unpad_fwd_kernel<V, Tiles><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        tiles, static_cast<const char*>(src.const_data_ptr()), src.stride(0) * es, src.stride(1) * es,
        batch, seqlen, tiles_per_row, summary, static_cast<V*>(out.data_ptr()),
        indices.data_ptr<int64_t>(), rows, vectors, threads_per_row(vectors));
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
  auto cu_seqlens = at::empty({batch + 1}, int_opts);
  auto seqused = at::empty({batch}, int_opts);

  if (batch * seqlen == 0) {
    const int64_t rows = std::max<int64_t>(capacity, 0);
    cu_seqlens.zero_();
    seqused.zero_();
    return {at::zeros(packed_shape(src, rows, 2), src.options()),
            at::zeros({rows}, hidden_states.options().dtype(at::kLong)), cu_seqlens, 0, seqused};
  }
  const auto mask = readable_mask(attention_mask);
  const auto unused = unused_mask.has_value() ? readable_mask(*unused_mask) : at::Tensor();
  const Mask m = make_mask(mask);
  const Mask u = unused.defined() ? make_mask(unused) : Mask{nullptr, 0, 0, 1, 0};

  const int64_t tiles_per_row = ceil_div(seqlen, kTile);
  const int64_t n_tiles = batch * tiles_per_row;
  // scratch: counts (n_tiles u64) | summary (2 i64) | tile_offsets (n_tiles i32) | valid_starts (batch+1 i32)
  auto scratch = at::empty({n_tiles * 8 + 16 + n_tiles * 4 + (batch + 1) * 4},
                           hidden_states.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  auto* counts = reinterpret_cast<uint64_t*>(base);
  auto* summary = reinterpret_cast<int64_t*>(base + n_tiles * 8);
  auto* tile_offsets = reinterpret_cast<int32_t*>(base + n_tiles * 8 + 16);
  auto* valid_starts = reinterpret_cast<int32_t*>(base + n_tiles * 12 + 16);

  _unpad_count_kernel<<<ceil_div(n_tiles, kThreads), kThreads, 0, stream>>>(m, u, batch, seqlen,
                                                                            tiles_per_row, counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::optional<HostRead> host_read;
  if (capacity < 0) host_read.emplace(2);
  _unpad_scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, batch, tiles_per_row, capacity, tile_offsets,
                                                     cu_seqlens.data_ptr<int32_t>(), valid_starts,
                                                     seqused.data_ptr<int32_t>(), summary,
                                                     host_read ? host_read->mapped : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  int64_t rows = capacity, max_seqlen = seqlen;
  if (host_read) {
    const int64_t* host = host_read->wait(summary, stream);
    rows = host[0];
    max_seqlen = host[1];
  }
  auto out = at::empty(packed_shape(src, rows, 2), src.options());
  auto indices = at::empty({rows}, hidden_states.options().dtype(at::kLong));
  launch_unpad_copy(MaskTiles{m, u, tile_offsets}, src, tiles_per_row, summary, out, indices,
                    capacity < 0 ? 0 : ceil_div(rows, kTile));
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
  const int64_t* host = host_read.wait(summary, stream);
  const int64_t nnz = host[0], num_cu = host[1], max_seqlen = host[2];

  auto cu_seqlens = at::empty({num_cu}, hidden_states.options().dtype(at::kInt));
  _unpad_concat_cu_kernel<<<ceil_div(batch, kThreads), kThreads, 0, stream>>>(
      lengths.const_data_ptr<int64_t>(), batch, seqlen, row_starts, sample_starts,
      cu_seqlens.data_ptr<int32_t>(), num_cu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto out = at::empty(packed_shape(src, nnz, 2), src.options());
  auto indices = at::empty({nnz}, long_opts);
  launch_unpad_copy(PrefixTiles{row_starts, row_lens}, src, ceil_div(seqlen, kTile), summary, out,
                    indices, 0);
  return {out, indices, cu_seqlens, c10::SymInt(max_seqlen)};
}

bool pad_by_scatter() {
  const char* strategy = std::getenv("TORCH_VARLEN_PAD_STRATEGY");
  return strategy != nullptr && std::strcmp(strategy, "scatter") == 0;
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
  const bool scatter = pad_by_scatter();
  at::Tensor source;
  if (scatter) {
    out.zero_();
  } else {
    source = at::empty({limit}, indices.options());
    if (n > 0) {
      _pad_map_kernel<<<std::min<int64_t>(ceil_div(n, kThreads), 65536), kThreads, 0, stream>>>(
          indices.const_data_ptr<int64_t>(), n, limit, source.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  with_vector(width, [&](auto tag) {
    using V = decltype(tag);
    const int64_t vectors = row_bytes / static_cast<int64_t>(sizeof(V));
    const int group = threads_per_row(vectors);
    const int rows_per_block = (kThreads / group) * 4;
    const auto* src_bytes = static_cast<const char*>(src.const_data_ptr());
    if (scatter) {
      if (n == 0) return;
      _pad_scatter_kernel<V><<<ceil_div(n, rows_per_block), kThreads, 0, stream>>>(
          src_bytes, src.stride(0) * es, n, indices.const_data_ptr<int64_t>(), limit,
          static_cast<V*>(out.data_ptr()), vectors, group, rows_per_block);
    } else {
      _pad_fwd_kernel<V><<<ceil_div(limit, rows_per_block), kThreads, 0, stream>>>(
          src_bytes, src.stride(0) * es, n, indices.const_data_ptr<int64_t>(),
          source.const_data_ptr<int64_t>(), limit, static_cast<V*>(out.data_ptr()), vectors, group,
          rows_per_block);
    }
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
