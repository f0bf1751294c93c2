"""Argument validation of varlen::attention_forward / attention_backward: each bad input raises
the same message on every device, so one regex matches them all.

Devices:
- ``cpu``: the op on CPU tensors (the C++ kernel's TORCH_CHECKs).
- ``cuda``: the op on CUDA tensors (the Triton launchers: meta/attention.py's checks on the host,
  kernels/checks.py's device asserts for cu_seqlens values). A device assert leaves the CUDA
  context unusable, so each value case runs in a child process that must fail with the
  message in its output.
- ``interp``: the registered CUDA kernels (torch_varlen.kernels._attention_*_cuda) on CPU
  tensors under ``TRITON_INTERPRET=1``, where the device asserts raise in the call: CI's check
  of the CUDA path. ``test_triton_interpreter_subprocess`` runs those ``test_interp_*`` tests in
  a child pytest with the variable set (it must be set before the kernels are defined).

Messages of value checks on the device carry no values (a device assert's message is a string
constant), so their regexes match the CPU's message up to its first value.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

import torch_varlen  # noqa: F401  (registers torch.ops.varlen)
from conftest import requires_cuda
from interp_child import run_interpreter_tests
from samples import cu_seqlens, make_attention_sample

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REPO = Path(__file__).resolve().parent.parent

if INTERPRET:
    from test_attention_triton import _fix_interpreter_scalar_index

    _fix_interpreter_scalar_index()

interp_only = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child of test_triton_interpreter_subprocess")

_ops = torch.ops.varlen
FWD = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
       "softmax_scale", "window_left", "window_right", "softcap", "alibi_slopes",
       "cu_seqlens_q_padded", "cu_seqlens_k_padded", "dropout_p", "rng_state", "deterministic",
       "q_descale", "k_descale", "v_descale", "backend")
BWD = ("grad_out", "q", "k", "v", "out", "softmax_lse", "cu_seqlens_q", "cu_seqlens_k",
       "max_seqlen_q", "max_seqlen_k", "softmax_scale", "window_left", "window_right", "softcap",
       "alibi_slopes", "cu_seqlens_q_padded", "cu_seqlens_k_padded", "dropout_p", "rng_state",
       "deterministic", "grad_lse", "backend")


# ---------------------------------------------------------------- calls


def _args(op, device):
    """Valid arguments, by schema name: 3 sequences (lengths 2, 4, 3: 9 rows), 4 query heads,
    2 kv heads, head dims 8; backward tensors random in the right shapes (every case fails
    before a kernel reads them)."""
    s = make_attention_sample([2, 4, 3], [2, 4, 3], 4, 2, 8, 8, device, torch.float32)
    a = dict(q=s.q, k=s.k, v=s.v, cu_seqlens_q=s.cu_seqlens_q, cu_seqlens_k=s.cu_seqlens_k,
             max_seqlen_q=4, max_seqlen_k=4, softmax_scale=8 ** -0.5, window_left=-1,
             window_right=-1, softcap=0.0, alibi_slopes=None, cu_seqlens_q_padded=None,
             cu_seqlens_k_padded=None, dropout_p=0.0, rng_state=None, deterministic=False,
             q_descale=None, k_descale=None, v_descale=None, backend="torch_varlen")
    if op == "bwd":
        a.update(grad_out=torch.randn(9, 4, 8, device=device), out=torch.randn(9, 4, 8, device=device),
                 softmax_lse=torch.randn(4, 9, device=device), grad_lse=None)
    return a


def _other_device(device):
    """A device other than the tensors': the CPU for CUDA tensors, meta for CPU tensors."""
    return "cpu" if device == "cuda" else "meta"


def _tensor_device(device):
    return "cpu" if device == "interp" else device


def _call(case, device):
    """Run case's op with its bad arguments on device ("cpu", "cuda" or "interp")."""
    tdev = _tensor_device(device)
    a = _args(case.op, tdev)
    a.update(case.over(a, _other_device(device)))
    names = FWD if case.op == "fwd" else BWD
    if device == "interp":
        from torch_varlen import kernels

        fn = kernels._attention_forward_cuda if case.op == "fwd" else kernels._attention_backward_cuda
    else:
        fn = _ops.attention_forward if case.op == "fwd" else _ops.attention_backward
    return fn(*(a[n] for n in names))


