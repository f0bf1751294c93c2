"""flash-attn's fixed-length functions (flash_attn_func, _kvpacked_, _qkvpacked_) on (B, S, H, D):
one varlen call with views, against reference.attention in float64, on every device."""

import pytest
import torch

import torch_varlen
from torch_varlen import ops as varlen_ops
from torch_varlen import reference
from conftest import DEVICES


def _reference(q, k, v, **kw):
    """reference.attention over (B, S, H, D) -> out (B, S_q, H, Dv), lse (B, H, S_q)."""
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    cu = lambda s: torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)  # noqa: E731
    out, lse, _ = reference.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu(sq), cu(sk), **kw)
    return out.view(b, sq, h, -1), lse.view(h, b, sq).transpose(0, 1)


def _randn(*shape, device, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(2, 1), softcap=2.0)],
                         ids=["full", "causal", "window_softcap"])
def test_flash_attn_func_matches_reference(device, kw):
    torch.manual_seed(0)
    q = _randn(2, 5, 4, 8, device=device, requires_grad=True)
    k = _randn(2, 7, 2, 8, device=device, requires_grad=True)
    v = _randn(2, 7, 2, 6, device=device, requires_grad=True)
    out = torch_varlen.flash_attn_func(q, k, v, **kw)
    ref, ref_lse = _reference(q, k, v, **kw)
    assert out.shape == (2, 5, 4, 6)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    out2, lse, probs = torch_varlen.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    torch.testing.assert_close(out2, out)
    assert lse.shape == (2, 4, 5) and probs.shape == (2, 4, 5, 7)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", probs.double(),
                                            v.repeat_interleave(2, 2)), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_variants_are_views_and_match(device, monkeypatch):
    torch.manual_seed(1)
    qkv = _randn(3, 6, 3, 2, 8, device=device, requires_grad=True)
    kv = _randn(3, 4, 2, 1, 8, device=device, requires_grad=True)
    q = _randn(3, 6, 2, 8, device=device, requires_grad=True)

    seen = []
    real = varlen_ops._ops

    class Spy:
        def __getattr__(self, name):
            op = getattr(real, name)

            def call(*args, **kwargs):
                seen.append([a.data_ptr() for a in args[:3]])
                return op(*args, **kwargs)
            return call

    monkeypatch.setattr(varlen_ops, "_ops", Spy())
    out = torch_varlen.flash_attn_qkvpacked_func(qkv, causal=True)
    base, item = qkv.data_ptr(), qkv.element_size()
    assert seen[-1] == [base, base + 16 * item, base + 32 * item]  # q, k, v read in place
    ref, _ = _reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, go)[0], torch.autograd.grad(ref, qkv, go)[0])

    out = torch_varlen.flash_attn_kvpacked_func(q, kv, 0.0, 0.5)  # positional dropout_p, scale
    assert seen[-1][1:] == [kv.data_ptr(), kv.data_ptr() + 8 * kv.element_size()]
    ref, _ = _reference(q, kv[:, :, 0], kv[:, :, 1], softmax_scale=0.5)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out, (q, kv), go[:, :, :2])
    ref_grads = torch.autograd.grad(ref, (q, kv), go[:, :, :2])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_extra_keywords_reach_the_varlen_op():
    """Options beyond flash-attn's (here sink and alibi) pass through; the lse is a view."""
    torch.manual_seed(2)
    q, k, v = (_randn(2, 4, 2, 8, device="cpu") for _ in range(3))
    sink = torch.randn(2, dtype=torch.float64)
    slopes = torch.rand(2, 2, dtype=torch.float32)
    out, lse, _ = torch_varlen.flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True,
                                               sink=sink)
    ref, ref_lse = _reference(q, k, v, alibi_slopes=slopes, sink=sink)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_shapes_raise(device):
    q = _randn(2, 4, 2, 8, device=device)
    with pytest.raises(ValueError, match=r"q must be \(batch, seqlen, nheads, headdim\)"):
        torch_varlen.flash_attn_func(q[0], q, q)
    with pytest.raises(ValueError, match="k must have q's batch size 2"):
        torch_varlen.flash_attn_func(q, q[:1], q)
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\)"):
        torch_varlen.flash_attn_qkvpacked_func(q)
    with pytest.raises(ValueError, match=r"kv must be \(batch, seqlen_k, 2, nheads_k, headdim\)"):
        torch_varlen.flash_attn_kvpacked_func(q, torch.stack([q, q, q], 2))


