"""The FlashAttention-4 backend of the attention ops (torch_varlen/kernels/fa4.py).

CPU half (CI): which calls FA4 can run (``fa4.supported``), how the ``backend`` argument,
``attention_backend`` and TORCH_VARLEN_ATTENTION_BACKEND choose, the errors of a forced 'fa4',
and that the public API hands the chosen backend to the op as a constant under torch.compile.

GPU half: FA4 through our ops against reference.py in float64 (the 2x same-dtype rule of
test_attention_triton.py), compiled training step, CUDA-graph capture. These need a GPU and an
importable flash_attn.cute, else they skip saying which is missing. FA4 lives outside the venv
on the GPU machine: TORCH_VARLEN_FA4_SITE names its site-packages directory. Run this file in
its own pytest process there, since adding FA4 makes backend 'auto' pick it in later tests too.
FA4 JIT-compiles every kernel configuration on first use (seconds each), so the GPU tests share
a handful of configurations.
"""

from __future__ import annotations

import logging
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TORCH_VARLEN_FA4_SITE"):
    site.addsitedir(os.environ["TORCH_VARLEN_FA4_SITE"])

import torch_varlen  # noqa: E402
from torch_varlen import ops as varlen_ops  # noqa: E402
from torch_varlen.kernels import fa4  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from samples import assert_compiled_step_matches_eager, cu_seqlens, make_attention_sample  # noqa: E402
from test_attention_triton import _check, _finite  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
H90 = (9, 0)


def _qkv(dtype=torch.bfloat16, d=64, dv=64, h=4, hk=2, device="cpu"):
    mk = lambda n, heads, dim: torch.randn(n, heads, dim, dtype=torch.float64).to(dtype).to(device)
    return mk(9, h, d), mk(7, hk, d), mk(7, hk, dv)


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(fa4, "_logged", set())


@pytest.fixture
def fa4_installed(monkeypatch):
    """Pretend flash_attn.cute imported (the CPU tests never import or call it)."""
    monkeypatch.setattr(fa4, "available", lambda: (True, ""))


# ---------------------------------------------------------------- CPU: what FA4 can run


@pytest.mark.parametrize("case, kwargs, capability, reason", [
    ("bf16", {}, H90, ""),
    ("fp16_hopper", dict(dtype=torch.float16), H90, ""),
    ("blackwell", {}, (10, 0), ""),
    ("hd256_hopper", dict(d=256, dv=256), H90, ""),
    ("hd256_blackwell", dict(d=256, dv=256), (10, 0), ""),
    ("dv_ne_d_hopper", dict(d=96, dv=160, h=4, hk=4), H90, ""),
    ("gqa_dv_ne_d_hopper", dict(d=192, dv=128, h=8, hk=2), H90,
     r"GQA/MQA with headdim_v != headdim \(192, 128\) .* backward on compute capability 9.x"),
    ("deepseek_blackwell", dict(d=192, dv=128), (10, 0), ""),
    ("mqa", dict(h=8, hk=1), H90, ""),
    ("float32", dict(dtype=torch.float32), H90, r"torch.float32 inputs are not supported .*float16 or bfloat16"),
    ("float64", dict(dtype=torch.float64), H90, r"torch.float64 inputs"),
    ("ampere", {}, (8, 0), r"compute capability 8.0 is not supported by FlashAttention-4 here \(9.x or 10.x\)"),
    ("consumer_blackwell", {}, (12, 0), r"compute capability 12.0"),
    ("hd_not_multiple_of_8", dict(d=60, dv=60), H90, r"head dims \(headdim, headdim_v\) = \(60, 60\)"),
    ("hd_too_large_hopper", dict(d=264, dv=264), H90, r"\(264, 264\) .* compute capability 9.x"),
    ("hd160_blackwell", dict(d=160, dv=160), (10, 0), r"\(160, 160\) .* compute capability 10.x"),
    ("dv256_d64_blackwell", dict(d=64, dv=256), (10, 0), r"\(64, 256\)"),
])
def test_supported_dtypes_head_dims_and_gpus(case, kwargs, capability, reason):
    q, k, v = _qkv(**kwargs)
    ok, why = fa4.supported(q, k, v, capability=capability)
    assert ok == (reason == ""), (case, why)
    if reason:
        assert re.search(reason, why), (case, why)
    else:
        assert why == ""