# ---------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    name: str
    op: str  # "fwd" or "bwd"
    match: str  # one regex for every device's message
    over: Callable  # (valid args, another device) -> the arguments to replace
    values: bool = False  # a check of cu_seqlens values (a device assert on CUDA)
    exc: tuple = (RuntimeError,)

    def __str__(self):
        return self.name


def _cu(**lists):
    """Replace cu_seqlens tensors by int32 ones with these values, on the tensors' device."""
    return lambda a, o: {n: torch.tensor(v, dtype=torch.int32, device=a["q"].device)
                         for n, v in lists.items()}


def _to(name, **kw):
    return lambda a, o: {name: a[name].to(**kw)}


def _on_other(name):
    return lambda a, o: {name: a[name].to(o)}


def _fp8(extra=None):
    def over(a, o):
        r = {n: a[n].to(torch.float8_e4m3fn) for n in ("q", "k", "v")}
        r.update(extra(a, o) if extra else {})
        return r
    return over


def _dev(a):
    return re.escape(str(a["q"].device))


def _large_batch(cu_k_edit=None, padded_q_edit=None):
    """2000 sequences of length 1 (one loop step of the device check is 1024 entries), with
    cu_seqlens_k or cu_seqlens_q_padded edited at a late index."""
    def over(a, o):
        dev = a["q"].device
        n = 2000
        r = dict(q=torch.randn(n, 4, 8, device=dev), k=torch.randn(n, 2, 8, device=dev),
                 v=torch.randn(n, 2, 8, device=dev), cu_seqlens_q=cu_seqlens([1] * n, dev),
                 cu_seqlens_k=cu_seqlens([1] * n, dev))
        if a.get("grad_out") is not None:
            r.update(grad_out=torch.randn(n, 4, 8, device=dev), out=torch.randn(n, 4, 8, device=dev),
                     softmax_lse=torch.randn(4, n, device=dev))
        if cu_k_edit:
            r["cu_seqlens_k"] = r["cu_seqlens_k"].clone()
            r["cu_seqlens_k"][cu_k_edit[0]] = cu_k_edit[1]
        if padded_q_edit:
            r["q"] = torch.randn(2 * n, 4, 8, device=dev)
            if "grad_out" in r:
                r.update(grad_out=torch.randn(2 * n, 4, 8, device=dev),
                         out=torch.randn(2 * n, 4, 8, device=dev),
                         softmax_lse=torch.randn(4, 2 * n, device=dev))
            starts = torch.arange(0, 2 * n + 1, 2, dtype=torch.int32, device=dev)
            starts[padded_q_edit[0]] = padded_q_edit[1]
            r["cu_seqlens_q_padded"] = starts
        return r
    return over