# ---------------------------------------------------------------- torch_varlen.testing


def test_generate_random_padding_mask_modes():
    from torch_varlen.testing import generate_random_padding_mask

    torch.manual_seed(3)
    full = generate_random_padding_mask(9, 3, "cpu", mode="full")
    assert full.dtype == torch.bool and full.shape == (3, 9) and bool(full.all())
    for mode, low in (("random", 1), ("third", 3)):
        m = generate_random_padding_mask(9, 50, "cpu", mode=mode)
        lengths = m.sum(1)
        assert bool((lengths >= low).all()) and bool((lengths <= 9).all())
        assert torch.equal(m, torch.arange(9)[None] < lengths[:, None])  # right padding
    z = generate_random_padding_mask(30, 7, "cpu", zero_lengths=True).sum(1)
    assert z[0] == 0 and z[5] == 0 and z[-1] == 0
    with pytest.raises(ValueError, match="mode must be"):
        generate_random_padding_mask(4, 2, "cpu", mode="left")


@pytest.mark.parametrize("device", DEVICES)
def test_guide_end_to_end_example_with_generate_qkv(device):
    """The AITER guide's example (generate_qkv, varlen attention, pad back) at small sizes, and
    the kv- / qkv-packed returns driving the packed varlen functions to the same result."""
    from torch_varlen.testing import generate_qkv, generate_random_padding_mask

    torch.manual_seed(4)
    b, s, h, d = 3, 10, 2, 8
    q, k, v = (_randn(b, s, h, d, device=device) for _ in range(3))
    qmask = generate_random_padding_mask(s, b, device, zero_lengths=True)
    kmask = generate_random_padding_mask(s, b, device)
    (q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, q_pad, k_pad, v_pad, output_pad_fn,
     dq_pad_fn, dk_pad_fn) = generate_qkv(q, k, v, qmask, kmask)
    assert q_unpad.requires_grad and q_pad.requires_grad and not q_pad.grad_fn
    out_unpad = torch_varlen.flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q,
                                                    max_k, causal=True)
    out = output_pad_fn(out_unpad)
    assert out.shape == (b, s, h, d) and bool((out[~qmask] == 0).all())
    ref = reference.attention(q_unpad, k_unpad, v_unpad, cu_q, cu_k, causal=True)[0]
    torch.testing.assert_close(out[qmask], ref)
    dq, dk = torch.autograd.grad(out_unpad.sum(), (q_unpad, k_unpad))
    assert dq_pad_fn(dq).shape == q.shape and dk_pad_fn(dk).shape == k.shape

    (q2, kv_unpad, cu_q2, cu_k2, mq, mk, _, kv, _, _, dkv_pad_fn) = generate_qkv(
        q, k, v, qmask, kmask, kvpacked=True)
    assert kv.shape == (b, s, 2, h, d)
    out2 = torch_varlen.flash_attn_varlen_kvpacked_func(q2, kv_unpad, cu_q2, cu_k2, mq, mk, causal=True)
    torch.testing.assert_close(out2, out_unpad)
    assert dkv_pad_fn(torch.autograd.grad(out2.sum(), kv_unpad)[0]).shape == kv.shape

    qkv_unpad, cu, mx, qkv, pad_fn, dqkv_pad_fn = generate_qkv(q, k, v, qmask, qmask, qkvpacked=True)
    out3 = torch_varlen.flash_attn_varlen_qkvpacked_func(qkv_unpad, cu, mx)
    ref3 = reference.attention(*qkv_unpad.unbind(1), cu, cu)[0]
    torch.testing.assert_close(out3, ref3)
    assert pad_fn(out3).shape == (b, s, h, d) and qkv.shape == (b, s, 3, h, d)
    assert dqkv_pad_fn(torch.autograd.grad(out3.sum(), qkv_unpad)[0]).shape == qkv.shape

    # no masks: every row kept, cu_seqlens an arange
    full = generate_qkv(q, k, v)
    assert full[3].tolist() == list(range(0, (b + 1) * s, s)) and full[5] == s
    with pytest.raises(ValueError, match="qkvpacked needs"):
        generate_qkv(q, k, v, qmask, kmask, qkvpacked=True)
