"""Hugging Face transformers integration: varlen attention, and whole-model unpadding for BERT.

Importing this module registers ``attn_implementation="varlen"``::

    import torch_varlen.integrations.transformers  # noqa: F401  (registers "varlen")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="varlen")

Any model that dispatches attention through transformers' ``AttentionInterface`` (BERT, Llama,
Qwen2, Mistral, ...) then runs ``torch.ops.varlen.attention_forward``:

- with a padding mask, attention unpads q/k/v, runs varlen attention and pads the output back
  (a matching ``AttentionMaskInterface`` entry hands it the 2-D mask instead of a 4-D bias);
- with packed inputs, attention runs varlen attention on the flattened batch directly: the
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs of ``DataCollatorWithFlattening``, or
  ``position_ids`` that restart (a sequence starts wherever the position is not the previous
  one plus one, the rule transformers uses to detect packing).

Neither path reads a tensor on the host, so a model compiled with
``torch.compile(fullgraph=True)`` has no graph break and no ``.item()`` in attention.

``apply_unpadding(model)`` goes further for BERT-family encoders (``BertModel``, ``RobertaModel``,
``XLMRobertaModel`` and the task models built on them): it unpads once after the embeddings,
runs every layer on the packed tokens (q/k/v projections, attention, output projection,
LayerNorms and feed-forward see only real tokens) and pads once at the end. It replaces the
encoder's ``forward`` on that instance only, uses the layer's own modules and weights, and
``remove_unpadding(model)`` puts the original back::

    from torch_varlen.integrations.transformers import apply_unpadding, remove_unpadding
    apply_unpadding(model)   # same outputs at real tokens; padded positions come back as 0
    remove_unpadding(model)

``PackedEncoder(model)`` (``torch_varlen.integrations.packed_encoder``, also importable from
here) computes mean-pooled sentence embeddings from the same packed layers, in fixed-shape
token-budget steps that compile and capture as CUDA graphs.

Not supported (a clear error, never a silent fallback): attention weights
(``output_attentions``), custom mask functions
(``or_mask_function`` / ``and_mask_function``) and 4-D masks; the unpadded encoder also
refuses decoders, cross-attention, caches and ``head_mask``.

Generation: ``generate()`` works with the dynamic cache and with static caches
(``cache_implementation="static"``, also under transformers' compiled decode): the mask is padded
to the cache capacity and keys are unpadded with a static capacity, so decode steps keep their
shapes and compile once. Left padding only. Tested with transformers 5.17 and 5.24.
"""

from __future__ import annotations

import types

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from .. import ops

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PackedEncoder",
    "apply_unpadding",
    "cu_seqlens_from_position_ids",
    "remove_unpadding",
    "varlen_attention_forward",
    "varlen_attention_mask",
]

ATTN_IMPLEMENTATION = "varlen"


# ---------------------------------------------------------------- attn_implementation="varlen"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence boundaries of a packed (B, S) batch from its positions, on the device.

    A sequence starts at the start of every row and wherever the position is not the previous
    one plus one (so at every 0 after the first token). Returns int32 ``cu_seqlens`` with a
    static B*S+1 entries: one per sequence found, then the total repeated (empty sequences),
    so the shape never depends on the data and nothing is read on the host.

    Example: positions ``[[0, 1, 2, 0, 1]]`` -> ``[0, 3, 5, 5, 5, 5]``.
    """
    batch, seqlen = position_ids.shape
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts = torch.cat([torch.ones_like(restarts[:, :1]), restarts], dim=1).flatten()
    seq_id = starts.cumsum(0) - 1
    ones = torch.ones_like(seq_id, dtype=torch.int32)
    lengths = torch.zeros_like(ones).scatter_add_(0, seq_id, ones)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _length_hint(value, default: int) -> int:
    # max_seqlen is only a sizing hint to our ops: take the caller's int, never read a tensor.
    return value if isinstance(value, int) else default


def _packed_boundaries(batch, q_len, k_len, device, kwargs):
    """cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k of an unpadded (B, S) batch."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        return (
            cu_q.to(device=device, dtype=torch.int32),
            cu_k.to(device=device, dtype=torch.int32),
            _length_hint(kwargs.get("max_length_q"), batch * q_len),
            _length_hint(kwargs.get("max_length_k"), batch * k_len),
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and q_len == k_len:
        cu = cu_seqlens_from_position_ids(position_ids.to(device).expand(batch, -1))
        return cu, cu, q_len, k_len
    rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return rows * q_len, rows * k_len, q_len, k_len


