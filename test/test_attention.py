"""varlen attention kernels (forward and backward) against reference.attention.

Every device in DEVICES runs the same tests (the CPU kernel, and the CUDA kernel when there
is one); a few tests are about the CPU kernel itself (instruction-set variants, thread count)
and say so.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import torch_varlen
from torch_varlen import reference
from conftest import DEVICES
from samples import attention_sample_inputs, cu_seqlens, make_attention_sample

_ops = torch.ops.varlen


def _device_params():
    """DEVICES, with a device whose attention kernel is not registered yet skipped visibly."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for d in DEVICES:
        missing = d != "cpu" and not has("varlen::attention_forward", d.upper())
        yield pytest.param(d, marks=pytest.mark.skipif(missing, reason=f"no {d} attention kernel registered yet"))


ATTN_DEVICES = list(_device_params())


def slopes(*shape, device="cpu"):
    return (torch.rand(*shape) * 0.5 + 0.05).float().to(device)


def rng(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def extra_samples(device, dtype, requires_grad=False):
    """Combinations beyond attention_sample_inputs: several blocks per sequence (the kernels
    tile by 64), every feature at once, dropout."""
    mk = lambda *a, **kw: make_attention_sample(*a, device=device, dtype=dtype, requires_grad=requires_grad, **kw)
    yield mk([70, 0, 130, 1], [90, 5, 129, 0], 4, 2, 40, 24, pad_q=3, pad_k=2, causal=True,
             window_size=(50, 3), softcap=3.0, alibi_slopes=slopes(4, 4, device=device), name="everything")
    yield mk([150, 66], [150, 66], 3, 1, 64, 64, causal=True, name="multiblock_causal_mqa")
    yield mk([65, 129], [200, 3], 2, 2, 32, 16, window_size=(10, 70), name="multiblock_window_lq_ne_lk")
    yield mk([128, 97, 32], [128, 96, 64], 4, 2, 64, 32, name="whole_tiles")  # 32/64-key tiles, Dv 32
    yield mk([80, 7], [75, 9], 4, 2, 16, 16, dropout_p=0.3, rng_state=rng(7, 3, device), name="dropout")
    yield mk([40, 0, 33], [38, 2, 33], 4, 2, 24, 8, pad_q=5, pad_k=1, causal=True, softcap=2.0,
             alibi_slopes=slopes(4, device=device), dropout_p=0.2, rng_state=rng(2**40 + 5, 2**33 + 9, device),
             name="dropout_everything")


def all_samples(device, dtype, requires_grad=False):
    yield from attention_sample_inputs(device, dtype, requires_grad)
    yield from extra_samples(device, dtype, requires_grad)


def sample_names():
    return [s.name for s in all_samples("cpu", torch.float64)]


def get_sample(name, device, dtype, requires_grad=False):
    torch.manual_seed(sum(map(ord, name)))
    for s in all_samples(device, dtype, requires_grad):
        if s.name == name:
            return s
    raise KeyError(name)


def run(s, q=None, k=None, v=None):
    q, k, v = (s.q if q is None else q), (s.k if k is None else k), (s.v if v is None else v)
    return torch_varlen.varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                         s.max_seqlen_k, **s.kwargs)


def run_reference(s, q, k, v):
    return reference.attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, **s.kwargs)[:2]


def op_args(s, q=None, k=None, v=None):
    """Positional arguments of varlen::attention_forward for a sample."""
    kw = s.kwargs
    left, right = kw.get("window_size", (-1, -1))
    if kw.get("causal"):
        right = 0
    scale = kw.get("softmax_scale") or s.q.shape[-1] ** -0.5
    return (s.q if q is None else q, s.k if k is None else k, s.v if v is None else v,
            s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k, scale, left, right,
            kw.get("softcap", 0.0), kw.get("alibi_slopes"), kw.get("cu_seqlens_q_padded"),
            kw.get("cu_seqlens_k_padded"), kw.get("dropout_p", 0.0), kw.get("rng_state"), False)


