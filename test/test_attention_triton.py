"""Triton varlen attention (torch_varlen/kernels/attention.py) against reference.py in float64.

Two halves:
- ``test_interp_*``: the same Triton kernels run on the CPU under ``TRITON_INTERPRET=1`` at tiny
  sizes, so CI (no GPU) tests every kernel change. The interpreter must be switched on before
  the kernels are defined, so ``test_triton_interpreter_subprocess`` runs them in a child pytest
  with that variable set; in this process they skip with a reason that says so.
- ``test_gpu_*``: compiled kernels through the public ops on CUDA (``requires_cuda``).

Numerics follow DESIGN.md: err(kernel) <= 2 * err(reference run in the same dtype) + atol,
errors against the float64 reference; outputs are NaN-poisoned before the kernels run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import torch_varlen
from torch_varlen import reference
from conftest import DEVICES, requires_cuda
from interp_child import run_interpreter_tests
from samples import (assert_compiled_step_matches_eager, attention_sample_inputs, cu_seqlens,
                     make_attention_sample)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REPO = Path(__file__).resolve().parent.parent


def _fix_interpreter_scalar_index():
    """Triton 3.6's interpreter turns a scalar (a 1-element numpy array) into a loop bound with
    int(array), which numpy >= 2.4 rejects for arrays with ndim > 0; read the element instead."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_varlen_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._varlen_fixed = True
    interpreter._patch_lang_tensor = patched


def _fix_interpreter_fp8_casts():
    """Triton 3.6's interpreter casts to float8 by truncating the mantissa (and flushes some
    subnormals); the GPU rounds to nearest even. Cast float8e4nv <-> 32/16-bit floats the way
    the GPU does, with torch's casts (the interpreter keeps every float as its bits in an
    unsigned array)."""
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    if getattr(convert, "_varlen_fixed", False):
        return
    types = {tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8), tl.bfloat16: (torch.bfloat16, torch.int16),
             tl.float16: (torch.float16, torch.int16), tl.float32: (torch.float32, torch.int32)}

    def patched(input, input_dtype, output_dtype, rounding_mode):
        if tl.float8e4nv in (input_dtype, output_dtype) and input_dtype in types and output_dtype in types:
            (src, src_bits), (dst, dst_bits) = types[input_dtype], types[output_dtype]
            bits = torch.from_numpy(input.reshape(-1).copy()).view(src_bits)
            out = bits.view(src).to(dst).view(dst_bits).numpy()
            return out.view(f"uint{out.dtype.itemsize * 8}").reshape(input.shape)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    patched._varlen_fixed = True
    interpreter._convert_float = patched


if INTERPRET:
    _fix_interpreter_scalar_index()
    _fix_interpreter_fp8_casts()

from torch_varlen.kernels import attention as triton_attention  # noqa: E402


@pytest.fixture(autouse=True)
def our_kernels(monkeypatch):
    """These tests are about the Triton kernels: with FlashAttention-4 installed, backend "auto"
    would run FA4 for most calls (test_fa4_backend.py tests that path), and on a Hopper GPU
    "torch_varlen" runs the forward on kernels/hopper.py where it can (test_hopper_attention.py
    tests that path; TORCH_VARLEN_HOPPER=0 turns it off, in sanitizer children too)."""
    monkeypatch.setenv("TORCH_VARLEN_HOPPER", "0")
    with torch_varlen.attention_backend("torch_varlen"):
        yield


