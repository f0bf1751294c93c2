"""Autograd formulas (DESIGN.md rule 3): each backward calls registered ops, never raw kernels.

unpad* -> backward is pad; pad -> backward is gather_rows; gather_rows -> backward is pad;
attention_forward -> backward is attention_backward; attention_backward (double backward) ->
autograd through _attention_dense.attention_backward_dense, its pure-PyTorch equivalent.
"""

import torch

from ._attention_dense import attention_backward_dense
from .meta.attention import FP8, FP8_BACKWARD_ERROR, PAGED_BACKWARD_ERROR

_ops = torch.ops.varlen


# ---------------------------------------------------------------- padding


def _setup_unpad(ctx, inputs, output):
    hidden_states = inputs[0]
    ctx.save_for_backward(output[1])  # indices
    ctx.batch, ctx.seqlen = hidden_states.shape[0], hidden_states.shape[1]


def _backward_unpad(ctx, grad_unpad, *_):
    (indices,) = ctx.saved_tensors
    return (_ops.pad(grad_unpad, indices, ctx.batch, ctx.seqlen),) + (None,) * (ctx.num_inputs - 1)


for _name, _num_inputs in (("unpad", 3), ("unpad_capacity", 4), ("unpad_concat", 2)):

    def _setup(ctx, inputs, output, _n=_num_inputs):
        _setup_unpad(ctx, inputs, output)
        ctx.num_inputs = _n

    torch.library.register_autograd(f"varlen::{_name}", _backward_unpad, setup_context=_setup)


def _setup_pad(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_pad(ctx, grad_padded):
    (indices,) = ctx.saved_tensors
    return _ops.gather_rows(grad_padded, indices), None, None, None


torch.library.register_autograd("varlen::pad", _backward_pad, setup_context=_setup_pad)


def _setup_gather_rows(ctx, inputs, output):
    padded, indices = inputs
    ctx.save_for_backward(indices)
    ctx.batch, ctx.seqlen = padded.shape[0], padded.shape[1]


def _backward_gather_rows(ctx, grad_rows):
    (indices,) = ctx.saved_tensors
    return _ops.pad(grad_rows, indices, ctx.batch, ctx.seqlen), None


torch.library.register_autograd(
    "varlen::gather_rows", _backward_gather_rows, setup_context=_setup_gather_rows
)


# ---------------------------------------------------------------- attention

# attention_forward's arguments, in schema order, split into saved tensors and plain values.
_ATTN_TENSORS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")
_ATTN_OPTIONAL_TENSORS = ("alibi_slopes", "cu_seqlens_q_padded", "cu_seqlens_k_padded", "rng_state")
_ATTN_DESCALES = ("q_descale", "k_descale", "v_descale")
_ATTN_SCHEMA = (
    "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
    "window_left", "window_right", "softcap", "alibi_slopes", "cu_seqlens_q_padded",
    "cu_seqlens_k_padded", "dropout_p", "rng_state", "deterministic", "q_descale", "k_descale",
    "v_descale", "backend", "sink", "block_table", "seqused_k", "num_splits",
)
_ATTN_PAGED = ("block_table", "seqused_k", "num_splits")


def _setup_attention(ctx, inputs, output):
    args = dict(zip(_ATTN_SCHEMA, inputs))
    out, lse = output
    ctx.save_for_backward(
        *(args[n] for n in _ATTN_TENSORS), out, lse, *(args[n] for n in _ATTN_OPTIONAL_TENSORS),
        args.get("sink"),
    )
    # The descales are not kept: FP8 attention has no backward (fp8 tensors may require grad,
    # so the backward below raises instead of handing fp8 q, k, v to attention_backward).
    ctx.fp8 = args["q"].dtype == FP8
    # Paged KV / seqused_k are forward-only (the backward below raises); num_splits only
    # changes how the forward is computed.
    ctx.paged = args.get("block_table") is not None or args.get("seqused_k") is not None
    ctx.values = {n: v for n, v in args.items()
                  if n not in _ATTN_TENSORS + _ATTN_OPTIONAL_TENSORS + _ATTN_DESCALES + ("sink",) + _ATTN_PAGED}
    ctx.values.setdefault("backend", None)  # the dispatcher drops trailing default arguments


def _backward_attention(ctx, grad_out, grad_lse):
    if ctx.fp8:
        raise RuntimeError(FP8_BACKWARD_ERROR)
    if ctx.paged:
        raise NotImplementedError(PAGED_BACKWARD_ERROR)
    q, k, v, cu_q, cu_k, out, lse, alibi, cu_q_pad, cu_k_pad, rng_state, sink = ctx.saved_tensors
    a = ctx.values
    # With a sink, lse includes it, and that is all the backward kernels need (see _C/ops.cpp).
    dq, dk, dv = _ops.attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, a["max_seqlen_q"], a["max_seqlen_k"],
        a["softmax_scale"], a["window_left"], a["window_right"], a["softcap"], alibi, cu_q_pad,
        cu_k_pad, a["dropout_p"], rng_state, a["deterministic"], grad_lse, a["backend"],
    )
    needs = tuple(ctx.needs_input_grad)
    sink_index = _ATTN_SCHEMA.index("sink")
    want_sink = len(needs) > sink_index and needs[sink_index]
    dsink = sink_grad(sink, out, lse, grad_out, grad_lse) if want_sink else None
    grads = [None] * len(_ATTN_SCHEMA)
    grads[:3] = dq, dk, dv
    grads[sink_index] = dsink
    return tuple(grads)