def finite_lse(lse):
    """lse with the -inf of rows that see no key replaced by 0 (a usable loss term)."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def loss_grads(s, q, k, v, fn, go, gl):
    """Gradients of sum(out * go) + sum(finite lse * gl) w.r.t. (q, k, v)."""
    out, lse = fn(s, q, k, v)
    loss = (out.double() * go).sum() + (finite_lse(lse).double() * gl).sum()
    return torch.autograd.grad(loss, (q, k, v))


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("device", ATTN_DEVICES)
@pytest.mark.parametrize("name", sample_names())
def test_forward_matches_reference_float64(device, name):
    s = get_sample(name, device, torch.float64)
    out, lse = run(s)
    ref_out, ref_lse = run_reference(s, s.q, s.k, s.v)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)  # -inf where the reference has -inf


@pytest.mark.parametrize("device", ATTN_DEVICES)
@pytest.mark.parametrize("name", ["basic", "causal_lq_ne_lk_gqa_dv", "alibi_batch_softcap_window",
                                  "padded_cu_seqlens", "everything", "dropout_everything"])
def test_float32_forward_and_grads_match_reference(device, name):
    s = get_sample(name, device, torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (s.q, s.k, s.v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (s.q, s.k, s.v))
    out, lse = run(s, q, k, v)
    ref_out, ref_lse = run_reference(s, q64, k64, v64)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    go, gl = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    grads = loss_grads(s, q, k, v, run, go, gl)
    ref_grads = loss_grads(s, q64, k64, v64, run_reference, go, gl)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ATTN_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["basic", "zero_and_len1_mqa", "window", "alibi_heads", "everything",
                                  "multiblock_causal_mqa", "whole_tiles", "dropout_everything"])
def test_half_precision_error_ratio(device, dtype, name):
    """err(kernel) <= 2 * err(reference run in the same dtype) + atol, both against float64."""
    s = get_sample(name, device, dtype)
    q, k, v = (t.detach().requires_grad_() for t in (s.q, s.k, s.v))
    qr, kr, vr = (t.detach().requires_grad_() for t in (s.q, s.k, s.v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (s.q, s.k, s.v))
    out, lse = run(s, q, k, v)
    low_out, low_lse = run_reference(s, qr, kr, vr)
    ref_out, ref_lse = run_reference(s, q64, k64, v64)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert max_err(out, ref_out) <= 2 * max_err(low_out, ref_out) + 1e-3
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert max_err(lse[fin], ref_lse[fin]) <= 2 * max_err(low_lse[fin], ref_lse[fin]) + 1e-3
    go = torch.randn_like(ref_out)
    gl = torch.randn_like(ref_lse)
    grads = loss_grads(s, q, k, v, run, go, gl)
    low_grads = loss_grads(s, qr, kr, vr, run_reference, go, gl)
    ref_grads = loss_grads(s, q64, k64, v64, run_reference, go, gl)
    for g, lo, r in zip(grads, low_grads, ref_grads):
        assert g.dtype == dtype
        assert max_err(g, r) <= 2 * max_err(lo, r) + 2e-3


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", ATTN_DEVICES)
@pytest.mark.parametrize("name", [
    "basic", "zero_and_len1_mqa", "causal_lq_ne_lk_gqa_dv", "causal_lq_gt_lk_odd_dims", "window",
    "window_causal", "softcap", "alibi_heads", "alibi_batch_softcap_window", "padded_cu_seqlens", "scale",
])
def test_gradcheck_float64(device, name):
    s = get_sample(name, device, torch.float64, requires_grad=True)
    kw = {k: v for k, v in s.kwargs.items() if k in ("softmax_scale", "causal", "window_size", "softcap",
                                                     "alibi_slopes", "cu_seqlens_q_padded", "cu_seqlens_k_padded")}

    def fn(q, k, v):  # through the flash-attn compatible entry point, out and lse both used
        out, lse = torch_varlen.flash_attn_varlen_func(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                                       s.max_seqlen_k, return_lse=True, **kw)
        return out, finite_lse(lse)

    assert torch.autograd.gradcheck(fn, (s.q, s.k, s.v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", ATTN_DEVICES)
def test_gradcheck_float64_dropout(device):
    torch.manual_seed(5)
    s = make_attention_sample([5, 0, 4], [6, 2, 4], 2, 1, 8, 6, device, torch.float64, requires_grad=True,
                              pad_q=1, pad_k=2, causal=True, softcap=2.0, alibi_slopes=slopes(2, device=device))
    state = rng(11, 4, device)

    def fn(q, k, v):
        out, lse = torch_varlen.varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                                 s.max_seqlen_k, dropout_p=0.4, rng_state=state, **s.kwargs)
        return out, finite_lse(lse)

    assert torch.autograd.gradcheck(fn, (s.q, s.k, s.v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", ATTN_DEVICES)
@pytest.mark.parametrize("name", ["everything", "dropout", "dropout_everything", "multiblock_window_lq_ne_lk"])
def test_grads_float64_match_reference_multiblock(device, name):
    s = get_sample(name, device, torch.float64)
    q, k, v = (t.detach().requires_grad_() for t in (s.q, s.k, s.v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (s.q, s.k, s.v))
    out, lse = run(s, q, k, v)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = loss_grads(s, q, k, v, run, go, gl)
    ref_grads = loss_grads(s, q2, k2, v2, run_reference, go, gl)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("device", ATTN_DEVICES)
def test_noncontiguous_inputs_and_grad_out(device):
    """q/k/v as views of packed qkv, one with a non-unit last stride, and a strided grad_out."""
    torch.manual_seed(0)
    lengths = [5, 70, 3]
    cu = cu_seqlens(lengths, device)
    qkv = torch.randn(sum(lengths), 3, 4, 16, dtype=torch.float64, device=device, requires_grad=True)
    q_t = torch.randn(sum(lengths), 16, 4, dtype=torch.float64, device=device).transpose(1, 2).requires_grad_()
    go_base = torch.randn(sum(lengths), 4, 32, dtype=torch.float64, device=device)
    go = go_base[:, :, ::2]
    for q in (qkv[:, 0], q_t):
        out, lse = torch_varlen.varlen_attention(q, qkv[:, 1], qkv[:, 2], cu, cu, 70, 70, causal=True)
        grads = torch.autograd.grad((out * go).sum(), (q, qkv))
        ref_out, _, _ = reference.attention(q, qkv[:, 1], qkv[:, 2], cu, cu, causal=True)
        ref_grads = torch.autograd.grad((ref_out * go).sum(), (q, qkv))
        torch.testing.assert_close(out, ref_out)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("device", ATTN_DEVICES)
def test_dropout_mask_reproducible_from_rng_state(device):
    s = get_sample("dropout", device, torch.float32)
    args = list(op_args(s))
    out1, lse1 = _ops.attention_forward(*args)
    out2, lse2 = _ops.attention_forward(*args)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    for other in (rng(8, 3, device), rng(7, 4, device)):  # another seed, another offset
        args[15] = other
        out3, lse3 = _ops.attention_forward(*args)
        assert not torch.equal(out1, out3)
        assert torch.equal(lse1, lse3)  # lse is that of the probabilities before dropout
    args[14] = 0.0
    out_nodrop, _ = _ops.attention_forward(*args)
    assert not torch.equal(out1, out_nodrop)


@pytest.mark.parametrize("device", ATTN_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_attn_probs_times_v_is_out(device, causal):
    torch.manual_seed(1)
    s = make_attention_sample([9, 0, 17], [12, 3, 17], 4, 2, 16, 8, device, torch.float64)
    state = rng(99, 1, device)
    out, lse, probs = torch_varlen.flash_attn_varlen_func(
        s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k, dropout_p=0.25,
        causal=causal, return_attn_probs=True, rng_state=state)
    cu_q, cu_k = s.cu_seqlens_q.tolist(), s.cu_seqlens_k.tolist()
    dropped = 0
    for b in range(len(cu_q) - 1):
        lq, lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        p = probs[b, :, :lq, :lk].double()
        vb = s.v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(2, 0)
        torch.testing.assert_close((p @ vb).transpose(0, 1), out[cu_q[b]:cu_q[b + 1]], rtol=1e-6, atol=1e-6)
        dropped += int((p == 0).sum())
    assert dropped > 0


# ---------------------------------------------------------------- opcheck


def _backward_args(s, out, lse, with_grad_lse):
    a = op_args(s)
    go = torch.randn_like(out)
    gl = torch.randn_like(lse) if with_grad_lse else None
    return (go, a[0], a[1], a[2], out, lse) + a[3:] + (gl,)


# With requires_grad inputs, opcheck's autograd tests of attention_backward go through its own
# autograd formula (double backward, torch_varlen/_attention_dense.py); a missing one warns.
@pytest.mark.filterwarnings("error:.*an autograd kernel was not registered")
@pytest.mark.parametrize("device", ATTN_DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", ["basic", "zero_and_len1_mqa", "causal_lq_ne_lk_gqa_dv",
                                  "alibi_batch_softcap_window", "padded_cu_seqlens", "dropout_everything"])
def test_opcheck(device, requires_grad, name):
    s = get_sample(name, device, torch.float32, requires_grad=requires_grad)
    torch.library.opcheck(_ops.attention_forward.default, op_args(s))
    with torch.no_grad():
        out, lse = _ops.attention_forward(*op_args(s))
    for with_grad_lse in (False, True):
        torch.library.opcheck(_ops.attention_backward.default, _backward_args(s, out, lse, with_grad_lse))


@pytest.mark.parametrize("device", ATTN_DEVICES)
def test_opcheck_backward_permuted_q(device):
    """grad_q follows q's strides as the fake's empty_like does."""
    s = get_sample("basic", device, torch.float32)
    q = s.q.detach().transpose(0, 1).contiguous().transpose(0, 1)  # dense, (H, N, D) memory order
    args = op_args(s, q=q)
    out, lse = _ops.attention_forward(*args)
    bargs = _backward_args(s, out, lse, False)
    bargs = (bargs[0], q) + bargs[2:]
    dq, _, _ = _ops.attention_backward(*bargs)
    assert dq.stride() == q.stride()
    torch.library.opcheck(_ops.attention_backward.default, bargs)


# ---------------------------------------------------------------- bad input


def _error_cases(device):
    s = make_attention_sample([2, 4, 3], [2, 4, 3], 4, 2, 8, 8, device, torch.float32)
    base = dict(zip(("q", "k", "v", "cu_q", "cu_k"), op_args(s)[:5]))
    cu, dev = base["cu_q"], device
    k_other = s.k.to("meta")
    return [
        (dict(cu_q=cu.long()), "cu_seqlens_q must be int32, got torch.int64"),
        (dict(cu_k=cu.long()), "cu_seqlens_k must be int32"),
        (dict(cu_q=cu[None]), r"cu_seqlens_q must be 1-D of shape \(batch\+1,\), got \(1, 4\)"),
        (dict(cu_k=cu[:3]), r"cu_seqlens_k must have batch\+1 = 4 entries"),
        (dict(k=s.k[:, :1].repeat(1, 3, 1), v=s.v[:, :1].repeat(1, 3, 1)),
         r"nheads \(4\) must be divisible by nheads_k \(3\)"),
        (dict(k=s.k.double()), "q, k and v must share a dtype, got torch.float32, torch.float64, torch.float32"),
        (dict(v=s.v.half()), "q, k and v must share a dtype"),
        (dict(k=k_other), "q, k and v must be on one device"),
        (dict(q=s.q[..., :6]), r"q and k must have the same head dim, got 6 and 8"),
        (dict(v=s.v[:5]), r"v must be \(total_k, nheads_k, headdim_v\)"),
        (dict(q=s.q[0]), r"q must be \(total, nheads, headdim\), got shape \(4, 8\)"),
        (dict(q=s.q.int(), k=s.k.int(), v=s.v.int()), "q must be float16, bfloat16, float32 or float64"),
        (dict(window_left=-2), r"window_size entries must be >= -1 \(-1 = unbounded\), got \(-2, -1\)"),
        (dict(softcap=-1.0), r"softcap must be >= 0 \(0 = off\), got -1.0"),
        (dict(alibi=torch.ones(3, device=dev)), r"alibi_slopes must be \(nheads,\) = \(4,\) or \(batch, nheads\) = \(3, 4\), got \(3,\)"),
        (dict(alibi=torch.ones(4, 4, device=dev)), r"alibi_slopes must be \(nheads,\)"),
        (dict(alibi=torch.ones(4, device=dev, dtype=torch.float64)), "alibi_slopes must be float32, got torch.float64"),
        (dict(dropout_p=0.5), r"rng_state \(\[seed, offset\] int64\) is required when dropout_p > 0"),
        (dict(dropout_p=0.5, rng_state=torch.zeros(3, dtype=torch.int64, device=dev)),
         r"rng_state must be int64 of shape \(2,\), got torch.int64 \(3,\)"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1.0"),
    ]


def _call_forward(s_args, **over):
    names = ("q", "k", "v", "cu_q", "cu_k", "max_q", "max_k", "scale", "window_left", "window_right",
             "softcap", "alibi", "cu_q_pad", "cu_k_pad", "dropout_p", "rng_state", "deterministic")
    args = dict(zip(names, s_args))
    args.update(over)
    return _ops.attention_forward(*args.values())


@pytest.mark.parametrize("device", ATTN_DEVICES)
def test_bad_shapes_dtypes_devices_raise(device):
    s = make_attention_sample([2, 4, 3], [2, 4, 3], 4, 2, 8, 8, device, torch.float32)
    for over, match in _error_cases(device):
        with pytest.raises(RuntimeError, match=match):
            _call_forward(op_args(s), **over)


@pytest.mark.parametrize("over, match", [
    (dict(cu_q=[0, 2, 1, 9]), "cu_seqlens_q must be non-decreasing, got 2 then 1 at index 2"),
    (dict(cu_k=[0, 5, 4, 9]), "cu_seqlens_k must be non-decreasing"),
    (dict(cu_q=[1, 2, 6, 9]), "cu_seqlens_q must start at 0, got 1"),
    (dict(cu_q=[0, 2, 6, 10]), r"cu_seqlens_q\[-1\] must be <= q.shape\[0\] = 9 \(the rows of q\), got 10"),
    (dict(cu_k=[0, 2, 6, 4000]), r"cu_seqlens_k\[-1\] must be <= k.shape\[0\] = 9"),
    (dict(cu_q_pad=[0, 2, 4, 9]), r"cu_seqlens_q_padded\[2\] = 4 must be >= 0 and >= the end of the previous sequence \(6\)"),
    (dict(cu_k_pad=[0, 2, 7, 9]), r"cu_seqlens_k_padded: sequence 2 occupies rows \[7, 10\) beyond k.shape\[0\] = 9"),
    (dict(cu_k_pad=[-1, 2, 6, 9]), r"cu_seqlens_k_padded\[0\] = -1 must be >= 0"),
])
def test_bad_cu_seqlens_values_raise(over, match):
    """Values are checked by the CPU kernel (a GPU launcher cannot read them without a sync)."""
    s = make_attention_sample([2, 4, 3], [2, 4, 3], 4, 2, 8, 8, "cpu", torch.float32)
    over = {k: torch.tensor(v, dtype=torch.int32) for k, v in over.items()}
    with pytest.raises(RuntimeError, match=match):
        _call_forward(op_args(s), **over)
    a = op_args(s)
    out, lse = _ops.attention_forward(*a)
    names = {"cu_q": 3, "cu_k": 4, "cu_q_pad": 12, "cu_k_pad": 13}
    a = list(a)
    for k, v in over.items():
        a[names[k]] = v
    with pytest.raises(RuntimeError, match=match):
        _ops.attention_backward(torch.randn_like(out), *a[:3], out, lse, *a[3:], None)


@pytest.mark.parametrize("device", ATTN_DEVICES)
def test_backward_bad_grad_shapes_raise(device):
    s = make_attention_sample([2, 4, 3], [2, 4, 3], 4, 2, 8, 8, device, torch.float32)
    a = op_args(s)
    out, lse = _ops.attention_forward(*a)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(9, 4, 8\), got \(9, 4, 7\)"):
        _ops.attention_backward(out[..., :7], *a[:3], out, lse, *a[3:], None)
    with pytest.raises(RuntimeError, match=r"softmax_lse must be torch.float32, got torch.float64"):
        _ops.attention_backward(out, *a[:3], out, lse.double(), *a[3:], None)
    with pytest.raises(RuntimeError, match=r"grad_lse must have shape \(4, 9\)"):
        _ops.attention_backward(out, *a[:3], out, lse, *a[3:], lse[:, :3])


# ---------------------------------------------------------------- determinism, fresh outputs


@pytest.mark.parametrize("device", ATTN_DEVICES)
@pytest.mark.parametrize("name", ["everything", "dropout_everything"])
def test_backward_bitwise_deterministic(device, name):
    s = get_sample(name, device, torch.float32)
    a = op_args(s)
    out, lse = _ops.attention_forward(*a)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    first = _ops.attention_backward(go, *a[:3], out, lse, *a[3:-1], True, gl)
    second = _ops.attention_backward(go, *a[:3], out, lse, *a[3:-1], True, gl)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_cpu_result_independent_of_thread_count():
    """CPU kernel: work items are independent, so 1 and 2 threads give the same bits."""
    s = get_sample("everything", "cpu", torch.float32)
    a = op_args(s)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = _ops.attention_forward(*a)
            go = torch.ones_like(out)
            results.append((out, lse) + tuple(_ops.attention_backward(go, *a[:3], out, lse, *a[3:], None)))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", ATTN_DEVICES)
def test_padding_rows_are_zero_and_minus_inf(device, monkeypatch):
    """With outputs poisoned (NaN) before the kernel runs, rows that belong to no sequence
    (padding between sequences, rows past cu_seqlens[-1]) come out 0 / -inf, gradients 0."""
    monkeypatch.setenv("TORCH_VARLEN_POISON_OUTPUTS", "1")
    torch.manual_seed(3)
    s = make_attention_sample([3, 0, 70], [4, 2, 72], 4, 2, 16, 8, device, torch.float32, pad_q=2, pad_k=3,
                              causal=True)
    extra = 5  # rows after the last physical sequence
    q = torch.cat([s.q, torch.randn(extra, 4, 16, device=device)]).requires_grad_()
    k = torch.cat([s.k, torch.randn(extra, 2, 16, device=device)]).requires_grad_()
    v = torch.cat([s.v, torch.randn(extra, 2, 8, device=device)]).requires_grad_()
    out, lse = run(s, q, k, v)
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum() + finite_lse(lse).sum(), (q, k, v))
    inside_q = torch.zeros(q.shape[0], dtype=torch.bool)
    for start, n in zip(s.kwargs["cu_seqlens_q_padded"].tolist()[:-1], [3, 0, 70]):
        inside_q[start:start + n] = True
    inside_k = torch.zeros(k.shape[0], dtype=torch.bool)
    for start, n in zip(s.kwargs["cu_seqlens_k_padded"].tolist()[:-1], [4, 2, 72]):
        inside_k[start:start + n] = True
    for t in (out, dq, dk, dv):
        assert not t.isnan().any()
    assert (out[~inside_q] == 0).all() and (dq[~inside_q] == 0).all()
    assert (lse[:, ~inside_q] == -math.inf).all() and torch.isfinite(lse[:, inside_q]).all()
    assert (dk[~inside_k] == 0).all() and (dv[~inside_k] == 0).all()
    assert (out[inside_q] != 0).any() and (dk[inside_k] != 0).any()
    ref_out, ref_lse = run_reference(s, q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "default"}, {"ATEN_CPU_CAPABILITY": "avx2"},
                                 {"TORCH_VARLEN_CPU_NO_AMX": "1"}], ids=["default", "avx2", "avx512_no_amx"])
def test_cpu_isa_variants(env):
    """The CPU kernel is built for AVX-512 (+AMX for the bfloat16 forward), AVX-512, AVX2 and a
    baseline, and picks the best the machine has (capped by ATEN_CPU_CAPABILITY). Each other
    variant, in a fresh process, passes a few of this file's tests (on a machine that lacks
    an instruction set, the variant asked for falls back to a lower one and is tested there)."""
    script = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_attention as t
for name in ("everything", "dropout_everything"):
    t.test_forward_matches_reference_float64("cpu", name)
    t.test_grads_float64_match_reference_multiblock("cpu", name)
t.test_float32_forward_and_grads_match_reference("cpu", "everything")
t.test_half_precision_error_ratio("cpu", torch.bfloat16, "whole_tiles")
t.test_half_precision_error_ratio("cpu", torch.float16, "everything")
"""
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", script, here], env=dict(os.environ, **env), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------- AITER keyword names