@pytest.fixture(autouse=INTERPRET)
def interpreter_bounds_check():
    """Under the interpreter, fail any load or store (mask on) outside the storages of the
    kernel's tensor arguments: a CPU stand-in for compute-sanitizer's memcheck."""
    from triton.runtime import interpreter

    ranges = []
    init_args = interpreter.GridExecutor._init_args_hst

    def init_args_recording(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges.clear()
        for a in list(args_hst) + list(kwargs_hst.values()):
            if isinstance(a, torch.Tensor):
                st = a.untyped_storage()
                ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        return args_hst, kwargs_hst

    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store

    def check(ptrs, mask, what):
        import numpy as np

        size = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        p = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64)
        ok = np.zeros(p.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (p >= lo) & (p + size <= hi)
        assert ok.all(), f"out-of-bounds {what} of {int((~ok).sum())} elements"

    def checked_load(ptrs, mask, *args):
        check(ptrs, mask, "load")
        return load(ptrs, mask, *args)

    def checked_store(ptrs, value, mask, *args):
        check(ptrs, mask, "store")
        return store(ptrs, value, mask, *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(interpreter.GridExecutor, "_init_args_hst", init_args_recording)
    mp.setattr(builder, "create_masked_load", checked_load)
    mp.setattr(builder, "create_masked_store", checked_store)
    yield
    mp.undo()


interp_only = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child of test_triton_interpreter_subprocess")


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(triton_attention, "_poison_outputs", True)


# ---------------------------------------------------------------- helpers


def _finite(lse):
    return lse.masked_fill(~torch.isfinite(lse), 0)


def _reference(s, dtype, do, dlse, dropout_p=0.0, rng_state=None):
    """reference.attention in `dtype` -> (out, lse, dq, dk, dv) with the loss sum(out*do) + sum(lse*dlse)."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (s.q, s.k, s.v))
    out, lse, _ = reference.attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, dropout_p=dropout_p,
                                      rng_state=rng_state, **s.kwargs)
    loss = (out.double() * do).sum() + (_finite(lse).double() * dlse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out, lse, dq, dk, dv


def _launch_args(s, dropout_p=0.0, rng_state=None, deterministic=False):
    kw = s.kwargs
    left, right = kw.get("window_size", (-1, -1))
    if kw.get("causal", False):
        right = 0
    scale = kw.get("softmax_scale") or s.q.shape[-1] ** -0.5
    return ((s.q.detach(), s.k.detach(), s.v.detach(), s.cu_seqlens_q, s.cu_seqlens_k,
             s.max_seqlen_q, s.max_seqlen_k, scale, left, right, kw.get("softcap", 0.0),
             kw.get("alibi_slopes"), kw.get("cu_seqlens_q_padded"), kw.get("cu_seqlens_k_padded"),
             dropout_p, rng_state, deterministic))


def _run_launchers(s, do, dlse, dropout_p=0.0, rng_state=None, deterministic=False):
    """The Triton launchers called directly (CPU under the interpreter, or CUDA)."""
    args = _launch_args(s, dropout_p, rng_state, deterministic)
    out, lse = triton_attention.attention_forward(*args)
    dq, dk, dv = triton_attention.attention_backward(
        do.to(s.q.dtype), *args[:3], out, lse, *args[3:], grad_lse=dlse.to(lse.dtype))
    return out, lse, dq, dk, dv


def _run_op(s, do, dlse, dropout_p=0.0, rng_state=None, deterministic=False):
    """The public API with autograd (dispatches to the registered CUDA kernels)."""
    q, k, v = (x.detach().requires_grad_() for x in (s.q, s.k, s.v))
    out, lse = torch_varlen.varlen_attention(
        q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k,
        dropout_p=dropout_p, rng_state=rng_state, deterministic=deterministic, **s.kwargs)
    loss = (out.double() * do).sum() + (_finite(lse).double() * dlse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _check(s, run, *, dropout_p=0.0, rng_state=None, atol=None):
    """run(s, do, dlse, ...) against the float64 reference, with the 2x same-dtype rule."""
    dtype = s.q.dtype
    atol = atol if atol is not None else (1e-5 if dtype == torch.float32 else 2e-3)
    do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64, device=s.q.device)
    dlse = torch.randn(s.q.shape[1], s.q.shape[0], dtype=torch.float64, device=s.q.device)
    got = run(s, do, dlse, dropout_p=dropout_p, rng_state=rng_state)
    ref64 = _reference(s, torch.float64, do, dlse, dropout_p, rng_state)
    same = _reference(s, dtype, do, dlse, dropout_p, rng_state)
    out, lse = got[0], got[1]
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not out.isnan().any() and not lse.isnan().any()
    # Rows that see no key (or lie outside every sequence): lse -inf exactly where the reference has it.
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref64[1])), s.name
    for name, x, r, m in zip(("out", "lse", "dq", "dk", "dv"), got, ref64, same):
        if name == "lse":
            x, r, m = _finite(x), _finite(r), _finite(m.to(x.dtype))
        assert not x.isnan().any(), f"{s.name}: {name} has NaN (an unwritten row?)"
        err, err_same = _err(x, r), _err(m, r)
        assert err <= 2 * err_same + atol, f"{s.name}: {name} err {err:.3g} > 2 * {err_same:.3g} + {atol}"


def _long_samples(device, dtype):
    """Several blocks per sequence at the interpreter's tile sizes, every feature."""
    mk = lambda *a, **kw: make_attention_sample(*a, device=device, dtype=dtype, **kw)
    slopes = (torch.rand(4) * 0.3 + 0.05).float().to(device)
    yield mk([37, 0, 17, 33], [20, 5, 40, 33], 4, 2, 32, 16, causal=True, name="long_causal_gqa")
    yield mk([37, 1, 33], [37, 3, 30], 4, 1, 16, 32, window_size=(7, 3), pad_q=3, pad_k=2,
             name="long_window_padded_mqa")
    yield mk([38, 21], [29, 39], 4, 2, 16, 16, softcap=3.0, alibi_slopes=slopes,
             window_size=(-1, 5), name="long_softcap_alibi_right_window")


# ---------------------------------------------------------------- CPU, under the interpreter


def test_triton_interpreter_subprocess():
    """Runs the test_interp_* tests in a child pytest with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__, "interp_", min_passed=20)


def _interp_samples():
    return list(attention_sample_inputs("cpu", torch.float32)) + list(_long_samples("cpu", torch.float32))


@interp_only
@pytest.mark.parametrize("index", range(14))
def test_interp_matches_reference(index, poison):
    samples = _interp_samples()
    assert len(samples) == 14
    _check(samples[index], _run_launchers)


@interp_only
def test_interp_float16(poison):
    s = make_attention_sample([19, 0, 33], [25, 2, 33], 2, 1, 16, 16, "cpu", torch.float16,
                              causal=True, pad_k=2, name="fp16")
    _check(s, _run_launchers)


def _check_float64(s, run, *, dropout_p=0.0, rng_state=None, tol=1e-10):
    """run(s, do, dlse, ...) on float64 inputs against reference.attention in float64: out, lse
    (float64) and the gradients within tol (relative to each reference's size, at least 1)."""
    assert s.q.dtype == torch.float64
    do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64, device=s.q.device)
    dlse = torch.randn(s.q.shape[1], s.q.shape[0], dtype=torch.float64, device=s.q.device)
    got = run(s, do, dlse, dropout_p=dropout_p, rng_state=rng_state)
    ref = _reference(s, torch.float64, do, dlse, dropout_p, rng_state)
    assert all(x.dtype == torch.float64 for x in got), [x.dtype for x in got]
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1])), s.name
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        if name == "lse":
            x, r = _finite(x), _finite(r)
        assert not x.isnan().any(), f"{s.name}: {name} has NaN (an unwritten row?)"
        bound = tol * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        assert _err(x, r) <= bound, f"{s.name}: {name} err {_err(x, r):.3g} > {bound:.3g}"