def sink_grad(sink, out, lse, grad_out, grad_lse=None):
    """The gradient of attention's sink logits (H,): ``dsink_h = sum_i exp(sink_h - lse_i) *
    (dlse_i - D_i)`` with ``D_i = rowsum(dO_i * O_i)`` (DESIGN.md "Sinks"), since
    d out_i / d sink_h = -p_sink * out_i and d lse_i / d sink_h = p_sink = exp(sink_h - lse_i).
    Rows with lse -inf (outside every sequence, or no key and a -inf sink) add 0. Plain torch
    ops: differentiable (double backward) and traceable (no host sync); one read of out and
    grad_out, the same as the kernels' delta pass."""
    acc = lse.dtype
    d = (grad_out.to(acc) * out.to(acc)).sum(-1).transpose(0, 1)  # (H, Nq)
    if grad_lse is not None:
        d = d - grad_lse.to(acc)
    # where before exp: the masked rows' exp(+inf) never exists, so no 0 * inf in any backward
    log_w = torch.where(lse == float("-inf"), float("-inf"), sink.to(acc)[:, None] - lse)
    return -(torch.exp(log_w) * d).sum(1).to(sink.dtype)


torch.library.register_autograd(
    "varlen::attention_forward", _backward_attention, setup_context=_setup_attention
)


# ---------------------------------------------------------------- attention double backward

# attention_backward's arguments, in schema order; the tensors it is differentiable in.
_ATTN_BWD_SCHEMA = (
    "grad_out", "q", "k", "v", "out", "softmax_lse", "cu_seqlens_q", "cu_seqlens_k",
    "max_seqlen_q", "max_seqlen_k", "softmax_scale", "window_left", "window_right", "softcap",
    "alibi_slopes", "cu_seqlens_q_padded", "cu_seqlens_k_padded", "dropout_p", "rng_state",
    "deterministic", "grad_lse", "backend",
)
_ATTN_BWD_DIFF = ("grad_out", "q", "k", "v", "out", "softmax_lse", "grad_lse")
_ATTN_BWD_TENSORS = _ATTN_BWD_DIFF + (
    "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "cu_seqlens_q_padded", "cu_seqlens_k_padded",
    "rng_state",
)
_ATTN_BWD_VALUES = ("softmax_scale", "window_left", "window_right", "softcap", "dropout_p")


def _setup_attention_backward(ctx, inputs, output):
    args = dict(zip(_ATTN_BWD_SCHEMA, inputs))
    ctx.save_for_backward(*(args[n] for n in _ATTN_BWD_TENSORS))
    ctx.values = {n: args[n] for n in _ATTN_BWD_VALUES}


def _backward_attention_backward(ctx, grad_dq, grad_dk, grad_dv):
    """grad_dq (Nq, H, D), grad_dk (Nk, Hk, D), grad_dv (Nk, Hk, Dv) -> the vjp of
    attention_backward w.r.t. grad_out, q, k, v, out, softmax_lse and grad_lse (None for the
    other arguments): autograd through attention_backward_dense, with a graph when this backward
    builds one (create_graph=True), so third and higher orders work too."""
    create_graph = torch.is_grad_enabled()
    tensors = dict(zip(_ATTN_BWD_TENSORS, ctx.saved_tensors))
    # the dispatcher drops trailing arguments equal to their defaults (grad_lse=None, say), and
    # needs_input_grad covers only the arguments passed
    needs = tuple(ctx.needs_input_grad) + (False,) * (len(_ATTN_BWD_SCHEMA) - len(ctx.needs_input_grad))
    needed = [n for n in _ATTN_BWD_DIFF if needs[_ATTN_BWD_SCHEMA.index(n)]]
    with torch.enable_grad():
        for n in needed:  # a fresh node per input, so aliased inputs get their own gradients
            t = tensors[n]
            tensors[n] = t.view_as(t) if create_graph else t.detach().requires_grad_()
        grads_dense = attention_backward_dense(**tensors, **ctx.values)
        pairs = [(o, g) for o, g in zip(grads_dense, (grad_dq, grad_dk, grad_dv)) if g is not None]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], [tensors[n] for n in needed], [g for _, g in pairs],
            create_graph=create_graph, allow_unused=True,
        )
    by_name = dict(zip(needed, grads))
    return tuple(by_name.get(n) for n in _ATTN_BWD_SCHEMA)


torch.library.register_autograd(
    "varlen::attention_backward", _backward_attention_backward,
    setup_context=_setup_attention_backward,
)