# Arguments both ops take (checked by check_attention_shapes on every device), as (name,
# regex, over); their values checks are in _VALUE_CASES.
_SHARED = [
    ("q_2d", r"q must be \(total, nheads, headdim\), got shape \(4, 8\)", lambda a, o: dict(q=a["q"][0])),
    ("k_2d", r"k must be \(total, nheads, headdim\), got shape \(2, 8\)", lambda a, o: dict(k=a["k"][0])),
    ("v_2d", r"v must be \(total, nheads, headdim\), got shape \(2, 8\)", lambda a, o: dict(v=a["v"][0])),
    ("qkv_int", r"q must be float16, bfloat16, float32 or float64 \(or float8_e4m3fn for the FP8 "
     r"forward\), got torch.int32", lambda a, o: {n: a[n].int() for n in ("q", "k", "v")}),
    ("k_float64", "q, k and v must share a dtype, got torch.float32, torch.float64, torch.float32",
     _to("k", dtype=torch.float64)),
    ("v_float16", "q, k and v must share a dtype, got torch.float32, torch.float32, torch.float16",
     _to("v", dtype=torch.float16)),
    ("q_other_device", "q, k and v must be on one device", _on_other("q")),
    ("k_other_device", "q, k and v must be on one device", _on_other("k")),
    ("v_other_device", "q, k and v must be on one device", _on_other("v")),
    ("k_headdim", "q and k must have the same head dim, got 8 and 6",
     lambda a, o: dict(k=a["k"][..., :6].contiguous())),
    ("v_rows", r"v must be \(total_k, nheads_k, headdim_v\) with k's first two dims \(9, 2\), "
     r"got \(5, 2, 8\)", lambda a, o: dict(v=a["v"][:5])),
    ("nheads_k_3", r"nheads \(4\) must be divisible by nheads_k \(3\)",
     lambda a, o: dict(k=a["k"][:, :1].repeat(1, 3, 1), v=a["v"][:, :1].repeat(1, 3, 1))),
    ("cu_q_int64", "cu_seqlens_q must be int32, got torch.int64", _to("cu_seqlens_q", dtype=torch.int64)),
    ("cu_k_int64", "cu_seqlens_k must be int32, got torch.int64", _to("cu_seqlens_k", dtype=torch.int64)),
    ("cu_q_2d", r"cu_seqlens_q must be 1-D of shape \(batch\+1,\), got \(1, 4\)",
     lambda a, o: dict(cu_seqlens_q=a["cu_seqlens_q"][None])),
    ("cu_q_empty", r"cu_seqlens_q must be 1-D of shape \(batch\+1,\), got \(0,\)",
     lambda a, o: dict(cu_seqlens_q=a["cu_seqlens_q"][:0])),
    ("cu_k_short", r"cu_seqlens_k must have batch\+1 = 4 entries like cu_seqlens_q, got 3",
     lambda a, o: dict(cu_seqlens_k=a["cu_seqlens_k"][:3])),
    ("cu_q_other_device", "cu_seqlens_q must be on q's device", _on_other("cu_seqlens_q")),
    ("cu_k_other_device", "cu_seqlens_k must be on q's device", _on_other("cu_seqlens_k")),
    ("cu_q_padded_int64", "cu_seqlens_q_padded must be int32, got torch.int64",
     lambda a, o: dict(cu_seqlens_q_padded=a["cu_seqlens_q"].long())),
    ("cu_k_padded_long", r"cu_seqlens_k_padded must have batch\+1 = 4 entries like cu_seqlens_q, got 5",
     lambda a, o: dict(cu_seqlens_k_padded=torch.cat([a["cu_seqlens_k"], a["cu_seqlens_k"][-1:]]))),
    ("cu_k_padded_other_device", "cu_seqlens_k_padded must be on q's device",
     lambda a, o: dict(cu_seqlens_k_padded=a["cu_seqlens_k"].to(o))),
    ("alibi_3", r"alibi_slopes must be \(nheads,\) = \(4,\) or \(batch, nheads\) = \(3, 4\), got \(3,\)",
     lambda a, o: dict(alibi_slopes=torch.ones(3, device=a["q"].device))),
    ("alibi_4x4", r"alibi_slopes must be \(nheads,\) = \(4,\) or \(batch, nheads\) = \(3, 4\), got \(4, 4\)",
     lambda a, o: dict(alibi_slopes=torch.ones(4, 4, device=a["q"].device))),
    ("alibi_float64", "alibi_slopes must be float32, got torch.float64",
     lambda a, o: dict(alibi_slopes=torch.ones(4, device=a["q"].device, dtype=torch.float64))),
    ("alibi_other_device", "alibi_slopes must be on q's device",
     lambda a, o: dict(alibi_slopes=torch.ones(4, device=o))),
    ("window_left", r"window_size entries must be >= -1 \(-1 = unbounded\), got \(-2, -1\)",
     lambda a, o: dict(window_left=-2)),
    ("window_right", r"window_size entries must be >= -1 \(-1 = unbounded\), got \(-1, -3\)",
     lambda a, o: dict(window_right=-3)),
    ("softcap", r"softcap must be >= 0 \(0 = off\), got -1.0", lambda a, o: dict(softcap=-1.0)),
    ("dropout_1", r"dropout_p must be in \[0, 1\), got 1.0", lambda a, o: dict(dropout_p=1.0)),
    ("dropout_negative", r"dropout_p must be in \[0, 1\), got -0.5", lambda a, o: dict(dropout_p=-0.5)),
    ("dropout_no_rng", r"rng_state \(\[seed, offset\] int64\) is required when dropout_p > 0",
     lambda a, o: dict(dropout_p=0.5)),
    ("rng_shape", r"rng_state must be int64 of shape \(2,\), got torch.int64 \(3,\)",
     lambda a, o: dict(dropout_p=0.5, rng_state=torch.zeros(3, dtype=torch.int64, device=a["q"].device))),
    ("rng_int32", r"rng_state must be int64 of shape \(2,\), got torch.int32 \(2,\)",
     lambda a, o: dict(dropout_p=0.5, rng_state=torch.zeros(2, dtype=torch.int32, device=a["q"].device))),
    ("rng_other_device", "rng_state must be on q's device",
     lambda a, o: dict(dropout_p=0.5, rng_state=torch.zeros(2, dtype=torch.int64, device=o))),
    ("backend", r"backend must be None, 'auto'.*got 'bogus'", lambda a, o: dict(backend="bogus")),
]

