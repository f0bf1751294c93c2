"""flash_attn_with_kvcache and varlen::kvcache_append against a float64 reference.

The reference appends the (rotated) new keys to a copy of the cache, gathers each sequence's
keys ``[cache_leftpad, cache_seqlens + seqlen_new)`` contiguously and runs reference.attention;
the rotary embedding is written independently (complex multiplication). The op must give the
same out / lse, and leave the caches equal to the reference's appended copy. Devices: the CPU
kernels; the Triton attention (and split-KV) under TRITON_INTERPRET=1 in a child pytest
(``test_interp_*``); CUDA (``test_gpu_*``, make test-gpu), including decode steps replayed from
a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

import torch_varlen
from torch_varlen import ops, reference
from conftest import requires_cuda
from interp_child import run_interpreter_tests
from samples import cu_seqlens

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ops = torch.ops.varlen

if INTERPRET:
    from test_attention_triton import _fix_interpreter_scalar_index

    _fix_interpreter_scalar_index()
    from test_attention_triton import interpreter_bounds_check  # noqa: F401  (autouse fixture)

interp_only = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child of test_kvcache_triton_interpreter_subprocess")


# ---------------------------------------------------------------- cases and reference


@dataclasses.dataclass
class Case:
    name: str
    cache_seqlens: list
    seqlen_q: int = 1
    seqlen_new: int = 1
    nheads: int = 4
    nheads_k: int = 2
    headdim: int = 16
    headdim_v: int = 16
    seqlen_cache: int = 48  # contiguous caches; paged: max_blocks * block_size >= this
    block_size: Optional[int] = None  # paged when set
    rotary_dim: int = 0
    interleaved: bool = True
    causal: bool = False
    window_size: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None  # "heads" or "batch"
    batch_idx: bool = False
    leftpad: bool = False
    sink: bool = False


CASES = [
    Case("decode_causal_rotary_gqa", [5, 17, 0], causal=True, rotary_dim=16),
    Case("append3_window_neox_partial_rotary_alibi", [4, 30], seqlen_q=3, seqlen_new=3, window_size=(4, 0),
         rotary_dim=8, interleaved=False, alibi="heads"),
    Case("no_new_kv_batch_idx_noncausal_rotary_softcap", [9, 48, 1], seqlen_new=0, rotary_dim=16,
         batch_idx=True, softcap=2.0),
    Case("leftpad_causal_append2", [20, 7, 33], seqlen_q=2, seqlen_new=2, causal=True, leftpad=True),
    Case("paged16_causal_rotary_sink", [5, 40, 16, 0], causal=True, rotary_dim=16, block_size=16, sink=True),
    Case("paged32_no_new_kv_alibi_batch", [33, 64], seqlen_new=0, block_size=32, seqlen_cache=64,
         alibi="batch", nheads=4, nheads_k=1),
    Case("paged16_decode_gqa4_softcap_right_window", [5, 40, 16, 0], block_size=16, nheads=8, nheads_k=2,
         window_size=(-1, 2), softcap=1.5),
    Case("paged16_speculative4_mqa_window", [3, 25, 60], seqlen_q=4, seqlen_new=4, block_size=16,
         seqlen_cache=64, nheads_k=1, causal=True, window_size=(8, 0), headdim_v=8),
]


def make_inputs(c: Case, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    T = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    B = len(c.cache_seqlens)
    inp = dict(q=rnd(B, c.seqlen_q, c.nheads, c.headdim), cache_seqlens=T(c.cache_seqlens))
    if c.block_size:
        max_blocks = -(-c.seqlen_cache // c.block_size)
        num_blocks = B * max_blocks + 3
        inp["k_cache"] = rnd(num_blocks, c.block_size, c.nheads_k, c.headdim)
        inp["v_cache"] = rnd(num_blocks, c.block_size, c.nheads_k, c.headdim_v)
        perm = torch.randperm(num_blocks, generator=g)[: B * max_blocks]
        inp["block_table"] = perm.view(B, max_blocks).to(torch.int32).to(device)
    else:
        B_c = B + 2 if c.batch_idx else B
        inp["k_cache"] = rnd(B_c, c.seqlen_cache, c.nheads_k, c.headdim)
        inp["v_cache"] = rnd(B_c, c.seqlen_cache, c.nheads_k, c.headdim_v)
        if c.batch_idx:
            inp["cache_batch_idx"] = torch.randperm(B_c, generator=g)[:B].to(torch.int32).to(device)
    if c.seqlen_new:
        inp["k"] = rnd(B, c.seqlen_new, c.nheads_k, c.headdim)
        inp["v"] = rnd(B, c.seqlen_new, c.nheads_k, c.headdim_v)
    if c.rotary_dim:
        seqlen_ro = c.seqlen_cache + c.seqlen_q
        angle = torch.rand(seqlen_ro, c.rotary_dim // 2, generator=g, dtype=torch.float64) * 6.3
        inp["rotary_cos"], inp["rotary_sin"] = angle.cos().to(dtype).to(device), angle.sin().to(dtype).to(device)
        inp["rotary_interleaved"] = c.interleaved
    if c.leftpad:
        inp["cache_leftpad"] = T([min(3 * b + 1, n) for b, n in enumerate(c.cache_seqlens)])
    if c.alibi == "heads":
        inp["alibi_slopes"] = (torch.rand(c.nheads, generator=g) * 0.3).to(device)
    elif c.alibi == "batch":
        inp["alibi_slopes"] = (torch.rand(B, c.nheads, generator=g) * 0.3).to(device)
    if c.sink:
        inp["sink"] = torch.randn(c.nheads, generator=g, dtype=torch.float64).to(
            torch.float64 if dtype == torch.float64 else torch.float32).to(device)
    inp.update(causal=c.causal, window_size=c.window_size, softcap=c.softcap)
    return inp


def ref_rotary(x, cos, sin, pos, interleaved):
    """x (S, H, D) float64 rotated at positions pos (S,): complex multiplication of its pairs."""
    rd = 2 * cos.shape[1]
    xr = x[..., :rd]
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., : rd // 2], xr[..., rd // 2:])
    z = torch.complex(a, b) * torch.complex(cos[pos], sin[pos])[:, None]
    r = torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((r, x[..., rd:]), -1)


def reference_kvcache(inp, c: Case):
    """-> (out (B, Sq, H, Dv), lse (B, H, Sq), k_cache, v_cache) in float64."""
    d = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in inp.items()}
    q, kc, vc = d["q"], d["k_cache"].clone(), d["v_cache"].clone()
    B, Sq = q.shape[:2]
    seqlens = inp["cache_seqlens"].tolist()
    bs = c.block_size
    qs, ks, vs, lengths_k = [], [], [], []
    for b in range(B):
        n = seqlens[b]
        if bs:
            table = inp["block_table"][b].long()
            pos_of = lambda p: (table[p // bs], p % bs)  # noqa: E731
        else:
            row = inp["cache_batch_idx"][b].item() if c.batch_idx else b
            pos_of = lambda p, row=row: (row, p)  # noqa: E731
        qb = q[b]
        if c.rotary_dim:
            cos, sin = d["rotary_cos"], d["rotary_sin"]
            local = c.causal or c.window_size != (-1, -1)
            pos_q = torch.arange(n, n + Sq) if local else torch.full((Sq,), n)
            qb = ref_rotary(qb, cos, sin, pos_q, c.interleaved)
        if c.seqlen_new:
            kn = d["k"][b]
            if c.rotary_dim:
                kn = ref_rotary(kn, cos, sin, torch.arange(n, n + c.seqlen_new), c.interleaved)
            for i in range(c.seqlen_new):
                kc[pos_of(n + i)] = kn[i]
                vc[pos_of(n + i)] = d["v"][b, i]
        lp = inp["cache_leftpad"][b].item() if c.leftpad else 0
        ks.append(torch.stack([kc[pos_of(p)] for p in range(lp, n + c.seqlen_new)]) if n + c.seqlen_new > lp
                  else kc.new_zeros(0, *kc.shape[-2:]))
        vs.append(torch.stack([vc[pos_of(p)] for p in range(lp, n + c.seqlen_new)]) if n + c.seqlen_new > lp
                  else vc.new_zeros(0, *vc.shape[-2:]))
        qs.append(qb)
        lengths_k.append(n + c.seqlen_new - lp)
    out, lse, _ = reference.attention(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_seqlens([Sq] * B, "cpu"), cu_seqlens(lengths_k, "cpu"),
        causal=c.causal, window_size=c.window_size, softcap=c.softcap,
        alibi_slopes=inp.get("alibi_slopes", None) if inp.get("alibi_slopes") is None else inp["alibi_slopes"].cpu(),
        sink=None if not c.sink else d["sink"].cpu())
    H = q.shape[2]
    return out.view(B, Sq, H, -1), lse.view(H, B, Sq).transpose(0, 1), kc, vc


def _finite(x):
    return x.double().masked_fill(torch.isneginf(x), 0)


def check_case(c: Case, device, dtype, run=None, tol=1e-10, **extra):
    inp = make_inputs(c, device, dtype)
    inp_cpu = {n: (x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    ro, rl, rkc, rvc = reference_kvcache(inp_cpu, c)
    run = run or torch_varlen.flash_attn_with_kvcache
    out, lse = run(**inp, return_softmax_lse=True, **extra)
    assert out.shape == ro.shape and lse.shape == rl.shape and out.dtype == dtype
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(rl)), c.name
    errs = [(_finite(out.cpu()) - _finite(ro)).abs().max().item(), (_finite(lse.cpu()) - _finite(rl)).abs().max().item(),
            (inp["k_cache"].cpu().double() - rkc).abs().max().item(),
            (inp["v_cache"].cpu().double() - rvc).abs().max().item()]
    assert max(errs) <= tol, (c.name, errs)


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kvcache_matches_reference_cpu(case):
    check_case(case, "cpu", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvcache_low_precision_cpu(dtype):
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for c in (CASES[0], CASES[4]):
        check_case(c, "cpu", dtype, tol=tol)


def test_kvcache_gqa_decode_packs_query_heads(monkeypatch):
    """One query per sequence under GQA: the attention op gets the G query heads of a kv head
    as G rows of one sequence (Hk heads); a left window, ALiBi, a sink or several queries keep
    the per-head layout. The results are checked by the reference cases above."""
    seen = []
    real = _ops.attention_forward

    def spy(q, *args, **kwargs):
        seen.append((tuple(q.shape), args[2].tolist()))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(ops, "_ops", SimpleNamespace(attention_forward=spy, kvcache_append=_ops.kvcache_append))
    for c, want in ((Case("gqa", [5, 17, 0], nheads=8, nheads_k=2, causal=True), ((12, 2, 16), [0, 4, 8, 12])),
                    (Case("mqa", [5, 17], nheads=4, nheads_k=1), ((8, 1, 16), [0, 4, 8])),
                    (Case("left_window", [5, 17], causal=True, window_size=(3, 0)), ((2, 4, 16), [0, 1, 2])),
                    (Case("alibi", [5, 17], alibi="heads"), ((2, 4, 16), [0, 1, 2])),
                    (Case("sink", [5, 17], sink=True), ((2, 4, 16), [0, 1, 2])),
                    (Case("two_queries", [5, 17], seqlen_q=2, seqlen_new=2), ((4, 4, 16), [0, 2, 4]))):
        seen.clear()
        check_case(c, "cpu", torch.float64)
        assert seen == [(want[0], want[1])], (c.name, seen)


def test_kvcache_returns_out_only_and_int_seqlens():
    c = Case("int", [6, 6], causal=True)
    inp = make_inputs(c, "cpu", torch.float64)
    want = ops.flash_attn_with_kvcache(**{**inp, "k_cache": inp["k_cache"].clone(), "v_cache": inp["v_cache"].clone()})
    got = ops.flash_attn_with_kvcache(**{**inp, "cache_seqlens": 6})
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    # cache_seqlens None without new keys: the whole cache
    q = inp["q"]
    out = ops.flash_attn_with_kvcache(q, inp["k_cache"], inp["v_cache"])
    full = ops.flash_attn_with_kvcache(q, inp["k_cache"], inp["v_cache"], cache_seqlens=48)
    assert torch.equal(out, full)


def test_kvcache_append_opcheck():
    for c in (CASES[0], CASES[2], CASES[4]):
        inp = make_inputs(Case(c.name, [min(n, 40) for n in c.cache_seqlens], seqlen_new=2, block_size=c.block_size,
                               batch_idx=c.batch_idx), "cpu", torch.float32)
        args = (inp["k_cache"], inp["v_cache"], inp["k"], inp["v"], inp["cache_seqlens"],
                inp.get("cache_batch_idx"), inp.get("block_table"))
        torch.library.opcheck(_ops.kvcache_append.default, args)


def test_kvcache_compile_fullgraph_decode_loop():
    """A compiled decode loop (new token appended in place, cache_seqlens advancing) matches
    eager step for step, writes the caller's caches, and compiles once."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(torch_varlen.flash_attn_with_kvcache, backend=counter, fullgraph=True, dynamic=False)
    c = CASES[4]
    inp = make_inputs(c, "cpu", torch.float32)
    eager = {**inp, "k_cache": inp["k_cache"].clone(), "v_cache": inp["v_cache"].clone()}
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for n in ("q", "k", "v"):
            inp[n] = eager[n] = torch.randn(inp[n].shape, generator=g)
        got = step(**inp)
        want = torch_varlen.flash_attn_with_kvcache(**eager)
        torch.testing.assert_close(got, want)
        assert torch.equal(inp["k_cache"], eager["k_cache"]) and torch.equal(inp["v_cache"], eager["v_cache"])
        inp["cache_seqlens"] = eager["cache_seqlens"] = inp["cache_seqlens"] + 1
    assert counter.frame_count == 1