@interp_only
@pytest.mark.parametrize("index", range(14))
def test_interp_float64_matches_reference(index, poison):
    """The float64 path (float64 dots, accumulators, lse, delta and scalars) matches the float64
    reference to ~1e-10 on every sample (causal, window, softcap, ALiBi, GQA/MQA, padded
    cu_seqlens, zero-length sequences, several blocks per sequence)."""
    samples = list(attention_sample_inputs("cpu", torch.float64)) + list(_long_samples("cpu", torch.float64))
    _check_float64(samples[index], _run_launchers)


@interp_only
def test_interp_float64_dropout_and_tail_rows(poison):
    rng = torch.tensor([987654321987, 4242], dtype=torch.int64)
    for s in _long_samples("cpu", torch.float64):
        _check_float64(s, _run_launchers, dropout_p=0.3, rng_state=rng)
    # rows past cu_seqlens[-1]: out 0, lse -inf (float64), zero gradients
    s = make_attention_sample([5, 9], [7, 3], 2, 2, 16, 16, "cpu", torch.float64, causal=True)
    s.q = torch.cat([s.q, torch.randn(21, 2, 16, dtype=torch.float64)])
    s.k = torch.cat([s.k, torch.randn(30, 2, 16, dtype=torch.float64)])
    s.v = torch.cat([s.v, torch.randn(30, 2, 16, dtype=torch.float64)])
    _check_float64(s, _run_launchers)
    out, lse, dq, dk, dv = _run_launchers(s, torch.randn(35, 2, 16), torch.randn(2, 35))
    assert lse.dtype == torch.float64 and torch.isneginf(lse[:, 14:]).all()
    assert out[14:].eq(0).all() and dq[14:].eq(0).all() and dk[10:].eq(0).all() and dv[10:].eq(0).all()


def _check_float64_scalars(device, run):
    """softmax_scale, softcap and the dropout scale reach the float64 kernels unrounded: with
    values that float32 cannot hold (1/3, 0.7, 1/(1-0.37)) the results match the float64
    reference to 1e-12, where any one of them rounded to float32 is off by more than 5e-9."""
    rng = torch.tensor([11, 5], dtype=torch.int64, device=device)
    for kw, q_mult in ((dict(softmax_scale=1 / 3), 30.0), (dict(softmax_scale=1 / 3, softcap=0.7), 1.0)):
        s = make_attention_sample([9, 4], [9, 6], 2, 1, 16, 16, device, torch.float64, **kw)
        s.q = s.q * q_mult  # large scores: a scale rounded to float32 would show in lse
        do = torch.randn(s.q.shape[0], 2, 16, dtype=torch.float64, device=device)
        dlse = torch.randn(2, s.q.shape[0], dtype=torch.float64, device=device)
        for p in (0.0, 0.37):
            got = run(s, do, dlse, dropout_p=p, rng_state=rng)
            ref = _reference(s, torch.float64, do, dlse, p, rng)
            for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
                assert _err(x, r) <= 1e-12 * max(1.0, r.abs().max().item()), (kw, p, name, _err(x, r))


def _float64_tile_configs(d):
    """The float64 GPU launch configs (_config's float64 table) for padded head dim d, as
    config overrides for the launchers."""
    cfg = lambda kind: dict(zip(("block_m", "block_n", "warps", "stages"),
                                triton_attention._FP64_CONFIGS[kind][d]))
    return cfg("fwd"), {"dkdv": cfg("dkdv"), "dq": cfg("dq")}


@interp_only
def test_interp_float64_scalars_keep_float64_precision():
    _check_float64_scalars("cpu", _run_launchers)


@interp_only
@pytest.mark.parametrize("headdim", [64, 256])
def test_interp_float64_gpu_tiles(headdim, poison):
    """The float64 GPU tiles (8-row tiles at head dim 256 included) compute the reference's
    numbers, with several blocks per sequence."""
    fwd_cfg, bwd_cfg = _float64_tile_configs(headdim)

    def run(s, do, dlse, **_):
        args = _launch_args(s)
        out, lse = triton_attention.attention_forward(*args, config=fwd_cfg)
        grads = triton_attention.attention_backward(do, *args[:3], out, lse, *args[3:], grad_lse=dlse,
                                                    config=bwd_cfg)
        return (out, lse, *grads)

    slopes = (torch.rand(4) * 0.3 + 0.05).float()
    _check_float64(make_attention_sample([21, 0, 9], [17, 3, 26], 4, 2, headdim, headdim, "cpu", torch.float64,
                                         causal=True, alibi_slopes=slopes, softcap=2.0, pad_q=2), run)
    _check_float64(make_attention_sample([19, 1], [13, 30], 4, 1, headdim, 48, "cpu", torch.float64,
                                         window_size=(6, 2)), run)


