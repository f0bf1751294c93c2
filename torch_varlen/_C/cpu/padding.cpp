// CPU kernels of the padding ops (schemas and their documentation: _C/ops.cpp; specification:
// reference.py). Rows are moved as raw bytes, so every dtype (floating, integer, bool, complex)
// and any number of trailing dims is served by one code path; the leading (batch, seqlen) or
// (rows) dims may have any strides, the trailing dims are made dense when they are not.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "padding_checks.h"

namespace varlen {
namespace {

// Rows of a tensor indexed by its leading dims: row r = (r / inner, r % inner) for (batch,
// seqlen)-led tensors, inner = 1 for (rows)-led ones. Strides in bytes.
struct Rows {
  const char* data;
  int64_t inner;
  int64_t stride_outer;
  int64_t stride_inner;

  const char* row(int64_t r) const {
    return data + (r / inner) * stride_outer + (r % inner) * stride_inner;
  }
};

// t must have dense trailing dims (dense_rows). lead = 2 for (batch, seqlen, ...), 1 for (rows, ...).
Rows rows_of(const at::Tensor& t, int64_t lead) {
  const int64_t es = static_cast<int64_t>(t.element_size());
  if (lead == 2) {
    return {static_cast<const char*>(t.const_data_ptr()), std::max<int64_t>(t.size(1), 1),
            t.stride(0) * es, t.stride(1) * es};
  }
  return {static_cast<const char*>(t.const_data_ptr()), 1, t.stride(0) * es, 0};
}

int64_t row_bytes(const at::Tensor& t, int64_t lead) {
  int64_t n = static_cast<int64_t>(t.element_size());
  for (int64_t d = lead; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Rows per parallel_for chunk: about 64 KiB of copying, at least one row.
int64_t grain_rows(int64_t bytes_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(bytes_per_row, 1));
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor here, got ", t.device());
}

// out[i] = src row indices[i] when indices[i] < limit, else zeros. Indices are validated.
void gather_into(const Rows& src, const int64_t* indices, int64_t n, int64_t limit, int64_t bytes,
                 char* out) {
  at::parallel_for(0, n, grain_rows(bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      char* dst = out + i * bytes;
      if (indices[i] < limit) {
        std::memcpy(dst, src.row(indices[i]), bytes);
      } else {
        std::memset(dst, 0, bytes);
      }
    }
  });
}

// Every index in [0, limit]; limit (= batch*seqlen) marks an unused row.
void check_index_range(const at::Tensor& indices, int64_t limit) {
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] <= limit, "indices must be in [0, batch*seqlen] = [0, ",
                limit, "] (batch*seqlen marks an unused row), got ", idx[i], " at position ", i);
  }
}

// Number of set entries in each row of a (batch, seqlen) bool tensor (contiguous).
std::vector<int64_t> row_counts(const at::Tensor& keep) {
  const int64_t batch = keep.size(0), seqlen = keep.size(1);
  const bool* k = keep.const_data_ptr<bool>();
  std::vector<int64_t> counts(batch);
  at::parallel_for(0, batch, grain_rows(seqlen), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      counts[b] = std::count(k + b * seqlen, k + (b + 1) * seqlen, true);
    }
  });
  return counts;
}

at::Tensor to_int32(const std::vector<int64_t>& v) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kInt);
  int32_t* p = t.data_ptr<int32_t>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<int32_t>(v[i]);
  return t;
}

// Exclusive prefix sum -> (len+1,) offsets; checks the total fits cu_seqlens' int32.
std::vector<int64_t> offsets_of(const std::vector<int64_t>& lengths) {
  std::vector<int64_t> offsets(lengths.size() + 1, 0);
  for (size_t i = 0; i < lengths.size(); ++i) offsets[i + 1] = offsets[i] + lengths[i];
  TORCH_CHECK(offsets.back() <= std::numeric_limits<int32_t>::max(), "the number of kept tokens (",
              offsets.back(), ") does not fit cu_seqlens' int32");
  return offsets;
}

// indices (rows,) int64: row b's kept positions b*seqlen+s at offsets[b]..; entries past the
// kept ones (capacity padding) are batch*seqlen. keep(b, s) says whether position s is kept.
template <typename Keep>
at::Tensor build_indices(int64_t batch, int64_t seqlen, const std::vector<int64_t>& offsets,
                         int64_t rows, const Keep& keep) {
  auto indices = at::empty({rows}, at::kLong);
  int64_t* idx = indices.data_ptr<int64_t>();
  at::parallel_for(0, batch, grain_rows(seqlen), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t pos = offsets[b];
      for (int64_t s = 0; s < seqlen; ++s) {
        if (keep(b, s)) idx[pos++] = b * seqlen + s;
      }
    }
  });
  std::fill(idx + offsets.back(), idx + rows, batch * seqlen);
  return indices;
}

at::Tensor gather_hidden(const at::Tensor& hidden_states, const at::Tensor& indices) {
  const auto src = dense_rows(hidden_states, 2);
  const int64_t bytes = row_bytes(src, 2);
  auto out = at::empty(packed_shape(src, indices.size(0), 2), src.options());
  gather_into(rows_of(src, 2), indices.const_data_ptr<int64_t>(), indices.size(0),
              src.size(0) * src.size(1), bytes, static_cast<char*>(out.data_ptr()));
  return out;
}