# ---------------------------------------------------------------- bad inputs


def _bad(name, device="cpu"):
    c = Case("bad", [5, 40], block_size=16 if name.startswith("paged") else None)
    inp = make_inputs(c, device, torch.float32)
    T = lambda *x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    edits = {
        "seqlens_beyond_capacity": dict(cache_seqlens=T(5, 48)),
        "seqlens_negative": dict(cache_seqlens=T(-1, 5)),
        "leftpad_beyond_seqlens": dict(cache_leftpad=T(6, 0)),
        "batch_idx_out_of_range": dict(cache_batch_idx=T(0, 2)),
        "rotary_too_short": dict(rotary_cos=torch.ones(40, 8, device=device), rotary_sin=torch.ones(40, 8, device=device)),
        "seqlens_int64": dict(cache_seqlens=T(5, 40).long()),
        "k_without_v": dict(v=None),
        "paged_block_out_of_range": dict(block_table=T(0, 1, 2, 3, 4, 99).view(2, 3)),
        "paged_block_table_int64": dict(block_table=T(0, 1, 2, 3, 4, 5).view(2, 3).long()),
        "paged_batch_idx": dict(cache_batch_idx=T(0, 1)),
        "paged_leftpad": dict(cache_leftpad=T(0, 1)),
        "paged_seqlens_beyond_capacity": dict(cache_seqlens=T(5, 48)),
    }
    inp.update(edits[name])
    torch_varlen.flash_attn_with_kvcache(**inp)


