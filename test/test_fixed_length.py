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
