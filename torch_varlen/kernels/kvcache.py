"""varlen::kvcache_append on CPU and CUDA: new keys / values written into a KV cache in place.

Plain torch ops (an index_put_ per cache), so one implementation serves both devices and
nothing syncs with the host: the value checks are ``torch._assert_async`` (a RuntimeError on
the CPU, a device-side assert on CUDA), and indexing bounds-checks every position besides, so a
bad input never writes outside the cache. Captured by CUDA graphs; under torch.compile the op is
opaque and its schema's ``Tensor(a!)`` / ``Tensor(b!)`` show the mutation to functionalization.
"""

from __future__ import annotations

import torch

from ..meta.attention import check_kvcache_append

APPEND_MESSAGES = dict(
    seqlens="kvcache: cache_seqlens must be >= 0",
    capacity="kvcache: cache_seqlens + seqlen_new must be <= the cache's capacity (seqlen_cache, "
             "or max_blocks * block_size with a block_table)",
    batch_idx="kvcache: cache_batch_idx must be in [0, k_cache.shape[0])",
    block="paged KV: block_table holds a block id outside [0, num_blocks)",
)


def append_slots(k_cache, batch, seqlen_new, cache_seqlens, cache_batch_idx, block_table):
    """(rows, slots) int64 (batch, seqlen_new): where token i of sequence b goes in a cache
    (num, slot, ...), with the value checks of kvcache_append."""
    device = k_cache.device
    pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(seqlen_new, device=device)
    torch._assert_async((cache_seqlens >= 0).all(), APPEND_MESSAGES["seqlens"])
    if block_table is not None:
        block_size, max_blocks = k_cache.shape[1], block_table.shape[1]
        torch._assert_async((pos < max_blocks * block_size).all(), APPEND_MESSAGES["capacity"])
        # clamped so that a bad position never reads outside the table (the assert reports it)
        col = (pos // block_size).clamp(0, max(max_blocks - 1, 0))
        rows = block_table.to(torch.int64).gather(1, col)
        torch._assert_async(((rows >= 0) & (rows < k_cache.shape[0])).all(), APPEND_MESSAGES["block"])
        return rows, pos % block_size
    torch._assert_async((pos < k_cache.shape[1]).all(), APPEND_MESSAGES["capacity"])
    if cache_batch_idx is None:
        rows = torch.arange(batch, device=device)
    else:
        rows = cache_batch_idx.to(torch.int64)
        torch._assert_async(((rows >= 0) & (rows < k_cache.shape[0])).all(), APPEND_MESSAGES["batch_idx"])
    return rows[:, None].expand(batch, seqlen_new), pos


def kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=None, block_table=None):
    check_kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
    batch, seqlen_new = k.shape[0], k.shape[1]
    if batch == 0 or seqlen_new == 0:
        return
    rows, slots = append_slots(k_cache, batch, seqlen_new, cache_seqlens, cache_batch_idx, block_table)
    k_cache.index_put_((rows, slots), k)
    v_cache.index_put_((rows, slots), v)


torch.library.register_kernel("varlen::kvcache_append", ("cpu", "cuda"), kvcache_append)
