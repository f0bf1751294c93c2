"""Property-based fuzzing (hypothesis, seeded) of varlen attention and the padding ops.

Properties, on random packed batches (lengths 0, 1, at the tile edges 15/16/17 ... 127/128/129
and a few long ones), GQA, head-dim pairs from 5 to 256, every dtype, and causal / window /
softcap / ALiBi / dropout / learnable sinks / padded cu_seqlens / rows after the last sequence /
a gradient of softmax_lse in random combinations (sinks: not in the FP8 and interpreter slices;
the sink logits are inputs here, their gradient is test_sinks.py's):

- attention forward and backward against reference.attention in float64 with DESIGN.md's rule
  err(kernel) <= 2 * err(reference in the same dtype) + atol (test_attention_triton._check,
  with NaN-poisoned outputs and lse -inf exactly where the reference has it), with two changes
  that the fuzzer's draws forced on correct kernels (see "Rounded out in the backward" and
  _scaled_atol): the backward's grad_lse shifted by what D = rowsum(dO * out) loses to out's
  rounding, and atol scaled by the largest reference value; examples drawn without a gradient
  on lse also check the backward of a loss through out alone; float64 to 1e-10
  (test_attention_triton._check_float64); FP8 (float8_e4m3fn forward, per-tensor / per-(batch,
  kv head) descales) within test_fp8_attention's bound;
- the padding ops bit-exact against reference.py on random masks (empty, full, right-padded and
  scattered rows, integer masks with values > 1, an unused_mask), forward and gradients:
  unpad_input (eager and capacity=), pad_input, gather_rows, unpad_input_for_concatenated_sequences.

Where each slice runs (example counts at TORCH_VARLEN_FUZZ_SCALE=1, the default):

- ``test_gpu_*``: CUDA (our Triton attention kernels, the CUDA padding kernels). Every attention
  test item is one *kernel key* of GPU_KEYS (dtype, head dims, heads, mask kind, softcap /
  ALiBi / dropout / padded layout / FP8 descales): those choose the Triton specialisations, so
  the keys bound the compile count (114 kernel variants); hypothesis draws everything else
  (lengths, batch, window sizes, softcap and dropout values, pads, tail rows, scale, lse
  gradient, seeds). 46 keys x 6 attention examples, 2 x 50 padding examples.
- ``test_cpu_*``: the CPU C++ kernels, small sizes, every choice drawn freely (CI): 30
  attention examples (all five dtypes), 60 padding examples.
- ``test_interp_fuzz_*``: the Triton launchers on the CPU under TRITON_INTERPRET=1, tiny sizes,
  float16 / float32 / FP8 (bfloat16 is unreliable there: numpy has no bfloat16), in the child
  pytest of test_fuzz_triton_interpreter_subprocess (CI), with test_attention_triton's
  out-of-bounds check of every masked load and store: 15 examples.
- ``test_gpu_compute_sanitizer_*``: fixed examples of GPU keys replayed under compute-sanitizer
  (memcheck: every kernel family, padding included; racecheck: forward and backward).

Every example is an AttnExample / PadExample whose ``source()`` is the Python code that builds
its inputs: the tests run that code, and a failure's message carries ``reproducer()``, the same
code plus the op and reference calls, as a standalone script (a CPU test compiles and runs it).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st
try:
    from hypothesis.control import currently_in_test_context
except ImportError:  # an older hypothesis: no note() then
    def currently_in_test_context():
        return False

import torch_varlen
from torch_varlen import reference
from conftest import requires_cuda
from interp_child import run_interpreter_tests
from test_attention_triton import (  # noqa: F401  (interpreter_bounds_check: autouse under TRITON_INTERPRET=1)
    INTERPRET, _check, _err, _finite, _launch_args, _reference, _run_launchers, _run_op,
    interpreter_bounds_check, triton_attention)
from test_fp8_attention import Fp8Sample, assert_within_fp8_bound
from test_padding import assert_same


def _fix_interpreter_bfloat16_casts():
    """Triton 3.6's interpreter casts float32 / float16 to bfloat16 by truncating the mantissa;
    the GPU rounds to nearest even. The FP8 forward's bfloat16 out then carries twice the
    rounding error under the interpreter (mean error 0.0154 against 2 x 0.0055 allowed on a
    peaked softmax, lengths 17/17, head dim 5). Cast the way the GPU does, with torch (as
    test_attention_triton's float8 fix does; the interpreter keeps floats as their bits)."""
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    if getattr(convert, "_varlen_bf16_fixed", False):
        return
    types = {tl.float16: (torch.float16, torch.int16), tl.float32: (torch.float32, torch.int32)}

    def patched(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.bfloat16 and input_dtype in types:
            src, src_bits = types[input_dtype]
            bits = torch.from_numpy(input.reshape(-1).copy()).view(src_bits)
            out = bits.view(src).to(torch.bfloat16).view(torch.int16).numpy()
            return out.view("uint16").reshape(input.shape)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    patched._varlen_bf16_fixed = True
    interpreter._convert_float = patched


if INTERPRET:
    _fix_interpreter_bfloat16_casts()

REPO = Path(__file__).resolve().parent.parent
FP8 = "float8_e4m3fn"
# Lengths at tile edges (the GPU's 16 to 128-row tiles, the interpreter's 16 and 32), 17 first:
# it is the simplest example's length (hypothesis starts with, and shrinks towards, the first).
EDGES = (17, 0, 1, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129)

interp_only = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child of test_fuzz_triton_interpreter_subprocess")


def _float64_supported() -> bool:
    """Whether the Triton launchers take float64 (the float64 CUDA path)."""
    q = torch.zeros(1, 1, 8, dtype=torch.float64)
    try:
        triton_attention._check_supported(q, q)
    except TypeError:
        return False
    return True


FLOAT64_SKIP = "the Triton attention launchers reject float64 (_check_supported): no float64 CUDA path"


# ---------------------------------------------------------------- examples and their source code


@dataclasses.dataclass(frozen=True)
class AttnExample:
    """One attention case. ``source()`` builds its inputs; ``reproducer()`` is a standalone script."""

    device: str
    dtype: str  # torch dtype name
    lengths_q: tuple
    lengths_k: tuple
    nheads_k: int
    group: int  # nheads = nheads_k * group
    headdim: int
    headdim_v: int
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None  # None, "head" (H,) or "batch" (B, H)
    dropout_p: float = 0.0
    rng: tuple = (0, 0)  # dropout rng_state [seed, offset]
    pads_q: Optional[tuple] = None  # trailing padding rows per sequence -> cu_seqlens_q_padded
    pads_k: Optional[tuple] = None
    tail_q: int = 0  # rows after the last sequence
    tail_k: int = 0
    softmax_scale: Optional[float] = None
    lse_grad: bool = True  # False: also check the backward of a loss through out alone
    descales: tuple = (None, None, None)  # FP8 q/k/v descale: None, "tensor" (1,), "head" (B, Hk)
    fp8_pv: Optional[bool] = None  # FP8 on Triton: force P @ V in FP8 (True) / float16 (False)
    launchers: bool = False  # call the Triton launchers directly (the interpreter slice)
    sink: bool = False  # learnable sink logits (head 0's -inf when there are two heads or more)
    seed: int = 0  # torch.manual_seed before the inputs are drawn
    backend: str = "torch_varlen"  # the op's backend ("hopper": HOPPER_KEYS' examples)

    @property
    def nheads(self):
        return self.nheads_k * self.group

    @property
    def fp8(self):
        return self.dtype == FP8

    def source(self) -> str:
        """Python code that builds the inputs (on the CPU for FP8, whose reference runs there)."""
        where = "'cpu'" if self.fp8 else "device"
        make = ("q, k, v = ((t * 8).to(dtype) for t in (q, k, v))  # fp8 of 8 * N(0, 1), on the CPU"
                if self.fp8 else "q, k, v = (t.to(dtype).to(device) for t in (q, k, v))")
        lines = [
            "import torch",
            f"device, dtype = {self.device!r}, torch.{self.dtype}",
            f"torch.manual_seed({self.seed})",
            f"lengths_q, lengths_k = {list(self.lengths_q)!r}, {list(self.lengths_k)!r}",
            f"pads_q, pads_k = {_list(self.pads_q)}, {_list(self.pads_k)}  # trailing padding rows per sequence",
            f"tail_q, tail_k = {self.tail_q}, {self.tail_k}  # rows after the last sequence",
            f"nheads, nheads_k, headdim, headdim_v = {self.nheads}, {self.nheads_k}, {self.headdim}, {self.headdim_v}",
            "",
            "def cu_seqlens(lengths):",
            f"    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32).to({where})",
            "",
            "def rows(lengths, pads, tail):",
            "    return sum(lengths) + sum(pads or []) + tail",
            "",
            "q = torch.randn(rows(lengths_q, pads_q, tail_q), nheads, headdim, dtype=torch.float64)",
            "k = torch.randn(rows(lengths_k, pads_k, tail_k), nheads_k, headdim, dtype=torch.float64)",
            "v = torch.randn(rows(lengths_k, pads_k, tail_k), nheads_k, headdim_v, dtype=torch.float64)",
            make,
            "cu_seqlens_q, cu_seqlens_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)",
            "max_seqlen_q, max_seqlen_k = max(lengths_q, default=0), max(lengths_k, default=0)",
            f"kwargs = dict(causal={self.causal}, window_size={tuple(self.window)!r}, softcap={float(self.softcap)!r}, "
            f"softmax_scale={self.softmax_scale!r})",
        ]
        if self.alibi == "head":
            lines.append(f"kwargs['alibi_slopes'] = (torch.rand(nheads) * 0.5 + 0.05).to({where})")
        elif self.alibi == "batch":
            lines.append(f"kwargs['alibi_slopes'] = (torch.rand(len(lengths_q), nheads) * 0.5 + 0.05).to({where})")
        if self.sink:
            lines += ["kwargs['sink'] = (torch.randn(nheads, dtype=torch.float64) * 1.5).to(",
                      "    torch.float64 if dtype == torch.float64 else torch.float32).to(device)",
                      "if nheads > 1:",
                      "    kwargs['sink'][0] = -float('inf')  # a head without a sink"]
        if self.pads_q is not None:
            lines.append("kwargs['cu_seqlens_q_padded'] = cu_seqlens([n + p for n, p in zip(lengths_q, pads_q)])")
        if self.pads_k is not None:
            lines.append("kwargs['cu_seqlens_k_padded'] = cu_seqlens([n + p for n, p in zip(lengths_k, pads_k)])")
        if self.dropout_p > 0:
            lines.append(f"dropout = dict(dropout_p={self.dropout_p!r}, "
                         f"rng_state=torch.tensor({list(self.rng)!r}, dtype=torch.int64, device={where}))")
        else:
            lines.append("dropout = {}")
        if self.fp8:
            shapes = {None: None, "tensor": "(1,)", "head": "(len(lengths_q), nheads_k)"}
            items = ", ".join(f"{n}_descale=" + ("None" if kind is None else f"torch.rand{shapes[kind]} * 0.1 + 0.08")
                              for n, kind in zip("qkv", self.descales))
            lines.append(f"descales = dict({items})  # float32, on the CPU")
        return "\n".join(lines) + "\n"

    def reproducer(self) -> str:
        """A standalone script: the inputs, the op (or the launchers) and the reference, with the
        test's check. Run it from the repository root (FP8 and interpreter cases import test/)."""
        head = [f"# torch_varlen fuzz reproducer (test/test_fuzz.py): {self.describe()}"]
        if self.launchers:
            head += ["import os",
                     "os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported"]
        if self.launchers or self.fp8:
            head += ["import sys",
                     "sys.path.insert(0, 'test')  # run from the repository root"]
        if self.launchers:
            head.append("import test_fuzz  # noqa: F401  (the interpreter patches the test applies)")
        check = _FP8_CHECK if self.fp8 else _ATTN_CHECK
        poison = ("import os\nos.environ['TORCH_VARLEN_POISON_OUTPUTS'] = '1'  # the CPU kernels NaN-fill outputs\n"
                  if self.device == "cpu" and not self.launchers else
                  "triton_attention._poison_outputs = True  # NaN-fill outputs, as the test does\n")
        run = _RUN_LAUNCHERS if self.launchers else _RUN_OP.replace("'torch_varlen'", repr(self.backend))
        body = check.format(poison=poison, run=run, out_only="" if self.lse_grad else _OUT_ONLY_CHECK,
                            fp8_pv=self.fp8_pv,
                            launcher=self.launchers or self.fp8_pv is not None,
                            fp8_p=self.device != "cpu" or self.launchers)
        return "\n".join(head) + "\n" + self.source() + "\n" + body

    def describe(self) -> str:
        flags = [f for f, on in (("causal", self.causal), (f"window{tuple(self.window)}", self.window != (-1, -1)),
                                 (f"softcap={self.softcap}", self.softcap > 0), (f"alibi={self.alibi}", self.alibi),
                                 (f"dropout={self.dropout_p}", self.dropout_p > 0),
                                 ("pads_q", self.pads_q is not None), ("pads_k", self.pads_k is not None),
                                 (f"tail={self.tail_q},{self.tail_k}", self.tail_q or self.tail_k),
                                 (f"scale={self.softmax_scale}", self.softmax_scale is not None),
                                 ("no_lse_grad", not self.lse_grad), ("sink", self.sink), (f"fp8_pv={self.fp8_pv}", self.fp8_pv is not None),
                                 ("launchers", self.launchers)) if on]
        return (f"attention {self.dtype} on {self.device}, lengths_q {list(self.lengths_q)}, lengths_k "
                f"{list(self.lengths_k)}, heads {self.nheads}/{self.nheads_k}, dims {self.headdim}/{self.headdim_v}"
                + (", " + ", ".join(flags) if flags else ""))


def _list(t):
    return None if t is None else list(t)


# The rest of an attention reproducer. {run} defines run_kernel(q, k, v, do, dlse) -> (out, lse,
# dq, dk, dv); dlse None = a loss through out alone.
_RUN_OP = """\
def run_kernel(q, k, v, do, dlse):
    op = lambda q, k, v: torch_varlen.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                       max_seqlen_k, backend='torch_varlen', **dropout, **kwargs)
    return forward_backward(op, q, k, v, do, dlse)
"""

_RUN_LAUNCHERS = """\
left, right = kwargs['window_size']
right = 0 if kwargs['causal'] else right
launch = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kwargs['softmax_scale'] or headdim ** -0.5, left,
          right, kwargs['softcap'], kwargs.get('alibi_slopes'), kwargs.get('cu_seqlens_q_padded'),
          kwargs.get('cu_seqlens_k_padded'), dropout.get('dropout_p', 0.0), dropout.get('rng_state'), False)

def run_kernel(q, k, v, do, dlse):  # the Triton launchers (as CUDA's op kernels), under the interpreter
    out, lse = triton_attention.attention_forward(q, k, v, *launch)
    grads = triton_attention.attention_backward(do.to(dtype), q, k, v, out, lse, *launch,
                                                grad_lse=None if dlse is None else dlse.to(lse.dtype))
    return (out, lse) + tuple(grads)
"""

_ATTN_CHECK = """\
import torch_varlen
from torch_varlen import reference
from torch_varlen.kernels import attention as triton_attention
{poison}

def finite(t):
    return t.masked_fill(~torch.isfinite(t), 0)

def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0

def forward_backward(fn, q, k, v, do, dlse):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * do).sum()
    if dlse is not None:
        loss = loss + (finite(lse).double() * dlse).sum()
    return (out.detach(), lse.detach()) + torch.autograd.grad(loss, (q, k, v))

{run}
reference_fn = lambda q, k, v: reference.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **dropout, **kwargs)[:2]
q64, k64, v64 = q.double(), k.double(), v.double()
half = dtype != torch.float64  # rounds out
out64 = reference_fn(q64, k64, v64)[0]

def rounded_out_shift(do):
    # the backward reads out rounded to its dtype (D = rowsum(dO * out)): D is off by this, which
    # moves the gradients by those of sum(lse * -shift) (test_fuzz.py, "Rounded out in the backward")
    out = run_kernel(q, k, v, do, None)[0]
    return ((out.double() - out64) * do).sum(-1).transpose(0, 1)

def check(do, dlse):
    shift = rounded_out_shift(do) if half else None
    got = run_kernel(q, k, v, do, dlse + shift if half and dlse is not None else dlse)
    ref64 = forward_backward(reference_fn, q64, k64, v64, do, dlse)
    same = forward_backward(reference_fn, q, k, v, do, dlse)  # the reference in q's dtype
    zero = torch.zeros(())
    # no grad_lse to shift: allow the term itself
    term = (forward_backward(reference_fn, q64, k64, v64, torch.zeros_like(do), shift) if half and dlse is None
            else (zero,) * 5)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref64[1])), 'lse -inf not where the reference has it'
    # atol times the largest reference value (test_fuzz.py _scaled_atol)
    largest = max((t.abs().max().item() for i, t in enumerate(ref64) if i != 1 and t.numel()), default=0.0)
    atol = (1e-5 if dtype == torch.float32 else 2e-3) * max(1.0, largest)
    names = ('out', 'lse', 'dq', 'dk', 'dv') if dlse is not None else ('dq', 'dk', 'dv')
    failed = []
    for name, x, r, m, t in list(zip(('out', 'lse', 'dq', 'dk', 'dv'), got, ref64, same, term))[5 - len(names):]:
        if name == 'lse':
            x, r, m = finite(x), finite(r), finite(m.float())
        if dtype == torch.float64:  # no rounding to compare with: within 1e-10 of the reference's size
            bound = 1e-10 * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        else:  # DESIGN.md: err(kernel) <= 2 * err(reference in the same dtype) + atol
            bound = 2 * err(m, r) + err(t, zero) + atol
        print(f'{{name}}: err {{err(x, r):.3g}} (bound {{bound:.3g}}), NaN: {{bool(x.isnan().any())}}')
        if x.isnan().any() or err(x, r) > bound:
            failed.append(name)
    assert not failed, f'over the bound: {{failed}}'

# the test's draws: do, then dlse (test_attention_triton._check), on q's device
check(torch.randn(q.shape[0], nheads, headdim_v, dtype=torch.float64, device=device),
      torch.randn(nheads, q.shape[0], dtype=torch.float64, device=device))
{out_only}print('passed')
"""
_OUT_ONLY_CHECK = """\
# and the backward of a loss through out alone (the example's lse_grad=False)
check(torch.randn(q.shape[0], nheads, headdim_v, dtype=torch.float64, device=device), None)
"""

_FP8_CHECK = """\
import torch_varlen
from torch_varlen import reference
from torch_varlen.kernels import attention as triton_attention
from test_fp8_attention import Fp8Sample, assert_within_fp8_bound
{poison}
dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
args = tuple(map(dev, (q, k, v, cu_seqlens_q, cu_seqlens_k))) + (max_seqlen_q, max_seqlen_k)
fp8_pv = {fp8_pv}  # None: the launch config's own choice; True / False: P @ V in FP8 / in float16
if not {launcher}:  # the public op
    out, lse = torch_varlen.varlen_attention(*args, backend='torch_varlen',
                                             **{{n: dev(t) for n, t in {{**kwargs, **descales}}.items()}})
else:  # the Triton launcher
    left, right = kwargs['window_size']
    right = 0 if kwargs['causal'] else right
    config = triton_attention._config('fwd', args[0], args[2], left, right)
    if fp8_pv is not None:
        config['fp8_pv'] = fp8_pv
    out, lse = triton_attention.attention_forward(
        *args, kwargs['softmax_scale'] or headdim ** -0.5, left, right, kwargs['softcap'],
        dev(kwargs.get('alibi_slopes')), dev(kwargs.get('cu_seqlens_q_padded')),
        dev(kwargs.get('cu_seqlens_k_padded')), **{{n: dev(t) for n, t in descales.items()}}, config=config)
ref_out, ref_lse, _ = reference.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs, **descales)
print('out max err', (out.cpu().double() - ref_out).abs().max().item() if out.numel() else 0.0)
s = Fp8Sample.__new__(Fp8Sample)  # the test's bound (test_fp8_attention.py) on these inputs
s.q, s.k, s.v, s.cu_q, s.cu_k, s.max_q, s.max_k = q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
s.kwargs, s.descales, s.lengths_q, s.lengths_k = kwargs, descales, lengths_q, lengths_k
if torch.isfinite(lse).any():
    assert_within_fp8_bound(s, out.cpu(), lse.cpu(), fp8_p={fp8_p})
else:  # no row sees a key
    assert torch.isneginf(ref_lse).all() and torch.isneginf(lse).all() and out.eq(0).all()
print('passed')
"""


@dataclasses.dataclass(frozen=True)
class PadExample:
    """One padding case: hidden (B, S, *rest), a mask built row by row, an attention_mask_in_length."""

    device: str
    dtype: str
    batch: int
    seqlen: int
    rest: tuple
    rows: tuple  # per row (kind, n): ("empty", 0), ("full", 0), ("prefix", length), ("scattered", percent)
    mask_dtype: str = "bool"
    mask_values: bool = False  # integer masks: valid entries hold values in [1, 100)
    unused: bool = False  # an unused_mask on some padding positions
    capacity_extra: int = 0  # capacity = kept tokens + this
    concat: tuple = ()  # per row: the lengths of the samples concatenated in it
    seed: int = 0

    def source(self) -> str:
        dtype = getattr(torch, self.dtype)
        if dtype == torch.bool:
            hidden = "torch.rand(batch, seqlen, *rest) > 0.5"
        elif dtype == torch.uint8:
            hidden = "torch.randint(0, 256, (batch, seqlen, *rest)).to(dtype)"
        elif not dtype.is_floating_point:
            hidden = "torch.randint(-1000, 1000, (batch, seqlen, *rest)).to(dtype)"
        else:
            hidden = "torch.randn(batch, seqlen, *rest, dtype=torch.float64).to(dtype)"
        values = ("attention_mask = keep.to(torch.int64) * torch.randint(1, 100, (batch, seqlen))"
                  if self.mask_values else "attention_mask = keep")
        return "\n".join([
            "import torch",
            f"device, dtype = {self.device!r}, torch.{self.dtype}",
            f"torch.manual_seed({self.seed})",
            f"batch, seqlen, rest = {self.batch}, {self.seqlen}, {tuple(self.rest)!r}",
            f"hidden = ({hidden}).to(device)",
            f"rows = {list(self.rows)!r}  # per row: (kind, length or percent kept)",
            "keep = torch.zeros(batch, seqlen, dtype=torch.bool)",
            "for r, (kind, n) in enumerate(rows):",
            "    if kind == 'full':",
            "        keep[r] = True",
            "    elif kind == 'prefix':",
            "        keep[r, :n] = True",
            "    elif kind == 'scattered':",
            "        keep[r] = torch.rand(seqlen) < n / 100",
            values,
            f"attention_mask = attention_mask.to(torch.{self.mask_dtype}).to(device)",
            ("unused_mask = (~keep & (torch.rand(batch, seqlen) < 0.5)).to(device)" if self.unused
             else "unused_mask = None"),
            f"capacity_extra = {self.capacity_extra}  # unpad_input(capacity=kept tokens + this)",
            f"concat = {[list(c) for c in self.concat]!r}  # per row: lengths of the concatenated samples",
            "attention_mask_in_length = torch.zeros(batch, seqlen, dtype=torch.int32)",
            "for r, lengths in enumerate(concat):",
            "    attention_mask_in_length[r, :len(lengths)] = torch.tensor(lengths, dtype=torch.int32)",
            "attention_mask_in_length = attention_mask_in_length.to(device)",
        ]) + "\n"

    def reproducer(self) -> str:
        return (f"# torch_varlen fuzz reproducer (test/test_fuzz.py): {self.describe()}\n"
                + self.source() + "\n" + _PAD_CHECK)

    def describe(self) -> str:
        return (f"padding {self.dtype} on {self.device}, hidden {(self.batch, self.seqlen) + tuple(self.rest)}, "
                f"rows {list(self.rows)}, mask {self.mask_dtype}{' with values' if self.mask_values else ''}"
                f"{', unused_mask' if self.unused else ''}, capacity +{self.capacity_extra}, concat "
                f"{[list(c) for c in self.concat]}")


_PAD_CHECK = """\
import torch_varlen
from torch_varlen import reference

def same(a, b, what):  # bit-exact, dtype and device included
    assert type(a) is type(b), (what, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape, (what, a, b)
        assert torch.equal(a, b), (what, a, b)
    else:
        assert a == b, (what, a, b)

def grad(fn, x, cotangent):
    x = x.detach().requires_grad_()
    return torch.autograd.grad(fn(x), x, cotangent)[0]

out = torch_varlen.unpad_input(hidden, attention_mask, unused_mask)
expect = reference.unpad(hidden, attention_mask, unused_mask)
for i, (a, b) in enumerate(zip(out, expect)):
    same(a, b, f'unpad_input output {i}')
rows_, indices = out[0], out[1]
capacity = indices.numel() + capacity_extra
cap = torch_varlen.unpad_input(hidden, attention_mask, unused_mask, capacity=capacity)
expect = reference.unpad_capacity(hidden, attention_mask, unused_mask, capacity)
for i, (a, b) in enumerate(zip((cap[0], cap[1], cap[2], cap[4]), expect)):
    same(a, b, f'unpad_input(capacity) output {i}')
assert cap[3] == seqlen
same(torch_varlen.pad_input(rows_, indices, batch, seqlen), reference.pad(rows_, indices, batch, seqlen), 'pad_input')
same(torch_varlen.pad_input(cap[0], cap[1], batch, seqlen), reference.pad(cap[0], cap[1], batch, seqlen),
     'pad_input(capacity rows)')
same(torch.ops.varlen.gather_rows(hidden, cap[1]), reference.gather_rows(hidden, cap[1]), 'gather_rows')
out = torch_varlen.unpad_input_for_concatenated_sequences(hidden, attention_mask_in_length)
expect = reference.unpad_concat(hidden, attention_mask_in_length)
for i, (a, b) in enumerate(zip(out, expect)):
    same(a, b, f'unpad_input_for_concatenated_sequences output {i}')
if dtype.is_floating_point:  # gradients, bit-exact too
    cases = {
        'unpad_input': (lambda x: torch_varlen.unpad_input(x, attention_mask, unused_mask)[0],
                        lambda x: reference.unpad(x, attention_mask, unused_mask)[0], hidden),
        'unpad_input(capacity)': (
            lambda x: torch_varlen.unpad_input(x, attention_mask, unused_mask, capacity=capacity)[0],
            lambda x: reference.unpad_capacity(x, attention_mask, unused_mask, capacity)[0], hidden),
        'pad_input': (lambda x: torch_varlen.pad_input(x, cap[1], batch, seqlen),
                      lambda x: reference.pad(x, cap[1], batch, seqlen), cap[0]),
        'gather_rows': (lambda x: torch.ops.varlen.gather_rows(x, cap[1]),
                        lambda x: reference.gather_rows(x, cap[1]), hidden),
        'unpad_input_for_concatenated_sequences': (
            lambda x: torch_varlen.unpad_input_for_concatenated_sequences(x, attention_mask_in_length)[0],
            lambda x: reference.unpad_concat(x, attention_mask_in_length)[0], hidden),
    }
    for name, (op, ref, x) in cases.items():
        y = ref(x)
        cotangent = torch.randn(y.shape, dtype=torch.float64).to(dtype).to(device)
        same(grad(op, x, cotangent), grad(ref, x, cotangent), f'gradient of {name}')
print('passed')
"""


def run_source(code: str, name: str = "<fuzz example>") -> dict:
    """Execute an example's source() and return its namespace (the inputs)."""
    ns: dict = {}
    exec(compile(code, name, "exec"), ns)
    return ns


class reproducer_on_failure:
    """Context manager: any exception becomes an AssertionError whose message ends with the
    example's standalone reproducer."""

    def __init__(self, example):
        self.example = example

    def __enter__(self):
        if currently_in_test_context():  # inside @given: hypothesis prints it with the failing example
            note(f"example: {self.example.describe()}")
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, Exception):  # pytest's skip and fail pass through
            return False
        raise AssertionError(f"{kind.__name__}: {exc}\n\nFailing example: {self.example.describe()}\n"
                             f"Standalone reproducer (run from the repository root):\n\n"
                             f"{self.example.reproducer()}") from exc


# ---------------------------------------------------------------- attention: checks


def _sample(ex: AttnExample, ns: dict):
    """The inputs as test_attention_triton's helpers take them."""
    return SimpleNamespace(q=ns["q"], k=ns["k"], v=ns["v"], cu_seqlens_q=ns["cu_seqlens_q"],
                           cu_seqlens_k=ns["cu_seqlens_k"], max_seqlen_q=ns["max_seqlen_q"],
                           max_seqlen_k=ns["max_seqlen_k"], kwargs=ns["kwargs"], name=ex.describe())


def _run_out_only(s, do, launchers, dropout_p, rng_state):
    """(dq, dk, dv) of the loss sum(out * do): no gradient on lse (grad_lse None on the launchers)."""
    if launchers:
        args = _launch_args(s, dropout_p, rng_state)
        out, lse = triton_attention.attention_forward(*args)
        return triton_attention.attention_backward(do.to(s.q.dtype), *args[:3], out, lse, *args[3:], grad_lse=None)
    q, k, v = (x.detach().requires_grad_() for x in (s.q, s.k, s.v))
    out, _ = torch_varlen.varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k,
                                           dropout_p=dropout_p, rng_state=rng_state, **s.kwargs)
    return torch.autograd.grad((out.double() * do).sum(), (q, k, v))


