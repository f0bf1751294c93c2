"""Loads the compiled operator library, which registers torch.ops.varlen.* schemas and kernels."""

from pathlib import Path

import torch


def _library_path() -> Path:
    here = Path(__file__).parent
    found = sorted(here.glob("_kernels*.so")) + sorted(here.glob("_kernels*.pyd"))
    if not found:
        raise ImportError(
            f"torch_varlen's compiled library (_kernels*.so) is missing from {here}; "
            "build it with `pip install --no-build-isolation -e .`"
        )
    return found[0]


torch.ops.load_library(str(_library_path()))