_FWD_ONLY = [
    ("q_descale_not_fp8", r"q_descale is only for float8_e4m3fn q, k and v \(FP8 attention\), got q "
     r"of dtype torch.float32", lambda a, o: dict(q_descale=torch.ones(1, device=a["q"].device))),
    ("v_descale_not_fp8", "v_descale is only for float8_e4m3fn q, k and v",
     lambda a, o: dict(v_descale=torch.ones(1, device=a["q"].device))),
    ("fp8_dropout", r"dropout is not supported with float8_e4m3fn q, k and v \(FP8 attention is "
     r"inference only\), got dropout_p=0.25",
     _fp8(lambda a, o: dict(dropout_p=0.25, rng_state=torch.zeros(2, dtype=torch.int64, device=a["q"].device)))),
    ("fp8_q_descale_float64", "q_descale must be float32, got torch.float64",
     _fp8(lambda a, o: dict(q_descale=torch.ones(1, device=a["q"].device, dtype=torch.float64)))),
    ("fp8_k_descale_shape", r"k_descale must be \(1,\) \(per tensor\) or \(batch, nheads_k\) = \(3, 2\), "
     r"got \(3, 4\)", _fp8(lambda a, o: dict(k_descale=torch.ones(3, 4, device=a["q"].device)))),
    ("fp8_v_descale_shape", r"v_descale must be \(1,\) \(per tensor\) or \(batch, nheads_k\) = \(3, 2\), "
     r"got \(2,\)", _fp8(lambda a, o: dict(v_descale=torch.ones(2, device=a["q"].device)))),
    ("fp8_v_descale_other_device", "v_descale must be on q's device",
     _fp8(lambda a, o: dict(v_descale=torch.ones(1, device=o)))),
]

_BWD_ONLY = [
    ("grad_out_shape", r"grad_out must have shape \(9, 4, 8\), got \(9, 4, 7\)",
     lambda a, o: dict(grad_out=a["grad_out"][..., :7])),
    ("grad_out_2d", r"grad_out must have shape \(9, 4, 8\), got \(9, 4\)",
     lambda a, o: dict(grad_out=a["grad_out"][..., 0])),
    ("grad_out_float64", "grad_out must be torch.float32, got torch.float64",
     _to("grad_out", dtype=torch.float64)),
    ("grad_out_other_device", "grad_out must be on q's device", _on_other("grad_out")),
    ("out_shape", r"out must have shape \(9, 4, 8\), got \(8, 4, 8\)", lambda a, o: dict(out=a["out"][:8])),
    ("out_float16", "out must be torch.float32, got torch.float16", _to("out", dtype=torch.float16)),
    ("out_other_device", "out must be on q's device", _on_other("out")),
    ("lse_shape", r"softmax_lse must have shape \(4, 9\), got \(9, 4\)",
     lambda a, o: dict(softmax_lse=a["softmax_lse"].t())),
    ("lse_float64", "softmax_lse must be torch.float32, got torch.float64",
     _to("softmax_lse", dtype=torch.float64)),
    ("lse_other_device", "softmax_lse must be on q's device", _on_other("softmax_lse")),
    ("grad_lse_shape", r"grad_lse must have shape \(4, 9\), got \(4, 3\)",
     lambda a, o: dict(grad_lse=a["softmax_lse"][:, :3])),
    ("grad_lse_float64", "grad_lse must be torch.float32, got torch.float64",
     lambda a, o: dict(grad_lse=a["softmax_lse"].double())),
    ("grad_lse_other_device", "grad_lse must be on q's device",
     lambda a, o: dict(grad_lse=a["softmax_lse"].to(o))),
    ("fp8", "FP8 attention is forward-only: there is no backward for float8_e4m3fn q, k, v", _fp8()),
]