BAD = {
    "seqlens_beyond_capacity": (RuntimeError, r"kvcache: cache_seqlens \+ seqlen_new must be <= the cache's capacity"),
    "seqlens_negative": (RuntimeError, r"kvcache: cache_seqlens \+ seqlen_new must be <= the cache's capacity"),
    "leftpad_beyond_seqlens": (RuntimeError, r"kvcache: cache_leftpad must be in \[0, cache_seqlens\]"),
    "batch_idx_out_of_range": (RuntimeError, r"kvcache: cache_batch_idx must be in \[0, k_cache.shape\[0\]\)"),
    "rotary_too_short": (RuntimeError, r"kvcache: rotary_cos / rotary_sin must have a row for every rotated position"),
    "seqlens_int64": (ValueError, r"cache_seqlens must be int32 of shape \(2,\)"),
    "k_without_v": (ValueError, r"give both k and v"),
    "paged_block_out_of_range": (RuntimeError, r"paged KV: block_table holds a block id outside \[0, num_blocks\)"),
    "paged_block_table_int64": (ValueError, r"block_table must be int32 \(batch, max_blocks\)"),
    "paged_batch_idx": (ValueError, r"cache_batch_idx is not supported with a block_table"),
    "paged_leftpad": (ValueError, r"cache_leftpad is not supported with a block_table"),
    "paged_seqlens_beyond_capacity": (RuntimeError, r"kvcache: cache_seqlens \+ seqlen_new must be <= the cache's capacity"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_kvcache_bad_input_raises_cpu(name):
    exc, match = BAD[name]
    with pytest.raises(exc, match=match):
        _bad(name)


def test_kvcache_append_op_checks():
    kc, vc = torch.zeros(2, 8, 1, 4), torch.zeros(2, 8, 1, 4)
    k = torch.ones(2, 3, 1, 4)
    T = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"kvcache: cache_seqlens \+ seqlen_new must be <="):
        _ops.kvcache_append(kc, vc, k, k, T(0, 6))
    with pytest.raises(RuntimeError, match=r"k must have k_cache's \(nheads_k, headdim\)"):
        _ops.kvcache_append(kc, vc, torch.ones(2, 3, 1, 5), k, T(0, 1))
    with pytest.raises(RuntimeError, match="v must have k_cache's dtype"):
        _ops.kvcache_append(kc, vc, k, k.double(), T(0, 1))
    assert kc.eq(0).all()  # nothing written by a call that failed its checks
    _ops.kvcache_append(kc, vc, k, 2 * k, T(0, 5))
    assert kc[0, :3].eq(1).all() and kc[1, 5:].eq(1).all() and kc[0, 3:].eq(0).all() and vc[1, 5:].eq(2).all()


# ---------------------------------------------------------------- Triton path under the interpreter


def test_kvcache_triton_interpreter_subprocess():
    run_interpreter_tests(__file__, "interp_", exact_passed=len(CASES), timeout=600)


@interp_only
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_interp_kvcache_matches_reference(case, monkeypatch):
    """flash_attn_with_kvcache with its attention on the Triton launcher (CPU tensors, the
    CUDA path's code) and split-KV into 2 parts, in float32 and float64."""
    from torch_varlen import kernels

    monkeypatch.setattr(ops, "_ops", SimpleNamespace(attention_forward=kernels._attention_forward_cuda,
                                                     kvcache_append=_ops.kvcache_append))
    check_case(case, "cpu", torch.float64, num_splits=2)
    if case.name.startswith("paged16"):
        check_case(case, "cpu", torch.float32, tol=3e-5, num_splits=3)


# ---------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kvcache_matches_reference(case, dtype):
    for splits in (0, 1, 3):
        check_case(case, "cuda", dtype, tol=6e-2 if dtype == torch.bfloat16 else 1e-2, num_splits=splits)


@requires_cuda
def test_gpu_kvcache_float64_split_kv_long_cache():
    """One query per sequence over long paged caches, split-KV by the heuristic and forced."""
    c = Case("long", [3000, 17, 4095, 1000], causal=True, rotary_dim=16, block_size=64, seqlen_cache=4096)
    for splits in (0, 1, 8):
        check_case(c, "cuda", torch.float64, num_splits=splits)


@requires_cuda
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_decode_steps_in_a_cuda_graph(paged):
    """Decode steps (rotary, append in place, split-KV attention, cache_seqlens += 1) captured
    once in a CUDA graph and replayed: no host sync (capture would fail), each replay equals an
    eager step on a copy of the state."""
    c = Case("graph", [5, 40, 300, 0], causal=True, rotary_dim=16, nheads=8, nheads_k=2, headdim=64,
             headdim_v=64, seqlen_cache=512, block_size=16 if paged else None)
    state = make_inputs(c, "cuda", torch.bfloat16)
    eager = {n: (x.clone() if isinstance(x, torch.Tensor) else x) for n, x in state.items()}
    out_buf = torch.empty(4, 1, 8, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        out_buf.copy_(torch_varlen.flash_attn_with_kvcache(**state))
        state["cache_seqlens"].add_(1)

    saved = {n: state[n].clone() for n in ("k_cache", "v_cache", "cache_seqlens")}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels
        step()
    torch.cuda.current_stream().wait_stream(side)
    for n, x in saved.items():
        state[n].copy_(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    g = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(4):
        for n in ("q", "k", "v"):
            state[n].copy_(torch.randn(state[n].shape, generator=g, device="cuda"))
            eager[n] = state[n].clone()
        graph.replay()
        want = torch_varlen.flash_attn_with_kvcache(**eager)
        eager["cache_seqlens"] += 1
        torch.testing.assert_close(out_buf, want, rtol=2e-2, atol=2e-2)
        assert torch.equal(state["k_cache"], eager["k_cache"]) and torch.equal(state["v_cache"], eager["v_cache"])
        assert torch.equal(state["cache_seqlens"], eager["cache_seqlens"])