def _attend_padded(q, k, v, attention_mask, options):
    """(B, S, H, D) q/k/v with a (B, Sk) key mask -> (B, Sq, H, Dv), padded rows zero.

    Sq == Sk: query i is key slot i (no cache, or a first forward with a dynamic cache).
    Sq < Sk (decoding with a cache): the queries are the Sq slots that end at the last slot
    valid in any row, L. With a dynamic cache L = Sk; with a static cache the mask is padded
    to the cache capacity (``varlen_attention_mask``) and L is the number of slots written so
    far. Keys and queries are unpadded with a static capacity (B*Sk and B*Sq rows), so every
    shape depends only on input shapes: no host read, no recompilation as L grows.
    """
    batch, q_len = q.shape[:2]
    k_len = k.shape[1]
    if attention_mask.shape != (batch, k_len):
        raise ValueError(
            f"varlen attention: the padding mask must be (batch, kv_length) = {(batch, k_len)}, got "
            f"{tuple(attention_mask.shape)}"
        )
    if q_len == k_len:
        k_unpad, indices_k, cu_k, max_k, _ = ops.unpad_input(k, attention_mask)
        v_unpad = torch.ops.varlen.gather_rows(v, indices_k)
        q_unpad = torch.ops.varlen.gather_rows(q, indices_k)
        out, _ = ops.varlen_attention(q_unpad, k_unpad, v_unpad, cu_k, cu_k, max_k, max_k, **options)
        return ops.pad_input(out, indices_k, batch, q_len)
    if q_len > k_len:
        raise ValueError(f"varlen attention: {q_len} queries but only {k_len} keys")
    mask = attention_mask.bool()
    slots = torch.arange(k_len, device=mask.device)
    end = torch.where(mask, slots + 1, 0).amax()  # L: one past the last slot valid in any row
    q_mask = mask.index_select(1, (end - q_len + slots[:q_len]).clamp(min=0))
    k_unpad, indices_k, cu_k, _, _ = ops.unpad_input(k, mask, capacity=batch * k_len)
    v_unpad = torch.ops.varlen.gather_rows(v, indices_k)
    q_unpad, indices_q, cu_q, _, _ = ops.unpad_input(q, q_mask, capacity=batch * q_len)
    # Bottom-right causal alignment on the unpadded rows: a sequence's valid queries are its
    # last valid keys, so each query sees exactly the valid keys up to its own slot.
    out, _ = ops.varlen_attention(q_unpad, k_unpad, v_unpad, cu_q, cu_k, q_len, k_len, **options)
    return ops.pad_input(out, indices_q, batch, q_len)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers attention function: query (B, H, Sq, D), key/value (B, Hk, Sk, D|Dv).

    Returns ``(attn_output (B, Sq, H, Dv), None)``. ``attention_mask`` is the 2-D (B, Sk)
    padding mask that ``varlen_attention_mask`` passes through, or None. With a cache (dynamic,
    static or sliding-window) the keys outnumber the queries; a static cache's unwritten slots
    are False in the mask, and the queries are the newest slots (see ``_attend_padded``), so
    ``generate()`` works with every cache and compiles its static-cache decode step with
    fullgraph=True and no recompilation. Causality comes from
    ``is_causal`` or ``module.is_causal``; ``sliding_window`` w lets a query see the w keys
    up to and including itself, as in transformers' masks. ``s_aux`` (H,) (gpt-oss's learnable
    sinks) becomes ``sink`` (cast to float32, differentiably).
    """
    if kwargs.get("output_attentions"):
        raise ValueError("varlen attention never forms the attention weights: output_attentions=True "
                         "needs attn_implementation='eager'")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"varlen attention takes a 2-D (batch, kv_length) padding mask, got shape {tuple(attention_mask.shape)}: "
            "4-D masks and custom mask patterns are not supported"
        )
    batch, heads, q_len, _ = query.shape
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    options = dict(softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0,
                   dropout_p=dropout)
    if kwargs.get("s_aux") is not None:  # gpt-oss's per-head sink logits, in the lse's dtype
        options["sink"] = kwargs["s_aux"].to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    if attention_mask is not None:
        return _attend_padded(q, k, v, attention_mask, options), None
    cu_q, cu_k, max_q, max_k = _packed_boundaries(batch, q_len, k.shape[1], q.device, kwargs)
    out, _ = ops.varlen_attention(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                  v.reshape(-1, *v.shape[2:]), cu_q, cu_k, max_q, max_k, **options)
    return out.view(batch, q_len, heads, out.shape[-1]), None


def varlen_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, use_vmap=False, **kwargs):
    """transformers mask function: keeps the 2-D padding mask (or None) for varlen attention.

    The mask is passed through as is (no "is it all ones?" check, which would read the device),
    cut to its last ``kv_length`` columns (a sliding-window cache holds the last keys). A mask
    shorter than ``kv_length`` (a static cache, whose kv_length is its capacity) is padded with
    False, as transformers' own masks are, so the result is always (batch, kv_length): the same
    shape at every decode step. Both steps are idempotent, as they must be: with a static cache,
    ``generate`` builds the mask once and the model passes the result through this function again.
    Causality, sliding windows and packing are applied inside attention, so a custom mask
    pattern (``or_mask_function`` / ``and_mask_function``, signalled by ``use_vmap``) is refused.
    """
    if use_vmap:
        raise NotImplementedError("varlen attention does not support custom mask functions "
                                  "(or_mask_function / and_mask_function)")
    if attention_mask is None:
        if mask_function is not bidirectional_mask_function and (
                isinstance(q_offset, torch.Tensor) or q_offset + q_length < kv_offset + kv_length):
            # a static cache without a padding mask: the slots written so far are the valid keys
            slots = torch.arange(kv_length, device=kwargs.get("device", "cpu")) + kv_offset
            return (slots < q_offset + q_length).expand(batch_size, kv_length)
        return None
    attention_mask = attention_mask[:, -kv_length:]  # a sliding-window cache keeps the last keys
    if attention_mask.shape[-1] < kv_length:  # a static cache: its unwritten slots are not keys
        attention_mask = torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]))
    if 1 < q_length < kv_length and not torch.compiler.is_compiling():
        # Attention finds the queries' slots from the last key valid in any row (see
        # _attend_padded). Checked on the host only in eager prefills (never in a decode step).
        newest = attention_mask[:, q_offset + q_length - 1 - kv_offset]
        if not bool(newest.any()):
            raise ValueError(
                "varlen attention with a cache: the newest token is padding in every row of the batch, "
                "so the queries' positions cannot be told from the mask; pad on the left "
                "(tokenizer.padding_side = 'left') or drop the padding that ends every row")
    return attention_mask


AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, varlen_attention_mask)


# ---------------------------------------------------------------- whole-model unpadding (BERT family)


def _encoder_classes():
    import transformers

    names = ("BertModel", "RobertaModel", "XLMRobertaModel")
    return tuple(getattr(transformers, n) for n in names if hasattr(transformers, n))


def _check_config(config):
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise NotImplementedError("apply_unpadding supports encoders only: this model is a decoder "
                                  "or has cross-attention")
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise NotImplementedError(f"apply_unpadding supports absolute position embeddings only, got "
                                  f"position_embedding_type={config.position_embedding_type!r}")


# Arguments of BertModel.forward the unpadded encoder cannot honour: name -> why.
_UNSUPPORTED = {
    "encoder_hidden_states": "cross-attention",
    "encoder_attention_mask": "cross-attention",
    "past_key_values": "a cache",
    "cache": "a cache",
    "use_cache": "a cache",
    "head_mask": "head_mask",
    "output_attentions": "attention weights (output_attentions)",
}


def _packed_layer(layer, hidden, cu_seqlens, max_seqlen):
    """One BertLayer on packed (N, hidden) rows, through the layer's own modules."""
    attention = layer.attention
    self_attn = attention.self
    heads, head_dim = self_attn.num_attention_heads, self_attn.attention_head_size
    q, k, v = (proj(hidden).view(-1, heads, head_dim)
               for proj in (self_attn.query, self_attn.key, self_attn.value))
    out, _ = ops.varlen_attention(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        softmax_scale=getattr(self_attn, "scaling", head_dim ** -0.5),
        dropout_p=self_attn.dropout.p if self_attn.training else 0.0,
    )
    attention_output = attention.output(out.reshape(-1, heads * head_dim), hidden)
    return layer.output(layer.intermediate(attention_output), attention_output)