@pytest.mark.parametrize("feature, reason", [
    (dict(dropout_p=0.1), "dropout is not supported by FlashAttention-4"),
    (dict(alibi_slopes=torch.ones(4)), "ALiBi (alibi_slopes) is not supported by FlashAttention-4"),
    (dict(cu_seqlens_q_padded=cu_seqlens([5, 4], "cpu")), "cu_seqlens_q_padded / cu_seqlens_k_padded"),
    (dict(cu_seqlens_k_padded=cu_seqlens([5, 4], "cpu")), "cu_seqlens_q_padded / cu_seqlens_k_padded"),
    (dict(q_descale=torch.ones(1), k_descale=torch.ones(1), v_descale=torch.ones(1)),
     "FP8 (q/k/v_descale) is not routed to FlashAttention-4"),
])
def test_supported_rejects_features_fa4_lacks(feature, reason):
    q, k, v = _qkv()
    ok, why = fa4.supported(q, k, v, capability=H90, **feature)
    assert not ok and reason in why
    assert fa4.supported(q, k, v, capability=H90, dropout_p=0.0)[0]  # dropout 0 is no dropout


def test_supported_reads_the_device_when_no_capability_given():
    q, k, v = _qkv()
    assert fa4.supported(q, k, v) == (False, "FlashAttention-4 runs on CUDA GPUs only, got cpu tensors")


def test_window_mapping():
    assert fa4._window(-1, -1) == (None, None)
    assert fa4._window(-1, 0) == (None, 0)  # causal
    assert fa4._window(32, 8) == (32, 8)
    assert fa4._window(0, -1) == (0, None)


def test_cover_tails_appends_two_empty_sequences():
    # Spare rows after cu_seqlens[-1]: (Lq 0, the spare keys) then (the spare queries, Lk 0).
    cu_q, cu_k = fa4._cover_tails(cu_seqlens([2, 3], "cpu"), cu_seqlens([4, 1], "cpu"), 8, 6)
    assert cu_q.tolist() == [0, 2, 5, 5, 8] and cu_k.tolist() == [0, 4, 5, 6, 6]
    assert cu_q.dtype == cu_k.dtype == torch.int32
    cu_q, cu_k = fa4._cover_tails(cu_seqlens([], "cpu"), cu_seqlens([], "cpu"), 3, 0)
    assert cu_q.tolist() == [0, 0, 3] and cu_k.tolist() == [0, 0, 0]


# ---------------------------------------------------------------- CPU: selection and errors


def test_select_fa4_forced_names_the_reason(fa4_installed):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"^backend='fa4' cannot run this call: dropout is not "
                                           r"supported by FlashAttention-4$"):
        fa4.select("fa4", q, k, v, dropout_p=0.1, capability=H90)
    with pytest.raises(RuntimeError, match=r"backend='fa4' cannot run this call: torch.float32 inputs"):
        fa4.select("fa4", *_qkv(torch.float32), capability=H90)
    with pytest.raises(RuntimeError, match=r"backend='fa4' cannot run this call: FlashAttention-4 "
                                           r"runs on CUDA GPUs only, got cpu tensors"):
        fa4.select("fa4", q, k, v)
    assert fa4.select("fa4", q, k, v, capability=H90) is True


def test_select_fa4_forced_without_fa4_installed(monkeypatch):
    monkeypatch.setattr(fa4, "_interface", None)
    monkeypatch.setattr(fa4, "_import_error", "ModuleNotFoundError: No module named 'flash_attn'")
    with pytest.raises(RuntimeError, match=r"backend='fa4' cannot run this call: flash_attn.cute is "
                                           r"not importable \(ModuleNotFoundError.*pip install "
                                           r"torch_varlen\[fa4\]"):
        fa4.select("fa4", *_qkv(), capability=H90)
    assert fa4.select("auto", *_qkv(), capability=H90) is False


