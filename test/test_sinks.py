"""Learnable attention sinks (``sink=``: gpt-oss's s_aux, FA4's learnable_sink, AITER's sink_ptr)
on every path: the CPU kernel, the Triton kernels (under TRITON_INTERPRET=1 in a child pytest
here, compiled on CUDA), FA4's merge, the public API, torch.compile and the HF integration,
all against reference.attention(sink=...) in float64, gradients of the sink included.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import torch_varlen
from torch_varlen import reference
from conftest import DEVICES, requires_cuda
from interp_child import run_interpreter_tests
from samples import attention_sample_inputs, make_attention_sample
import test_attention_triton  # noqa: F401  (applies its interpreter fixes under TRITON_INTERPRET=1)
from test_attention_triton import interpreter_bounds_check  # noqa: F401  (autouse under the interpreter)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child of test_sinks_triton_interpreter_subprocess")
_ops = torch.ops.varlen


def _sink(nheads, dtype=torch.float64, device="cpu", minus_inf=True):
    """Random sink logits around the scores' scale; head 0 is -inf (no sink) when asked."""
    s = (torch.randn(nheads, dtype=torch.float64) * 1.5).to(dtype).to(device)
    if minus_inf and nheads > 1:
        s[0] = -math.inf
    return s


def _finite(lse):
    return lse.masked_fill(~torch.isfinite(lse), 0)


def _loss_grads(out, lse, inputs, do, dlse):
    loss = (out.double() * do).sum() + (_finite(lse).double() * dlse).sum()
    return torch.autograd.grad(loss, inputs)


