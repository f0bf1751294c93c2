"""Every tile class of the Triton attention kernels, on the GPU, against the float64 reference.

The kernels compile one variant per (BLOCK_D, BLOCK_DV) tile pair (head dims rounded up to a
power of two, at least 16) and, through Triton's specialisation, per head-dim divisibility (the
column masks of a head dim that is 8 mod 16, or odd, vectorise differently from a multiple of
16). A Triton 3.6 miscompile of P @ V hid in some of these variants (benchmarks/NOTES.md,
"Head-dim pairs"), so every tile pair runs here with head dims of each divisibility kind,
bf16 with GQA (causal, full and windowed in turn), and a slice of the pairs in fp16, fp32 and
float64. Outputs are NaN-poisoned; out, lse and dq/dk/dv follow the 2x rule.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import requires_cuda
from samples import make_attention_sample
from test_attention_triton import _check, _run_op, our_kernels, poison  # noqa: F401  (fixtures)

# One head dim per (tile, divisibility): multiples of 16, 8 mod 16, and odd dims.
MULT16 = [16, 32, 48, 96, 192]
MOD8 = [8, 24, 40, 72, 136]
ODD = [5, 33, 129, 255]
MASKS = ({"causal": True}, {}, {"window_size": (50, 7)})


def _pairs():
    dims = MULT16 + MOD8
    pairs = list(itertools.product(dims, dims))
    pairs += [(d, dv) for d in ODD for dv in (ODD[ODD.index(d) - 1], 64)]
    return pairs


def _run(headdim, headdim_v, dtype, index, atol=None):
    torch.manual_seed(headdim * 1000 + headdim_v)
    s = make_attention_sample([70, 0, 130, 1, 257], [70, 3, 130, 1, 250], 4, 2, headdim,
                              headdim_v, "cuda", dtype, name=f"d{headdim}_dv{headdim_v}_{dtype}",
                              **MASKS[index % len(MASKS)])
    _check(s, _run_op, atol=atol)


@requires_cuda
@pytest.mark.parametrize("headdim,headdim_v", _pairs())
def test_gpu_bf16_every_tile_pair(headdim, headdim_v, poison):
    _run(headdim, headdim_v, torch.bfloat16, _pairs().index((headdim, headdim_v)))


# fp16 shares bf16's tensor-core path: the 8-mod-16 dims (where the miscompile showed) against
# every tile. fp32 and float64 have tiles of their own: one pair per (tile, tile) on the diagonal
# and its neighbours.
_FP16 = list(itertools.product(MOD8, MOD8))
_CHAIN = MOD8 + [192]
_WIDE = [(_CHAIN[i], _CHAIN[j]) for i in range(len(_CHAIN)) for j in range(len(_CHAIN))
         if abs(i - j) <= 1]


@requires_cuda
@pytest.mark.parametrize("headdim,headdim_v", _FP16)
def test_gpu_fp16_tile_pairs(headdim, headdim_v, poison):
    _run(headdim, headdim_v, torch.float16, _FP16.index((headdim, headdim_v)))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("headdim,headdim_v", _WIDE)
def test_gpu_wide_dtypes_tile_pairs(headdim, headdim_v, dtype, poison):
    _run(headdim, headdim_v, dtype, _WIDE.index((headdim, headdim_v)),
         atol=1e-10 if dtype == torch.float64 else None)
