"""CUDA kernels of torch.ops.varlen.attention_forward / attention_backward.

Each call runs FlashAttention-4 (fa4.py, when importable and able to run the call; see
``fa4.select`` for how the op's ``backend`` argument chooses), or our kernels: the forward on
the warp-specialized Hopper kernel (hopper.py, Gluon, compute capability 9.x; ``hopper.select``:
backend="hopper", or opt-in by TORCH_VARLEN_HOPPER=1 for the automatic choice) where it runs the
call, else on our Triton launchers (attention.py, DESIGN.md rule 4), and the backward on the
Triton launchers. Triton, Gluon and FA4 are imported on the first CUDA call that needs them, so
importing torch_varlen stays cheap and works on machines without Triton, FA4 or a GPU; without
Triton a call that needs it raises a clear error.
"""

import importlib.util
import os

import torch

from . import fa4
from . import kvcache  # noqa: F401  (registers varlen::kvcache_append on CPU and CUDA)

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _attention():
    if not HAVE_TRITON:
        raise RuntimeError("torch_varlen's CUDA attention kernels need Triton: pip install triton")
    from . import attention

    return attention


def _hopper():
    _attention()
    from . import hopper

    return hopper


def _attention_forward_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
                            alibi_slopes=None, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None,
                            dropout_p=0.0, rng_state=None, deterministic=False, q_descale=None,
                            k_descale=None, v_descale=None, backend=None, sink=None,
                            block_table=None, seqused_k=None, num_splits=0):
    paged = block_table is not None or seqused_k is not None
    if paged:
        # paged KV / seqused_k run on our Triton kernels only
        if backend == "fa4":
            raise RuntimeError("backend='fa4' cannot run this call: paged KV (block_table) and seqused_k "
                               "are not routed to FlashAttention-4 (use backend='torch_varlen' or 'auto')")
    elif fa4.select(backend, q, k, v, alibi_slopes=alibi_slopes,
                  cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_k_padded=cu_seqlens_k_padded,
                  dropout_p=dropout_p, q_descale=q_descale, k_descale=k_descale,
                  v_descale=v_descale):
        return fa4.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left,
                           window_right, softcap, sink)
    # hopper.py (Gluon) is imported only when the call may run on it: backend="hopper", or the
    # TORCH_VARLEN_HOPPER=1 opt-in of the automatic choice (hopper.enabled()).
    if backend == "hopper" or os.environ.get("TORCH_VARLEN_HOPPER") == "1":
        hopper = _hopper()
        if hopper.select(backend, q, k, v, batch=cu_seqlens_q.shape[0] - 1,
                         softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                         dropout_p=dropout_p, q_descale=q_descale, k_descale=k_descale,
                         v_descale=v_descale, paged=paged, num_splits=num_splits):
            return hopper.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                  window_left, window_right, softcap, cu_seqlens_q_padded,
                                  cu_seqlens_k_padded, sink)
    return _attention().attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        window_left, window_right, softcap, alibi_slopes, cu_seqlens_q_padded, cu_seqlens_k_padded,
        dropout_p, rng_state, deterministic, q_descale, k_descale, v_descale, backend, sink,
        block_table, seqused_k, num_splits)


def _attention_backward_cuda(grad_out, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, softmax_scale, window_left=-1,
                             window_right=-1, softcap=0.0, alibi_slopes=None,
                             cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, dropout_p=0.0,
                             rng_state=None, deterministic=False, grad_lse=None, backend=None):
    # The same choice as the forward's: same backend string, same shapes, dtypes and flags (a
    # forward on the Hopper kernel has its backward here, on Triton).
    if fa4.select(backend, q, k, v, alibi_slopes=alibi_slopes,
                  cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_k_padded=cu_seqlens_k_padded,
                  dropout_p=dropout_p):
        return fa4.backward(grad_out, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                            softmax_scale, window_left, window_right, softcap, deterministic,
                            grad_lse)
    return _attention().attention_backward(
        grad_out, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, softmax_scale, window_left, window_right, softcap, alibi_slopes,
        cu_seqlens_q_padded, cu_seqlens_k_padded, dropout_p, rng_state, deterministic, grad_lse,
        backend)


torch.library.register_kernel("varlen::attention_forward", "cuda", _attention_forward_cuda)
torch.library.register_kernel("varlen::attention_backward", "cuda", _attention_backward_cuda)
