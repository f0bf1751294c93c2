"""GPU-only checks of the CUDA padding kernels (_C/cuda/padding.cu).

test_padding.py runs the shared checks (reference exactness, opcheck, gradcheck, compile) on
every device; this file adds what needs a GPU: odd hidden sizes and many dtypes at larger
sizes with poisoned outputs, the host-sync budget, CUDA graph capture (manual and
torch.compile(mode="reduce-overhead")) with capacity, and device-side asserts on bad values.
"""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import requires_cuda
from samples import random_mask
from test_padding import assert_same, fresh

import torch_varlen  # noqa: F401
from torch_varlen import reference
from torch_varlen.bert_padding import pad_input, unpad_input

pytestmark = requires_cuda
ops = torch.ops.varlen
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.uint8, torch.bool]
REST = [(), (3,), (768,), (4100,), (2, 5)]


def poison_cuda_memory(nbytes):
    """Fill every free block of the caching allocator with 0xFF bytes (NaN in every float
    dtype), so outputs a kernel allocates next start poisoned: an unwritten row then fails the
    exact comparison. Checked with a probe allocation of nbytes."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    poison = lambda n: torch.full((n,), 255, dtype=torch.uint8, device="cuda")
    # fresh segments filled whole (two 2 MiB small-pool ones, one 20 MiB large-pool one) ...
    blocks = [poison(n) for n in [1 << 20] * 4 + [20 << 20]]
    # ... and the free blocks of segments that live tensors keep (small requests are <= 1 MiB)
    chunks = []
    for segment in torch.cuda.memory_snapshot():
        small = segment["segment_type"] == "small"
        for block in segment["blocks"]:
            size = block["size"]
            while block["state"] == "inactive" and size > 0 and (small or size > (1 << 20)):
                chunks.append(min(size, 1 << 20) if small else size)
                size -= chunks[-1]
    blocks += [poison(n) for n in sorted(chunks, reverse=True)]  # largest first: best fit is exact
    del blocks
    probe = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device="cuda")
    assert probe.isnan().all(), "poisoning the allocator did not work: the test would prove nothing"
    del probe


def masks(batch, seqlen):
    lengths = torch.randint(0, seqlen + 1, (batch,))
    lengths[0], lengths[-1] = 0, seqlen  # an empty row and an all-valid row
    yield random_mask(batch, seqlen, "cuda", lengths=lengths.tolist()), None
    scattered = torch.rand(batch, seqlen, device="cuda") > 0.5
    yield scattered, (~scattered) & (torch.rand(batch, seqlen, device="cuda") > 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_vs_reference_with_poisoned_outputs(dtype):
    for batch, seqlen in [(5, 37), (1, 70)]:  # partial tiles, batch of one
        for rest in REST:
            h = fresh((batch, seqlen) + rest, dtype, "cuda")
            nbytes = h.numel() * h.element_size() * 2 + 4096
            for m, u in masks(batch, seqlen):
                poison_cuda_memory(nbytes)
                out = ops.unpad(h, m, u)
                assert_same(out, reference.unpad(h, m, u))
                nnz = out[1].numel()
                poison_cuda_memory(nbytes)
                cap = ops.unpad_capacity(h, m, u, nnz + 40)
                assert_same(cap, reference.unpad_capacity(h, m, u, nnz + 40))
                poison_cuda_memory(nbytes)
                assert_same([ops.pad(out[0], out[1], batch, seqlen)],
                            [reference.pad(out[0], out[1], batch, seqlen)])
                poison_cuda_memory(nbytes)
                assert_same([ops.pad(cap[0], cap[1], batch, seqlen)],
                            [reference.pad(cap[0], cap[1], batch, seqlen)])
                poison_cuda_memory(nbytes)
                assert_same([ops.gather_rows(h, cap[1])], [reference.gather_rows(h, cap[1])])


# Geometries around the scan tiles (4096 positions per eager scan block, 64 per capacity block,
# 32 per copy block; tiles cover consecutive positions b*seqlen + s, so they straddle rows).
GEOMETRIES = [(3, 5000), (1, 20000), (2500, 3), (700, 1), (37, 300)]


def geometry_masks(batch, seqlen):
    """(name, mask, unused_mask) cases for one geometry; every mask has values beyond 0/1."""
    keep = torch.rand(batch, seqlen, device="cuda") > 0.4
    values = torch.randint(1, 100, (batch, seqlen), device="cuda") * keep
    yield "bool", keep, None
    yield "all_zero", torch.zeros(batch, seqlen, dtype=torch.bool, device="cuda"), None
    yield "all_one", torch.ones(batch, seqlen, dtype=torch.int32, device="cuda"), None
    yield "prefix", random_mask(batch, seqlen, "cuda"), None
    yield "unused", keep, (~keep) & (torch.rand(batch, seqlen, device="cuda") > 0.5)
    yield "unused_only", torch.zeros_like(keep), keep
    for dtype in [torch.int32, torch.int64, torch.uint8, torch.float16, torch.float32, torch.float64]:
        yield str(dtype), values.to(dtype) * (-1 if dtype.is_floating_point else 1), None
    wide = torch.stack([values, values], -1).flatten(1).to(torch.int16)
    yield "strided", wide[:, ::2], None  # not contiguous: element-wise reads
    storage = torch.empty(batch * seqlen + 1, dtype=torch.float32, device="cuda")
    storage[1:] = values.flatten().float()
    yield "misaligned", storage[1:].view(batch, seqlen), None  # contiguous, 4 bytes off 16-byte alignment


@pytest.mark.parametrize("batch,seqlen", GEOMETRIES, ids=str)
def test_tiles_straddling_rows_and_mask_kinds(batch, seqlen):
    """Eager unpad and unpad_capacity (capacity nnz, nnz + 70, batch*seqlen) against the
    reference on scan tiles that straddle rows, for every kind of mask, outputs poisoned."""
    for rest, dtype in [((5,), torch.float32), ((8,), torch.bfloat16)]:
        h = fresh((batch, seqlen) + rest, dtype, "cuda")
        nbytes = h.numel() * h.element_size() * 2 + 4096
        for name, m, u in geometry_masks(batch, seqlen):
            expected = reference.unpad(h, m, u)
            poison_cuda_memory(nbytes)
            assert_same(ops.unpad(h, m, u), expected)
            nnz = expected[1].numel()
            for cap in sorted({nnz, nnz + 70, batch * seqlen}):
                poison_cuda_memory(nbytes)
                assert_same(ops.unpad_capacity(h, m, u, cap), reference.unpad_capacity(h, m, u, cap))


def test_repeated_calls_reset_the_scan_state():
    """The ticket, done counter and tile flags live in scratch that the allocator hands back
    to the next call: every call must reset them. Alternate sizes and masks, same stream."""
    h = fresh((37, 300, 4), torch.float32, "cuda")
    masks = [m for _, m, _ in geometry_masks(37, 300)][:4]
    for i in range(24):
        m = masks[i % len(masks)]
        rows = 37 if i % 3 else 20
        expected = reference.unpad(h[:rows], m[:rows])
        first = ops.unpad(h[:rows], m[:rows])
        assert_same(first, expected)
        assert_same(ops.unpad(h[:rows], m[:rows]), first)
        cap = rows * 300
        assert_same(ops.unpad_capacity(h[:rows], m[:rows], None, cap),
                    reference.unpad_capacity(h[:rows], m[:rows], None, cap))


def test_capacity_graph_replay_with_changing_masks():
    """unpad_capacity alone captured in a CUDA graph (memset + one kernel), replayed over
    masks with different nnz: all-zero, all-one, random, with an unused mask."""
    batch, seqlen, hidden = 23, 700, 16  # 252 scan tiles + tail blocks
    cap = batch * seqlen
    static_h = fresh((batch, seqlen, hidden), torch.bfloat16, "cuda")
    static_m = torch.ones(batch, seqlen, dtype=torch.bool, device="cuda")
    static_u = torch.zeros(batch, seqlen, dtype=torch.bool, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.unpad_capacity(static_h, static_m, static_u, cap)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.unpad_capacity(static_h, static_m, static_u, cap)
    cases = [(m, None) for _, m, _ in geometry_masks(batch, seqlen)][:4]
    keep = torch.rand(batch, seqlen, device="cuda") > 0.7
    cases += [(keep, (~keep) & (torch.rand(batch, seqlen, device="cuda") > 0.5))] * 2
    for m, u in cases:
        static_h.copy_(fresh((batch, seqlen, hidden), torch.bfloat16, "cuda"))
        static_m.copy_(m != 0)
        static_u.copy_(u if u is not None else torch.zeros_like(static_u))
        graph.replay()
        assert_same(static_out, reference.unpad_capacity(static_h, static_m, static_u, cap))


def test_concat_larger():
    batch, seqlen = 7, 300
    rows = []
    for b in range(batch):
        lengths = []
        while b != 3:  # row 3 holds no sample
            n = int(torch.randint(1, 60, ()))
            if sum(lengths) + n > seqlen:
                break
            lengths.append(n)
        rows.append(lengths + [0] * (seqlen - len(lengths)))
    mask = torch.tensor(rows, device="cuda")
    for rest in [(), (3,), (768,)]:
        h = fresh((batch, seqlen) + rest, torch.bfloat16, "cuda")
        poison_cuda_memory(h.numel() * 4 + 4096)
        assert_same(ops.unpad_concat(h, mask), reference.unpad_concat(h, mask))


def test_mask_dtypes_read_as_values():
    h = fresh((4, 40, 8), torch.float32, "cuda")
    base = torch.randn(4, 40, device="cuda")
    base[0, :7] = -0.0  # -0.0 is unset
    base[1, 3] = float("nan")  # NaN != 0 is set
    base[2] = 0
    for dtype in [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                  torch.int16, torch.int64, torch.uint8, torch.bool, torch.complex64]:
        m = base.to(dtype)
        assert_same(ops.unpad(h, m), reference.unpad(h, m))
        m_strided = torch.stack([m, m], -1)[..., 0]
        assert_same(ops.unpad(h.transpose(0, 1).contiguous().transpose(0, 1), m_strided), reference.unpad(h, m))


def test_misaligned_and_strided_rows():
    base = fresh((3, 50, 771), torch.bfloat16, "cuda")
    for h in (base[..., 1:769], base[:, 1:, :768], base[..., ::3]):
        m = torch.rand(h.shape[:2], device="cuda") > 0.4
        out = ops.unpad(h, m)
        assert_same(out, reference.unpad(h.contiguous(), m))
        assert_same([ops.gather_rows(h, out[1])], [reference.gather_rows(h.contiguous(), out[1])])
        packed = torch.cat([out[0][:, :1], out[0]], 1)[:, 1:]  # rows at a 2-byte offset
        assert_same([ops.pad(packed, out[1], *h.shape[:2])], [reference.pad(out[0], out[1], *h.shape[:2])])


def test_eager_unpad_outputs_are_plain_tensors():
    """Eager unpad copies into buffers of batch*seqlen rows and shrinks them in place: the
    outputs must be ordinary (non-view) contiguous tensors that autograd lets a user modify
    in place, with gradients that still reach only the kept positions."""
    h = fresh((6, 50, 8), torch.float32, "cuda").requires_grad_()
    m = torch.rand(6, 50, device="cuda") > 0.4
    hu, idx, *_ = unpad_input(h, m)
    assert not hu._is_view() and not idx._is_view() and hu.is_contiguous()
    assert hu.shape == (int(m.sum()), 8)
    hu.mul_(3.0)  # in place on an op output: no "view created inside a custom Function" error
    hu.sum().backward()
    assert torch.equal(h.grad, 3.0 * m[..., None].float().expand_as(h))


def count_syncs(fn, capfd):
    """Synchronising CUDA calls ``fn`` makes, by the sync debug mode's warnings.

    c10 turns the warning into a Python warning where Python's handler is installed on the
    thread and prints it to stderr otherwise (an H200 suite run saw the second after other tests
    had run in the worker), so both are counted. Only that warning's own words count: the first
    set_sync_debug_mode call of a process also warns that the mode "does not yet detect all
    synchronizing operations" (an H200 run counted it when this test came first in its worker)."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    words = "called a synchronizing CUDA operation"
    return capfd.readouterr().err.count(words) + sum(words in str(w.message) for w in caught)


