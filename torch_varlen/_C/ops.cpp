// The one place every torch_varlen operator schema is written (DESIGN.md rule 1).
// Kernels live in cpu/ and cuda/ (TORCH_LIBRARY_IMPL per file); Triton launchers are
// registered for CUDA from Python; fakes live in torch_varlen/meta; autograd in
// torch_varlen/autograd.py.
#include <torch/library.h>

TORCH_LIBRARY(varlen, m) {
  // ---- padding -------------------------------------------------------------------------
  // hidden_states (batch, seqlen, *rest); attention_mask / unused_mask (batch, seqlen), any
  // dtype, nonzero = keep. Rows where mask|unused is set, in row-major order.
  // hidden_unpad (nnz, *rest); indices int64 (nnz,) into the flattened (batch*seqlen);
  // cu_seqlens int32 (batch+1,); max_seqlen = longest (mask|unused) row; seqused int32
  // (batch,) counts attention_mask only.
  m.def(
      "unpad(Tensor hidden_states, Tensor attention_mask, Tensor? unused_mask=None) -> "
      "(Tensor hidden_unpad, Tensor indices, Tensor cu_seqlens, SymInt max_seqlen, "
      "Tensor seqused)");
  // Static-shape unpad: hidden_unpad (capacity, *rest) and indices (capacity,); rows past
  // the valid ones are zero and their indices equal batch*seqlen. Errors if capacity < nnz.
  m.def(
      "unpad_capacity(Tensor hidden_states, Tensor attention_mask, Tensor? unused_mask, "
      "SymInt capacity) -> (Tensor hidden_unpad, Tensor indices, Tensor cu_seqlens, "
      "Tensor seqused)");
  // attention_mask_in_length (batch, seqlen): row r lists the lengths of the samples
  // concatenated in row r, then zeros. One sequence per nonzero entry (row-major).
  m.def(
      "unpad_concat(Tensor hidden_states, Tensor attention_mask_in_length) -> "
      "(Tensor hidden_unpad, Tensor indices, Tensor cu_seqlens, SymInt max_seqlen)");
  // Scatter (nnz, *rest) rows into zeros (batch, seqlen, *rest); indices >= batch*seqlen
  // are ignored (capacity padding).
  m.def("pad(Tensor hidden_unpad, Tensor indices, SymInt batch, SymInt seqlen) -> Tensor");
  // Gather: padded (batch, seqlen, *rest) -> (nnz, *rest); indices >= batch*seqlen give
  // zero rows. The backward of pad (and pad is the backward of this and of every unpad).
  m.def("gather_rows(Tensor padded, Tensor indices) -> Tensor");

  // ---- attention -----------------------------------------------------------------------
  // q (total_q, nheads, headdim), k (total_k, nheads_k, headdim), v (total_k, nheads_k,
  // headdim_v); cu_seqlens_* int32 (batch+1,). Causal is window_right = 0 (bottom-right).
  // out (total_q, nheads, headdim_v); softmax_lse (nheads, total_q) float32 (float64 for
  // float64 inputs). rng_state int64 (2,) = [seed, offset] on q's device, needed when
  // dropout_p > 0. deterministic only affects the backward; it is here so autograd sees it.
  // The backward takes the gradient of softmax_lse too (optional): dS = P * (dP - (D - dlse))
  // with D = rowsum(dO * O), so a loss that uses lse is differentiated correctly.
  // FP8 forward: float8_e4m3fn q/k/v with float32 descale factors q/k/v_descale, each None
  // (= 1), (1,) per tensor or (batch, nheads_k) per sequence and kv head (q_descale covers
  // the query heads of the kv head's group); the op computes with q*q_descale etc. and returns
  // out in bfloat16, lse float32. No dropout; forward only (the backward rejects FP8).
  // backend: None = automatic (torch_varlen.attention_backend), "torch_varlen" = our kernels,
  // "triton" / "hopper" = our Triton kernels / the Hopper forward on CUDA (kernels/hopper.py),
  // "fa4" = FlashAttention-4 on CUDA (kernels/fa4.py); the forward's choice goes to the backward.
  // sink (nheads,) in softmax_lse's dtype: a learnable logit per query head that joins every
  // row's softmax denominator (gpt-oss's s_aux): p_ij = exp(s_ij) / (exp(sink_h) + sum_j
  // exp(s_ij)), lse includes it; a row that sees no key gives out 0 and lse = sink_h. The
  // backward needs nothing more than that lse: attention_backward's dS = P * (dP - (D - dlse))
  // holds unchanged, and the autograd formula adds
  // dsink_h = sum_i exp(sink_h - lse_i) * (dlse_i - D_i) (torch_varlen/autograd.py).
  // Paged KV (forward only): with block_table int32 (batch, max_blocks), k is a cache
  // (num_blocks, block_size, nheads_k, headdim) and v (num_blocks, block_size, nheads_k,
  // headdim_v); key j of sequence b is k[block_table[b, j // block_size], j % block_size].
  // block_size a positive multiple of 16. seqused_k int32 (batch,): sequence b has
  // Lk = seqused_k[b] keys (else Lk = cu_seqlens_k[b+1] - cu_seqlens_k[b]); with packed k they
  // are the rows from cu_seqlens_k_padded[b] (or cu_seqlens_k[b]) on, which must lie inside k;
  // with a block_table Lk <= max_blocks * block_size and the block ids of its
  // ceil(Lk / block_size) blocks must lie in [0, num_blocks). A backward through a forward with
  // block_table or seqused_k raises. num_splits: split-KV on CUDA (0 = heuristic, 1 = none):
  // each query tile's keys in num_splits parts, merged by lse (torch_varlen/merge.py); the CPU
  // ignores it.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, "
      "Tensor? alibi_slopes=None, Tensor? cu_seqlens_q_padded=None, "
      "Tensor? cu_seqlens_k_padded=None, float dropout_p=0.0, Tensor? rng_state=None, "
      "bool deterministic=False, Tensor? q_descale=None, Tensor? k_descale=None, "
      "Tensor? v_descale=None, str? backend=None, Tensor? sink=None, Tensor? block_table=None, "
      "Tensor? seqused_k=None, int num_splits=0) -> (Tensor out, Tensor softmax_lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor softmax_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, float softmax_scale, int window_left=-1, int window_right=-1, "
      "float softcap=0.0, Tensor? alibi_slopes=None, Tensor? cu_seqlens_q_padded=None, "
      "Tensor? cu_seqlens_k_padded=None, float dropout_p=0.0, Tensor? rng_state=None, "
      "bool deterministic=False, Tensor? grad_lse=None, str? backend=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // ---- KV cache ------------------------------------------------------------------------
  // Appends new keys / values in place (flash_attn_with_kvcache): k (batch, seqlen_new,
  // nheads_k, headdim), v (batch, seqlen_new, nheads_k, headdim_v) go to positions
  // cache_seqlens[b] + i (int32 (batch,)) of sequence b. Caches are (batch_cache, seqlen_cache,
  // nheads_k, headdim) indexed by cache_batch_idx[b] (int32 (batch,); default b), or paged
  // (num_blocks, block_size, nheads_k, headdim) with block_table int32 (batch, max_blocks)
  // (position p of sequence b at [block_table[b, p // block_size], p % block_size]).
  // cache_seqlens[b] + seqlen_new must fit the cache; block ids must be in range.
  m.def(
      "kvcache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
      "Tensor cache_seqlens, Tensor? cache_batch_idx=None, Tensor? block_table=None) -> ()");
}