@interp_only
@pytest.mark.filterwarnings("ignore:Warning only once for all operators")
def test_interp_float64_gradcheck_through_the_op():
    """gradcheck in float64 through torch_varlen's public op and its registered autograd, with
    the Triton launchers standing in for the CPU kernels (as they serve CUDA)."""
    calls = []

    def fwd(*args):
        calls.append("fwd")
        return triton_attention.attention_forward(*args)

    def bwd(*args):
        calls.append("bwd")
        return triton_attention.attention_backward(*args)

    torch.manual_seed(7)
    slopes = (torch.rand(2) * 0.3 + 0.05).float()
    cases = [
        (make_attention_sample([3, 0, 4], [2, 3, 4], 2, 1, 8, 6, "cpu", torch.float64, requires_grad=True,
                               pad_q=1, pad_k=1, causal=True, softcap=1.5, alibi_slopes=slopes), {}),
        (make_attention_sample([4, 2], [5, 3], 2, 2, 8, 8, "cpu", torch.float64, requires_grad=True,
                               window_size=(2, 1)),
         dict(dropout_p=0.3, rng_state=torch.tensor([99, 3], dtype=torch.int64))),
    ]
    with torch.library._scoped_library("varlen", "IMPL") as lib:
        lib.impl("attention_forward", fwd, "CPU")
        lib.impl("attention_backward", bwd, "CPU")
        for s, extra in cases:
            def fn(q, k, v, s=s, extra=extra):
                out, lse = torch_varlen.varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k,
                                                         s.max_seqlen_q, s.max_seqlen_k, **extra, **s.kwargs)
                return out, _finite(lse)

            assert torch.autograd.gradcheck(fn, (s.q, s.k, s.v), eps=1e-6, atol=1e-7, rtol=1e-5,
                                            fast_mode=True)
    assert "fwd" in calls and "bwd" in calls, "the Triton launchers did not run"


@interp_only
@pytest.mark.parametrize("p", [0.17, 0.5, 0.93])
def test_interp_dropout_mask_is_philox_keep(p):
    rng = torch.tensor([(3 << 40) + 987654321, (5 << 33) + 4242], dtype=torch.int64)
    keep = triton_attention.dropout_keep_mask(rng, 3, 1000, 40, 50, p)
    ref = reference.philox_keep(int(rng[0]), int(rng[1]), 3, torch.arange(1000, 1040)[:, None],
                                torch.arange(50)[None, :], p)
    assert torch.equal(keep, ref)


@interp_only
def test_interp_dropout_matches_reference(poison):
    rng = torch.tensor([123456789012345, 77], dtype=torch.int64)
    for s in _long_samples("cpu", torch.float32):
        _check(s, _run_launchers, dropout_p=0.3, rng_state=rng)


@interp_only
def test_interp_dropout_same_as_cpu_kernel():
    # Same seed and offset: the Triton kernel and the C++ CPU kernel drop the same weights.
    rng = torch.tensor([(11 << 45) + 2024, (3 << 34) + 99], dtype=torch.int64)
    for s in _long_samples("cpu", torch.float32):
        do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64)
        dlse = torch.randn(s.q.shape[1], s.q.shape[0], dtype=torch.float64)
        triton_out = _run_launchers(s, do, dlse, dropout_p=0.35, rng_state=rng)
        cpu_out = _run_op(s, do, dlse, dropout_p=0.35, rng_state=rng)
        for a, b in zip(triton_out, cpu_out):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


@interp_only
@pytest.mark.parametrize("fp8_pv", [True, False], ids=["fp8_pv", "fp16_pv"])
@pytest.mark.parametrize("name", ["padded_cu_seqlens", "per_head_gqa_causal", "multiblock_causal"])
def test_interp_fp8_forward(name, fp8_pv, poison):
    """Both FP8 forward variants (P @ V in FP8 with V copied keys-fastest, or in float16 with
    V widened) within test_fp8_attention's error bound, padded layouts included."""
    from test_fp8_attention import assert_within_fp8_bound, get_sample

    s = get_sample(name)
    args = _launch_args(SimpleNamespace(q=s.q, k=s.k, v=s.v, cu_seqlens_q=s.cu_q,
                                        cu_seqlens_k=s.cu_k, max_seqlen_q=s.max_q,
                                        max_seqlen_k=s.max_k, kwargs=s.kwargs))
    config = dict(block_m=32, block_n=16, warps=4, stages=1, fp8_pv=fp8_pv)
    out, lse = triton_attention.attention_forward(*args, **s.descales, config=config)
    assert_within_fp8_bound(s, out, lse, fp8_p=True)


@interp_only
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_interp_tuner_keeps_the_fastest_candidate_that_matches(kind, monkeypatch):
    """tune.tune_key runs every candidate, drops one whose output is wrong and returns the
    fastest of the rest, or None when the fallback config is faster still (timings stubbed:
    the interpreter has no clock worth tuning on)."""
    import triton.testing

    from torch_varlen import tune

    bm, bn = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}[kind]
    tiles = [(bm, bn), (16, 16), (bm, 32)]
    monkeypatch.setattr(tune, "_candidates", lambda *a: [
        dict(block_m=m, block_n=n, warps=4, stages=1, tma=False, reverse=False) for m, n in tiles])
    fake_ms = {None: 3.0, (bm, bn): 2.0, (16, 16): 1.0, (bm, 32): 0.5}
    broken = (bm, 32)  # the "fastest" candidate computes garbage: the tuner must drop it
    name = "attention_forward" if kind == "fwd" else "attention_backward"
    launch = getattr(triton_attention, name)
    last = []

    def launch_and_record(*args, config=None, **kwargs):
        cfg = config if kind == "fwd" else (config or {}).get(kind)
        tile = None if cfg is None else (cfg["block_m"], cfg["block_n"])
        last.append(tile)
        result = launch(*args, config=config, **kwargs)
        return tuple(r + 1 for r in result) if tile == broken else result

    def fake_bench(fn, **_):
        fn()
        return fake_ms[last[-1]]

    monkeypatch.setattr(triton_attention, name, launch_and_record)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    entry = tune.tune_key(kind, "float32", 16, "causal", log=lambda m: None, total=150, nheads=2,
                          device="cpu")
    assert (entry["block_m"], entry["block_n"]) == (16, 16)
    assert entry["ms"] == 1.0 and entry["fallback_ms"] == 3.0
    assert set(tiles) <= set(last)  # every candidate ran
    fake_ms[None] = 0.9  # the fallback config beats every correct candidate: no entry
    assert tune.tune_key(kind, "float32", 16, "causal", log=lambda m: None, total=150, nheads=2,
                         device="cpu") is None


