"""Double backward of varlen attention: the autograd formula of varlen::attention_backward.

attention_backward's backward is autograd through _attention_dense.attention_backward_dense.
Checked here: that function against autograd through reference.attention, gradcheck of the op
w.r.t. all seven tensor inputs (out and lse independent), gradgradcheck through
attention_forward for every feature, the create_graph scenario of the issue against the
reference's own double backward, opcheck with inputs that require grad, and the errors.
Sizes are tiny (under 20 tokens, head dims 4-8) so that float64 checks stay fast.
"""

import pytest
import torch

import torch_varlen
from torch_varlen import reference
from torch_varlen._attention_dense import _dropout_keep, attention_backward_dense
from conftest import DEVICES
from samples import make_attention_sample

_ops = torch.ops.varlen


def _rng(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def _samples(device, dtype, requires_grad=False):
    """One tiny sample per feature (and a few combinations), fresh random tensors each call."""
    mk = lambda *a, **kw: make_attention_sample(*a, device=device, dtype=dtype, requires_grad=requires_grad, **kw)
    slopes = lambda *shape: (torch.rand(*shape) * 0.5 + 0.05).float().to(device)
    yield mk([3, 1, 4], [3, 1, 4], 2, 2, 4, 4, name="basic")
    yield mk([3, 0, 1, 4], [3, 0, 1, 4], 2, 1, 6, 4, name="zero_and_len1_mqa")
    yield mk([2, 4], [5, 2], 4, 2, 4, 6, causal=True, name="causal_lq_ne_lk_gqa_dv")
    yield mk([5, 1], [3, 2], 2, 2, 5, 4, causal=True, name="causal_lq_gt_lk_rows_see_nothing")
    yield mk([5, 3], [5, 4], 2, 2, 4, 4, window_size=(2, 1), name="window")
    yield mk([5, 3], [5, 3], 2, 2, 4, 4, window_size=(1, -1), causal=True, name="window_causal")
    yield mk([4, 3], [4, 3], 2, 2, 4, 4, softcap=1.5, name="softcap")
    yield mk([4, 3], [3, 5], 4, 2, 4, 4, alibi_slopes=slopes(4), causal=True, name="alibi_heads")
    yield mk([4, 3], [4, 3], 2, 2, 4, 4, alibi_slopes=slopes(2, 2), softcap=1.5, window_size=(2, 1),
             name="alibi_batch_softcap_window")
    yield mk([3, 0, 4], [2, 3, 4], 2, 1, 4, 6, pad_q=2, pad_k=1, causal=True, name="padded_cu_seqlens")
    yield mk([4, 3], [4, 3], 2, 2, 4, 4, softmax_scale=0.7, name="scale")
    yield mk([5, 4], [6, 4], 2, 1, 4, 4, dropout_p=0.3, rng_state=_rng(7, 3, device), name="dropout")
    yield mk([4, 0, 3], [5, 2, 3], 2, 1, 4, 4, pad_q=1, pad_k=2, causal=True, softcap=2.0,
             alibi_slopes=slopes(2), dropout_p=0.25, rng_state=_rng(2**40 + 5, 2**33 + 9, device),
             name="dropout_everything")


NAMES = [s.name for s in _samples("cpu", torch.float64)]


def _sample(name, device, dtype=torch.float64, requires_grad=False):
    torch.manual_seed(sum(map(ord, name)))
    return next(s for s in _samples(device, dtype, requires_grad) if s.name == name)


def _options(s):
    """The attention_backward (and attention_backward_dense) keyword options of a sample."""
    kw = s.kwargs
    left, right = kw.get("window_size", (-1, -1))
    return dict(
        softmax_scale=kw.get("softmax_scale") or s.q.shape[-1] ** -0.5, window_left=left,
        window_right=0 if kw.get("causal") else right, softcap=kw.get("softcap", 0.0),
        alibi_slopes=kw.get("alibi_slopes"), cu_seqlens_q_padded=kw.get("cu_seqlens_q_padded"),
        cu_seqlens_k_padded=kw.get("cu_seqlens_k_padded"), dropout_p=kw.get("dropout_p", 0.0),
        rng_state=kw.get("rng_state"),
    )


def _finite(lse):
    """lse with the -inf of rows that see no key (or belong to no sequence) replaced by 0."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _attention(s, q, k, v):
    """(out, finite lse) through the op."""
    out, lse = torch_varlen.varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                             s.max_seqlen_k, **s.kwargs)
    return out, _finite(lse)


def _reference(s, q, k, v):
    """(out, finite lse) through reference.attention (autograd through it is the specification)."""
    out, lse, _ = reference.attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, **s.kwargs)
    return out, _finite(lse)


def _backward_inputs(s, requires_grad):
    """(grad_out, q, k, v, out, lse, grad_lse): out and lse from the forward, detached, so
    that they are independent inputs of attention_backward."""
    with torch.no_grad():
        out, lse = _ops.attention_forward(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k,
                                          s.max_seqlen_q, s.max_seqlen_k, **_options(s))
    ts = (torch.randn_like(out), s.q.detach(), s.k.detach(), s.v.detach(), out, lse, torch.randn_like(lse))
    return tuple(t.clone().requires_grad_(requires_grad) for t in ts)


def _call_backward(s, go, q, k, v, out, lse, gl):
    return _ops.attention_backward(go, q, k, v, out, lse, s.cu_seqlens_q, s.cu_seqlens_k,
                                   s.max_seqlen_q, s.max_seqlen_k, **_options(s), grad_lse=gl)


# ---------------------------------------------------------------- the dense function


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_dense_matches_reference_autograd_and_kernel(device, name):
    s = _sample(name, device, requires_grad=True)
    out, lse, _ = reference.attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, **s.kwargs)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    ref = torch.autograd.grad((out * go).sum() + (_finite(lse) * gl).sum(), (s.q, s.k, s.v))
    args = (go, s.q.detach(), s.k.detach(), s.v.detach(), out.detach(), lse.detach())
    dense = attention_backward_dense(*args, s.cu_seqlens_q, s.cu_seqlens_k, **_options(s), grad_lse=gl)
    kernel = _ops.attention_backward(*args, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                     s.max_seqlen_k, **_options(s), grad_lse=gl)
    for d, r, kk in zip(dense, ref, kernel):
        assert d.dtype == r.dtype and d.shape == r.shape
        torch.testing.assert_close(d, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d, kk, rtol=1e-10, atol=1e-12)
    assert all(d.abs().sum() > 0 for d in dense)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_float32_matches_kernel_bfloat16_computes_in_float32(device):
    s = _sample("alibi_batch_softcap_window", device, torch.float32)
    args = _backward_inputs(s, requires_grad=False)
    dense = attention_backward_dense(*args[:6], s.cu_seqlens_q, s.cu_seqlens_k, **_options(s), grad_lse=args[6])
    for d, kk in zip(dense, _call_backward(s, *args)):
        torch.testing.assert_close(d, kk, rtol=1e-5, atol=1e-5)
    half = [t.to(torch.bfloat16) for t in args[:5]] + [args[5]]
    dense_bf16 = attention_backward_dense(*half, s.cu_seqlens_q, s.cu_seqlens_k, **_options(s), grad_lse=args[6])
    assert [d.dtype for d in dense_bf16] == [torch.bfloat16] * 3
    for d, r in zip(dense_bf16, dense):
        torch.testing.assert_close(d.float(), r, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_keep_matches_philox_keep(device):
    rows = torch.tensor([0, 1, 2, 7, 9, 40], device=device)
    cols = torch.tensor([0, 3, 5, 6, 11], device=device)
    for seed, offset in ((7, 3), (2**40 + 5, 2**33 + 9), (2**62 - 1, 2**62 - 3)):
        keep = _dropout_keep(_rng(seed, offset, device), 0.3, 3, rows, cols)
        h = torch.arange(3, device=device)[:, None, None]
        expected = reference.philox_keep(seed, offset, h, rows[None, :, None], cols[None, None, :], 0.3)
        assert keep.shape == (3, 6, 5)
        assert torch.equal(keep, expected)
        assert 0 < int(keep.sum()) < keep.numel()


def test_dense_traces_with_fake_tensors():
    """No host sync and no data-dependent shape: the function runs on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    s = _sample("dropout_everything", "cpu")
    args = _backward_inputs(s, requires_grad=False)
    cu_q, cu_k, opts = s.cu_seqlens_q, s.cu_seqlens_k, _options(s)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = lambda t: None if t is None else mode.from_tensor(t)
        opts = {n: fake(v) if isinstance(v, torch.Tensor) else v for n, v in opts.items()}
        dq, dk, dv = attention_backward_dense(*map(fake, args[:6]), fake(cu_q), fake(cu_k), **opts,
                                              grad_lse=fake(args[6]))
    assert (dq.shape, dk.shape, dv.shape) == (s.q.shape, s.k.shape, s.v.shape)


# ---------------------------------------------------------------- gradient checks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_attention_backward_all_inputs(device, name):
    """The vjp of attention_backward w.r.t. grad_out, q, k, v, out, lse and grad_lse."""
    s = _sample(name, device)
    inputs = _backward_inputs(s, requires_grad=True)
    fn = lambda *ts: _call_backward(s, *ts)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck_through_forward(device, name):
    """Second order of (out, lse) in q, k, v: attention_backward's vjp composed with the forward's."""
    s = _sample(name, device, requires_grad=True)
    fn = lambda q, k, v: _attention(s, q, k, v)
    assert torch.autograd.gradgradcheck(fn, (s.q, s.k, s.v), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["alibi_batch_softcap_window", "dropout"])
def test_gradgradcheck_through_forward_full_jacobian(device, name):
    """As above without fast mode: every entry of the second-order Jacobian."""
    s = _sample(name, device, requires_grad=True)
    fn = lambda q, k, v: _attention(s, q, k, v)
    assert torch.autograd.gradgradcheck(fn, (s.q, s.k, s.v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["causal_lq_ne_lk_gqa_dv", "dropout_everything"])
def test_gradgradcheck_attention_backward_third_order(device, name):
    """The backward of attention_backward's backward (create_graph through the dense function)."""
    s = _sample(name, device)
    inputs = _backward_inputs(s, requires_grad=True)
    fn = lambda *ts: _call_backward(s, *ts)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ---------------------------------------------------------------- the scenario


@pytest.mark.filterwarnings("error")  # no "autograd kernel was not registered" warning
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["basic", "zero_and_len1_mqa", "causal_lq_gt_lk_rows_see_nothing",
                                  "alibi_batch_softcap_window", "padded_cu_seqlens", "dropout_everything"])
def test_create_graph_second_order_matches_reference(device, name):
    s = _sample(name, device, requires_grad=True)
    results = []
    for fn in (_attention, _reference):
        out, lse = fn(s, s.q, s.k, s.v)
        (gq,) = torch.autograd.grad(out.pow(2).sum() + lse.pow(2).sum(), s.q, create_graph=True)
        results.append(torch.autograd.grad(gq.pow(2).sum(), (s.q, s.k, s.v)))
    for g, r in zip(*results):
        assert g.abs().max() > 1e-3  # the issue: these were silently zero
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_second_order_with_q_k_v_one_tensor(device):
    """q, k and v the same tensor: attention_backward sees one saved tensor three times and
    must still give each argument its own vjp."""
    torch.manual_seed(3)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    x = torch.randn(7, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    results = []
    for fn in (lambda: torch_varlen.varlen_attention(x, x, x, cu, cu, 4, 4, causal=True)[0],
               lambda: reference.attention(x, x, x, cu, cu, causal=True)[0]):
        (g,) = torch.autograd.grad(fn().pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.pow(2).sum(), x)[0])
    assert results[0].abs().max() > 1e-3
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["padded_cu_seqlens", "dropout_everything"])
def test_opcheck_with_inputs_that_require_grad(device, name):
    s = _sample(name, device, torch.float32, requires_grad=True)
    opts = _options(s)
    fwd_args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k)
    torch.library.opcheck(_ops.attention_forward.default, fwd_args, opts)
    go, q, k, v, out, lse, gl = _backward_inputs(s, requires_grad=True)
    bwd_args = (go, q, k, v, out, lse, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k)
    torch.library.opcheck(_ops.attention_backward.default, bwd_args, dict(opts, grad_lse=gl))
    # positional, without grad_lse: the dispatcher drops the trailing defaults
    positional = bwd_args + tuple(opts[n] for n in ("softmax_scale", "window_left", "window_right", "softcap",
                                                    "alibi_slopes", "cu_seqlens_q_padded",
                                                    "cu_seqlens_k_padded", "dropout_p", "rng_state"))
    torch.library.opcheck(_ops.attention_backward.default, positional)


# ---------------------------------------------------------------- what is not supported


def test_fp8_has_no_double_backward():
    s = _sample("basic", "cpu", torch.float32)
    q8, k8, v8 = (t.to(torch.float8_e4m3fn).requires_grad_() for t in (s.q, s.k, s.v))
    out, _ = torch_varlen.varlen_attention(q8, k8, v8, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                           s.max_seqlen_k)
    with pytest.raises(RuntimeError, match="FP8 attention is forward-only"):
        torch.autograd.grad(out.float().pow(2).sum(), q8, create_graph=True)
    go = torch.randn(out.shape).to(torch.float8_e4m3fn)
    lse = torch.zeros(s.q.shape[1], s.q.shape[0])
    with pytest.raises(ValueError, match="double backward of varlen attention: FP8"):
        attention_backward_dense(go, q8, k8, v8, go, lse, s.cu_seqlens_q, s.cu_seqlens_k, 0.5)