@pytest.mark.parametrize("device", ATTN_DEVICES)
def test_aiter_keywords(device):
    """logits_soft_cap = softcap, min_seqlen_q a hint, out= written and returned, a 3-entry
    window_size with 0 sink tokens, block_table / seqused_k None; clear errors otherwise."""
    s = get_sample("basic", device, torch.float32)
    f = torch_varlen.flash_attn_varlen_func
    args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k)
    ref = f(*args, softcap=2.0, window_size=(2, 1))
    got = f(*args, logits_soft_cap=2.0, window_size=(2, 1, 0), min_seqlen_q=1, block_table=None,
            seqused_k=None)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(f(*args, softcap=2.0, logits_soft_cap=2.0), f(*args, softcap=2.0))
    buf = torch.full_like(ref, float("nan"))
    res, lse = f(*args, softcap=2.0, window_size=(2, 1), out=buf, return_lse=True)
    assert res is buf
    torch.testing.assert_close(buf, ref)
    with pytest.raises(ValueError, match=r"softcap \(1.0\) and logits_soft_cap \(2.0\) are the same option"):
        f(*args, softcap=1.0, logits_soft_cap=2.0)
    with pytest.raises(NotImplementedError, match="sink tokens .* third entry must be 0"):
        f(*args, window_size=(4, 0, 2))
    # paged KV is supported (test_paged_kv.py); a packed k with a block_table is a clear error
    with pytest.raises(RuntimeError, match=r"with a block_table, k must be a cache"):
        f(*args, block_table=torch.zeros(3, 1, dtype=torch.int32, device=device))
    used = torch.ones(3, dtype=torch.int32, device=device)
    torch.testing.assert_close(f(*args, seqused_k=used), f(*args, seqused_k=used, cu_seqlens_k_padded=None))
    for bad, what in ((ref[:, :, :4], r"shape \(9, 2, 16\)"), (ref.double(), "torch.float32"),
                      (ref.to("meta"), f"on {ref.device}")):
        with pytest.raises(ValueError, match=f"out must be .*{what}"):
            f(*args, out=bad)