def _results(run, s, sink, dtype, do, dlse):
    """run(q, k, v, sink) in dtype -> (out, lse, dq, dk, dv, dsink)."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (s.q, s.k, s.v))
    sk = sink.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out, lse = run(s, q, k, v, sk)
    return (out.detach(), lse.detach()) + _loss_grads(out, lse, (q, k, v, sk), do, dlse)


def _op(s, q, k, v, sink):
    return torch_varlen.varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q,
                                         s.max_seqlen_k, sink=sink, **s.kwargs)


def _ref(s, q, k, v, sink):
    return reference.attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, sink=sink, **s.kwargs)[:2]


def _ref_same_dtype(s, q, k, v, sink):
    """The reference in the inputs' own dtype (the 2x rule's yardstick)."""
    out, lse = _ref(s, q, k, v, sink)
    return out, lse.float() if lse.dtype != torch.float64 else lse


def _inputs(s):
    do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64, device=s.q.device)
    dlse = torch.randn(s.q.shape[1], s.q.shape[0], dtype=torch.float64, device=s.q.device)
    return do, dlse


_NAMES = ("out", "lse", "dq", "dk", "dv", "dsink")


def check_float64(s, run, tol=1e-10):
    """run in float64 against the float64 reference: every output within tol (relative)."""
    sink = _sink(s.q.shape[1], device=s.q.device)
    do, dlse = _inputs(s)
    got = _results(run, s, sink, torch.float64, do, dlse)
    ref = _results(_ref, s, sink, torch.float64, do, dlse)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1])), s.name
    for name, x, r in zip(_NAMES, got, ref):
        if name == "lse":
            x, r = _finite(x), _finite(r)
        assert not x.isnan().any(), f"{s.name}: {name} has NaN"
        bound = tol * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        err = (x - r).abs().max().item() if x.numel() else 0.0
        assert err <= bound, f"{s.name}: {name} err {err:.3g} > {bound:.3g}"


def check_two_x(s, run, dtype):
    """The 2x rule: err(run in dtype) <= 2 * err(reference in dtype) + atol, vs float64."""
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    sink = _sink(s.q.shape[1], device=s.q.device)
    do, dlse = _inputs(s)
    got = _results(run, s, sink, dtype, do, dlse)
    ref = _results(_ref, s, sink, torch.float64, do, dlse)
    same = _results(_ref_same_dtype, s, sink, dtype, do, dlse)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1])), s.name
    for name, x, r, m in zip(_NAMES, got, ref, same):
        if name == "lse":
            x, r, m = _finite(x), _finite(r), _finite(m)
        assert not x.isnan().any(), f"{s.name}: {name} has NaN"
        err = (x.double() - r).abs().max().item() if x.numel() else 0.0
        err_same = (m.double() - r).abs().max().item() if m.numel() else 0.0
        # dsink sums over every row of a head: scale its atol by the rows summed
        tol = atol * (max(1, s.q.shape[0]) if name == "dsink" else 1)
        assert err <= 2 * err_same + tol, f"{s.name}: {name} err {err:.3g} > 2 * {err_same:.3g} + {tol}"


def _samples(device, dtype):
    yield from attention_sample_inputs(device, dtype)
    mk = lambda *a, **kw: make_attention_sample(*a, device=device, dtype=dtype, **kw)  # noqa: E731
    yield mk([37, 0, 17, 33], [20, 5, 40, 0], 4, 2, 32, 16, causal=True, name="long_causal_gqa_no_keys")
    yield mk([21, 3], [25, 3], 4, 2, 16, 16, dropout_p=0.3, window_size=(5, 2),
             rng_state=torch.tensor([5, 7], device=device), name="dropout_window")


def _sample(index, device, dtype):
    torch.manual_seed(index)
    return list(_samples(device, dtype))[index]


N_SAMPLES = len(list(_samples("cpu", torch.float64)))


# ---------------------------------------------------------------- our kernels (CPU; CUDA when present)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(N_SAMPLES))
def test_sinks_float64_match_reference(device, index):
    check_float64(_sample(index, device, torch.float64), _op)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index", [2, 9, N_SAMPLES - 2])
def test_sinks_two_x_rule(device, dtype, index):
    check_two_x(_sample(index, device, torch.float64), _op, dtype)


@pytest.mark.parametrize("name", ["basic", "zero_and_len1_mqa", "padded_cu_seqlens", "alibi_batch_softcap_window"])
def test_sinks_gradcheck(name):
    s = next(x for x in attention_sample_inputs("cpu", torch.float64) if x.name == name)
    sink = _sink(s.q.shape[1]).requires_grad_()
    q, k, v = (x.detach().requires_grad_() for x in (s.q, s.k, s.v))

    def fn(q, k, v, sink):
        out, lse = _op(s, q, k, v, sink)
        return out, _finite(lse)

    assert torch.autograd.gradcheck(fn, (q, k, v, sink), eps=1e-6, atol=1e-5)


def test_sinks_gradgradcheck():
    """Second order through the sink: attention_backward's formula (via the saved out and lse)
    and sink_grad's torch ops."""
    s = make_attention_sample([3, 0, 2], [2, 3, 2], 2, 1, 4, 4, "cpu", torch.float64, causal=True)
    sink = _sink(2, minus_inf=False).requires_grad_()
    q, k, v = (x.detach().requires_grad_() for x in (s.q, s.k, s.v))

    def fn(q, k, v, sink):
        out, lse = _op(s, q, k, v, sink)
        return out, _finite(lse)

    assert torch.autograd.gradgradcheck(fn, (q, k, v, sink), eps=1e-6, atol=1e-5)


def test_sinks_row_without_keys_and_rows_outside_sequences():
    """A row that sees no key: out 0, lse = sink (and -inf for a -inf sink); rows outside
    every sequence stay 0 / -inf; dsink gets exp(sink - lse) * (dlse - D) from each row."""
    s = make_attention_sample([2, 3], [0, 4], 2, 2, 8, 8, "cpu", torch.float64, pad_q=2)
    sink = torch.tensor([-math.inf, 0.5], dtype=torch.float64, requires_grad=True)
    out, lse = _op(s, s.q, s.k, s.v, sink)
    assert (out[:2] == 0).all() and torch.isneginf(lse[0, :2]).all() and (lse[1, :2] == 0.5).all()
    assert (out[2:4] == 0).all() and torch.isneginf(lse[:, 2:4]).all()  # padding rows
    assert torch.isneginf(lse[:, 7:]).all() and torch.isfinite(lse[:, 4:7]).all()
    (dsink,) = torch.autograd.grad(_finite(lse).sum(), sink)
    # d lse / d sink = exp(sink - lse): 1 on each no-key row, exp(0.5 - lse) on the others
    expect = 2 + torch.exp(0.5 - lse[1, 4:7]).sum()
    torch.testing.assert_close(dsink, torch.stack([torch.zeros((), dtype=torch.float64), expect]))