def _unpadded_encoder_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                              inputs_embeds=None, output_hidden_states=None, return_dict=None, **kwargs):
    """BertModel.forward on packed tokens: embeddings, unpad, every layer, pad, pooler."""
    for name, value in kwargs.items():
        if name in _UNSUPPORTED and value is not None and value is not False:
            raise NotImplementedError(f"apply_unpadding: the unpadded encoder does not support "
                                      f"{_UNSUPPORTED[name]} (got {name}=...); call remove_unpadding(model) first")
        if name not in _UNSUPPORTED:
            raise TypeError(f"apply_unpadding: unexpected argument {name!r} to the unpadded encoder")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if output_hidden_states is None:
        output_hidden_states = getattr(self.config, "output_hidden_states", False)
    if not isinstance(output_hidden_states, bool):
        raise NotImplementedError("apply_unpadding: output_hidden_states must be True or False")

    embeddings = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                 position_ids=position_ids, inputs_embeds=inputs_embeds)
    batch, seqlen, width = embeddings.shape
    if attention_mask is None:  # every token is real: the rows are already packed
        hidden, indices = embeddings.reshape(batch * seqlen, width), None
        cu_seqlens = torch.arange(batch + 1, device=hidden.device, dtype=torch.int32) * seqlen
        max_seqlen = seqlen
    else:
        if attention_mask.shape != (batch, seqlen):
            raise ValueError(f"apply_unpadding: attention_mask must be (batch, seqlen) = {(batch, seqlen)}, "
                             f"got {tuple(attention_mask.shape)}")
        hidden, indices, cu_seqlens, max_seqlen, _ = ops.unpad_input(embeddings, attention_mask)

    def padded(rows):
        if indices is None:
            return rows.view(batch, seqlen, width)
        return ops.pad_input(rows, indices, batch, seqlen)

    all_hidden = [padded(hidden)] if output_hidden_states else None
    for layer in self.encoder.layer:
        if getattr(layer, "gradient_checkpointing", False) and self.training:
            hidden = torch.utils.checkpoint.checkpoint(_packed_layer, layer, hidden, cu_seqlens, max_seqlen,
                                                       use_reentrant=False)
        else:
            hidden = _packed_layer(layer, hidden, cu_seqlens, max_seqlen)
        if all_hidden is not None:
            all_hidden.append(padded(hidden))
    sequence_output = padded(hidden)
    pooler = getattr(self, "pooler", None)
    output = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=sequence_output,
        pooler_output=pooler(sequence_output) if pooler is not None else None,
        hidden_states=tuple(all_hidden) if all_hidden is not None else None,
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return output if return_dict else output.to_tuple()


