"""Fakes for the attention ops, and the shape checks the Triton launchers share with them."""

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn)
FP8 = torch.float8_e4m3fn  # FP8 attention (forward only): float8_e4m3fn q, k, v -> bfloat16 out
FP8_BACKWARD_ERROR = ("FP8 attention is forward-only: there is no backward for float8_e4m3fn q, k, v "
                      "(train with bfloat16 or float16 inputs)")


def out_dtype(q: torch.Tensor) -> torch.dtype:
    """out has q's dtype, except bfloat16 for float8_e4m3fn inputs (FP8 attention)."""
    return torch.bfloat16 if q.dtype == FP8 else q.dtype


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    """softmax_lse is float32, except float64 for float64 inputs (so gradcheck sees float64)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_attention_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes=None,
                           cu_seqlens_q_padded=None, cu_seqlens_k_padded=None,
                           window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0,
                           rng_state=None, q_descale=None, k_descale=None, v_descale=None):
    """Shape, dtype and device checks of attention_forward and attention_backward, the CPU
    kernel's check_shapes with its messages (cu_seqlens values are checked by the kernels: the
    CPU's on the host, the CUDA launchers' by kernels/checks.py on the device)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check(t.dim() == 3, lambda: f"{name} must be (total, nheads, headdim), got shape {tuple(t.shape)}")
        torch._check(t.dtype in _DTYPES, lambda: f"{name} must be float16, bfloat16, float32 or float64 "
                     f"(or float8_e4m3fn for the FP8 forward), got {t.dtype}")
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype,
                 lambda: f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(k.device == q.device and v.device == q.device,
                 lambda: f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    torch._check(k.shape[2] == q.shape[2],
                 lambda: f"q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}")
    torch._check(v.shape[0] == k.shape[0] and v.shape[1] == k.shape[1],
                 lambda: f"v must be (total_k, nheads_k, headdim_v) with k's first two dims "
                 f"{tuple(k.shape[:2])}, got {tuple(v.shape)}")
    torch._check(k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
                 lambda: f"nheads ({q.shape[1]}) must be divisible by nheads_k ({k.shape[1]})")
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q.dim() == 1 else -1
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                    ("cu_seqlens_q_padded", cu_seqlens_q_padded),
                    ("cu_seqlens_k_padded", cu_seqlens_k_padded)):
        if t is None:
            continue
        torch._check(t.dtype == torch.int32, lambda: f"{name} must be int32, got {t.dtype}")
        torch._check(t.dim() == 1 and t.shape[0] >= 1,
                     lambda: f"{name} must be 1-D of shape (batch+1,), got {tuple(t.shape)}")
        torch._check(t.shape[0] == batch + 1,
                     lambda: f"{name} must have batch+1 = {batch + 1} entries like cu_seqlens_q, got {t.shape[0]}")
        torch._check(t.device == q.device, lambda: f"{name} must be on q's device {q.device}, got {t.device}")
    if alibi_slopes is not None:
        torch._check(alibi_slopes.dtype == torch.float32,
                     lambda: f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        torch._check(tuple(alibi_slopes.shape) in ((q.shape[1],), (batch, q.shape[1])),
                     lambda: f"alibi_slopes must be (nheads,) = ({q.shape[1]},) or (batch, nheads) = "
                     f"({batch}, {q.shape[1]}), got {tuple(alibi_slopes.shape)}")
        torch._check(alibi_slopes.device == q.device,
                     lambda: f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
    torch._check(window_left >= -1 and window_right >= -1,
                 lambda: f"window_size entries must be >= -1 (-1 = unbounded), got ({window_left}, {window_right})")
    torch._check(softcap >= 0, lambda: f"softcap must be >= 0 (0 = off), got {softcap}")
    torch._check(0 <= dropout_p < 1, lambda: f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0:
        torch._check(rng_state is not None, lambda: "rng_state ([seed, offset] int64) is required when dropout_p > 0")
        torch._check(rng_state.dtype == torch.int64 and tuple(rng_state.shape) == (2,),
                     lambda: f"rng_state must be int64 of shape (2,), got {rng_state.dtype} {tuple(rng_state.shape)}")
        torch._check(rng_state.device == q.device,
                     lambda: f"rng_state must be on q's device {q.device}, got {rng_state.device}")
    check_descales(q, k, batch, dropout_p, q_descale, k_descale, v_descale)


def check_descales(q, k, batch, dropout_p, q_descale, k_descale, v_descale):
    """FP8 attention: float8_e4m3fn q/k/v, no dropout; each descale None, (1,) or (batch, nheads_k)
    float32 on q's device."""
    descales = (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))
    if q.dtype != FP8:
        for name, d in descales:
            torch._check(d is None, lambda: f"{name} is only for float8_e4m3fn q, k and v (FP8 attention), "
                         f"got q of dtype {q.dtype}")
        return
    torch._check(dropout_p == 0, lambda: f"dropout is not supported with float8_e4m3fn q, k and v "
                 f"(FP8 attention is inference only), got dropout_p={dropout_p}")
    for name, d in descales:
        if d is None:
            continue
        torch._check(d.dtype == torch.float32, lambda: f"{name} must be float32, got {d.dtype}")
        torch._check(tuple(d.shape) in ((1,), (batch, k.shape[1])),
                     lambda: f"{name} must be (1,) (per tensor) or (batch, nheads_k) = ({batch}, "
                     f"{k.shape[1]}), got {tuple(d.shape)}")
        torch._check(d.device == q.device, lambda: f"{name} must be on q's device {q.device}, got {d.device}")


def check_sink(q, sink):
    """sink: None, or (nheads,) in softmax_lse's dtype (float32; float64 for float64 inputs) on
    q's device (the CPU kernel's check_sink, with its messages)."""
    if sink is None:
        return
    torch._check(sink.dim() == 1 and sink.shape[0] == q.shape[1],
                 lambda: f"sink must be (nheads,) = ({q.shape[1]},), got {tuple(sink.shape)}")
    torch._check(sink.dtype == lse_dtype(q),
                 lambda: f"sink must be {lse_dtype(q)} (softmax_lse's dtype), got {sink.dtype}")
    torch._check(sink.device == q.device, lambda: f"sink must be on q's device {q.device}, got {sink.device}")


PAGED_BLOCK_MULTIPLE = 16  # paged KV block sizes: positive multiples of this
PAGED_BACKWARD_ERROR = ("paged KV (block_table) and seqused_k are inference features: there is no "
                        "backward through attention with block_table or seqused_k (gather the keys "
                        "into packed k, v to train)")


def _check_int32_vector(name, t, shape, q):
    torch._check(t.dtype == torch.int32, lambda: f"{name} must be int32, got {t.dtype}")
    torch._check(t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape)),
                 lambda: f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    torch._check(t.device == q.device, lambda: f"{name} must be on q's device {q.device}, got {t.device}")


def check_paged_kv(q, k, v, cu_seqlens_q, cu_seqlens_k_padded, block_table, seqused_k, num_splits=0):
    """Shapes of attention_forward's paged-KV arguments (the CPU kernel's check_paged, with its
    messages) -> (k3, v3): k and v when packed, else (num_blocks, nheads_k, headdim) views of
    the caches' first slots, which stand in for k and v in check_attention_shapes."""
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q.dim() == 1 else -1
    torch._check(num_splits >= 0, lambda: f"num_splits must be >= 0 (0 = heuristic), got {num_splits}")
    if seqused_k is not None:
        _check_int32_vector("seqused_k", seqused_k, (batch,), q)
    if block_table is None:
        return k, v
    torch._check(block_table.dtype == torch.int32, lambda: f"block_table must be int32, got {block_table.dtype}")
    torch._check(block_table.dim() == 2 and block_table.shape[0] == batch,
                 lambda: f"block_table must be (batch, max_blocks) with batch = {batch}, got shape "
                 f"{tuple(block_table.shape)}")
    torch._check(block_table.device == q.device,
                 lambda: f"block_table must be on q's device {q.device}, got {block_table.device}")
    for name, t in (("k", k), ("v", v)):
        torch._check(t.dim() == 4, lambda: f"with a block_table, {name} must be a cache (num_blocks, "
                     f"block_size, nheads_k, headdim), got shape {tuple(t.shape)}")
    torch._check(v.shape[0] == k.shape[0] and v.shape[1] == k.shape[1],
                 lambda: f"v must be (num_blocks, block_size, nheads_k, headdim_v) with k's first two dims "
                 f"{tuple(k.shape[:2])}, got {tuple(v.shape)}")
    block_size = k.shape[1]
    torch._check(block_size > 0 and block_size % PAGED_BLOCK_MULTIPLE == 0,
                 lambda: f"paged KV block_size (k.shape[1]) must be a positive multiple of "
                 f"{PAGED_BLOCK_MULTIPLE}, got {block_size}")
    torch._check(cu_seqlens_k_padded is None,
                 lambda: "cu_seqlens_k_padded must be None with a block_table (keys live in the cache's blocks)")
    return k[:, 0], v[:, 0]


def check_kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=None, block_table=None):
    """Shapes of kvcache_append's arguments (the CPU kernel's, with its messages)."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        torch._check(t.dim() == 4, lambda: f"{name} must be 4-D, got shape {tuple(t.shape)}")
    torch._check(v_cache.shape[0] == k_cache.shape[0] and v_cache.shape[1] == k_cache.shape[1]
                 and v_cache.shape[2] == k_cache.shape[2],
                 lambda: f"v_cache must have k_cache's first three dims {tuple(k_cache.shape[:3])}, got "
                 f"{tuple(v_cache.shape)}")
    batch = k.shape[0]
    torch._check(v.shape[0] == batch and v.shape[1] == k.shape[1],
                 lambda: f"v must be (batch, seqlen_new, nheads_k, headdim_v) with k's first two dims "
                 f"{tuple(k.shape[:2])}, got {tuple(v.shape)}")
    torch._check(k.shape[2] == k_cache.shape[2] and k.shape[3] == k_cache.shape[3],
                 lambda: f"k must have k_cache's (nheads_k, headdim) {tuple(k_cache.shape[2:])}, got "
                 f"{tuple(k.shape[2:])}")
    torch._check(v.shape[3] == v_cache.shape[3],
                 lambda: f"v must have v_cache's headdim_v {v_cache.shape[3]}, got {v.shape[3]}")
    for name, t in (("v_cache", v_cache), ("k", k), ("v", v)):
        torch._check(t.dtype == k_cache.dtype, lambda: f"{name} must have k_cache's dtype {k_cache.dtype}, got {t.dtype}")
    for name, t in (("v_cache", v_cache), ("k", k), ("v", v)):
        torch._check(t.device == k_cache.device,
                     lambda: f"{name} must be on k_cache's device {k_cache.device}, got {t.device}")
    _check_int32_vector("cache_seqlens", cache_seqlens, (batch,), k_cache)
    if cache_batch_idx is not None:
        torch._check(block_table is None, lambda: "cache_batch_idx is not supported with a block_table "
                     "(as in flash-attn): index the block_table's rows instead")
        _check_int32_vector("cache_batch_idx", cache_batch_idx, (batch,), k_cache)
    if block_table is not None:
        torch._check(block_table.dtype == torch.int32, lambda: f"block_table must be int32, got {block_table.dtype}")
        torch._check(block_table.dim() == 2 and block_table.shape[0] == batch,
                     lambda: f"block_table must be (batch, max_blocks) with batch = {batch}, got shape "
                     f"{tuple(block_table.shape)}")
        torch._check(block_table.device == k_cache.device,
                     lambda: f"block_table must be on k_cache's device {k_cache.device}, got {block_table.device}")
        torch._check(k_cache.shape[1] > 0 and k_cache.shape[1] % PAGED_BLOCK_MULTIPLE == 0,
                     lambda: f"paged KV block_size (k_cache.shape[1]) must be a positive multiple of "
                     f"{PAGED_BLOCK_MULTIPLE}, got {k_cache.shape[1]}")


@torch.library.register_fake("varlen::kvcache_append")
def _kvcache_append_fake(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=None, block_table=None):
    check_kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
    return None


def _check_like(name, t, shape, dtype, q):
    """t has this shape, dtype and q's device (the CPU kernel's check_like)."""
    shape = tuple(shape)
    msg = lambda: f"{name} must have shape {shape}, got {tuple(t.shape)}"  # noqa: E731
    torch._check(t.dim() == len(shape), msg)
    for got, want in zip(t.shape, shape):  # one check per dim: a symbolic size gives a runtime assert
        torch._check(got == want, msg)
    torch._check(t.dtype == dtype, lambda: f"{name} must be {dtype}, got {t.dtype}")
    torch._check(t.device == q.device, lambda: f"{name} must be on q's device {q.device}, got {t.device}")


def check_attention_backward_args(grad_out, q, v, out, softmax_lse, grad_lse=None):
    """attention_backward's own tensors, after check_attention_shapes: grad_out and out are
    (total_q, nheads, headdim_v) in q's dtype, softmax_lse and grad_lse (nheads, total_q) in
    lse_dtype(q), all on q's device (the CPU kernel's checks, with its messages)."""
    torch._check(q.dtype != FP8, lambda: FP8_BACKWARD_ERROR)
    total_q, nheads = q.shape[0], q.shape[1]
    out_shape, lse_shape = (total_q, nheads, v.shape[2]), (nheads, total_q)
    _check_like("grad_out", grad_out, out_shape, q.dtype, q)
    _check_like("out", out, out_shape, q.dtype, q)
    _check_like("softmax_lse", softmax_lse, lse_shape, lse_dtype(q), q)
    if grad_lse is not None:
        _check_like("grad_lse", grad_lse, lse_shape, lse_dtype(q), q)


@torch.library.register_fake("varlen::attention_forward")
def _attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
                            alibi_slopes=None, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None,
                            dropout_p=0.0, rng_state=None, deterministic=False, q_descale=None,
                            k_descale=None, v_descale=None, backend=None, sink=None,
                            block_table=None, seqused_k=None, num_splits=0):
    k, v = check_paged_kv(q, k, v, cu_seqlens_q, cu_seqlens_k_padded, block_table, seqused_k, num_splits)
    check_attention_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, cu_seqlens_q_padded,
                           cu_seqlens_k_padded, window_left, window_right, softcap, dropout_p, rng_state,
                           q_descale, k_descale, v_descale)
    check_sink(q, sink)
    total_q, nheads, _ = q.shape
    out = q.new_empty((total_q, nheads, v.shape[2]), dtype=out_dtype(q))
    lse = q.new_empty((nheads, total_q), dtype=lse_dtype(q))
    return out, lse


@torch.library.register_fake("varlen::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, softmax_scale, window_left=-1,
                             window_right=-1, softcap=0.0, alibi_slopes=None,
                             cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, dropout_p=0.0,
                             rng_state=None, deterministic=False, grad_lse=None, backend=None):
    torch._check(q.dtype != FP8, lambda: FP8_BACKWARD_ERROR)
    check_attention_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, cu_seqlens_q_padded,
                           cu_seqlens_k_padded, window_left, window_right, softcap, dropout_p, rng_state)
    check_attention_backward_args(grad_out, q, v, out, softmax_lse, grad_lse)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