# Rounded out in the backward. The kernels' backward, like flash-attention's, takes D =
# rowsum(dO * out) from out rounded to its dtype, so D is off by dD = rowsum(dO * (out - out64)),
# which shifts dS = P * (dP - D) by -P * dD: exactly the gradient of sum(lse * -dD). The
# reference's softmax backward has no such term (on a row that sees one key it cancels exactly),
# so the 2x rule fails for no fault of the kernel where that term dominates: rows that see one
# key (the CPU kernel, bfloat16, lengths 1/1, head dim 5: 2.7x over; float32, causal window
# (0, -1), dropout 0.9: 1.25e-5 against 1e-5). Two remedies, both exact: the kernels get
# grad_lse = dlse + dD (then they owe the reference's gradient of dlse), and the loss through
# out alone (no grad_lse to shift) allows the term itself, the float64 gradient of
# sum(lse * dD). float64 needs neither (dD ~ 1e-16 of the gradients).
SHIFTED = (torch.float16, torch.bfloat16, torch.float32)


def _rounded_out_shift(s, do, launchers, dropout_p, rng_state):
    """dD (H, total_q) = rowsum(do * (out - out64)) for the kernels' out."""
    with torch.no_grad():
        if launchers:
            out = triton_attention.attention_forward(*_launch_args(s, dropout_p, rng_state))[0]
        else:
            out = torch_varlen.varlen_attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                                s.max_seqlen_k, dropout_p=dropout_p, rng_state=rng_state,
                                                **s.kwargs)[0]
        out64 = reference.attention(s.q.double(), s.k.double(), s.v.double(), s.cu_seqlens_q, s.cu_seqlens_k,
                                    dropout_p=dropout_p, rng_state=rng_state, **s.kwargs)[0]
    return ((out.double() - out64) * do).sum(-1).transpose(0, 1)