# cu_seqlens values (the CPU reads them; CUDA checks them with device asserts), as (name, regex, over).
_VALUES = [
    ("cu_q_start", "cu_seqlens_q must start at 0", _cu(cu_seqlens_q=[1, 2, 6, 9])),
    ("cu_k_start", "cu_seqlens_k must start at 0", _cu(cu_seqlens_k=[-2, 2, 6, 9])),
    ("cu_q_decreasing", "cu_seqlens_q must be non-decreasing", _cu(cu_seqlens_q=[0, 2, 1, 9])),
    ("cu_k_decreasing", "cu_seqlens_k must be non-decreasing", _cu(cu_seqlens_k=[0, 5, 4, 9])),
    ("cu_q_past_rows", r"cu_seqlens_q\[-1\] must be <= q.shape\[0\]", _cu(cu_seqlens_q=[0, 2, 6, 10])),
    ("cu_k_past_rows", r"cu_seqlens_k\[-1\] must be <= k.shape\[0\]", _cu(cu_seqlens_k=[0, 2, 6, 4000])),
    ("cu_q_padded_overlap", r"cu_seqlens_q_padded\[\S+\]( = -?\d+)? must be >= 0 and >= the end of "
     "the previous sequence", _cu(cu_seqlens_q_padded=[0, 2, 4, 9])),
    ("cu_k_padded_overlap_empty", r"cu_seqlens_k_padded\[\S+\]( = -?\d+)? must be >= 0 and >= the "
     "end of the previous sequence", _cu(cu_seqlens_k=[0, 2, 2, 9], cu_seqlens_k_padded=[0, 1, 2, 2])),
    ("cu_k_padded_negative", r"cu_seqlens_k_padded\[\S+\]( = -?\d+)? must be >= 0",
     _cu(cu_seqlens_k_padded=[-1, 2, 6, 9])),
    ("cu_k_padded_past_rows", r"cu_seqlens_k_padded: sequence \S+ occupies rows \[.*\) beyond "
     r"k.shape\[0\]", _cu(cu_seqlens_k_padded=[0, 2, 7, 9])),
    ("large_batch_cu_k_decreasing", "cu_seqlens_k must be non-decreasing", _large_batch(cu_k_edit=(1500, 1490))),
    ("large_batch_cu_q_padded_overlap", r"cu_seqlens_q_padded\[\S+\]( = -?\d+)? must be >= 0 and >= "
     "the end of the previous sequence", _large_batch(padded_q_edit=(1700, 3397))),
]

_FAILS_FIRST = {"backend": (RuntimeError, ValueError)}  # CPU: RuntimeError; CUDA (fa4.select): ValueError


def _cases():
    out = []
    for op, extra in (("fwd", _FWD_ONLY), ("bwd", _BWD_ONLY)):
        for name, match, over in _SHARED + extra:
            out.append(Case(f"{op}_{name}", op, match, over, exc=_FAILS_FIRST.get(name, (RuntimeError,))))
        for name, match, over in _VALUES:
            out.append(Case(f"{op}_{name}", op, match, over, values=True))
    return out


CASES = {c.name: c for c in _cases()}
_HOST = [c for c in CASES.values() if not c.values]
_DEVICE_VALUES = [c for c in CASES.values() if c.values]


# ---------------------------------------------------------------- CPU and CUDA


def test_every_case_has_a_distinct_name():
    assert len(CASES) == len(_cases()) >= 100


@pytest.mark.parametrize("case", list(CASES.values()), ids=str)
def test_cpu_bad_input_raises(case):
    with pytest.raises(case.exc, match=case.match):
        _call(case, "cpu")


@requires_cuda
@pytest.mark.parametrize("case", _HOST, ids=str)
def test_cuda_bad_input_raises(case):
    with pytest.raises(case.exc, match=case.match):
        _call(case, "cuda")


