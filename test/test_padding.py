"""Padding ops (unpad, unpad_capacity, unpad_concat, pad, gather_rows) against reference.py.

Device-parametrized over DEVICES: the same checks run on the CPU kernels and, when a GPU is
present, on the CUDA kernels. GPU-only checks (graph capture, poisoned outputs at large sizes)
live in test_padding_cuda.py.
"""

import pytest
import torch
from conftest import DEVICES
from samples import concat_sample_inputs, padding_sample_inputs, random_mask

import torch_varlen
from torch_varlen import reference
from torch_varlen.bert_padding import pad_input, unpad_input, unpad_input_for_concatenated_sequences

ops = torch.ops.varlen
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool]


def fresh(shape, dtype, device):
    """Random values of any dtype, never all zeros."""
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=torch.float64, device=device).to(dtype)


def assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if isinstance(e, torch.Tensor):
            assert a.dtype == e.dtype and a.device == e.device, (a.dtype, e.dtype, a.device, e.device)
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=False)
        else:
            assert a == e


def samples(device, dtype):
    """padding_sample_inputs with hidden_states redrawn in `dtype` (integer and bool included)."""
    for s in padding_sample_inputs(device):
        yield fresh(s.hidden_states.shape, dtype, device), s


# ---------------------------------------------------------------- exactness vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_unpad_pad_gather_match_reference(device, dtype):
    for h, s in samples(device, dtype):
        m, u = s.attention_mask, s.unused_mask
        out = ops.unpad(h, m, u)
        assert_same(out, reference.unpad(h, m, u))
        hidden_unpad, indices = out[0], out[1]
        batch, seqlen = h.shape[:2]
        assert_same([ops.pad(hidden_unpad, indices, batch, seqlen)],
                    [reference.pad(hidden_unpad, indices, batch, seqlen)])
        assert_same([ops.gather_rows(h, indices)], [reference.gather_rows(h, indices)])
        nnz = indices.numel()
        for capacity in (nnz, nnz + 3):
            cap = ops.unpad_capacity(h, m, u, capacity)
            assert_same(cap, reference.unpad_capacity(h, m, u, capacity))
            # capacity padding: pad ignores index batch*seqlen, gather_rows gives zero rows
            assert_same([ops.pad(cap[0], cap[1], batch, seqlen)], [reference.pad(cap[0], cap[1], batch, seqlen)])
            assert_same([ops.gather_rows(h, cap[1])], [reference.gather_rows(h, cap[1])])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_unpad_concat_matches_reference(device, dtype):
    for h, lengths in concat_sample_inputs(device):
        h = fresh(h.shape, dtype, device)
        for mask in (lengths, lengths.to(torch.int64), lengths.to(torch.uint8)):
            assert_same(ops.unpad_concat(h, mask), reference.unpad_concat(h, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    lengths = [3, 0, 5, 1]
    mask = random_mask(4, 6, device, lengths=lengths)
    base = fresh((6, 4, 10), torch.float32, device)
    cases = {
        "batch_seq_transposed": base.transpose(0, 1),  # leading dims strided, rows dense
        "strided_hidden": fresh((4, 6, 10), torch.float32, device)[..., ::2],  # rows not dense
        "expanded": fresh((1, 6, 5), torch.float32, device).expand(4, 6, 5),
    }
    mask_t = mask.t().contiguous().t()  # non-contiguous mask
    for name, h in cases.items():
        assert not h.is_contiguous(), name
        out = ops.unpad(h, mask_t)
        assert_same(out, reference.unpad(h.contiguous(), mask))
        cap = ops.unpad_capacity(h, mask_t, None, 12)
        assert_same(cap, reference.unpad_capacity(h.contiguous(), mask, None, 12))
        packed = torch.stack([out[0], out[0]], -1)[..., 0]  # non-dense rows for pad
        indices = torch.stack([out[1], out[1]], 1)[:, 0]  # strided indices
        assert_same([ops.pad(packed, indices, 4, 6)], [reference.pad(out[0], out[1], 4, 6)])
        assert_same([ops.gather_rows(h, indices)], [reference.gather_rows(h.contiguous(), out[1])])
    concat = torch.tensor([[2, 1, 0, 0, 0, 0], [0] * 6, [6, 0, 0, 0, 0, 0], [1] * 6], device=device)
    h = cases["batch_seq_transposed"]
    assert_same(ops.unpad_concat(h, concat.t().contiguous().t()), reference.unpad_concat(h.contiguous(), concat))


@pytest.mark.parametrize("device", DEVICES)
def test_odd_row_sizes_and_rest_dims(device):
    for rest in [(), (1,), (3,), (2, 3, 5), (0,), (4100,)]:
        h = fresh((3, 5) + rest, torch.bfloat16, device)
        m = random_mask(3, 5, device, lengths=[5, 0, 2])
        out = ops.unpad(h, m)
        assert_same(out, reference.unpad(h, m))
        assert_same([ops.pad(out[0], out[1], 3, 5)], [reference.pad(out[0], out[1], 3, 5)])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_seqlen(device):
    for batch, seqlen in [(0, 4), (3, 0), (0, 0)]:
        h = fresh((batch, seqlen, 2), torch.float32, device)
        m = torch.ones(batch, seqlen, dtype=torch.bool, device=device)
        hu, idx, cu, max_seqlen, used = ops.unpad(h, m)
        assert hu.shape == (0, 2) and idx.shape == (0,) and max_seqlen == 0
        assert cu.tolist() == [0] * (batch + 1) and used.tolist() == [0] * batch
        assert ops.pad(hu, idx, batch, seqlen).shape == (batch, seqlen, 2)
        assert ops.unpad_capacity(h, m, None, 2)[1].tolist() == [batch * seqlen] * 2


# ---------------------------------------------------------------- public API


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_lengths_2_4_3(device):
    mask = random_mask(3, 4, device, lengths=[2, 4, 3])
    h = fresh((3, 4, 8), torch.float32, device)
    hu, idx, cu, max_seqlen, used = unpad_input(h, mask)
    assert cu.tolist() == [0, 2, 6, 9] and cu.dtype == torch.int32
    assert idx.tolist() == [0, 1, 4, 5, 6, 7, 8, 9, 10] and idx.dtype == torch.int64
    assert max_seqlen == 4 and isinstance(max_seqlen, int)
    assert used.tolist() == [2, 4, 3]
    torch.testing.assert_close(hu, h[mask], rtol=0, atol=0)
    torch.testing.assert_close(pad_input(hu, idx, 3, 4), h * mask[..., None], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_capacity(device):
    for s in padding_sample_inputs(device):
        h, m, u = s.hidden_states, s.attention_mask, s.unused_mask
        batch, seqlen = h.shape[:2]
        exact = unpad_input(h, m, u)
        nnz = exact[1].numel()
        capacity = nnz + 5
        hu, idx, cu, max_seqlen, used = unpad_input(h, m, u, capacity=capacity)
        assert hu.shape == (capacity,) + h.shape[2:] and idx.shape == (capacity,)
        torch.testing.assert_close(hu[:nnz], exact[0], rtol=0, atol=0)  # valid rows first
        assert (hu[nnz:] == 0).all()  # the rest zero
        assert (idx[nnz:] == batch * seqlen).all() and torch.equal(idx[:nnz], exact[1])
        assert torch.equal(cu, exact[2]) and torch.equal(used, exact[4])
        assert max_seqlen == seqlen
        # pad_input ignores the unused indices; the round trip restores the kept rows
        torch.testing.assert_close(pad_input(hu, idx, batch, seqlen), pad_input(*exact[:2], batch, seqlen), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_round_trips(device):
    for s in padding_sample_inputs(device):
        h, m, u = s.hidden_states, s.attention_mask, s.unused_mask
        keep = reference._keep_rows(m, u)
        hu, idx, *_ = unpad_input(h, m, u)
        padded = pad_input(hu, idx, *h.shape[:2])
        expected = torch.where(keep.reshape(keep.shape + (1,) * (h.dim() - 2)), h, torch.zeros_like(h))
        torch.testing.assert_close(padded, expected, rtol=0, atol=0)
        torch.testing.assert_close(unpad_input(padded, m, u)[0], hu, rtol=0, atol=0)
    for h, lengths in concat_sample_inputs(device):
        hu, idx, cu, max_seqlen = unpad_input_for_concatenated_sequences(h, lengths)
        back = pad_input(hu, idx, *h.shape[:2])
        torch.testing.assert_close(ops.gather_rows(back, idx), hu, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_concat_docstring_example(device):
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0]], device=device)
    h = fresh((2, 6, 3), torch.float32, device)
    hu, idx, cu, max_seqlen = unpad_input_for_concatenated_sequences(h, lengths)
    assert cu.tolist() == [0, 2, 5, 9, 10] and max_seqlen == 4
    assert idx.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for s in padding_sample_inputs(device, torch.float64, requires_grad=True):
        h, m, u = s.hidden_states, s.attention_mask, s.unused_mask
        batch, seqlen = h.shape[:2]
        unpad = lambda x: unpad_input(x, m, u)[0]
        unpad_cap = lambda x: unpad_input(x, m, u, capacity=batch * seqlen + 1)[0]
        torch.autograd.gradcheck(unpad, (h,))
        torch.autograd.gradgradcheck(unpad, (h,))
        torch.autograd.gradcheck(unpad_cap, (h,))
        idx = unpad_input(h, m, u)[1]
        hu = torch.randn((idx.numel(),) + h.shape[2:], dtype=torch.float64, device=device, requires_grad=True)
        torch.autograd.gradcheck(lambda x: pad_input(x, idx, batch, seqlen), (hu,))
        torch.autograd.gradgradcheck(lambda x: pad_input(x, idx, batch, seqlen), (hu,))
        torch.autograd.gradcheck(lambda x: ops.gather_rows(x, idx), (h,))
    for h, lengths in concat_sample_inputs(device, torch.float64, requires_grad=True):
        torch.autograd.gradcheck(lambda x: unpad_input_for_concatenated_sequences(x, lengths)[0], (h,))


# ---------------------------------------------------------------- opcheck


def opcheck_cases(device, requires_grad):
    for s in padding_sample_inputs(device, torch.float32, requires_grad=requires_grad):
        h, m, u = s.hidden_states, s.attention_mask, s.unused_mask
        batch, seqlen = h.shape[:2]
        yield ops.unpad.default, (h, m, u)
        with torch.no_grad():
            hu, idx, *_ = ops.unpad(h, m, u)
        cap = idx.numel() + 2
        yield ops.unpad_capacity.default, (h, m, u, cap)
        hu = hu.detach().requires_grad_(requires_grad)
        yield ops.pad.default, (hu, idx, batch, seqlen)
        yield ops.gather_rows.default, (h, idx)
        cap_idx = torch.cat([idx, idx.new_full((2,), batch * seqlen)])
        yield ops.gather_rows.default, (h, cap_idx)
    for h, lengths in concat_sample_inputs(device, torch.float32, requires_grad=requires_grad):
        yield ops.unpad_concat.default, (h, lengths)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, requires_grad):
    for op, args in opcheck_cases(device, requires_grad):
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    h = fresh((2, 3, 4), torch.float32, device)
    m = torch.ones(2, 3, dtype=torch.bool, device=device)
    idx = torch.arange(6, device=device)
    cases = [
        (lambda: ops.unpad(h, m[:, :2]), r"attention_mask must have shape \(batch, seqlen\)"),
        (lambda: ops.unpad(h, m.t()), r"attention_mask must have shape \(batch, seqlen\)"),
        (lambda: ops.unpad(h, m[0]), r"attention_mask must be 2-D"),
        (lambda: ops.unpad(h, m, m[:1]), r"unused_mask must have shape"),
        (lambda: ops.unpad(h[0, 0], m), r"hidden_states must be \(batch, seqlen, ...\)"),
        (lambda: ops.unpad_capacity(h, m, None, -1), r"capacity must be >= 0"),
        (lambda: ops.pad(h.flatten(0, 1), idx.int(), 2, 3), r"indices must be int64"),
        (lambda: ops.pad(h.flatten(0, 1), idx[None], 2, 3), r"indices must be 1-D"),
        (lambda: ops.pad(h.flatten(0, 1), idx[:5], 2, 3), r"indices must have 6 entries"),
        (lambda: ops.pad(h.flatten(0, 1), idx, -1, 3), r"batch and seqlen must be >= 0"),
        (lambda: ops.gather_rows(h, idx.float()), r"indices must be int64"),
        (lambda: ops.gather_rows(h[0, 0], idx), r"padded must be \(batch, seqlen, ...\)"),
        (lambda: ops.unpad_concat(h, m), r"attention_mask_in_length must hold integer lengths"),
        (lambda: ops.unpad_concat(h, m[:1].long()), r"attention_mask_in_length must have shape"),
    ]
    if device == "cpu":  # value checks; on CUDA they are device-side asserts (test_padding_cuda.py)
        cases += [
            (lambda: ops.unpad_capacity(h, m, None, 5),
             r"capacity \(5\) is smaller than the number of kept tokens \(6\)"),
            (lambda: unpad_input(h, m, capacity=3), r"capacity \(3\) is smaller than the number of kept tokens \(6\)"),
            (lambda: ops.pad(h.flatten(0, 1), idx - 1, 2, 3), r"indices must be in \[0, batch\*seqlen\] = \[0, 6\]"),
            (lambda: ops.pad(h.flatten(0, 1), idx + 2, 2, 3), r"indices must be in \[0, batch\*seqlen\] = \[0, 6\].*got 7"),
            (lambda: ops.gather_rows(h, idx + 2), r"indices must be in \[0, batch\*seqlen\].*got 7"),
            (lambda: ops.unpad_concat(h, torch.tensor([[1, -1, 0], [0, 0, 0]], device=device)),
             r"attention_mask_in_length must be >= 0"),
            (lambda: ops.unpad_concat(h, torch.tensor([[2, 2, 0], [0, 0, 0]], device=device)),
             r"attention_mask_in_length row 0 sums to 4, more than seqlen \(3\)"),
        ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()
            pytest.fail(f"no error raised; expected one matching {match!r}")
    ops.pad(h.flatten(0, 1), torch.full_like(idx, 6), 2, 3)  # == batch*seqlen: the legal "unused" value


# ---------------------------------------------------------------- torch.compile


def _packed_model(h, m, w):
    hu, idx, cu, max_seqlen, used = unpad_input(h, m)
    y = torch.tanh(hu @ w) * (max_seqlen + 1)
    return pad_input(y, idx, h.shape[0], h.shape[1]), cu, used


def _packed_model_capacity(h, m, w):
    hu, idx, cu, max_seqlen, used = unpad_input(h, m, capacity=h.shape[0] * h.shape[1])
    y = torch.tanh(hu @ w) * (max_seqlen + 1)
    return pad_input(y, idx, h.shape[0], h.shape[1]), cu, used


@pytest.mark.parametrize("model", [_packed_model, _packed_model_capacity], ids=["exact", "capacity"])
@pytest.mark.parametrize("device", DEVICES)
def test_compile_no_recompile(device, model):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    w = torch.randn(8, 8, device=device)
    shapes = [(3, 5), (4, 7), (2, 9), (5, 6)]
    for batch, seqlen in shapes:
        h = torch.randn(batch, seqlen, 8, device=device)
        for mask in (random_mask(batch, seqlen, device), torch.rand(batch, seqlen, device=device) > 0.3):
            expected = model(h, mask, w)
            actual = compiled(h, mask, w)
            for a, e in zip(actual, expected):
                torch.testing.assert_close(a, e)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for {len(shapes)} shapes"


# ---------------------------------------------------------------- flash-attn's index_* names


@pytest.mark.parametrize("device", DEVICES)
def test_index_first_axis_family_matches_indexing(device):
    """index_first_axis / index_put_first_axis / index_first_axis_residual equal plain
    indexing (values and gradients, float64), as in flash-attn's bert_padding."""
    from torch_varlen.bert_padding import (index_first_axis, index_first_axis_residual,
                                           index_put_first_axis)

    torch.manual_seed(0)
    x = torch.randn(11, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    idx = torch.tensor([7, 0, 3, 10, 4], device=device)
    g = torch.randn(5, 3, 4, dtype=torch.float64, device=device)
    rows = index_first_axis(x, idx)
    assert torch.equal(rows, x[idx])
    (gx,) = torch.autograd.grad(rows, x, g)
    (ex,) = torch.autograd.grad(x[idx], x, g)
    assert torch.equal(gx, ex)

    vals = torch.randn(5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    put = index_put_first_axis(vals, idx, 11)
    expect = torch.zeros(11, 3, 4, dtype=torch.float64, device=device).index_put((idx,), vals)
    assert torch.equal(put, expect)
    gp = torch.randn(11, 3, 4, dtype=torch.float64, device=device)
    assert torch.equal(torch.autograd.grad(put, vals, gp)[0], gp[idx])
    # an index equal to first_axis_dim is dropped (capacity padding), as pad_input does
    dropped = index_put_first_axis(vals, torch.tensor([7, 0, 3, 10, 11], device=device), 11)
    assert torch.equal(dropped[[7, 0, 3, 10]], vals[:4].detach()) and dropped[4].eq(0).all()

    rows, residual = index_first_axis_residual(x, idx)
    gr = torch.randn_like(x)
    (gx,) = torch.autograd.grad((rows, residual), x, (g, gr))
    assert torch.equal(rows, x[idx]) and torch.equal(residual, x)
    assert torch.allclose(gx, gr.index_add(0, idx, g), rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_index_first_axis_bad_inputs(device):
    from torch_varlen.bert_padding import index_first_axis, index_put_first_axis

    x = torch.randn(4, 2, device=device)
    with pytest.raises(ValueError, match="index_first_axis: input must have at least 2 dims"):
        index_first_axis(x[:, 0], torch.tensor([0], device=device))
    with pytest.raises(ValueError, match="index_first_axis: indices must be 1-D int64"):
        index_first_axis(x, torch.tensor([0], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="index_put_first_axis: indices must be 1-D int64"):
        index_put_first_axis(x, torch.zeros(4, 1, dtype=torch.int64, device=device), 4)
    if device == "cpu":  # CUDA checks index ranges with a device assert (test_padding_cuda.py)
        with pytest.raises(RuntimeError, match=r"indices must be in \[0, batch\*seqlen\]"):
            index_first_axis(x, torch.tensor([5], device=device))