def _shift_grad_lse(run, launchers):
    """run(s, do, dlse, ...) with the kernels' grad_lse shifted by dD (bfloat16 / float16)."""
    def shifted(s, do, dlse, dropout_p=0.0, rng_state=None):
        if s.q.dtype in SHIFTED:
            dlse = dlse + _rounded_out_shift(s, do, launchers, dropout_p, rng_state)
        return run(s, do, dlse, dropout_p=dropout_p, rng_state=rng_state)

    return shifted


def _scaled_atol(dtype, ref64):
    """_check's atol (1e-5 float32, 2e-3 otherwise) times max(1, the largest |value| among the
    float64 reference's out and gradients; lse, whose size says nothing of its rounding, left out).

    The fuzzer's magnitudes range widely (dropout 0.9 scales out by 10; softmax_scale 1 with head
    dim 256; ALiBi, softcap), and on small draws err(same-dtype reference) is the max of a few
    dozen entries, as likely small by chance as the kernel's is large: an atol meant for unit
    values fails correct kernels. Worst where the reference's error is 0: on rows that see one or
    few keys dS = P * (dP - D) cancels, exactly in the reference's softmax backward, but not in
    float32 dots in the kernels, and dK sums that over every row that sees the key (the CPU
    kernel, float32, one key for 63 queries x 3 heads, head dim 64: dK off by 4.1e-5 against
    1e-5 allowed; measured at 0.02 to 0.22 of this scaled atol). bfloat16: under one ulp of the
    largest value."""
    tensors = [t for i, t in enumerate(ref64) if i != 1 and t.numel()]  # out, dq, dk, dv (not lse)
    largest = max((t.abs().max().item() for t in tensors), default=0.0)
    return (1e-5 if dtype == torch.float32 else 2e-3) * max(1.0, largest)


