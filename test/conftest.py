import os

import pytest
import torch

import torch_varlen  # noqa: F401  (registers torch.ops.varlen)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (GPU tests skip)"
    return [f"torch {torch.__version__}, GPU: {gpu}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")
