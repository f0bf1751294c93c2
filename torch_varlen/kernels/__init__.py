"""Triton kernels for CUDA tensors, registered as the CUDA kernels of torch.ops.varlen.*."""
