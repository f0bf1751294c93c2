"""Fakes for the padding ops. Data-dependent sizes are unbacked SymInts from the fake ctx."""

import torch


def _rest(hidden_states: torch.Tensor):
    torch._check(
        hidden_states.dim() >= 2,
        lambda: f"hidden_states must be (batch, seqlen, ...), got shape {tuple(hidden_states.shape)}",
    )
    return tuple(hidden_states.shape[2:])


def _check_mask(name, mask, hidden_states):
    if mask is None:
        return
    torch._check(
        mask.shape == hidden_states.shape[:2],
        lambda: f"{name} must have shape (batch, seqlen) = {tuple(hidden_states.shape[:2])}, "
        f"got {tuple(mask.shape)}",
    )


@torch.library.register_fake("varlen::unpad")
def _unpad_fake(hidden_states, attention_mask, unused_mask=None):
    rest = _rest(hidden_states)
    _check_mask("attention_mask", attention_mask, hidden_states)
    _check_mask("unused_mask", unused_mask, hidden_states)
    batch, seqlen = hidden_states.shape[:2]
    ctx = torch.library.get_ctx()
    nnz = ctx.new_dynamic_size()
    torch._check(nnz <= batch * seqlen)
    max_seqlen = ctx.new_dynamic_size()
    torch._check(max_seqlen <= seqlen)
    return (
        hidden_states.new_empty((nnz, *rest)),
        hidden_states.new_empty((nnz,), dtype=torch.int64),
        hidden_states.new_empty((batch + 1,), dtype=torch.int32),
        max_seqlen,
        hidden_states.new_empty((batch,), dtype=torch.int32),
    )


@torch.library.register_fake("varlen::unpad_capacity")
def _unpad_capacity_fake(hidden_states, attention_mask, unused_mask, capacity):
    rest = _rest(hidden_states)
    _check_mask("attention_mask", attention_mask, hidden_states)
    _check_mask("unused_mask", unused_mask, hidden_states)
    torch._check(capacity >= 0, lambda: f"capacity must be >= 0, got {capacity}")
    batch = hidden_states.shape[0]
    return (
        hidden_states.new_empty((capacity, *rest)),
        hidden_states.new_empty((capacity,), dtype=torch.int64),
        hidden_states.new_empty((batch + 1,), dtype=torch.int32),
        hidden_states.new_empty((batch,), dtype=torch.int32),
    )


@torch.library.register_fake("varlen::unpad_concat")
def _unpad_concat_fake(hidden_states, attention_mask_in_length):
    rest = _rest(hidden_states)
    _check_mask("attention_mask_in_length", attention_mask_in_length, hidden_states)
    batch, seqlen = hidden_states.shape[:2]
    ctx = torch.library.get_ctx()
    nnz = ctx.new_dynamic_size()
    torch._check(nnz <= batch * seqlen)
    # cu_seqlens has (number of samples + 1) entries; that count is the unbacked size itself
    # (a size like u + 1 would leave u unbound in the output and fail aot_dispatch).
    num_cu = ctx.new_dynamic_size(min=1)
    torch._check(num_cu <= batch * seqlen + 1)
    max_seqlen = ctx.new_dynamic_size()
    torch._check(max_seqlen <= seqlen)
    return (
        hidden_states.new_empty((nnz, *rest)),
        hidden_states.new_empty((nnz,), dtype=torch.int64),
        hidden_states.new_empty((num_cu,), dtype=torch.int32),
        max_seqlen,
    )


@torch.library.register_fake("varlen::pad")
def _pad_fake(hidden_unpad, indices, batch, seqlen):
    torch._check(hidden_unpad.dim() >= 1, lambda: "hidden_unpad must have at least one dim")
    torch._check(
        indices.dim() == 1 and indices.shape[0] == hidden_unpad.shape[0],
        lambda: f"indices must be 1-D with {hidden_unpad.shape[0]} entries (one per row of "
        f"hidden_unpad), got shape {tuple(indices.shape)}",
    )
    return hidden_unpad.new_empty((batch, seqlen, *hidden_unpad.shape[1:]))


@torch.library.register_fake("varlen::gather_rows")
def _gather_rows_fake(padded, indices):
    torch._check(padded.dim() >= 2, lambda: "padded must be (batch, seqlen, ...)")
    torch._check(indices.dim() == 1, lambda: f"indices must be 1-D, got shape {tuple(indices.shape)}")
    return padded.new_empty((indices.shape[0], *padded.shape[2:]))