@interp_only
def test_interp_rows_after_last_sequence(poison):
    # A capacity-style buffer: rows past cu_seqlens[-1] give out 0, lse -inf, zero grads.
    s = make_attention_sample([5, 9], [7, 3], 2, 2, 16, 16, "cpu", torch.float32, causal=True)
    s.q = torch.cat([s.q, torch.randn(21, 2, 16)])
    s.k = torch.cat([s.k, torch.randn(30, 2, 16)])
    s.v = torch.cat([s.v, torch.randn(30, 2, 16)])
    _check(s, _run_launchers)
    out, lse, dq, dk, dv = _run_launchers(s, torch.randn(35, 2, 16), torch.randn(2, 35))
    assert out[14:].eq(0).all() and torch.isneginf(lse[:, 14:]).all()
    assert dq[14:].eq(0).all() and dk[10:].eq(0).all() and dv[10:].eq(0).all()


@interp_only
def test_interp_empty_batch_and_empty_buffers(poison):
    s = make_attention_sample([], [], 2, 2, 16, 16, "cpu", torch.float32)
    s.q, s.k, s.v = torch.randn(6, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    out, lse, dq, dk, dv = _run_launchers(s, torch.randn(6, 2, 16), torch.randn(2, 6))
    assert out.eq(0).all() and torch.isneginf(lse).all()
    assert dq.eq(0).all() and dk.eq(0).all() and dv.eq(0).all()
    s = make_attention_sample([0, 0], [0, 3], 2, 1, 16, 16, "cpu", torch.float32)
    out, lse, dq, dk, dv = _run_launchers(s, torch.randn(0, 2, 16), torch.randn(2, 0))
    assert out.shape == (0, 2, 16) and dk.eq(0).all() and dv.eq(0).all()


@interp_only
def test_interp_bad_cu_seqlens_raise():
    # Lengths past the buffers: the launchers' device-side check (kernels/checks.py) rejects
    # them with the CPU kernel's message before any attention kernel runs (and, under
    # interpreter_bounds_check, without an out-of-bounds access). test_validation.py has
    # every other bad value.
    s = make_attention_sample([5, 9], [7, 3], 2, 2, 16, 16, "cpu", torch.float32)
    s.cu_seqlens_q = torch.tensor([0, 5, 60], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q\[-1\] must be <= q.shape\[0\]"):
        _run_launchers(s, torch.randn(14, 2, 16), torch.randn(2, 14))
    s.cu_seqlens_q = torch.tensor([0, 5, 14], dtype=torch.int32)
    s.cu_seqlens_k = torch.tensor([0, 40, 41], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_k\[-1\] must be <= k.shape\[0\]"):
        _run_launchers(s, torch.randn(14, 2, 16), torch.randn(2, 14))


def test_tuned_configs_lookup(tmp_path, monkeypatch):
    """The shipped table parses and holds H200 entries; keys name (kernel, dtype, head dims,
    mask kind); float16 falls back to bfloat16's entry; TORCH_VARLEN_TUNED_CONFIGS swaps the
    file."""
    A = triton_attention
    assert A.mask_kind(-1, -1) == "full" and A.mask_kind(-1, 0) == "causal"
    assert A.mask_kind(16, 0) == "window" and A.mask_kind(-1, 4) == "window"
    A._tuned_table.cache_clear()
    shipped = A._tuned_table("NVIDIA H200")
    assert A.tuned_entry(shipped, "fwd", torch.bfloat16, 128, 128, "causal")["block_m"] > 0
    entry = {"block_m": 64, "block_n": 32, "warps": 4, "stages": 2}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"version": 1, "gpus": {"GPU X": {
        A.tuning_key("dq", torch.bfloat16, 96, 64, "causal"): entry}}}))
    monkeypatch.setenv("TORCH_VARLEN_TUNED_CONFIGS", str(path))
    A._tuned_table.cache_clear()
    try:
        table = A._tuned_table("GPU X")
        assert A.tuned_entry(table, "dq", torch.bfloat16, 96, 64, "causal") == entry
        assert A.tuned_entry(table, "dq", torch.float16, 96, 64, "causal") == entry
        assert A.tuned_entry(table, "dq", torch.float32, 96, 64, "causal") is None
        assert A.tuned_entry(table, "dq", torch.bfloat16, 96, 64, "full") is None
        assert A._tuned_table("GPU Y") == {}
    finally:
        A._tuned_table.cache_clear()


# ---------------------------------------------------------------- argument errors (any device)


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_argument(device):
    s = make_attention_sample([3, 4], [3, 4], 2, 2, 16, 16, device, torch.float32)
    args = list(_launch_args(s))
    fwd = triton_attention.attention_forward
    # float64 has a kernel path now; a dtype with none is named by the shape checks (first), and
    # the launchers' own check names the dtypes the kernels take.
    with pytest.raises(RuntimeError, match="q must be float16, bfloat16, float32 or float64"):
        fwd(*[a.int() if i < 3 else a for i, a in enumerate(args)])
    q64, v64 = s.q.detach().double(), s.v.detach().double()
    triton_attention._check_supported(q64, v64)
    with pytest.raises(TypeError, match="float64 and float8_e4m3fn .forward. inputs, got torch.float8_e5m2"):
        triton_attention._check_supported(q64.to(torch.float8_e5m2), v64)
    big = [torch.randn(7, 2, 512, device=device), torch.randn(7, 2, 512, device=device),
           torch.randn(7, 2, 512, device=device)]
    with pytest.raises(ValueError, match="head dims up to 256"):
        fwd(*big, *args[3:])
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32"):
        fwd(*args[:3], s.cu_seqlens_q.long(), *args[4:])
    with pytest.raises(RuntimeError, match="rng_state"):
        fwd(*args[:14], 0.1, None, False)
    out, lse = torch.zeros(7, 2, 16, device=device), torch.zeros(2, 7, device=device)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(7, 2, 16\)"):
        triton_attention.attention_backward(torch.zeros(7, 2, 8, device=device), *args[:3], out,
                                            lse, *args[3:])


