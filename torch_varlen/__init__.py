"""torch_varlen: variable-length (packed) sequence operators for PyTorch.

Importing registers torch.ops.varlen.* (schemas and C++/CUDA kernels from _C), then the fakes
(meta), the autograd formulas, and the Triton CUDA kernels when Triton and a GPU are present.
"""

from . import _C  # noqa: F401  (loads the operator library)
from . import meta  # noqa: F401
from . import autograd  # noqa: F401
from . import kernels  # noqa: F401
from .ops import (  # noqa: F401
    attention_backend,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
    varlen_attention,
)

__version__ = "0.1.0"