_CHILD = textwrap.dedent("""
    import sys
    import torch
    import test_validation as tv

    tv._call(tv.CASES[sys.argv[1]], "cuda")
    torch.cuda.synchronize()  # raises "device-side assert triggered": the child exits nonzero
""")


@requires_cuda
@pytest.mark.parametrize("case", _DEVICE_VALUES, ids=str)
def test_cuda_bad_cu_seqlens_values_fail_a_device_assert(case):
    """The bad call runs in a child (a device assert leaves its CUDA context unusable), which
    must fail, with the check's message in its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "test"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, case.name], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the bad call did not fail:\n{output[-3000:]}"
    assert re.search(r"Assertion `" + case.match, output), output[-3000:]
    assert "device-side assert" in output, output[-3000:]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_valid_edge_layouts_pass(device):
    """What the checks must accept: empty sequences, rows after the last sequence, padded
    starts with gaps and an empty sequence at the previous end, 2000 sequences (two loop
    steps of the device check)."""
    _valid_edge_layouts(device)


def _valid_edge_layouts(device):
    tdev = _tensor_device(device)
    if device == "interp":
        from torch_varlen import kernels

        fwd, bwd = kernels._attention_forward_cuda, kernels._attention_backward_cuda
    else:
        fwd, bwd = _ops.attention_forward, _ops.attention_backward
    T = lambda *v: torch.tensor(v, dtype=torch.int32, device=tdev)  # noqa: E731
    layouts = [
        (T(0, 2, 2, 5), T(0, 0, 3, 7), None, None, 8, 9),  # empty sequences, spare rows
        (T(0, 2, 2, 5), T(0, 1, 4, 6), T(0, 2, 4, 9), T(0, 2, 6, 9), 9, 9),  # padded, gaps, empty
    ]
    many = cu_seqlens([1] * 2000, tdev)
    if device == "interp":  # the attention kernels would take minutes here: the check alone
        from torch_varlen.kernels.checks import check_cu_seqlens

        check_cu_seqlens(many, many, None, None, 2000, 2000)
        check_cu_seqlens(many, many, torch.arange(0, 4001, 2, dtype=torch.int32), None, 4000, 2000)
    else:
        layouts.append((many, many, None, None, 2000, 2000))
    for cu_q, cu_k, pad_q, pad_k, total_q, total_k in layouts:
        q = torch.randn(total_q, 2, 8, device=tdev)
        k, v = torch.randn(total_k, 1, 8, device=tdev), torch.randn(total_k, 1, 8, device=tdev)
        out, lse = fwd(q, k, v, cu_q, cu_k, 4, 4, 0.3, -1, -1, 0.0, None, pad_q, pad_k, 0.0, None,
                       False, None, None, None, "torch_varlen")
        dq, dk, dv = bwd(torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, 4, 4, 0.3, -1, -1,
                         0.0, None, pad_q, pad_k, 0.0, None, False, None, "torch_varlen")
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    if tdev == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- the CUDA path on the CPU, interpreted


def test_triton_interpreter_subprocess():
    """Runs the test_interp_* tests in a child pytest with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__, "interp_", exact_passed=len(CASES) + 1, timeout=600)


@interp_only
@pytest.mark.parametrize("case", list(CASES.values()), ids=str)
def test_interp_bad_input_raises(case):
    with pytest.raises(case.exc, match=case.match):
        _call(case, "interp")


@interp_only
def test_interp_valid_edge_layouts_pass():
    _valid_edge_layouts("interp")


# ---------------------------------------------------------------- strided cu_seqlens


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_strided_cu_seqlens_give_the_contiguous_result(device):
    """A strided (non-contiguous) cu_seqlens view is read by value, not by its storage."""
    torch.manual_seed(0)
    s = make_attention_sample([5, 0, 9], [4, 3, 9], 4, 2, 16, 16, device, torch.float32, causal=True)
    args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 9, 9, 0.25, -1, 0)
    expect = _ops.attention_forward(*args)
    strided = [torch.stack([c, torch.full_like(c, 10**6)], 1)[:, 0] for c in args[3:5]]
    assert not strided[0].is_contiguous()
    got = _ops.attention_forward(*args[:3], *strided, *args[5:])
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
