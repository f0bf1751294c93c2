"""Paged KV (block_table) and seqused_k in varlen::attention_forward, against reference.py.

Paged attention must equal attention over the same keys gathered contiguously, and the float64
reference, with every mask feature; unused cache slots hold NaN and unused block table entries
-1, so a kernel that reads either shows. Devices:
- ``cpu``: the C++ kernel;
- ``test_interp_*``: the Triton launcher (CUDA path) on CPU tensors under TRITON_INTERPRET=1, in
  a child pytest, with the interpreter's bounds check on every load (test_attention_triton.py's
  fixture) and split-KV;
- ``test_gpu_*``: the op on CUDA (requires_cuda; make test-gpu).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torch_varlen
from torch_varlen import reference
from conftest import requires_cuda
from interp_child import run_interpreter_tests
from samples import attention_sample_inputs, cu_seqlens, make_attention_sample

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REPO = Path(__file__).resolve().parent.parent
_ops = torch.ops.varlen

if INTERPRET:
    from test_attention_triton import _fix_interpreter_fp8_casts, _fix_interpreter_scalar_index

    _fix_interpreter_scalar_index()
    _fix_interpreter_fp8_casts()
    from test_attention_triton import interpreter_bounds_check  # noqa: F401  (autouse fixture)
    from torch_varlen.kernels import attention as triton_attention

interp_only = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child of test_paged_triton_interpreter_subprocess")


# ---------------------------------------------------------------- helpers


def to_paged(k, v, cu_k, block_size, *, padded=None, spare_blocks=2, seed=0):
    """The keys of packed k, v (sequence b: rows from padded[b] or cu_k[b], cu_k[b+1] - cu_k[b]
    of them) in random blocks of a cache -> (k_cache, v_cache, block_table, seqused_k). Unused
    slots are NaN, unused table entries -1 (never read)."""
    g = torch.Generator().manual_seed(seed)
    cu = cu_k.tolist()
    starts = padded.tolist() if padded is not None else cu
    lengths = [cu[b + 1] - cu[b] for b in range(len(cu) - 1)]
    need = [-(-n // block_size) for n in lengths]
    max_blocks = max(need, default=0) + 1  # one spare column: entries past the used ones
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    kc = k.new_full((num_blocks, block_size) + k.shape[1:], float("nan"))
    vc = v.new_full((num_blocks, block_size) + v.shape[1:], float("nan"))
    table = torch.full((len(lengths), max_blocks), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        for j in range(need[b]):
            blk = perm.pop()
            table[b, j] = blk
            rows = slice(j * block_size, min(n, (j + 1) * block_size))
            count = rows.stop - rows.start
            kc[blk, :count] = k[starts[b] + rows.start: starts[b] + rows.stop]
            vc[blk, :count] = v[starts[b] + rows.start: starts[b] + rows.stop]
    return kc, vc, table.to(k.device), torch.tensor(lengths, dtype=torch.int32, device=k.device)


def _paged_kwargs(kwargs):
    return {n: x for n, x in kwargs.items() if n not in ("cu_seqlens_k_padded",)}


def _max_err(a, b):
    a, b = a.double(), b.double()
    a, b = a.masked_fill(torch.isneginf(a), 0), b.masked_fill(torch.isneginf(b), 0)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _check_paged(s, block_size, run, tol, **extra):
    """run(q, k_cache, v_cache, cu_q, cu_k, block_table, seqused_k, **kwargs) equals the float64
    reference over the sample's keys, and its lse is -inf exactly where the reference's is."""
    kc, vc, table, used = to_paged(s.k, s.v, s.cu_seqlens_k, block_size,
                                   padded=s.kwargs.get("cu_seqlens_k_padded"))
    kwargs = dict(_paged_kwargs(s.kwargs), **extra)
    out, lse = run(s.q, kc, vc, s.cu_seqlens_q, s.cu_seqlens_k, table, used, **kwargs)
    ref_kwargs = dict(s.kwargs, **{n: x for n, x in extra.items() if n != "num_splits"})
    ro, rl, _ = reference.attention(s.q.double(), s.k.double(), s.v.double(), s.cu_seqlens_q,
                                    s.cu_seqlens_k, **ref_kwargs)
    assert not out.isnan().any() and not lse.isnan().any(), s.name
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)), s.name
    assert _max_err(out, ro) <= tol and _max_err(lse, rl) <= tol, (s.name, _max_err(out, ro), _max_err(lse, rl))
    return out, lse


def _run_op(q, kc, vc, cu_q, cu_k, table, used, **kwargs):
    """The public function: lengths from seqused_k, cu_seqlens_k None."""
    return torch_varlen.varlen_attention(q, kc, vc, cu_q, None, 8, 8, block_table=table,
                                         seqused_k=used, **kwargs)


def _run_op_cu(q, kc, vc, cu_q, cu_k, table, used, **kwargs):
    """flash-attn's convention: lengths from cu_seqlens_k, no seqused_k."""
    return torch_varlen.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 8, 8, block_table=table,
                                               return_lse=True, **kwargs)