# ---------------------------------------------------------------- GPU


def _gpu_samples(dtype):
    return list(attention_sample_inputs("cuda", dtype)) + list(_long_samples("cuda", dtype))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_samples_match_reference(dtype, poison):
    for s in _gpu_samples(dtype):
        _check(s, _run_op)


@requires_cuda
@pytest.mark.parametrize("headdim", [32, 64, 80, 96, 128, 192, 256])
def test_gpu_headdims(headdim, poison):
    torch.manual_seed(headdim)
    lengths_q = [300, 0, 1, 129, 777]
    lengths_k = [300, 5, 1, 200, 640]
    dv = 64 if headdim == 192 else headdim
    for kw in ({"causal": True}, {}, {"window_size": (100, 20)}):
        s = make_attention_sample(lengths_q, lengths_k, 8, 2, headdim, dv, "cuda", torch.bfloat16,
                                  name=f"d{headdim}_{kw}", **kw)
        _check(s, _run_op)


@requires_cuda
@pytest.mark.parametrize("headdim", [64, 128])
def test_gpu_every_tuner_candidate_matches_reference(headdim, poison):
    """Each launch config the tuner may pick (tile edges, TMA K/V loads, reverse tile order; and
    for the backward each dK/dV and dQ tile) computes the reference's numbers."""
    from torch_varlen import tune

    torch.manual_seed(headdim)
    for kw, mask in (({"causal": True}, "causal"), ({}, "full")):
        s = make_attention_sample([700, 0, 129, 1000], [700, 3, 200, 1100], 4, 2, headdim,
                                  headdim, "cuda", torch.bfloat16, name=f"tune_{mask}", **kw)
        configs = [(c, None) for c in tune._candidates("fwd", headdim, mask, False)]
        if headdim == 128:
            configs += [(None, {kind: c}) for kind in ("dkdv", "dq")
                        for c in tune._candidates(kind, headdim, mask, False)]
        for fwd_cfg, bwd_cfg in configs:
            def run(s, do, dlse, fwd_cfg=fwd_cfg, bwd_cfg=bwd_cfg, **_):
                args = _launch_args(s)
                out, lse = triton_attention.attention_forward(*args, config=fwd_cfg)
                grads = triton_attention.attention_backward(
                    do.to(s.q.dtype), *args[:3], out, lse, *args[3:], grad_lse=dlse.float(),
                    config=bwd_cfg)
                return (out, lse, *grads)

            s.name = f"tune_{mask}_{fwd_cfg}_{bwd_cfg}"
            _check(s, run)


@requires_cuda
def test_gpu_all_features_with_dropout(poison):
    torch.manual_seed(0)
    slopes = (torch.rand(3, 6) * 0.2).float().cuda()
    s = make_attention_sample([200, 0, 333], [150, 7, 400], 6, 3, 96, 64, "cuda", torch.bfloat16,
                              softcap=20.0, alibi_slopes=slopes, window_size=(128, 16), pad_q=5,
                              pad_k=3, name="everything")
    rng = torch.tensor([2**61 + 12345, 2**40 + 9], dtype=torch.int64, device="cuda")
    _check(s, _run_op, dropout_p=0.2, rng_state=rng)