def _atol(s, dropout_p, rng_state):
    """_scaled_atol for the cotangents _check is about to draw (the same draws, in a forked RNG)."""
    devices = [s.q.device.index or 0] if s.q.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64, device=s.q.device)
        dlse = torch.randn(s.q.shape[1], s.q.shape[0], dtype=torch.float64, device=s.q.device)
        ref64 = _reference(s, torch.float64, do, dlse, dropout_p, rng_state)
    return _scaled_atol(s.q.dtype, ref64)


def _check_out_only_backward(s, launchers, dropout_p, rng_state):
    """The backward of a loss through out alone, by _check's rule plus the rounded-out term
    (float64: within 1e-10)."""
    dtype = s.q.dtype
    do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64, device=s.q.device)
    zero = torch.zeros(s.q.shape[1], s.q.shape[0], dtype=torch.float64, device=s.q.device)
    got = _run_out_only(s, do, launchers, dropout_p, rng_state)
    full64 = _reference(s, torch.float64, do, zero, dropout_p, rng_state)
    ref64 = full64[2:]
    same = _reference(s, dtype, do, zero, dropout_p, rng_state)[2:]
    if dtype in SHIFTED:
        shift = _rounded_out_shift(s, do, launchers, dropout_p, rng_state)
        term = _reference(s, torch.float64, torch.zeros_like(do), shift, dropout_p, rng_state)[2:]
    else:
        term = (torch.zeros(()),) * 3
    atol = _scaled_atol(dtype, full64)
    for name, x, r, m, t in zip(("dq", "dk", "dv"), got, ref64, same, term):
        assert not x.isnan().any(), f"{name} has NaN (an unwritten row?)"
        if dtype == torch.float64:
            bound = 1e-10 * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        else:
            bound = 2 * _err(m, r) + _err(t, torch.zeros_like(t)) + atol
        assert _err(x, r) <= bound, f"loss through out alone: {name} err {_err(x, r):.3g} > {bound:.3g}"


def check_attention(ex: AttnExample):
    """ex's inputs through the kernels under test against the float64 reference."""
    if ex.dtype == "float64" and ex.device != "cpu" and not _float64_supported():
        pytest.skip(FLOAT64_SKIP)
    with reproducer_on_failure(ex):
        ns = run_source(ex.source())
        if ex.fp8:
            _check_fp8(ex, ns)
            return
        s = _sample(ex, ns)
        dropout = ns["dropout"]
        dropout_p, rng_state = dropout.get("dropout_p", 0.0), dropout.get("rng_state")
        run = _run_launchers if ex.launchers else _run_op
        with torch_varlen.attention_backend(ex.backend):
            if ex.dtype == "float64":
                from test_attention_triton import _check_float64

                _check_float64(s, run, dropout_p=dropout_p, rng_state=rng_state)
            else:
                _check(s, _shift_grad_lse(run, ex.launchers), dropout_p=dropout_p,
                       rng_state=rng_state, atol=_atol(s, dropout_p, rng_state))
            if not ex.lse_grad:
                _check_out_only_backward(s, ex.launchers, dropout_p, rng_state)