@pytest.mark.filterwarnings("error:.*an autograd kernel was not registered")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_sinks_opcheck(device, requires_grad):
    s = make_attention_sample([3, 0, 5], [4, 2, 5], 4, 2, 8, 8, device, torch.float64,
                              requires_grad=requires_grad, causal=True)
    sink = _sink(4, device=device).requires_grad_(requires_grad)
    args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 5, 5, 0.35, -1, 0)
    torch.library.opcheck(_ops.attention_forward.default, args, dict(sink=sink))


@pytest.mark.parametrize("device", DEVICES)
def test_sinks_bad_inputs_raise(device):
    s = make_attention_sample([2, 3], [2, 3], 4, 2, 8, 8, device, torch.float32)
    f = lambda sink, **kw: torch_varlen.varlen_attention(  # noqa: E731
        s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 3, 3, sink=sink, **kw)
    cases = [(torch.zeros(3, device=device), r"sink must be \(nheads,\) = \(4,\), got \(3,\)"),
             (torch.zeros(1, 4, device=device), r"sink must be \(nheads,\) = \(4,\), got \(1, 4\)"),
             (torch.zeros(4, device=device, dtype=torch.bfloat16),
              r"sink must be torch.float32 \(softmax_lse's dtype\), got torch.bfloat16"),
             (torch.zeros(4, device="meta"), "sink must be on q's device")]
    meta = [t.to("meta") for t in (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k)]
    for sink, match in cases:
        with pytest.raises(RuntimeError, match=match):
            f(sink)
        # the fake (meta tensors): the same checks, the same messages
        other = torch.zeros(4, device=device) if sink.device.type == "meta" else sink.to("meta")
        with pytest.raises(RuntimeError, match=match.replace("meta", device) if sink.is_meta else match):
            _ops.attention_forward(*meta, 3, 3, 0.3, sink=other)
    with pytest.raises(ValueError, match="sink and sink_ptr are the same option"):
        torch_varlen.flash_attn_varlen_func(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 3, 3,
                                            sink=torch.zeros(4, device=device), sink_ptr=torch.ones(4, device=device))


def test_sink_ptr_is_sink_and_attn_probs_exclude_it():
    s = make_attention_sample([3, 4], [5, 4], 2, 1, 8, 8, "cpu", torch.float32, causal=True)
    sink = _sink(2, torch.float32, minus_inf=False)
    args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 4, 5)
    out, lse, probs = torch_varlen.flash_attn_varlen_func(*args, causal=True, sink_ptr=sink,
                                                          return_attn_probs=True)
    torch.testing.assert_close(out, torch_varlen.flash_attn_varlen_func(*args, causal=True, sink=sink))
    assert (probs.sum(-1)[0, :, :3] < 1).all()  # the sink takes its share of every row
    ref, ref_lse = _ref(s, s.q.double(), s.k.double(), s.v.double(), sink)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)