def test_host_syncs(capfd):
    h = fresh((8, 64, 32), torch.bfloat16, "cuda")
    m = torch.rand(8, 64, device="cuda") > 0.3
    hu, idx, *_ = ops.unpad(h, m)
    torch.cuda.synchronize()
    assert count_syncs(lambda: ops.unpad(h, m), capfd) == 1  # (nnz, max_seqlen) in one read
    assert count_syncs(lambda: ops.unpad_capacity(h, m, None, 8 * 64), capfd) == 0
    assert count_syncs(lambda: ops.pad(hu, idx, 8, 64), capfd) == 0
    assert count_syncs(lambda: ops.gather_rows(h, idx), capfd) == 0


def _capacity_model(h, m, w):
    hu, idx, cu, max_seqlen, used = unpad_input(h, m, capacity=h.shape[0] * h.shape[1])
    y = torch.nn.functional.gelu(hu.float() @ w).to(h.dtype)
    return pad_input(y, idx, h.shape[0], h.shape[1]), cu, used


def _batches(n, batch, seqlen, hidden):
    for _ in range(n):
        lengths = torch.randint(0, seqlen + 1, (batch,)).tolist()
        yield (torch.randn(batch, seqlen, hidden, device="cuda", dtype=torch.bfloat16),
               random_mask(batch, seqlen, "cuda", lengths=lengths))