_SAMPLES = list(attention_sample_inputs("cpu", torch.float64))


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("index", range(len(_SAMPLES)))
def test_paged_matches_reference_cpu(index, block_size):
    """Every sample (causal, window, softcap, ALiBi, GQA/MQA, empty sequences, Lq != Lk, a
    padded packed source) through the paged cache: the float64 reference to 1e-12, and bitwise
    the packed call on the same keys."""
    s = list(attention_sample_inputs("cpu", torch.float64))[index]
    run = _run_op if index % 2 == 0 else _run_op_cu
    out, lse = _check_paged(s, block_size, run, 1e-12)
    k, v, cu_k = reference.gather_keys(s.k, s.v, s.cu_seqlens_k, s.kwargs.get("cu_seqlens_k_padded"))
    po, pl = torch_varlen.varlen_attention(s.q, k, v, s.cu_seqlens_q, cu_k, 8, 8, **_paged_kwargs(s.kwargs))
    assert torch.equal(out, po) and torch.equal(lse, pl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_low_precision_cpu(dtype):
    s = make_attention_sample([37, 0, 20], [50, 3, 33], 4, 2, 32, 16, "cpu", dtype, causal=True,
                              name="long_causal_gqa")
    kc, vc, table, used = to_paged(s.k, s.v, s.cu_seqlens_k, 16)
    out, lse = _run_op(s.q, kc, vc, s.cu_seqlens_q, None, table, used, causal=True)
    po, pl = torch_varlen.varlen_attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 8, 8, causal=True)
    assert torch.equal(out, po) and torch.equal(lse, pl)


def test_paged_sink_dropout_fp8_cpu():
    """Sinks, dropout (same keep mask: it is keyed by the logical key index) and the FP8 forward
    with per-sequence descales give the packed call's results."""
    s = make_attention_sample([5, 9, 1], [20, 17, 0], 4, 2, 16, 16, "cpu", torch.float32,
                              window_size=(6, 2), name="w")
    kc, vc, table, used = to_paged(s.k, s.v, s.cu_seqlens_k, 16)
    sink = torch.randn(4)
    rng = torch.tensor([123, 7])
    for kw in (dict(sink=sink), dict(dropout_p=0.3, rng_state=rng), dict(sink=sink, alibi_slopes=torch.rand(4))):
        got = _run_op(s.q, kc, vc, s.cu_seqlens_q, None, table, used, window_size=(6, 2), **kw)
        want = torch_varlen.varlen_attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 8, 8,
                                             window_size=(6, 2), **kw)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    fp8 = torch.float8_e4m3fn
    q8, k8, v8 = (t.to(fp8) for t in (s.q, s.k, s.v))
    kc8, vc8, table, used = to_paged(k8.float(), v8.float(), s.cu_seqlens_k, 16)
    kc8, vc8 = kc8.nan_to_num().to(fp8), vc8.nan_to_num().to(fp8)
    ds = torch.rand(3, 2) + 0.5
    got = _run_op(q8, kc8, vc8, s.cu_seqlens_q, None, table, used, k_descale=ds, v_descale=ds)
    want = torch_varlen.varlen_attention(q8, k8, v8, s.cu_seqlens_q, s.cu_seqlens_k, 8, 8,
                                         k_descale=ds, v_descale=ds)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_seqused_k_packed_cpu():
    """seqused_k with packed k: sequence b reads the first seqused_k[b] keys of its rows."""
    s = make_attention_sample([4, 3, 2], [9, 6, 8], 2, 1, 8, 8, "cpu", torch.float64, causal=True)
    used = torch.tensor([5, 0, 8], dtype=torch.int32)
    out, lse = torch_varlen.varlen_attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 8, 8,
                                             causal=True, seqused_k=used)
    ro, rl, _ = reference.attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, causal=True, seqused_k=used)
    assert _max_err(out, ro) < 1e-12 and _max_err(lse, rl) < 1e-12
    assert torch.isneginf(lse[:, 4:7]).all()  # the sequence with no used key