def apply_unpadding(model: torch.nn.Module) -> torch.nn.Module:
    """Run every BERT-family encoder inside ``model`` on packed tokens; returns ``model``.

    Patches the instances (not the classes) of ``BertModel``, ``RobertaModel`` and
    ``XLMRobertaModel`` found in ``model`` (the model itself, or e.g. ``model.bert`` of a
    ``BertForSequenceClassification``). Idempotent. Outputs at real tokens equal the unpatched
    model's; padded positions of ``last_hidden_state`` and ``hidden_states`` are 0.
    """
    encoders = [m for m in model.modules() if isinstance(m, _encoder_classes())]
    if not encoders:
        raise ValueError(f"apply_unpadding: no BERT-family encoder (BertModel, RobertaModel, XLMRobertaModel) "
                         f"found in {type(model).__name__}")
    for encoder in encoders:
        _check_config(encoder.config)
    for encoder in encoders:
        if "_varlen_saved_forward" not in encoder.__dict__:
            encoder._varlen_saved_forward = encoder.__dict__.get("forward")
            encoder.forward = types.MethodType(_unpadded_encoder_forward, encoder)
    return model


def remove_unpadding(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply_unpadding``: every patched encoder gets its original ``forward`` back."""
    for module in model.modules():
        if "_varlen_saved_forward" in module.__dict__:
            saved = module.__dict__.pop("_varlen_saved_forward")
            if saved is None:
                del module.forward
            else:
                module.forward = saved
    return model


def __getattr__(name):
    # PackedEncoder lives in packed_encoder.py, which imports this module's helpers: imported
    # on first use, so that either module can be imported first.
    if name == "PackedEncoder":
        from .packed_encoder import PackedEncoder

        return PackedEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