@requires_cuda
@pytest.mark.parametrize("case", ["everything", "dropout_window"])
def test_gpu_float64_gradcheck(case):
    """float64 on CUDA runs the Triton float64 path: gradcheck through the public op."""
    torch.manual_seed(3)
    if case == "everything":
        s = make_attention_sample([3, 0, 4, 1], [2, 3, 5, 1], 4, 2, 8, 6, "cuda", torch.float64,
                                  requires_grad=True, pad_q=1, pad_k=2, causal=True, softcap=1.5,
                                  alibi_slopes=(torch.rand(4) * 0.3 + 0.05).float().cuda())
        extra = {}
    else:
        s = make_attention_sample([4, 2], [5, 3], 2, 2, 8, 8, "cuda", torch.float64, requires_grad=True,
                                  window_size=(2, 1))
        extra = dict(dropout_p=0.3, rng_state=torch.tensor([99, 3], dtype=torch.int64, device="cuda"))

    def fn(q, k, v):
        out, lse = torch_varlen.varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                                 s.max_seqlen_k, **extra, **s.kwargs)
        assert lse.dtype == torch.float64
        return out, _finite(lse)

    assert torch.autograd.gradcheck(fn, (s.q, s.k, s.v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@requires_cuda
@pytest.mark.parametrize("headdim", [16, 64, 128, 192, 256])
def test_gpu_float64_matches_reference(headdim, poison):
    """float64 on CUDA against the float64 reference to 1e-10 at every fp64 tile config (head
    dims up to 256), several blocks per sequence, each feature; float scalars unrounded."""
    torch.manual_seed(headdim)
    dv = 64 if headdim == 192 else headdim
    slopes = (torch.rand(4) * 0.3 + 0.05).float().cuda()
    for kw in (dict(causal=True), dict(window_size=(40, 7), softcap=3.0, alibi_slopes=slopes), {}):
        s = make_attention_sample([130, 0, 1, 77], [100, 5, 1, 140], 4, 2, headdim, dv, "cuda",
                                  torch.float64, pad_k=3, name=f"f64_d{headdim}_{kw}", **kw)
        _check_float64(s, _run_op)
    rng = torch.tensor([2**50 + 7, 2**33 + 1], dtype=torch.int64, device="cuda")
    s = make_attention_sample([90, 33], [70, 64], 4, 2, headdim, dv, "cuda", torch.float64, causal=True)
    _check_float64(s, _run_op, dropout_p=0.25, rng_state=rng)
    if headdim == 16:
        _check_float64_scalars("cuda", _run_op)


@requires_cuda
def test_gpu_dropout_mask_same_as_cpu():
    rng = torch.tensor([(9 << 50) + 31337, (1 << 32) + 5], dtype=torch.int64)
    for p in (0.1, 0.5, 0.99):
        keep = triton_attention.dropout_keep_mask(rng.cuda(), 5, 77, 300, 257, p)
        ref = reference.philox_keep(int(rng[0]), int(rng[1]), 5, torch.arange(77, 377)[:, None],
                                    torch.arange(257)[None, :], p)
        assert torch.equal(keep.cpu(), ref)
    # and inside the attention kernel: fp32 result equals the reference with the same rng_state,
    # and the CPU kernel's result on the same inputs.
    s = make_attention_sample([70, 33], [64, 90], 4, 2, 32, 32, "cuda", torch.float32, causal=True)
    _check(s, _run_op, dropout_p=0.4, rng_state=rng.cuda())
    do = torch.randn(s.q.shape[0], 4, 32, dtype=torch.float64, device="cuda")
    dlse = torch.randn(4, s.q.shape[0], dtype=torch.float64, device="cuda")
    gpu = _run_op(s, do, dlse, dropout_p=0.4, rng_state=rng.cuda())
    s_cpu = make_attention_sample([70, 33], [64, 90], 4, 2, 32, 32, "cpu", torch.float32, causal=True)
    s_cpu.q, s_cpu.k, s_cpu.v = s.q.cpu(), s.k.cpu(), s.v.cpu()
    cpu = _run_op(s_cpu, do.cpu(), dlse.cpu(), dropout_p=0.4, rng_state=rng)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu().double(), b.double(), rtol=1e-4, atol=1e-5)


@requires_cuda
def test_gpu_backward_is_bitwise_reproducible():
    s = make_attention_sample([1000, 3, 517], [900, 40, 517], 8, 2, 128, 128, "cuda", torch.bfloat16,
                              causal=True)
    do = torch.randn(s.q.shape[0], 8, 128, device="cuda", dtype=torch.float64)
    dlse = torch.randn(8, s.q.shape[0], device="cuda", dtype=torch.float64)
    first = _run_op(s, do, dlse, deterministic=True)
    for _ in range(3):
        again = _run_op(s, do, dlse, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@requires_cuda
def test_gpu_opcheck():
    for requires_grad in (False, True):
        for s in attention_sample_inputs("cuda", torch.bfloat16, requires_grad=requires_grad):
            kw = s.kwargs
            left, right = kw.get("window_size", (-1, -1))
            args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k,
                    kw.get("softmax_scale") or s.q.shape[-1] ** -0.5, left,
                    0 if kw.get("causal") else right, kw.get("softcap", 0.0), kw.get("alibi_slopes"),
                    kw.get("cu_seqlens_q_padded"), kw.get("cu_seqlens_k_padded"))
            torch.library.opcheck(torch.ops.varlen.attention_forward.default, args)


def _layer(embed=64, nheads=4, headdim=16):
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "qkv": torch.nn.Linear(embed, 3 * nheads * headdim),
        "proj": torch.nn.Linear(nheads * headdim, embed),
    }).cuda().to(torch.bfloat16)


def _layer_forward(layer, x, cu, max_seqlen, nheads=4, headdim=16):
    q, k, v = layer["qkv"](x).view(x.shape[0], 3, nheads, headdim).unbind(1)
    o = torch_varlen.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
    return layer["proj"](o.flatten(1)).float().square().mean()


@requires_cuda
def test_gpu_compiled_training_step_no_recompile():
    assert_compiled_step_matches_eager(_layer_forward, _layer(), 64,
                                       ([5, 17, 0, 64], [100, 3], [1, 2, 3, 4, 5, 6], [250]))


def _pack(hidden, mask):
    """Capture-safe unpad with capacity B*S (torch ops only, no host sync)."""
    batch, seqlen = mask.shape
    cap = batch * seqlen
    flat = mask.flatten().to(torch.int64)
    dest = torch.where(flat.bool(), torch.cumsum(flat, 0) - 1, cap)
    idx = torch.full((cap + 1,), cap, dtype=torch.int64, device=mask.device)
    idx.scatter_(0, dest, torch.arange(cap, device=mask.device))
    idx = idx[:cap]
    rows = torch.cat([hidden.flatten(0, 1), hidden.new_zeros(1, *hidden.shape[2:])])[idx]
    cu = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    return rows, idx, cu


def _unpack(rows, idx, batch, seqlen):
    out = rows.new_zeros(batch * seqlen + 1, *rows.shape[1:])
    out[idx] = rows
    return out[:-1].view(batch, seqlen, *rows.shape[1:])