def _fp8_launcher_forward(args, kwargs, fp8_pv):
    """The Triton FP8 forward launcher with its default config, P @ V forced to FP8 (fp8_pv True)
    or float16 (False) unless fp8_pv is None."""
    launch = _launch_args(SimpleNamespace(q=args[0], k=args[1], v=args[2], cu_seqlens_q=args[3], cu_seqlens_k=args[4],
                                          max_seqlen_q=args[5], max_seqlen_k=args[6], kwargs=kwargs))
    config = triton_attention._config("fwd", args[0], args[2], launch[8], launch[9])
    if fp8_pv is not None:
        config["fp8_pv"] = fp8_pv
    descales = {n: kwargs[n] for n in ("q_descale", "k_descale", "v_descale")}
    return triton_attention.attention_forward(*launch, **descales, config=config)


def _check_fp8(ex: AttnExample, ns: dict):
    s = Fp8Sample.__new__(Fp8Sample)
    s.q, s.k, s.v = ns["q"], ns["k"], ns["v"]
    s.cu_q, s.cu_k, s.max_q, s.max_k = ns["cu_seqlens_q"], ns["cu_seqlens_k"], ns["max_seqlen_q"], ns["max_seqlen_k"]
    s.kwargs, s.descales = ns["kwargs"], ns["descales"]
    s.lengths_q, s.lengths_k = list(ex.lengths_q), list(ex.lengths_k)
    device = "cpu" if ex.launchers else ex.device
    args, kwargs = s.to(device)
    if ex.launchers or ex.fp8_pv is not None:
        out, lse = _fp8_launcher_forward(args, kwargs, ex.fp8_pv)
    else:
        out, lse = torch_varlen.varlen_attention(*args, **kwargs)
    assert out.device.type == device
    if torch.isfinite(lse).any():
        assert_within_fp8_bound(s, out.cpu(), lse.cpu(), fp8_p=ex.launchers or ex.device != "cpu")
    else:  # no row sees a key (the bound's relative lse error needs one): out 0, lse -inf, as the reference
        ref_out, ref_lse, _ = s.reference()
        assert torch.isneginf(ref_lse).all() and torch.isneginf(lse).all() and out.eq(0).all()
        assert out.dtype == torch.bfloat16 and out.shape == ref_out.shape


# ---------------------------------------------------------------- attention: strategies


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes of one slice."""

    max_edge: int  # tile-edge lengths (EDGES) up to this
    max_random: int  # uniform lengths up to this
    long: Optional[tuple]  # rare long lengths (lo, hi)
    batch: tuple
    nheads_k: tuple
    group: tuple
    window_max: int
    pad_max: int
    tail_max: int


GPU = Profile(129, 140, (200, 700), (1, 6), (1, 4), (1, 4), 200, 5, 40)
CPU = Profile(65, 70, (100, 140), (1, 4), (1, 3), (1, 3), 80, 3, 9)
INTERP = Profile(33, 35, None, (1, 3), (1, 2), (1, 2), 40, 2, 5)


@dataclasses.dataclass(frozen=True)
class KernelKey:
    """The choices that select Triton specialisations (each new one compiles kernels)."""

    dtype: str
    headdim: int
    headdim_v: int
    nheads_k: int
    group: int
    mask: str  # "full", "causal" or "window"
    softcap: bool = False
    alibi: Optional[str] = None
    dropout: bool = False
    pad: str = ""  # "q", "k", "qk": cu_seqlens_*_padded
    descales: tuple = (None, None, None)
    fp8_pv: Optional[bool] = None
    sink: bool = False

    def __str__(self):
        parts = [self.dtype.replace("float8_e4m3fn", "fp8").replace("bfloat", "bf").replace("float", "fp"),
                 f"d{self.headdim}-{self.headdim_v}", f"h{self.nheads_k * self.group}-{self.nheads_k}", self.mask]
        parts += [n for n, on in (("softcap", self.softcap), (f"alibi_{self.alibi}", self.alibi),
                                  ("dropout", self.dropout), (f"pad_{self.pad}", self.pad), ("sink", self.sink),
                                  ("fp8pv" if self.fp8_pv else "fp16pv", self.fp8_pv is not None)) if on]
        if self.dtype == FP8:
            parts.append("desc_" + "".join({None: "n", "tensor": "t", "head": "h"}[d] for d in self.descales))
        return "-".join(parts)


def _length(draw, p: Profile):
    kind = draw(st.integers(0, 19))
    if kind < 10:
        return draw(st.sampled_from([n for n in EDGES if n <= p.max_edge]))
    if kind < 19 or p.long is None:
        return draw(st.integers(0, p.max_random))
    return draw(st.integers(*p.long))


def _rare(draw, strategy, default, one_in=4):
    """draw(strategy) one time in one_in, else default (which the simplest example takes)."""
    return draw(strategy) if draw(st.integers(0, one_in - 1)) == one_in - 1 else default


@st.composite
def kernel_keys(draw, dtypes, dims, p: Profile):
    """A key drawn freely (the CPU and interpreter slices, where a new key costs no compile)."""
    dtype = draw(st.sampled_from(dtypes))
    headdim, headdim_v = draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    fp8 = dtype == FP8
    return KernelKey(
        dtype, headdim, headdim_v, draw(st.integers(*p.nheads_k)), draw(st.integers(*p.group)),
        draw(st.sampled_from(["full", "causal", "window"])), draw(st.booleans()),
        draw(st.sampled_from([None, "head", "batch"])), (not fp8) and draw(st.booleans()),
        draw(st.sampled_from(["", "q", "k", "qk"])),
        tuple(draw(st.sampled_from([None, "tensor", "head"])) for _ in range(3)) if fp8 else (None, None, None),
        draw(st.sampled_from([None, True, False])) if fp8 and p is INTERP else None,
        (not fp8) and p is not INTERP and draw(st.booleans()))  # the launchers' argument list has no sink


@st.composite
def attention_examples(draw, key: KernelKey, p: Profile, device: str, launchers: bool = False):
    """Everything but the key: lengths, batch, window sizes, softcap / dropout values, pads,
    tail rows, scale, whether lse gets a gradient, seeds."""
    batch = draw(st.integers(*p.batch))
    lengths_q = tuple(_length(draw, p) for _ in range(batch))
    lengths_k = lengths_q if draw(st.booleans()) else tuple(_length(draw, p) for _ in range(batch))
    causal, window = False, (-1, -1)
    if key.mask == "causal":
        causal = True
    elif key.mask == "window":
        side = st.integers(0, p.window_max)
        if draw(st.booleans()):
            causal, window = True, (draw(side), draw(st.sampled_from([-1, 0, 3])))  # right is ignored
        else:
            window = draw(st.sampled_from([(0, -1), (-1, 0), (1, 1)]).flatmap(
                lambda w: st.tuples(side if w[0] >= 0 else st.just(-1), side if w[1] >= 0 else st.just(-1))))
            if window == (-1, 0):  # that one is the causal mask kind, not a window
                window = (0, 0)
    pads = st.tuples(*[st.integers(0, p.pad_max)] * batch)
    dropout_p = draw(st.sampled_from([0.1, 0.17, 0.3, 0.5, 0.9])) if key.dropout else 0.0
    return AttnExample(
        device=device, dtype=key.dtype, lengths_q=lengths_q, lengths_k=lengths_k, nheads_k=key.nheads_k,
        group=key.group, headdim=key.headdim, headdim_v=key.headdim_v, causal=causal, window=window,
        softcap=draw(st.sampled_from([0.5, 2.0, 5.0, 30.0])) if key.softcap else 0.0, alibi=key.alibi,
        dropout_p=dropout_p,
        rng=(draw(st.integers(0, 2**63 - 1)), draw(st.integers(0, 2**62))) if dropout_p else (0, 0),
        pads_q=draw(pads) if "q" in key.pad else None, pads_k=draw(pads) if "k" in key.pad else None,
        tail_q=_rare(draw, st.integers(1, p.tail_max), 0), tail_k=_rare(draw, st.integers(1, p.tail_max), 0),
        softmax_scale=_rare(draw, st.sampled_from([0.05, 0.3, 1.0]), None),
        lse_grad=key.dtype == FP8 or draw(st.booleans()), descales=key.descales, fp8_pv=key.fp8_pv,
        launchers=launchers, sink=key.sink, seed=draw(st.integers(0, 2**31 - 1)))


# Head-dim pairs per dtype on the GPU: mostly small and odd-ish multiples of 8, the tile
# classes up to 256, V narrower than q/k (the Triton 3.6 P @ V miscompile the forward avoids),
# and odd dims.
GPU_DIMS = {
    "bfloat16": [(8, 8), (24, 8), (40, 40), (56, 24), (65, 65), (72, 72), (96, 96), (128, 128), (136, 136),
                 (192, 128), (256, 256)],
    "float16": [(16, 16), (24, 24), (33, 33), (40, 24), (48, 48), (64, 64), (80, 80), (112, 112), (192, 192),
                (256, 64)],
    "float32": [(5, 5), (8, 24), (32, 32), (40, 40), (64, 64), (96, 96), (128, 128), (256, 256)],
    "float64": [(8, 8), (40, 24), (64, 64), (128, 128), (256, 256)],
    FP8: [(8, 8), (16, 16), (24, 8), (32, 32), (40, 24), (64, 64), (72, 72), (96, 96), (128, 128), (136, 136),
          (192, 128), (256, 256)],
}


def _gpu_keys():
    """One key per (dtype, head-dim pair), the rest of each key from a fixed-seed draw; mask kinds
    and padded layouts rotate so that every one meets every dtype."""
    rng = random.Random(20240611)
    sinks = random.Random(20261203)  # its own stream, so that adding sinks left the other draws as they were
    keys, i = [], 0
    for dtype, dims in GPU_DIMS.items():
        fp8 = dtype == FP8
        for d, dv in dims:
            keys.append(KernelKey(
                dtype, d, dv, rng.randint(1, 4), rng.randint(1, 4), ("full", "causal", "window")[i % 3],
                softcap=rng.random() < 0.4, alibi=rng.choice([None, None, "head", "batch"]),
                dropout=not fp8 and rng.random() < 0.4, pad=("", "q", "k", "qk")[(i // 3) % 4],
                descales=tuple(rng.choice([None, "tensor", "head"]) for _ in range(3)) if fp8 else (None,) * 3,
                fp8_pv=(rng.random() < 0.3 or None) if fp8 and max(d, dv) <= 128 else None,
                sink=not fp8 and sinks.random() < 0.35))
            i += 1
    return keys


GPU_KEYS = _gpu_keys()
GPU_EXAMPLES_PER_KEY = 6


def _hopper_keys():
    """Keys for kernels/hopper.py (run with backend "hopper"): both 16-bit dtypes, the head-dim
    pairs it takes, every mask kind, and softcap / padded layouts / sinks / GQA from a fixed draw
    (it has no ALiBi, dropout or FP8: those run on Triton, in GPU_KEYS)."""
    rng = random.Random(20261204)
    pairs = [(64, 64), (128, 128), (256, 256), (128, 64), (64, 128), (256, 128)]
    keys = []
    for i, (dtype, (d, dv)) in enumerate((t, p) for t in ("bfloat16", "float16") for p in pairs):
        keys.append(KernelKey(dtype, d, dv, rng.randint(1, 4), rng.randint(1, 4),
                              ("full", "causal", "window")[i % 3], softcap=rng.random() < 0.4,
                              pad=("", "q", "k", "qk")[(i // 3) % 4], sink=rng.random() < 0.35))
    return keys


HOPPER_KEYS = _hopper_keys()


# TORCH_VARLEN_FUZZ_SCALE=N multiplies every example count (a longer fuzz run by hand).
FUZZ_SCALE = float(os.environ.get("TORCH_VARLEN_FUZZ_SCALE", "1"))


def _settings(max_examples, shrink=False):
    """Seeded runs (with @seed), no example database; no shrinking where a step is slow (GPU
    compiles, the interpreter)."""
    phases = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if shrink else ())
    return settings(max_examples=max(1, round(max_examples * FUZZ_SCALE)), deadline=None, database=None,
                    phases=phases, print_blob=False,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every output the kernels allocate (Triton launchers and the CPU kernels)."""
    monkeypatch.setattr(triton_attention, "_poison_outputs", True)
    monkeypatch.setenv("TORCH_VARLEN_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True)
def our_kernels():
    with torch_varlen.attention_backend("torch_varlen"):
        yield


# ---------------------------------------------------------------- attention: GPU


@requires_cuda
@pytest.mark.parametrize("key", GPU_KEYS, ids=str)
def test_gpu_fuzz_attention(key, poisoned):
    """GPU_EXAMPLES_PER_KEY drawn examples of one kernel key, forward and backward (FP8: forward)."""
    if key.dtype == "float64" and not _float64_supported():
        pytest.skip(FLOAT64_SKIP)

    @seed(GPU_KEYS.index(key) + 1000)
    @_settings(GPU_EXAMPLES_PER_KEY)
    @given(attention_examples(key, GPU, "cuda"))
    def run(ex):
        check_attention(ex)

    run()


@requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="kernels/hopper.py needs a compute capability 9.x GPU")
@pytest.mark.parametrize("key", HOPPER_KEYS, ids=lambda k: f"hopper-{k}")
def test_gpu_fuzz_hopper_attention(key, poisoned):
    """GPU_EXAMPLES_PER_KEY drawn examples of one HOPPER_KEYS key, backend "hopper" (its forward,
    Triton's backward from its out and lse)."""

    @seed(HOPPER_KEYS.index(key) + 2000)
    @_settings(GPU_EXAMPLES_PER_KEY)
    @given(attention_examples(key, GPU, "cuda").map(lambda ex: dataclasses.replace(ex, backend="hopper")))
    def run(ex):
        check_attention(ex)

    run()


