// Argument checks shared by the CPU and CUDA padding kernels: shapes, dtypes and devices only
// (never a read of tensor data, so the CUDA launchers stay free of host syncs). Value checks
// (index ranges, lengths) are done by each backend: on the host for CPU, on the device for CUDA.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace varlen {

inline void check_hidden(const at::Tensor& hidden_states) {
  TORCH_CHECK(hidden_states.dim() >= 2,
              "hidden_states must be (batch, seqlen, ...) with at least 2 dims, got shape ",
              hidden_states.sizes());
}

// mask (batch, seqlen) on hidden_states' device, any dtype (nonzero = set).
inline void check_mask(const char* name, const at::Tensor& mask, const at::Tensor& hidden_states) {
  TORCH_CHECK(mask.dim() == 2, name, " must be 2-D (batch, seqlen), got shape ", mask.sizes());
  TORCH_CHECK(mask.size(0) == hidden_states.size(0) && mask.size(1) == hidden_states.size(1),
              name, " must have shape (batch, seqlen) = ", hidden_states.sizes().slice(0, 2),
              " of hidden_states, got ", mask.sizes());
  TORCH_CHECK(mask.device() == hidden_states.device(), name, " must be on hidden_states' device (",
              hidden_states.device(), "), got ", mask.device());
}

inline void check_optional_mask(const char* name, const std::optional<at::Tensor>& mask,
                                const at::Tensor& hidden_states) {
  if (mask.has_value()) check_mask(name, *mask, hidden_states);
}

// indices: int64 (rows,) on `device`; rows < 0 means any length.
inline void check_indices(const at::Tensor& indices, int64_t rows, const char* rows_of,
                          const at::Device& device) {
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.dim() == 1, "indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK(rows < 0 || indices.size(0) == rows, "indices must have ", rows,
              " entries (one per row of ", rows_of, "), got ", indices.size(0));
  TORCH_CHECK(indices.device() == device, "indices must be on ", device, ", got ",
              indices.device());
}

inline void check_pad_args(const at::Tensor& hidden_unpad, const at::Tensor& indices,
                           int64_t batch, int64_t seqlen) {
  TORCH_CHECK(hidden_unpad.dim() >= 1, "hidden_unpad must have at least 1 dim (rows, ...), got a 0-D tensor");
  TORCH_CHECK(batch >= 0 && seqlen >= 0, "batch and seqlen must be >= 0, got batch=", batch,
              ", seqlen=", seqlen);
  check_indices(indices, hidden_unpad.size(0), "hidden_unpad", hidden_unpad.device());
}

inline void check_gather_args(const at::Tensor& padded, const at::Tensor& indices) {
  TORCH_CHECK(padded.dim() >= 2, "padded must be (batch, seqlen, ...) with at least 2 dims, got shape ",
              padded.sizes());
  check_indices(indices, -1, "", padded.device());
}

inline void check_concat_lengths(const at::Tensor& lengths, const at::Tensor& hidden_states) {
  check_mask("attention_mask_in_length", lengths, hidden_states);
  TORCH_CHECK(at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false),
              "attention_mask_in_length must hold integer lengths, got ", lengths.scalar_type());
}

inline void check_capacity(int64_t capacity) {
  TORCH_CHECK(capacity >= 0, "capacity must be >= 0, got ", capacity);
}

// Shape of the packed output: (rows, *hidden_states.shape[first_rest_dim:]).
inline std::vector<int64_t> packed_shape(const at::Tensor& t, int64_t rows, int64_t first_rest_dim) {
  std::vector<int64_t> shape{rows};
  for (int64_t d = first_rest_dim; d < t.dim(); ++d) shape.push_back(t.size(d));
  return shape;
}

// True when dims [first, dim) of t form one dense row-major block, so each "row" indexed by the
// leading dims is `row_elems` contiguous elements and the leading dims may have any strides.
inline bool trailing_dense(const at::Tensor& t, int64_t first) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= first; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// t itself when its trailing dims are dense (leading dims keep their strides), else a copy.
inline at::Tensor dense_rows(const at::Tensor& t, int64_t first) {
  return trailing_dense(t, first) ? t : t.contiguous();
}

}  // namespace varlen
