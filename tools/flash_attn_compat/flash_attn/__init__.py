"""A stand-in ``flash_attn`` package backed by torch_varlen, for running flash-attn's own tests.

Put ``tools/flash_attn_compat`` first on ``PYTHONPATH`` and ``import flash_attn`` gives
torch_varlen's functions under flash-attn 2's names (``tools/run_flash_attn_tests.py`` does
this). Only the names flash-attn's ``tests/test_flash_attn.py`` imports exist. Where a name's
behaviour differs from flash-attn's, its module docstring says so (see ``flash_attn_interface``:
``return_attn_probs`` and ``_get_block_size_n``).
"""

from .flash_attn_interface import (  # noqa: F401
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__version__ = "2.8.3+torch_varlen"