def test_select_torch_varlen_and_bad_names(monkeypatch):
    def no_import():
        raise AssertionError("backend='torch_varlen' must not import flash_attn.cute")

    monkeypatch.setattr(fa4, "available", no_import)
    assert fa4.select("torch_varlen", *_qkv(), capability=H90) is False
    with pytest.raises(ValueError, match=r"backend must be None, 'auto', 'torch_varlen', 'triton', 'hopper' or 'fa4', got 'fa3'"):
        fa4.select("fa3", *_qkv(), capability=H90)
    # An unsupported call does not import FA4 either (the import takes seconds).
    assert fa4.select("auto", *_qkv(torch.float32), capability=H90) is False


def test_select_auto_logs_once_per_choice_and_reason(fa4_installed, fresh_log, caplog):
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="torch_varlen"):
        for _ in range(3):
            assert fa4.select(None, q, k, v, capability=H90) is True
            assert fa4.select("auto", q, k, v, capability=H90) is True
            assert fa4.select("auto", q, k, v, dropout_p=0.2, capability=H90) is False
            assert fa4.select("auto", q, k, v, alibi_slopes=torch.ones(4), capability=H90) is False
    messages = [r.getMessage() for r in caplog.records if r.name == "torch_varlen"]
    assert len(messages) == 3, messages
    assert "backend='auto' uses FlashAttention-4" in messages[0]
    assert messages[1].endswith("runs torch_varlen's kernels: dropout is not supported by FlashAttention-4")
    assert "ALiBi" in messages[2]


def test_forward_and_backward_resolve_alike(fa4_installed, fresh_log):
    # The CUDA kernels call select with the forward's / backward's arguments; both see the
    # same shapes, dtypes and flags, so 'auto' picks the same backend for both.
    q, k, v = _qkv()
    for feats in ({}, dict(dropout_p=0.1), dict(alibi_slopes=torch.ones(4))):
        fwd = fa4.select("auto", q, k, v, capability=H90, q_descale=None, **feats)
        bwd = fa4.select("auto", q, k, v, capability=H90, **feats)
        assert fwd == bwd == (not feats)


def _cpu_sample():
    return make_attention_sample([3, 0, 5], [4, 2, 5], 4, 2, 16, 16, "cpu", torch.float32,
                                 requires_grad=True, causal=True)


def test_forced_fa4_on_cpu_tensors_errors():
    s = _cpu_sample()
    msg = (r"backend must be None, 'auto' or 'torch_varlen' for CPU tensors \('fa4', 'triton' and "
           r"'hopper' need CUDA\), got 'fa4'")
    with pytest.raises(RuntimeError, match=msg):
        torch_varlen.varlen_attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 5, 5, backend="fa4")
    with pytest.raises(RuntimeError, match=msg):
        torch_varlen.flash_attn_varlen_func(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 5, 5,
                                            dropout_p=0.1, backend="fa4")
    with torch_varlen.attention_backend("fa4"), pytest.raises(RuntimeError, match=msg):
        torch_varlen.varlen_attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 5, 5)


# ---------------------------------------------------------------- CPU: public API -> op


class _RecordingOps:
    """Stands in for torch.ops.varlen inside torch_varlen.ops: records attention_forward's backend."""

    def __init__(self):
        self.backends = []

    def attention_forward(self, q, k, v, *args, backend=None, **kwargs):
        self.backends.append(backend)
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2]), q.new_zeros(q.shape[1], q.shape[0])


