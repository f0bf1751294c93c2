"""``flash_attn.bert_padding``: torch_varlen.bert_padding's names, unchanged.

unpad_input returns flash-attn 2.7's five values ``(hidden, indices, cu_seqlens, max_seqlen,
seqused)``, as flash-attn's tests unpack them.
"""

from torch_varlen.bert_padding import *  # noqa: F401,F403
from torch_varlen.bert_padding import __all__  # noqa: F401