def test_paged_backward_raises_naming_paged_kv():
    s = make_attention_sample([3, 2], [5, 4], 2, 2, 8, 8, "cpu", torch.float32, requires_grad=True)
    kc, vc, table, used = to_paged(s.k.detach(), s.v.detach(), s.cu_seqlens_k, 16)
    q = s.q
    out, _ = _run_op(q, kc.nan_to_num().requires_grad_(), vc.nan_to_num(), s.cu_seqlens_q, None, table, used)
    with pytest.raises(NotImplementedError, match="paged KV .* inference features: there is no backward"):
        out.sum().backward()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_paged_opcheck(requires_grad):
    s = make_attention_sample([3, 0, 5], [17, 2, 30], 4, 2, 8, 8, "cpu", torch.float32, causal=True)
    kc, vc, table, used = to_paged(s.k, s.v, s.cu_seqlens_k, 16)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()  # opcheck compares outputs of several runs
    q = s.q.requires_grad_(requires_grad)
    args = (q, kc, vc, s.cu_seqlens_q, cu_seqlens([17, 2, 30], "cpu"), 5, 30, 0.3)
    # with grad, the aot_dispatch checks run a backward, which paged KV does not have (it raises)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not requires_grad:
        tests = tests + ("test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(_ops.attention_forward.default, args,
                          dict(window_right=0, block_table=table, seqused_k=used), test_utils=tests)


def test_paged_compile_fullgraph_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def step(q, kc, vc, cu_q, table, used):
        out, lse = torch_varlen.varlen_attention(q, kc, vc, cu_q, None, 8, 8, causal=True,
                                                 block_table=table, seqused_k=used)
        return out * 2, lse

    # sizes that happen to be equal must not become guards (duck sizing), as in a decode loop
    # whose batch size equals the head count
    torch.fx.experimental._config.use_duck_shape, duck = False, torch.fx.experimental._config.use_duck_shape
    try:
        _compiled_batches(step)
    finally:
        torch.fx.experimental._config.use_duck_shape = duck
    assert counter.frame_count == 1


def _compiled_batches(step):
    for lq, lk in (([3, 1], [20, 33]), ([2, 5, 1], [7, 40, 16]), ([4, 2, 2, 1], [60, 2, 0, 17])):
        s = make_attention_sample(lq, lk, 2, 1, 16, 16, "cpu", torch.float32, causal=True)
        kc, vc, table, used = to_paged(s.k, s.v, s.cu_seqlens_k, 16)
        out, lse = step(s.q, kc, vc, s.cu_seqlens_q, table, used)
        want = torch_varlen.varlen_attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 8, 8, causal=True)
        torch.testing.assert_close(out, want[0] * 2)
        torch.testing.assert_close(lse, want[1])


# ---------------------------------------------------------------- bad inputs (CPU, interpreter, CUDA)