def test_gpu_keys_bound_the_compiles():
    """GPU_KEYS stay under ~150 kernel variants (a variant: one kernel with one set of
    constexprs: forward, dK/dV and dQ per key, forward alone for FP8; Triton's integer
    specialisation, e.g. total_q % 16 in the lse stride, multiplies compiles by up to ~2), and
    every dtype meets every mask kind and every feature."""
    variants = {(k, kernel) for k in GPU_KEYS for kernel in (("fwd",) if k.dtype == FP8 else ("fwd", "dkdv", "dq"))}
    assert len(variants) < 150, len(variants)
    for dtype in GPU_DIMS:
        keys = [k for k in GPU_KEYS if k.dtype == dtype]
        assert {k.mask for k in keys} == {"full", "causal", "window"}, dtype
        assert any(k.softcap for k in keys) and any(k.alibi for k in keys), dtype
        assert {p for k in keys for p in k.pad} == {"q", "k"}, dtype
        assert any(k.group > 1 for k in keys) and any(k.nheads_k > 1 for k in keys), dtype
        if dtype != FP8:
            assert any(k.dropout for k in keys) and any(k.sink for k in keys), dtype
    fp8 = [k for k in GPU_KEYS if k.dtype == FP8]
    assert {d for k in fp8 for d in k.descales} == {None, "tensor", "head"} and any(k.fp8_pv for k in fp8)
    assert len({str(k) for k in GPU_KEYS}) == len(GPU_KEYS)  # test ids are unique


# ---------------------------------------------------------------- attention: CPU kernel (CI)

CPU_DIMS = [5, 8, 16, 24, 33, 40, 64, 65, 96, 136]


@seed(20240611)
@_settings(30, shrink=True)
@given(kernel_keys(["bfloat16", "float16", "float32", "float64", FP8], CPU_DIMS, CPU).flatmap(
    lambda key: attention_examples(key, CPU, "cpu")))
def test_cpu_fuzz_attention(poisoned, ex):
    """The same property on the CPU C++ kernel (device "cpu"), small sizes, every choice drawn freely."""
    check_attention(ex)


# ---------------------------------------------------------------- attention: Triton interpreter (CI)

INTERP_DIMS = [5, 8, 16, 24, 32]


@interp_only
@seed(20240612)
@_settings(15)
@given(kernel_keys(["float32", "float16", FP8], INTERP_DIMS, INTERP).flatmap(
    lambda key: attention_examples(key, INTERP, "cpu", launchers=True)))
def test_interp_fuzz_attention(poisoned, ex):
    """The Triton launchers under TRITON_INTERPRET=1 at tiny sizes (its tiles are 32 x 16 and
    16 x 32, so the 15/16/17/31/32/33 lengths sit on tile edges)."""
    check_attention(ex)