def test_public_api_passes_the_resolved_backend(monkeypatch):
    rec = _RecordingOps()
    monkeypatch.setattr(varlen_ops, "_ops", rec)
    monkeypatch.setattr(varlen_ops, "_default_backend", None)
    q, k, v = _qkv()
    cu = cu_seqlens([4, 5], "cpu"), cu_seqlens([3, 4], "cpu")
    qkv = torch.randn(9, 3, 2, 16)
    kv = qkv[:, 1:]

    torch_varlen.varlen_attention(q, k, v, *cu, 5, 4)
    torch_varlen.varlen_attention(q, k, v, *cu, 5, 4, backend="fa4")
    torch_varlen.flash_attn_varlen_func(q, k, v, *cu, 5, 4, backend="torch_varlen")
    torch_varlen.flash_attn_varlen_kvpacked_func(qkv[:, 0], kv, cu[0], cu[0], 5, 5, backend="fa4")
    torch_varlen.flash_attn_varlen_qkvpacked_func(qkv, cu[0], 5, backend="auto")
    with torch_varlen.attention_backend("torch_varlen"):
        torch_varlen.varlen_attention(q, k, v, *cu, 5, 4)
        torch_varlen.flash_attn_varlen_func(q, k, v, *cu, 5, 4)
        torch_varlen.varlen_attention(q, k, v, *cu, 5, 4, backend="fa4")  # the argument wins
        with torch_varlen.attention_backend("fa4"):
            torch_varlen.flash_attn_varlen_qkvpacked_func(qkv, cu[0], 5)
        torch_varlen.varlen_attention(q, k, v, *cu, 5, 4)
    torch_varlen.varlen_attention(q, k, v, *cu, 5, 4)
    assert rec.backends == [None, "fa4", "torch_varlen", "fa4", "auto", "torch_varlen",
                            "torch_varlen", "fa4", "fa4", "torch_varlen", None]


def test_attention_backend_restores_on_error_and_checks_name(monkeypatch):
    monkeypatch.setattr(varlen_ops, "_default_backend", None)
    with pytest.raises(KeyError):
        with torch_varlen.attention_backend("fa4"):
            assert varlen_ops._default_backend == "fa4"
            raise KeyError("boom")
    assert varlen_ops._default_backend is None
    with pytest.raises(ValueError, match=r"attention_backend name must be 'auto', 'torch_varlen', 'triton', 'hopper' or 'fa4', got 'fa3'"):
        torch_varlen.attention_backend("fa3")


def test_env_var_sets_the_default_backend():
    code = ("import torch_varlen, torch_varlen.ops as o; print(o._default_backend); "
            "o_ = torch_varlen.attention_backend('auto').__enter__(); print(o._default_backend)")
    env = dict(os.environ, TORCH_VARLEN_ATTENTION_BACKEND="torch_varlen", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch_varlen", "auto"]


def _attn_loss(q, k, v, cu_q, cu_k, max_q, max_k):
    out, lse = torch_varlen.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    return out.square().sum() + _finite(lse).sum()


def test_compiled_call_sees_the_backend_as_a_constant_and_recompiles_on_change():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    graphs = []

    class Recorder(CompileCounterWithBackend):
        def __call__(self, gm, example_inputs):
            graphs.append(gm.code)
            return super().__call__(gm, example_inputs)

    counter = Recorder("eager")
    step = torch.compile(_attn_loss, backend=counter, fullgraph=True, dynamic=True)  # no graph break
    for name in ("torch_varlen", "torch_varlen", "auto"):
        s = _cpu_sample()
        args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k)
        with torch_varlen.attention_backend(name):
            loss = step(*args)
            grads = torch.autograd.grad(loss, (s.q, s.k, s.v))
        loss_e = _attn_loss(*args)
        grads_e = torch.autograd.grad(loss_e, (s.q, s.k, s.v))
        torch.testing.assert_close(loss, loss_e)
        for g, ge in zip(grads, grads_e):
            torch.testing.assert_close(g, ge)
    # The backend string is a constant of the graph: the same value reuses it, a new one recompiles.
    assert counter.frame_count == 2, graphs
    assert "backend = 'torch_varlen'" in graphs[0] and "backend = 'auto'" in graphs[1], graphs


# ---------------------------------------------------------------- GPU: FA4 against the reference