def _bad_call(name, device):
    """One bad call by name; runs the registered CPU kernel (device "cpu"), the CUDA path's
    launcher on CPU tensors ("interp") or the op on CUDA tensors ("cuda")."""
    tdev = "cpu" if device == "interp" else device
    T = lambda *x: torch.tensor(x, dtype=torch.int32, device=tdev)  # noqa: E731
    q = torch.randn(6, 2, 16, device=tdev)
    kc, vc = torch.randn(4, 16, 1, 16, device=tdev), torch.randn(4, 16, 1, 16, device=tdev)
    args = dict(q=q, k=kc, v=vc, cu_seqlens_q=T(0, 2, 6), cu_seqlens_k=T(0, 20, 30),
                block_table=T(2, 0, 1, 3).view(2, 2), seqused_k=T(20, 10))
    edits = {
        "block_id_too_large": dict(block_table=T(2, 4, 1, 3).view(2, 2)),
        "block_id_negative": dict(block_table=T(2, 0, -1, 3).view(2, 2)),
        "seqused_beyond_capacity": dict(seqused_k=T(33, 10)),
        "seqused_negative": dict(seqused_k=T(20, -1)),
        "packed_seqused_beyond_rows": dict(k=kc.flatten(0, 1)[:30], v=vc.flatten(0, 1)[:30],
                                           block_table=None, seqused_k=T(20, 11)),
        "block_table_int64": dict(block_table=T(2, 0, 1, 3).view(2, 2).long()),
        "seqused_int64": dict(seqused_k=T(20, 10).long()),
        "block_table_batch": dict(block_table=T(2, 0, 1, 3).view(1, 4)),
        "seqused_shape": dict(seqused_k=T(20, 10, 1)),
        "block_size_8": dict(k=kc.view(8, 8, 1, 16), v=vc.view(8, 8, 1, 16)),
        "block_size_24": dict(k=torch.randn(4, 24, 1, 16, device=tdev), v=torch.randn(4, 24, 1, 16, device=tdev)),
        "packed_k_with_block_table": dict(k=kc[:, 0], v=vc[:, 0]),
        "padded_with_block_table": dict(cu_seqlens_k_padded=T(0, 20, 30)),
        "v_blocks_differ": dict(v=torch.randn(3, 16, 1, 16, device=tdev)),
    }
    args.update(edits[name])
    a = args
    fn = _ops.attention_forward
    if device == "interp":
        from torch_varlen import kernels

        fn = kernels._attention_forward_cuda
    fn(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 4, 30, 0.25, -1, -1, 0.0, None,
       None, a.get("cu_seqlens_k_padded"), 0.0, None, False, None, None, None, "torch_varlen", None,
       a["block_table"], a["seqused_k"], 0)


# name -> (regex, checked on the device from values)
BAD = {
    "block_id_too_large": (r"paged KV: block_table holds a block id outside \[0, num_blocks\)", True),
    "block_id_negative": (r"paged KV: block_table holds a block id outside \[0, num_blocks\)", True),
    "seqused_beyond_capacity": (r"paged KV: a sequence's key count exceeds the block_table's capacity", True),
    "seqused_negative": (r"seqused_k must be >= 0", True),
    "packed_seqused_beyond_rows": (r"seqused_k: a sequence's keys \[start, start \+ seqused_k\) lie beyond "
                                   r"k.shape\[0\]", True),
    "block_table_int64": (r"block_table must be int32, got torch.int64", False),
    "seqused_int64": (r"seqused_k must be int32, got torch.int64", False),
    "block_table_batch": (r"block_table must be \(batch, max_blocks\) with batch = 2, got shape \(1, 4\)", False),
    "seqused_shape": (r"seqused_k must have shape \(2,\), got \(3,\)", False),
    "block_size_8": (r"paged KV block_size \(k.shape\[1\]\) must be a positive multiple of 16, got 8", False),
    "block_size_24": (r"paged KV block_size \(k.shape\[1\]\) must be a positive multiple of 16, got 24", False),
    "packed_k_with_block_table": (r"with a block_table, k must be a cache \(num_blocks, block_size, "
                                  r"nheads_k, headdim\), got shape \(4, 1, 16\)", False),
    "padded_with_block_table": (r"cu_seqlens_k_padded must be None with a block_table", False),
    "v_blocks_differ": (r"v must be \(num_blocks, block_size, nheads_k, headdim_v\) with k's first two dims", False),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_paged_bad_input_raises_cpu(name):
    with pytest.raises(RuntimeError, match=BAD[name][0]):
        _bad_call(name, "cpu")


def test_paged_valid_edges_pass_cpu():
    """Unused table entries may hold anything (-1 here); a sequence with no key reads none."""
    T = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    q = torch.randn(3, 2, 16)
    kc, vc = torch.randn(2, 16, 1, 16), torch.randn(2, 16, 1, 16)
    out, lse = _ops.attention_forward(q, kc, vc, T(0, 2, 3), T(0, 0, 16), 2, 16, 0.25,
                                      block_table=T(-1, 99, 1, -1).view(2, 2), seqused_k=T(0, 16))
    assert out[:2].eq(0).all() and torch.isneginf(lse[:, :2]).all() and torch.isfinite(lse[:, 2]).all()


_CUDA_CHILD = textwrap.dedent("""
    import sys
    import torch
    import test_paged_kv as t

    t._bad_call(sys.argv[1], "cuda")
    torch.cuda.synchronize()  # raises "device-side assert triggered": the child exits nonzero
""")


@requires_cuda
@pytest.mark.parametrize("name", sorted(BAD))
def test_gpu_paged_bad_input(name):
    """Shape errors raise on the host; value errors fail a device assert (in a child: it leaves
    the CUDA context unusable) with the message in the output."""
    match, on_device = BAD[name]
    if not on_device:
        with pytest.raises(RuntimeError, match=match):
            _bad_call(name, "cuda")
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "test"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CUDA_CHILD, name], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert re.search(r"Assertion `" + match, output), output[-3000:]