def test_sinks_compile_fullgraph_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def step(q, k, v, cu, max_len, sink):
        out, lse = torch_varlen.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True, sink=sink)
        return (out.float() ** 2).sum() + _finite(lse).sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    sink = _sink(4, torch.float32, minus_inf=False).requires_grad_()
    for lengths in ([3, 5], [7, 1, 2], [4, 4, 0, 6]):
        s = make_attention_sample(lengths, lengths, 4, 2, 16, 16, "cpu", torch.float32, requires_grad=True)
        args = (s.q, s.k, s.v, s.cu_seqlens_q, max(lengths), sink)
        got = compiled(*args)
        g = torch.autograd.grad(got, (s.q, sink))
        ref = step(*args)
        r = torch.autograd.grad(ref, (s.q, sink))
        torch.testing.assert_close(got, ref)
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def _check_fp8(run_forward):
    """FP8 forward (float8_e4m3fn q, k, v, per-head descales) with a sink, against the
    reference's float64 dequantized attention with the same sink."""
    torch.manual_seed(5)
    s = make_attention_sample([9, 0, 17], [12, 3, 17], 4, 2, 32, 32, "cpu", torch.float32, causal=True)
    q, k, v = (x.to(torch.float8_e4m3fn) for x in (s.q, s.k, s.v))
    descale = torch.rand(3, 2) * 0.5 + 0.5
    sink = _sink(4, torch.float32)
    out, lse = run_forward(q, k, v, s, descale, sink)
    ref, ref_lse, _ = reference.attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, causal=True, sink=sink,
                                          q_descale=descale, k_descale=descale, v_descale=descale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-2)
    torch.testing.assert_close(_finite(lse).double(), _finite(ref_lse).double(), rtol=0, atol=1e-4)


def test_sinks_fp8_forward_cpu():
    _check_fp8(lambda q, k, v, s, d, sink: torch_varlen.varlen_attention(
        q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, 17, 17, causal=True, q_descale=d, k_descale=d,
        v_descale=d, sink=sink))


@interp_only
def test_interp_sinks_fp8_forward():
    from torch_varlen.kernels import attention as triton_attention

    _check_fp8(lambda q, k, v, s, d, sink: triton_attention.attention_forward(
        q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, 17, 17, 32 ** -0.5, -1, 0, q_descale=d, k_descale=d,
        v_descale=d, sink=sink))


# ---------------------------------------------------------------- FA4: the exact merge, on the CPU


def test_fa4_merge_sink_is_exact_and_its_backward_needs_nothing_more():
    """kernels/fa4.py runs FA4 over the keys alone and folds the sink in with merge_sink; FA4's
    backward then gets the merged out and lse. Here the keys-alone attention and that backward
    are our CPU op's (the same contract), compared with attention with the sink."""
    from torch_varlen.kernels import fa4

    s = make_attention_sample([3, 0, 6, 2], [5, 3, 6, 0], 4, 2, 8, 8, "cpu", torch.float64, causal=True)
    extra = torch.randn(3, 4, 8, dtype=torch.float64)  # rows past cu_seqlens_q[-1]
    q = torch.cat([s.q, extra])
    sink = _sink(4)
    args = (q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 6, 6, 0.4, -1, 0)
    out0, lse0 = _ops.attention_forward(*args)
    out, lse = fa4.merge_sink(out0, lse0, sink, s.cu_seqlens_q)
    ref_out, ref_lse = _ops.attention_forward(*args, sink=sink)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.isneginf(lse[:, 11:]).all() and (out[11:] == 0).all()
    do = torch.randn_like(out)
    grads = _ops.attention_backward(do, q, s.k, s.v, out, lse, *args[3:])
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, s.k, s.v))
    o2, _ = _ops.attention_forward(q2, k2, v2, *args[3:], sink=sink)
    for g, r in zip(grads, torch.autograd.grad(o2, (q2, k2, v2), do)):
        torch.testing.assert_close(g, r)


# ---------------------------------------------------------------- Triton, under the interpreter