def test_fuzz_triton_interpreter_subprocess():
    """Runs this file's test_interp_fuzz_* tests in a child pytest with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__, "interp_fuzz", timeout=600)


# ---------------------------------------------------------------- padding ops


PAD_DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"]
# 32 positions per copy block, 64 per capacity block, 4096 per eager scan block (tiles straddle rows)
# (33 first: the simplest example's seqlen)
PAD_SEQLENS = (33, 0, 1, 2, 31, 32, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097)


@st.composite
def pad_examples(draw, device, max_seqlen, max_batch, rests):
    batch = draw(st.integers(1, max_batch))
    seqlen = draw(st.one_of(st.sampled_from([n for n in PAD_SEQLENS if n <= max_seqlen]),
                            st.integers(0, max_seqlen)))
    row = st.one_of(st.integers(0, seqlen).map(lambda n: ("prefix", n)),
                    st.integers(0, 100).map(lambda n: ("scattered", n)), st.just(("full", 0)), st.just(("empty", 0)))
    rows = tuple(draw(row) for _ in range(batch))
    mask_dtype = draw(st.sampled_from(["bool", "int32", "int64", "uint8"]))

    def concat_row(_):
        lengths, left = [], seqlen
        for _ in range(draw(st.integers(0, 4))):
            if left == 0:
                break
            lengths.append(draw(st.integers(1, left)))
            left -= lengths[-1]
        return tuple(lengths)

    return PadExample(device=device, dtype=draw(st.sampled_from(PAD_DTYPES)), batch=batch, seqlen=seqlen,
                      rest=draw(st.sampled_from(rests)), rows=rows, mask_dtype=mask_dtype,
                      mask_values=mask_dtype != "bool" and draw(st.booleans()), unused=draw(st.booleans()),
                      capacity_extra=draw(st.sampled_from([0, 0, 1, 7, 40])),
                      concat=tuple(concat_row(r) for r in range(batch)), seed=draw(st.integers(0, 2**31 - 1)))


def _fresh_memory(ex: PadExample, ns):
    """On CUDA, NaN-poison the caching allocator's free blocks (test_padding_cuda's helper), so
    that a row an op leaves unwritten fails the exact comparison."""
    if ex.device == "cuda":
        from test_padding_cuda import poison_cuda_memory

        h = ns["hidden"]
        poison_cuda_memory(h.numel() * h.element_size() * 2 + 4096)


def check_padding(ex: PadExample):
    with reproducer_on_failure(ex):
        ns = run_source(ex.source())
        h, m, u = ns["hidden"], ns["attention_mask"], ns["unused_mask"]
        aml, batch, seqlen = ns["attention_mask_in_length"], ex.batch, ex.seqlen
        fresh = lambda: _fresh_memory(ex, ns)
        fresh()
        out = torch_varlen.unpad_input(h, m, u)
        assert_same(out, reference.unpad(h, m, u))
        rows, indices = out[0], out[1]
        capacity = indices.numel() + ex.capacity_extra
        fresh()
        cap = torch_varlen.unpad_input(h, m, u, capacity=capacity)
        assert cap[3] == seqlen
        assert_same([cap[0], cap[1], cap[2], cap[4]], reference.unpad_capacity(h, m, u, capacity))
        fresh()
        assert_same([torch_varlen.pad_input(rows, indices, batch, seqlen)],
                    [reference.pad(rows, indices, batch, seqlen)])
        fresh()
        assert_same([torch_varlen.pad_input(cap[0], cap[1], batch, seqlen)],
                    [reference.pad(cap[0], cap[1], batch, seqlen)])
        fresh()
        assert_same([torch.ops.varlen.gather_rows(h, cap[1])], [reference.gather_rows(h, cap[1])])
        fresh()
        assert_same(torch_varlen.unpad_input_for_concatenated_sequences(h, aml), reference.unpad_concat(h, aml))
        if not h.dtype.is_floating_point:
            return
        cases = [
            (lambda x: torch_varlen.unpad_input(x, m, u)[0], lambda x: reference.unpad(x, m, u)[0], h),
            (lambda x: torch_varlen.unpad_input(x, m, u, capacity=capacity)[0],
             lambda x: reference.unpad_capacity(x, m, u, capacity)[0], h),
            (lambda x: torch_varlen.pad_input(x, cap[1], batch, seqlen),
             lambda x: reference.pad(x, cap[1], batch, seqlen), cap[0]),
            (lambda x: torch.ops.varlen.gather_rows(x, cap[1]), lambda x: reference.gather_rows(x, cap[1]), h),
            (lambda x: torch_varlen.unpad_input_for_concatenated_sequences(x, aml)[0],
             lambda x: reference.unpad_concat(x, aml)[0], h),
        ]
        for op, ref, x in cases:
            y = ref(x)
            cotangent = torch.randn(y.shape, dtype=torch.float64).to(h.dtype).to(h.device)
            fresh()
            assert_same([_grad(op, x, cotangent)], [_grad(ref, x, cotangent)])


def _grad(fn, x, cotangent):
    x = x.detach().requires_grad_()
    return torch.autograd.grad(fn(x), x, cotangent)[0]


@requires_cuda
@pytest.mark.parametrize("part", range(2))
def test_gpu_fuzz_padding(part):
    """The CUDA padding kernels, bit-exact, with a poisoned allocator: 2 x 50 examples."""
    @seed(7000 + part)
    @_settings(50)
    @given(pad_examples("cuda", 300 if part == 0 else 5000, 8 if part == 0 else 3,
                        [(), (1,), (3,), (8,), (33,), (2, 5), (130,)] if part == 0 else [(), (3,), (2, 5)]))
    def run(ex):
        check_padding(ex)

    run()


@seed(20240613)
@_settings(60, shrink=True)
@given(pad_examples("cpu", 129, 5, [(), (1,), (3,), (8,), (2, 5)]))
def test_cpu_fuzz_padding(ex):
    """The CPU padding kernels, bit-exact against reference.py, forward and gradients."""
    check_padding(ex)


# ---------------------------------------------------------------- reproducers


@seed(20240614)
@_settings(40)
@given(st.one_of(st.sampled_from(GPU_KEYS).flatmap(lambda key: attention_examples(key, GPU, "cuda")),
                 kernel_keys(["float32", "float16", FP8], INTERP_DIMS, INTERP).flatmap(
                     lambda key: attention_examples(key, INTERP, "cpu", launchers=True)),
                 pad_examples("cuda", 300, 8, [(), (3,), (2, 5)])))
def test_reproducers_compile(ex):
    """Every kind of reproducer (GPU, interpreter, padding) is valid Python."""
    compile(ex.reproducer(), "<reproducer>", "exec")


CPU_REPRODUCER_EXAMPLES = [
    AttnExample("cpu", "float32", (17, 0, 5), (9, 3, 5), 2, 2, 8, 16, causal=True, softcap=2.0, alibi="batch",
                dropout_p=0.25, rng=(2**40 + 3, 7), pads_q=(1, 0, 2), pads_k=(0, 2, 1), tail_q=3, tail_k=2,
                lse_grad=False, seed=5),
    AttnExample("cpu", "float64", (6, 1), (4, 9), 1, 2, 5, 7, window=(3, 1), seed=6),
    AttnExample("cpu", FP8, (7, 0, 12), (9, 3, 12), 2, 3, 32, 16, causal=True, pads_k=(1, 0, 2),
                descales=("head", None, "tensor"), seed=7),
    PadExample("cpu", "bfloat16", 3, 9, (2, 3), (("prefix", 4), ("empty", 0), ("scattered", 60)),
               mask_dtype="int64", mask_values=True, unused=True, capacity_extra=5, concat=((2, 3), (), (9,)), seed=8),
]


@pytest.mark.parametrize("index", range(len(CPU_REPRODUCER_EXAMPLES)))
def test_cpu_reproducer_rebuilds_the_inputs_and_runs(index, poisoned, monkeypatch):
    """A reproducer builds exactly the inputs the test checks (its first part is the example's
    source), runs standalone from the repository root, and passes where the test passes."""
    ex = CPU_REPRODUCER_EXAMPLES[index]
    monkeypatch.setattr(sys, "path", list(sys.path))  # the FP8 reproducer adds test/
    script = ex.reproducer()
    compile(script, "<reproducer>", "exec")
    ns, again = run_source(ex.source()), run_source(script.split("\nimport torch_varlen\n")[0])
    for name in ("q", "k", "v", "descales", "kwargs", "dropout", "hidden", "attention_mask", "unused_mask",
                 "attention_mask_in_length"):
        if name in ns:
            a, b = ns[name], again[name]
            pairs = list(zip(a.values(), b.values())) if isinstance(a, dict) else [(a, b)]
            for x, y in pairs:
                if isinstance(x, torch.Tensor):
                    x, y = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (x, y))
                    assert torch.equal(x, y), name
                else:
                    assert x == y, name
    monkeypatch.chdir(REPO)  # FP8 reproducers import test/ from the repository root
    run_source(script, "<reproducer>")
    (check_padding if isinstance(ex, PadExample) else check_attention)(ex)


def test_failure_message_carries_the_reproducer():
    ex = PadExample("cpu", "float32", 1, 3, (), (("full", 0),), seed=1)
    with pytest.raises(AssertionError, match=r"(?s)ValueError: boom.*Standalone reproducer.*torch.manual_seed\(1\)"):
        with reproducer_on_failure(ex):
            raise ValueError("boom")


# ---------------------------------------------------------------- compute-sanitizer


def example_from_key(key: KernelKey, lengths_q, lengths_k, seed, device="cuda", **overrides) -> AttnExample:
    """A fixed example of a GPU kernel key (the same Triton specialisations as the fuzz examples
    of that key, so the compiled kernels are shared), at the given lengths."""
    causal, window = {"full": (False, (-1, -1)), "causal": (True, (-1, -1)), "window": (True, (8, -1))}[key.mask]
    pads = tuple(1 + i % 3 for i in range(len(lengths_q)))
    fields = dict(causal=causal, window=window, softcap=2.0 if key.softcap else 0.0, alibi=key.alibi,
                  dropout_p=0.3 if key.dropout else 0.0, rng=(2**40 + 12345, 6) if key.dropout else (0, 0),
                  pads_q=pads if "q" in key.pad else None, pads_k=pads if "k" in key.pad else None,
                  descales=key.descales, fp8_pv=key.fp8_pv, sink=key.sink, seed=seed)
    return AttnExample(device, key.dtype, tuple(lengths_q), tuple(lengths_k), key.nheads_k, key.group, key.headdim,
                       key.headdim_v, **{**fields, **overrides})


def _pick(**want) -> KernelKey:
    """The first GPU key with the given field values (a callable value is a predicate)."""
    for key in GPU_KEYS:
        if all(v(getattr(key, n)) if callable(v) else getattr(key, n) == v for n, v in want.items()):
            return key
    raise LookupError(f"no GPU key with {want}")


# Fixed examples replayed under compute-sanitizer, built from GPU keys: tiny shapes (the tools
# are 10-100x slower), tile edges, every feature, both FP8 P @ V variants and float64.
_LQ, _LK = (37, 0, 130, 1), (20, 5, 140, 9)
SANITIZER_ATTENTION = [
    example_from_key(_pick(dtype="bfloat16", mask="causal", pad=lambda p: "q" in p), _LQ, _LK, 1, tail_q=5),
    example_from_key(_pick(dtype="float16", mask="window", dropout=True), (17, 33), (64, 15), 2, lse_grad=False),
    example_from_key(_pick(dtype="float32", headdim=5), (65, 1, 16), (65, 0, 31), 3, tail_q=7, tail_k=5),
    example_from_key(_pick(dtype="bfloat16", headdim=256), (129, 63), (129, 64), 4),
    example_from_key(_pick(dtype="float16", alibi="batch", softcap=True), (1, 128, 15), (1, 127, 17), 5,
                     softmax_scale=0.3),
    example_from_key(_pick(dtype="float64"), (33, 2), (16, 40), 6),
    example_from_key(_pick(dtype=FP8, fp8_pv=True), (31, 65), (31, 65), 7),
    example_from_key(_pick(dtype=FP8, descales=lambda d: "head" in d, pad=lambda p: "k" in p), (33, 0, 64),
                     (40, 7, 64), 8),
    example_from_key(_pick(dtype=FP8, headdim=256), (16, 17), (40, 1), 9, tail_q=3),
]
SANITIZER_PADDING = [
    PadExample("cuda", "bfloat16", 5, 37, (3,), (("prefix", 20), ("empty", 0), ("full", 0), ("scattered", 50),
                                                  ("prefix", 1)), unused=True, capacity_extra=7,
               concat=((3, 4), (), (37,), (1, 1, 1), (10,)), seed=10),
    PadExample("cuda", "float32", 2, 4097, (), (("scattered", 70), ("full", 0)), mask_dtype="int32", mask_values=True,
               capacity_extra=1, concat=((4000, 97), (5,)), seed=11),
    PadExample("cuda", "int64", 3, 65, (2, 5), (("empty", 0), ("empty", 0), ("empty", 0)), mask_dtype="uint8",
               concat=((), (), ()), seed=12),
]
RACECHECK_ATTENTION = [  # shared-memory hazards: the smallest dims of three dtypes, tiny lengths
    example_from_key(_pick(dtype="bfloat16", headdim=8), (9, 17), (12, 17), 21),
    example_from_key(_pick(dtype="float32", headdim=5), (16, 3), (20, 3), 22),
    example_from_key(_pick(dtype="float16", headdim=16), (7, 0), (33, 2), 23, lse_grad=False),
]


@pytest.mark.parametrize("index", range(len(SANITIZER_ATTENTION) + len(SANITIZER_PADDING) + len(RACECHECK_ATTENTION)))
def test_sanitizer_examples_pass_on_cpu(index, poisoned):
    """The fixed compute-sanitizer examples are valid cases: on the CPU kernels they pass the
    fuzz checks and replay() runs them; their reproducers compile."""
    ex = (SANITIZER_ATTENTION + SANITIZER_PADDING + RACECHECK_ATTENTION)[index]
    compile(ex.reproducer(), "<reproducer>", "exec")
    ex = dataclasses.replace(ex, device="cpu", **({"fp8_pv": None} if isinstance(ex, AttnExample) else {}))
    (check_padding if isinstance(ex, PadExample) else check_attention)(ex)
    replay([ex])


def replay(examples):
    """Run each example's kernels (forward, backward; FP8 forward; every padding op and its
    gradient), synchronizing after each: the body of the compute-sanitizer children."""
    for ex in examples:
        ns = run_source(ex.source())
        if isinstance(ex, PadExample):
            h, m, u, aml = ns["hidden"], ns["attention_mask"], ns["unused_mask"], ns["attention_mask_in_length"]
            h = h.requires_grad_() if h.dtype.is_floating_point else h
            rows, idx, _, _, _ = torch_varlen.unpad_input(h, m, u)
            cap = torch_varlen.unpad_input(h, m, u, capacity=idx.numel() + ex.capacity_extra)
            outs = [rows, cap[0], torch_varlen.pad_input(rows, idx, ex.batch, ex.seqlen),
                    torch_varlen.pad_input(cap[0], cap[1], ex.batch, ex.seqlen),
                    torch.ops.varlen.gather_rows(h, cap[1]),
                    torch_varlen.unpad_input_for_concatenated_sequences(h, aml)[0]]
            if h.requires_grad:
                torch.autograd.backward([o.float().sum() for o in outs])
        elif ex.fp8:
            s = Fp8Sample.__new__(Fp8Sample)
            s.q, s.k, s.v, s.kwargs, s.descales = ns["q"], ns["k"], ns["v"], ns["kwargs"], ns["descales"]
            s.cu_q, s.cu_k, s.max_q, s.max_k = (ns[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                                                  "max_seqlen_k"))
            args, kwargs = s.to(ex.device)
            torch_varlen.varlen_attention(*args, **kwargs)
            if ex.fp8_pv is not None:
                _fp8_launcher_forward(args, kwargs, ex.fp8_pv)
        else:
            s = _sample(ex, ns)
            do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64, device=s.q.device)
            dlse = torch.randn(s.q.shape[1], s.q.shape[0], dtype=torch.float64, device=s.q.device)
            _run_op(s, do, dlse * ex.lse_grad, **ns["dropout"])
        if ex.device == "cuda":
            torch.cuda.synchronize()


def _sanitizer():
    """compute-sanitizer on PATH, else in CUDA_HOME/bin; None when neither has it."""
    found = shutil.which("compute-sanitizer")
    if found is None:
        from torch.utils.cpp_extension import CUDA_HOME

        candidate = Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "compute-sanitizer"
        found = str(candidate) if candidate.exists() else None
    return found


_REPLAY_SCRIPT = textwrap.dedent("""
    import sys
    import test_fuzz
    for name in sys.argv[1:]:
        test_fuzz.replay(getattr(test_fuzz, name))
