"""Triton kernels for CUDA tensors, registered as the CUDA kernels of torch.ops.varlen.*.

The attention launchers (attention.py) serve varlen::attention_forward / attention_backward on
CUDA (DESIGN.md rule 4). Triton is imported on the first CUDA call, so importing torch_varlen
stays cheap and works on machines without Triton or a GPU; without Triton a CUDA call raises
a clear error.
"""

import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _attention():
    if not HAVE_TRITON:
        raise RuntimeError("torch_varlen's CUDA attention kernels need Triton: pip install triton")
    from . import attention

    return attention


def _attention_forward_cuda(*args, **kwargs):
    return _attention().attention_forward(*args, **kwargs)


def _attention_backward_cuda(*args, **kwargs):
    return _attention().attention_backward(*args, **kwargs)


torch.library.register_kernel("varlen::attention_forward", "cuda", _attention_forward_cuda)
torch.library.register_kernel("varlen::attention_backward", "cuda", _attention_backward_cuda)
