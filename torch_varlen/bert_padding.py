"""flash-attn / AITER compatible padding API: ``from torch_varlen.bert_padding import ...``."""

from .ops import (
    index_first_axis,
    index_first_axis_residual,
    index_put_first_axis,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)

__all__ = ["unpad_input", "pad_input", "unpad_input_for_concatenated_sequences",
           "index_first_axis", "index_put_first_axis", "index_first_axis_residual"]