@requires_cuda
def test_gpu_attention_in_cuda_graph_across_masks():
    batch, seqlen, nheads, headdim = 3, 96, 4, 64
    hidden = torch.randn(batch, seqlen, 3, nheads, headdim, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device="cuda")

    def pipeline(hidden, mask):
        rows, idx, cu = _pack(hidden, mask)
        out = torch_varlen.flash_attn_varlen_func(rows[:, 0], rows[:, 1], rows[:, 2], cu, cu,
                                                  seqlen, seqlen, causal=True)
        return _unpack(out, idx, batch, seqlen)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pipeline(hidden, mask)  # compiles the kernels before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = pipeline(hidden, mask)
    for lengths in ([96, 0, 50], [1, 95, 17], [33, 33, 33]):
        hidden.copy_(torch.randn_like(hidden))
        mask.copy_(torch.arange(seqlen, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None])
        graph.replay()
        expect = pipeline(hidden, mask)
        assert torch.equal(static_out, expect)
        ref, _, _ = reference.attention(*(hidden[mask][:, i].double() for i in range(3)),
                                        cu_seqlens(lengths, "cuda"), cu_seqlens(lengths, "cuda"),
                                        causal=True)
        assert (static_out[mask].double() - ref).abs().max() < 2e-2
        assert static_out[~mask].eq(0).all()


def _has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


@requires_cuda
@pytest.mark.skipif(not _has_cuda_kernel("varlen::unpad_capacity"),
                    reason="needs the CUDA unpad_capacity kernel (padding issue) in this build")
def test_gpu_capacity_pipeline_in_cuda_graph():
    batch, seqlen, nheads, headdim = 3, 80, 4, 32
    hidden = torch.randn(batch, seqlen, 3 * nheads * headdim, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device="cuda")

    def pipeline(hidden, mask):
        rows, idx, cu, max_seqlen, _ = torch_varlen.unpad_input(hidden, mask, capacity=batch * seqlen)
        q, k, v = rows.view(-1, 3, nheads, headdim).unbind(1)
        out = torch_varlen.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
        return torch_varlen.pad_input(out.flatten(1), idx, batch, seqlen)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pipeline(hidden, mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = pipeline(hidden, mask)
    for lengths in ([80, 0, 9], [1, 79, 40]):
        hidden.copy_(torch.randn_like(hidden))
        mask.copy_(torch.arange(seqlen, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None])
        graph.replay()
        assert torch.equal(static_out, pipeline(hidden, mask))
        assert static_out[~mask].eq(0).all()


_AOTI_SCRIPT = textwrap.dedent("""
    import sys, torch
    which, device, package = sys.argv[1:4]
    if which == "control":  # torch_varlen not even imported: tells a broken AOTInductor from a bug of ours
        class M(torch.nn.Module):
            def forward(self, x):
                return x.sin() + 1
        runs = [(torch.randn(8, 8, device=device),)]
    else:
        import torch_varlen
        from samples import cu_seqlens, make_attention_sample

        class M(torch.nn.Module):
            def forward(self, q, k, v, cu_q, cu_k):
                return torch_varlen.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 64, 64, causal=True,
                                                           softcap=5.0)
        s = make_attention_sample([40, 0, 64, 20], [64, 3, 50, 7], 4, 2, 64, 64, device, torch.bfloat16)
        runs = [(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k),
                # other lengths, same shapes
                (s.q, s.k, s.v, cu_seqlens([60, 20, 0, 44], device), cu_seqlens([30, 30, 30, 34], device))]
    ep = torch.export.export(M(), runs[0])
    loaded = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=package))
    exact = {} if which == "control" else {"rtol": 0, "atol": 0}  # our op runs as is: bitwise
    for args in runs:
        torch.testing.assert_close(loaded(*args), M()(*args), **exact)
""")


def _run_aoti(which, device, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "test")]),
               TORCH_VARLEN_ATTENTION_BACKEND="torch_varlen")
    return subprocess.run([sys.executable, "-c", _AOTI_SCRIPT, which, device, str(tmp_path / f"{which}.pt2")],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("device", DEVICES)
def test_aoti_export_matches_eager(device, tmp_path):
    """torch.export + AOTInductor package of a model calling the op, loaded in Python, equals
    eager (CUDA: the Triton kernels; CPU: the C++ kernel). Runs in a child process: a crash of AOTInductor's loader must not take pytest down.
    If it crashes, a control model without our op tells an environment problem (skip, with
    the reason) from one of ours (fail)."""
    proc = _run_aoti("varlen", device, tmp_path)
    if proc.returncode < 0 or proc.returncode > 128:  # killed by a signal
        control = _run_aoti("control", device, tmp_path)
        if control.returncode != 0:
            pytest.skip(f"AOTInductor crashes on this machine for a trivial model too (torch "
                        f"{torch.__version__}, exit {control.returncode}); not a torch_varlen bug")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, torch_varlen
    from samples import make_attention_sample
    s = make_attention_sample([37, 0, 130, 1], [20, 5, 140, 9], 4, 2, 64, 64, "cuda", torch.bfloat16,
                              requires_grad=True, causal=True, pad_q=3)
    out = torch_varlen.flash_attn_varlen_func(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 130, 140,
                                              window_size=(50, 0), softcap=3.0, dropout_p=0.1,
                                              cu_seqlens_q_padded=s.kwargs["cu_seqlens_q_padded"])
    out.float().square().sum().backward()
    torch.cuda.synchronize()
""")


@requires_cuda
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
def test_gpu_compute_sanitizer_memcheck_clean():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "test")]),
               TORCH_VARLEN_ATTENTION_BACKEND="torch_varlen")
    proc = subprocess.run(
        ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
         sys.executable, "-c", _SANITIZER_SCRIPT],
        env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "ERROR SUMMARY: 0 errors" in proc.stdout, tail