@pytest.fixture(scope="module")
def fa4_gpu():
    """Skips (with the reason) unless FA4 can run here."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none present)")
    q, k, v = _qkv(device="cuda")
    ok, why = fa4.supported(q, k, v)
    if ok:
        ok, why = fa4.available()
    if not ok:
        pytest.skip(f"FlashAttention-4 cannot run here: {why}")


def _poison_cache(*shapes_dtypes):
    """Leave NaN-filled blocks of these sizes in the CUDA caching allocator, so the outputs FA4
    allocates with torch.empty likely start as NaN and an unwritten row shows (best effort)."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def _fa4_run(max_seqlen=None, deterministic=False):
    """A _check runner: our public API with backend='fa4', optionally a too-small max_seqlen hint."""
    def run(s, do, dlse, dropout_p=0.0, rng_state=None):
        assert dropout_p == 0.0 and rng_state is None
        q, k, v = (x.detach().requires_grad_() for x in (s.q, s.k, s.v))
        nq, h, dv = s.q.shape[0], s.q.shape[1], s.v.shape[2]
        _poison_cache(((nq, h, dv), q.dtype), ((h, nq), torch.float32), (s.q.shape, q.dtype),
                      (s.k.shape, q.dtype), (s.v.shape, q.dtype))
        mq = s.max_seqlen_q if max_seqlen is None else max_seqlen
        mk = s.max_seqlen_k if max_seqlen is None else max_seqlen
        out, lse = torch_varlen.varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, mq, mk,
                                                 deterministic=deterministic, backend="fa4", **s.kwargs)
        loss = (out.double() * do).sum() + (_finite(lse).double() * dlse).sum()
        dq, dk, dv_ = torch.autograd.grad(loss, (q, k, v))
        return out.detach(), lse.detach(), dq, dk, dv_
    return run


def _gpu_sample(lq, lk, h, hk, d, dv, *, tail_q=0, tail_k=0, dtype=torch.bfloat16, **kwargs):
    """make_attention_sample on CUDA plus tail_q / tail_k rows after the last sequence."""
    s = make_attention_sample(lq, lk, h, hk, d, dv, "cuda", dtype, **kwargs)
    extra = lambda n, heads, dim: torch.randn(n, heads, dim, device="cuda", dtype=torch.float64).to(dtype)
    s.q = torch.cat([s.q, extra(tail_q, h, d)])
    s.k = torch.cat([s.k, extra(tail_k, hk, d)])
    s.v = torch.cat([s.v, extra(tail_k, hk, dv)])
    return s


# Five FA4 kernel configurations in all (FA4 compiles each on first use); later tests reuse them.
def _gpu_cases():
    yield _gpu_sample([37, 0, 150, 1], [37, 0, 150, 1], 4, 4, 64, 64, tail_q=19, tail_k=11,
                      name="plain_hd64_zero_len1_tail")
    yield _gpu_sample([30, 130, 7, 0], [50, 100, 7, 9], 4, 2, 128, 128, tail_q=5, tail_k=70,
                      causal=True, name="causal_gqa_lq_ne_lk_tail")
    yield _gpu_sample([90, 200, 3], [120, 200, 3], 4, 4, 64, 64, tail_q=7,
                      window_size=(32, 8), softcap=20.0, name="window_softcap_tail")
    yield _gpu_sample([70, 1, 140], [70, 1, 140], 2, 1, 256, 256, causal=True, softmax_scale=0.07,
                      name="hd256_causal_mqa")
    yield _gpu_sample([60, 129], [64, 100], 4, 4, 192, 128, tail_k=3, name="d192_dv128")


@requires_cuda
@pytest.mark.parametrize("index", range(5))
def test_gpu_fa4_matches_reference(fa4_gpu, index):
    s = list(_gpu_cases())[index]
    _check(s, _fa4_run())
    if s.q.shape[0] > s.cu_seqlens_q[-1] or s.k.shape[0] > s.cu_seqlens_k[-1]:
        end_q, end_k = int(s.cu_seqlens_q[-1]), int(s.cu_seqlens_k[-1])
        do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64, device="cuda")
        dlse = torch.randn(s.q.shape[1], s.q.shape[0], dtype=torch.float64, device="cuda")
        out, lse, dq, dk, dv = _fa4_run()(s, do, dlse)
        assert out[end_q:].eq(0).all() and torch.isneginf(lse[:, end_q:]).all(), s.name
        assert dq[end_q:].eq(0).all() and dk[end_k:].eq(0).all() and dv[end_k:].eq(0).all(), s.name