""")


def _replay_env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "test")]),
               TORCH_VARLEN_ATTENTION_BACKEND="torch_varlen",
               # one cudaMalloc per tensor: an access past a tensor's end is outside any allocation
               PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_replay_child_runs():
    """The sanitizer children's script, without a sanitizer, on CPU examples (CI): it imports
    and replays in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _REPLAY_SCRIPT, "CPU_REPRODUCER_EXAMPLES"], cwd=REPO,
                          env=_replay_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _run_sanitizer(tool, *example_lists):
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH (nor in CUDA_HOME/bin)")
    proc = subprocess.run(
        [sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", _REPLAY_SCRIPT, *example_lists],
        cwd=REPO, env=_replay_env(), capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    tail = out[-6000:]
    assert proc.returncode == 0, tail
    # memcheck ends with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY: ... (N errors"
    summary = "ERROR SUMMARY: 0 errors" if tool == "memcheck" else "RACECHECK SUMMARY:"
    assert summary in out, tail
    assert not re.search(r"ERROR SUMMARY: [1-9]", out), tail
    return out


@requires_cuda
def test_gpu_compute_sanitizer_memcheck_fuzz_corpus():
    """memcheck over SANITIZER_ATTENTION (forward, backward: delta, dK/dV, dQ; FP8 forward with P @ V
    in FP8 and in float16; float64) and SANITIZER_PADDING (unpad eager and capacity, pad,
    gather_rows, unpad_concat, and their gradients): no error."""
    examples = "SANITIZER_ATTENTION" if _float64_supported() else "SANITIZER_ATTENTION_NO_FLOAT64"
    _run_sanitizer("memcheck", examples, "SANITIZER_PADDING")


SANITIZER_ATTENTION_NO_FLOAT64 = [ex for ex in SANITIZER_ATTENTION if ex.dtype != "float64"]


@requires_cuda
def test_gpu_compute_sanitizer_racecheck_backward():
    """racecheck (shared-memory hazards) over the forward and backward of RACECHECK_ATTENTION."""
    out = _run_sanitizer("racecheck", "RACECHECK_ATTENTION")
    for line in re.findall(r"RACECHECK SUMMARY:.*", out):
        assert re.search(r"\(0 errors", line), line