def test_manual_cuda_graph_capture_with_capacity():
    batch, seqlen, hidden = 6, 48, 64
    w = torch.randn(hidden, hidden, device="cuda")
    static_h, static_m = next(_batches(1, batch, seqlen, hidden))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            _capacity_model(static_h, static_m, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _capacity_model(static_h, static_m, w)
    for h, m in _batches(4, batch, seqlen, hidden):
        static_h.copy_(h)
        static_m.copy_(m)
        graph.replay()
        expected = _capacity_model(h, m, w)
        torch.testing.assert_close(static_out[0], expected[0], rtol=1e-2, atol=1e-2)
        assert (static_out[0][~m] == 0).all()
        assert torch.equal(static_out[1], expected[1]) and torch.equal(static_out[2], expected[2])


def test_compile_reduce_overhead_with_capacity():
    torch._dynamo.reset()
    batch, seqlen, hidden = 6, 48, 64
    w = torch.randn(hidden, hidden, device="cuda")
    compiled = torch.compile(_capacity_model, mode="reduce-overhead", fullgraph=True)
    for h, m in _batches(5, batch, seqlen, hidden):
        actual = [t.clone() for t in compiled(h, m, w)]
        expected = _capacity_model(h, m, w)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2)
        # padded positions are exactly zero and kept rows follow the mask
        assert (actual[0][~m] == 0).all()
        assert torch.equal(actual[1], expected[1]) and torch.equal(actual[2], expected[2])


ASSERT_CASES = {
    "capacity_too_small": "ops.unpad_capacity(h, m, None, 5)",
    "pad_index_out_of_range": "ops.pad(h.flatten(0, 1), torch.arange(24, device='cuda') + 2, 4, 6)",
    "gather_index_negative": "ops.gather_rows(h, torch.arange(24, device='cuda') - 1)",
    "concat_row_too_long": "ops.unpad_concat(h, torch.full((4, 6), 2, device='cuda'))",
}


@pytest.mark.parametrize("case", sorted(ASSERT_CASES))
def test_bad_values_fail_a_device_side_assert(case):
    """Value errors that the host cannot see without a sync are device-side asserts; they run
    in a subprocess because an assert leaves the CUDA context unusable."""
    script = textwrap.dedent(f"""
        import torch, torch_varlen
        ops = torch.ops.varlen
        h = torch.randn(4, 6, 8, device="cuda")
        m = torch.ones(4, 6, dtype=torch.bool, device="cuda")
        try:
            {ASSERT_CASES[case]}
            torch.cuda.synchronize()
        except RuntimeError as e:
            assert "device-side assert" in str(e), str(e)
        else:
            raise AssertionError("no error was raised")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