# ---------------------------------------------------------------- the Triton path under the interpreter


def test_paged_triton_interpreter_subprocess():
    """Runs this file's test_interp_* tests in a child pytest with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__, "interp_", exact_passed=6 + len(BAD) + 1, timeout=600)


def _launch(q, kc, vc, cu_q, cu_k, table, used, *, causal=False, window_size=(-1, -1), config=None,
            num_splits=1, **kwargs):
    left, right = window_size
    return triton_attention.attention_forward(
        q, kc, vc, cu_q, cu_k, 8, 8, kwargs.pop("softmax_scale", q.shape[-1] ** -0.5), left,
        0 if causal else right, kwargs.pop("softcap", 0.0), kwargs.pop("alibi_slopes", None), None, None,
        kwargs.pop("dropout_p", 0.0), kwargs.pop("rng_state", None), False, None, None, None, None,
        kwargs.pop("sink", None), block_table=table, seqused_k=used, num_splits=num_splits, config=config)


def _interp_samples(dtype):
    mk = lambda *a, **kw: make_attention_sample(*a, device="cpu", dtype=dtype, **kw)  # noqa: E731
    slopes = (torch.rand(4) * 0.3 + 0.05).float()
    yield mk([19, 0, 7], [40, 5, 23], 4, 2, 32, 16, causal=True, name="causal_gqa")
    yield mk([9, 1, 5], [37, 3, 20], 2, 1, 16, 32, window_size=(7, 3), name="window_mqa")
    yield mk([8, 3], [29, 39], 4, 2, 16, 16, softcap=3.0, alibi_slopes=slopes, window_size=(-1, 5),
             name="softcap_alibi_right_window")


@interp_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_interp_paged_matches_reference(dtype):
    """Block size 16 (= the interpreter's key tile) and 32 (two tiles per block), seqused_k or
    cu_seqlens_k lengths, with split-KV into 1, 2 and 3 parts."""
    tol = {torch.float16: 3e-3, torch.float32: 2e-5, torch.float64: 1e-10}[dtype]
    for i, s in enumerate(_interp_samples(dtype)):
        block_size = 16 if i % 2 == 0 else 32
        used_fn = (lambda *a, **kw: _launch(*a[:6], None, **kw)) if i == 1 else _launch
        _check_paged(s, block_size, used_fn, tol, num_splits=(2, 3, 1)[i])


@interp_only
def test_interp_paged_tile_spans_blocks_sink_dropout():
    """A key tile of 32 over blocks of 16 (config override), with a sink and dropout."""
    s = make_attention_sample([5, 20], [40, 23], 4, 2, 16, 16, "cpu", torch.float64, causal=True)
    sink = torch.randn(4, dtype=torch.float64)
    rng = torch.tensor([99, 3])
    cfg = dict(block_m=16, block_n=32, warps=4, stages=1, tma=False, reverse=False, fp8_pv=False)
    for splits in (1, 2):
        _check_paged(s, 16, lambda *a, **kw: _launch(*a, config=cfg, **kw), 1e-10, causal=True, sink=sink,
                     dropout_p=0.25, rng_state=rng, num_splits=splits)


@interp_only
def test_interp_seqused_k_packed_and_splits_without_paging():
    """seqused_k with packed k, and split-KV of an ordinary packed call, against the reference."""
    s = make_attention_sample([4, 3, 9], [9, 20, 40], 2, 1, 16, 16, "cpu", torch.float64, causal=True,
                              pad_k=3)
    used = torch.tensor([5, 0, 40], dtype=torch.int32)
    kw = dict(causal=True, cu_seqlens_k_padded=s.kwargs["cu_seqlens_k_padded"])
    ro, rl, _ = reference.attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, seqused_k=used, **kw)
    for splits in (1, 3):
        out, lse = triton_attention.attention_forward(
            s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 8, 8, 16 ** -0.5, -1, 0, 0.0, None, None,
            kw["cu_seqlens_k_padded"], seqused_k=used, num_splits=splits)
        assert _max_err(out, ro) < 1e-10 and _max_err(lse, rl) < 1e-10
    ro, rl, _ = reference.attention(s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, **kw)
    out, lse = triton_attention.attention_forward(
        s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 8, 8, 16 ** -0.5, -1, 0, 0.0, None, None,
        kw["cu_seqlens_k_padded"], num_splits=2)
    assert _max_err(out, ro) < 1e-10 and _max_err(lse, rl) < 1e-10


@interp_only
def test_interp_paged_fp8():
    s = make_attention_sample([5, 9], [20, 33], 4, 2, 32, 32, "cpu", torch.float32, causal=True)
    fp8 = torch.float8_e4m3fn
    q8, k8, v8 = (t.to(fp8) for t in (s.q, s.k, s.v))
    kc, vc, table, used = to_paged(k8.float(), v8.float(), s.cu_seqlens_k, 16)
    kc, vc = kc.nan_to_num().to(fp8), vc.nan_to_num().to(fp8)
    out, lse = _launch(q8, kc, vc, s.cu_seqlens_q, s.cu_seqlens_k, table, used, causal=True, num_splits=2)
    ro, rl, _ = reference.attention(q8, k8, v8, s.cu_seqlens_q, s.cu_seqlens_k, causal=True)
    assert out.dtype == torch.bfloat16
    assert _max_err(out, ro) < 2e-2 and _max_err(lse, rl) < 1e-3


@interp_only
@pytest.mark.parametrize("name", sorted(BAD))
def test_interp_paged_bad_input_raises(name):
    with pytest.raises(RuntimeError, match=BAD[name][0]):
        _bad_call(name, "interp")


@interp_only
def test_interp_paged_valid_edges_pass():
    T = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    from torch_varlen import kernels

    q = torch.randn(3, 2, 16)
    kc, vc = torch.randn(2, 16, 1, 16), torch.randn(2, 16, 1, 16)
    out, lse = kernels._attention_forward_cuda(q, kc, vc, T(0, 2, 3), T(0, 0, 16), 2, 16, 0.25,
                                               block_table=T(-1, 99, 1, -1).view(2, 2), seqused_k=T(0, 16))
    assert out[:2].eq(0).all() and torch.isneginf(lse[:, :2]).all() and torch.isfinite(lse[:, 2]).all()


# ---------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_gpu_paged_matches_packed(dtype, block_size):
    """The op on CUDA: paged == packed on the same keys (within rounding: tiles may differ), and
    both near the float64 reference; split-KV on and off."""
    for s in _interp_samples(dtype):
        kwargs = {n: (x.cuda() if isinstance(x, torch.Tensor) else x) for n, x in s.kwargs.items()}
        s = make_attention_sample([n * 3 for n in s.cu_seqlens_q.diff().tolist()],
                                  [n * 5 for n in s.cu_seqlens_k.diff().tolist()], s.q.shape[1],
                                  s.k.shape[1], s.q.shape[2], s.v.shape[2], "cuda", dtype, **kwargs)
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        for splits in (0, 1, 4):
            _check_paged(s, block_size, _run_op, tol, num_splits=splits)