def test_sinks_triton_interpreter_subprocess():
    """Runs the test_interp_* tests in a child pytest with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__, "interp_", min_passed=8)


def _launchers(s, q, k, v, sink):
    """The Triton launchers with autograd: the forward launcher, then the backward launcher
    and autograd.py's sink_grad, as the CUDA kernels run them."""
    from torch_varlen.autograd import sink_grad
    from torch_varlen.kernels import attention as triton_attention

    kw = s.kwargs
    left, right = kw.get("window_size", (-1, -1))
    right = 0 if kw.get("causal") else right
    scale = kw.get("softmax_scale") or q.shape[-1] ** -0.5
    launch = (s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k, scale, left, right,
              kw.get("softcap", 0.0), kw.get("alibi_slopes"), kw.get("cu_seqlens_q_padded"),
              kw.get("cu_seqlens_k_padded"), kw.get("dropout_p", 0.0), kw.get("rng_state"), False)

    class Attention(torch.autograd.Function):  # test glue only: the library uses register_autograd
        @staticmethod
        def forward(ctx, q, k, v, sink):
            out, lse = triton_attention.attention_forward(q, k, v, *launch, sink=sink)
            ctx.save_for_backward(q, k, v, out, lse, sink)
            return out, lse

        @staticmethod
        def backward(ctx, do, dlse):
            q, k, v, out, lse, sink = ctx.saved_tensors
            dq, dk, dv = triton_attention.attention_backward(do.contiguous(), q, k, v, out, lse, *launch,
                                                             grad_lse=dlse.contiguous())
            return dq, dk, dv, sink_grad(sink, out, lse, do, dlse)

    return Attention.apply(q, k, v, sink)


@interp_only
@pytest.mark.parametrize("index", range(N_SAMPLES))
def test_interp_sinks_float64(index):
    check_float64(_sample(index, "cpu", torch.float64), _launchers)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("index", [1, 2, 9, N_SAMPLES - 2, N_SAMPLES - 1])
def test_interp_sinks_two_x_rule(dtype, index, monkeypatch):
    from torch_varlen.kernels import attention as triton_attention

    monkeypatch.setattr(triton_attention, "_poison_outputs", True)
    check_two_x(_sample(index, "cpu", torch.float64), _launchers, dtype)


@interp_only
def test_interp_sinks_bad_inputs_raise():
    from torch_varlen.kernels import attention as triton_attention

    s = make_attention_sample([2, 3], [2, 3], 4, 2, 8, 8, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match=r"sink must be \(nheads,\) = \(4,\), got \(2,\)"):
        triton_attention.attention_forward(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 3, 3, 0.3,
                                           sink=torch.zeros(2))
    with pytest.raises(RuntimeError, match="sink must be torch.float32"):
        triton_attention.attention_forward(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 3, 3, 0.3,
                                           sink=torch.zeros(4, dtype=torch.float64))


# ---------------------------------------------------------------- CUDA (compiled Triton kernels)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index", [1, 2, 9, N_SAMPLES - 2, N_SAMPLES - 1])
def test_gpu_sinks_two_x_rule(dtype, index):
    with torch_varlen.attention_backend("torch_varlen"):
        check_two_x(_sample(index, "cuda", torch.float64), _op, dtype)


# ---------------------------------------------------------------- Hugging Face: gpt-oss


def test_gpt_oss_matches_eager_with_sinks():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no GptOssForCausalLM")
    import torch_varlen.integrations.transformers  # noqa: F401  (registers "varlen")

    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"], use_cache=False)
    model = transformers.GptOssForCausalLM(config).float().train()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 1.0)  # far from 0, so the sinks matter
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    labels = ids.masked_fill(mask == 0, -100)

    def run(impl):
        model.set_attn_implementation(impl)
        model.zero_grad()
        res = model(input_ids=ids, attention_mask=mask, labels=labels)
        res.loss.backward()
        sinks = [layer.self_attn.sinks.grad.clone() for layer in model.model.layers]
        return res.logits.detach(), sinks

    ref, ref_sinks = run("eager")
    got, got_sinks = run("varlen")
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], rtol=0, atol=1e-5)
    for g, r in zip(got_sinks, ref_sinks):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        assert r.abs().max() > 1e-4  # the sinks do get a gradient