// The shared body of unpad and unpad_capacity (capacity < 0: exact size).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, at::Tensor> unpad_impl(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask,
    const std::optional<at::Tensor>& unused_mask, int64_t capacity) {
  check_hidden(hidden_states);
  check_cpu(hidden_states, "hidden_states");
  check_mask("attention_mask", attention_mask, hidden_states);
  check_optional_mask("unused_mask", unused_mask, hidden_states);
  const int64_t batch = hidden_states.size(0), seqlen = hidden_states.size(1);

  const auto valid = attention_mask.ne(0).contiguous();
  auto keep = valid;
  if (unused_mask.has_value()) keep = at::logical_or(valid, unused_mask->ne(0)).contiguous();
  const auto lengths = row_counts(keep);
  const auto offsets = offsets_of(lengths);
  const int64_t nnz = offsets.back();
  if (capacity >= 0) {
    TORCH_CHECK(nnz <= capacity, "capacity (", capacity,
                ") is smaller than the number of kept tokens (", nnz, ")");
  }
  const bool* k = keep.const_data_ptr<bool>();
  auto indices = build_indices(batch, seqlen, offsets, capacity >= 0 ? capacity : nnz,
                               [&](int64_t b, int64_t s) { return k[b * seqlen + s]; });
  auto hidden_unpad = gather_hidden(hidden_states, indices);
  const int64_t max_seqlen = lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
  auto seqused = to_int32(unused_mask.has_value() ? row_counts(valid) : lengths);
  return {hidden_unpad, indices, to_int32(offsets), max_seqlen, seqused};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt, at::Tensor> unpad_cpu(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask,
    const std::optional<at::Tensor>& unused_mask) {
  auto [hidden_unpad, indices, cu_seqlens, max_seqlen, seqused] =
      unpad_impl(hidden_states, attention_mask, unused_mask, -1);
  return {hidden_unpad, indices, cu_seqlens, c10::SymInt(max_seqlen), seqused};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unpad_capacity_cpu(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask,
    const std::optional<at::Tensor>& unused_mask, int64_t capacity) {
  check_capacity(capacity);
  auto [hidden_unpad, indices, cu_seqlens, max_seqlen, seqused] =
      unpad_impl(hidden_states, attention_mask, unused_mask, capacity);
  return {hidden_unpad, indices, cu_seqlens, seqused};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt> unpad_concat_cpu(
    const at::Tensor& hidden_states, const at::Tensor& attention_mask_in_length) {
  check_hidden(hidden_states);
  check_cpu(hidden_states, "hidden_states");
  check_concat_lengths(attention_mask_in_length, hidden_states);
  const int64_t batch = hidden_states.size(0), seqlen = hidden_states.size(1);
  const auto lengths_2d = attention_mask_in_length.to(at::kLong).contiguous();
  const int64_t* len = lengths_2d.const_data_ptr<int64_t>();

  std::vector<int64_t> row_len(batch, 0), sample_len;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seqlen; ++s) {
      const int64_t n = len[b * seqlen + s];
      TORCH_CHECK(n >= 0, "attention_mask_in_length must be >= 0, got ", n, " at (", b, ", ", s, ")");
      if (n == 0) continue;
      row_len[b] += n;
      sample_len.push_back(n);
    }
    TORCH_CHECK(row_len[b] <= seqlen, "attention_mask_in_length row ", b, " sums to ", row_len[b],
                ", more than seqlen (", seqlen, ")");
  }
  const auto offsets = offsets_of(row_len);
  auto indices = build_indices(batch, seqlen, offsets, offsets.back(),
                               [&](int64_t b, int64_t s) { return s < row_len[b]; });
  const int64_t max_seqlen =
      sample_len.empty() ? 0 : *std::max_element(sample_len.begin(), sample_len.end());
  return {gather_hidden(hidden_states, indices), indices, to_int32(offsets_of(sample_len)),
          c10::SymInt(max_seqlen)};
}

at::Tensor pad_cpu(const at::Tensor& hidden_unpad, const at::Tensor& indices_in, int64_t batch,
                   int64_t seqlen) {
  check_pad_args(hidden_unpad, indices_in, batch, seqlen);
  const auto indices = indices_in.contiguous();
  check_cpu(hidden_unpad, "hidden_unpad");
  const int64_t limit = batch * seqlen;
  check_index_range(indices, limit);
  const auto src = dense_rows(hidden_unpad, 1);
  std::vector<int64_t> shape{batch, seqlen};
  for (int64_t d = 1; d < src.dim(); ++d) shape.push_back(src.size(d));
  auto out = at::zeros(shape, src.options());
  const int64_t bytes = row_bytes(src, 1);
  const Rows rows = rows_of(src, 1);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, src.size(0), grain_rows(bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (idx[i] < limit) std::memcpy(dst + idx[i] * bytes, rows.row(i), bytes);
    }
  });
  return out;
}

at::Tensor gather_rows_cpu(const at::Tensor& padded, const at::Tensor& indices_in) {
  check_gather_args(padded, indices_in);
  const auto indices = indices_in.contiguous();
  check_cpu(padded, "padded");
  check_index_range(indices, padded.size(0) * padded.size(1));
  return gather_hidden(padded, indices);
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen, CPU, m) {
  m.impl("unpad", &unpad_cpu);
  m.impl("unpad_capacity", &unpad_capacity_cpu);
  m.impl("unpad_concat", &unpad_concat_cpu);
  m.impl("pad", &pad_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
}

}  // namespace varlen