@requires_cuda
def test_gpu_fa4_max_seqlen_is_only_a_hint_and_deterministic_backward(fa4_gpu):
    # max_seqlen 1 is far below the true maximum: FA4 gets None and stays correct; the
    # deterministic backward (dQ semaphores sized from it in FA4) is bitwise reproducible.
    s = list(_gpu_cases())[1]
    _check(s, _fa4_run(max_seqlen=1, deterministic=True))
    do = torch.randn(s.q.shape[0], s.q.shape[1], s.v.shape[2], dtype=torch.float64, device="cuda")
    dlse = torch.randn(s.q.shape[1], s.q.shape[0], dtype=torch.float64, device="cuda")
    first = _fa4_run(max_seqlen=1, deterministic=True)(s, do, dlse)
    again = _fa4_run(max_seqlen=1, deterministic=True)(s, do, dlse)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@requires_cuda
def test_gpu_auto_picks_fa4_and_falls_back(fa4_gpu, fresh_log, caplog):
    s = list(_gpu_cases())[0]
    args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k)
    with caplog.at_level(logging.INFO, logger="torch_varlen"):
        auto = torch_varlen.varlen_attention(*args, backend="auto")
        forced = torch_varlen.varlen_attention(*args, backend="fa4")
        ours = torch_varlen.varlen_attention(*args, backend="torch_varlen")
        assert all(torch.equal(a, b) for a, b in zip(auto, forced))  # same FA4 kernel
        assert not torch.equal(auto[0], ours[0])  # a different kernel rounds differently
        rng = torch.tensor([1234, 0], dtype=torch.int64, device="cuda")
        slopes = torch.rand(4, device="cuda") * 0.3
        for feature in (dict(dropout_p=0.2, rng_state=rng), dict(alibi_slopes=slopes)):
            auto = torch_varlen.varlen_attention(*args, backend="auto", **feature)
            ours = torch_varlen.varlen_attention(*args, backend="torch_varlen", **feature)
            assert all(torch.equal(a, b) for a, b in zip(auto, ours))
            with pytest.raises(RuntimeError, match="backend='fa4' cannot run this call: (dropout|ALiBi)"):
                torch_varlen.varlen_attention(*args, backend="fa4", **feature)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "torch_varlen")
    assert "backend='auto' uses FlashAttention-4" in text
    assert "runs torch_varlen's kernels: dropout is not supported" in text
    assert "runs torch_varlen's kernels: ALiBi" in text


def _layer():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "qkv": torch.nn.Linear(128, 3 * 4 * 64),
        "proj": torch.nn.Linear(4 * 64, 128),
    }).cuda().to(torch.bfloat16)


def _layer_loss(layer, x, cu, max_seqlen):
    q, k, v = layer["qkv"](x).view(x.shape[0], 3, 4, 64).unbind(1)  # the plain hd64 configuration
    o = torch_varlen.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, backend="fa4")
    return layer["proj"](o.flatten(1)).float().square().mean()


@requires_cuda
def test_gpu_compiled_training_step_with_fa4(fa4_gpu):
    # fullgraph=True: no graph break; dynamic: no recompile across lengths
    assert_compiled_step_matches_eager(_layer_loss, _layer(), 128,
                                       ([5, 17, 0, 64], [100, 3], [250]))


@requires_cuda
def test_gpu_fa4_forward_backward_in_cuda_graph(fa4_gpu):
    # The causal GQA hd128 configuration; capacity 160 rows, lengths change between replays.
    cap, h, hk, d = 160, 4, 2, 128
    q = torch.randn(cap, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(cap, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(cap, hk, d, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(cap, h, d, device="cuda", dtype=torch.bfloat16)
    cu = cu_seqlens([60, 100, 0], "cuda")

    def step():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out, _ = torch_varlen.varlen_attention(qq, kk, vv, cu, cu, cap, cap, causal=True, backend="fa4")
        return (out, *torch.autograd.grad(out, (qq, kk, vv), do))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles the kernels before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for lengths in ([10, 30, 90], [0, 1, 120], [50, 50, 50]):
        for x in (q, k, v, do):
            x.copy_(torch.randn_like(x))
        cu.copy_(cu_seqlens(lengths, "cuda"))
        graph.replay()
        expect = step()
        end = sum(lengths)
        assert torch.equal(static[0], expect[0])  # the forward is deterministic
        for got, exp in zip(static[1:], expect[1:]):
            torch.testing.assert_close(got, exp, rtol=2e-2, atol=2e-2)
        for t in static:
            assert not t.isnan().any() and t[end:].eq(0).all()
