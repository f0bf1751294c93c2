"""The operator layer under torch.compile: a packed model end to end, no graph break, no host
sync, no recompilation when lengths change, same numbers as eager (forward and training)."""

import copy

import pytest
import torch
import torch._dynamo.testing
from expecttest import assert_expected_inline

from torch_varlen.bert_padding import pad_input, unpad_input
from torch_varlen import flash_attn_varlen_func

from samples import random_mask


class PackedCausalBlock(torch.nn.Module):
    """unpad_input -> linear layers -> causal varlen attention -> linear -> pad_input."""

    def __init__(self, dim=32, nheads=4, nheads_k=2):
        super().__init__()
        self.nheads, self.nheads_k, self.headdim = nheads, nheads_k, dim // nheads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * nheads_k * self.headdim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, mask):
        batch, seqlen, dim = x.shape
        x_unpad, indices, cu_seqlens, max_seqlen, _ = unpad_input(x, mask)
        q = self.q(x_unpad).view(-1, self.nheads, self.headdim)
        k, v = self.kv(x_unpad).view(-1, 2, self.nheads_k, self.headdim).unbind(1)
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return pad_input(self.proj(out.reshape(-1, dim)), indices, batch, seqlen)


# (batch, seqlen, lengths): different batch sizes, sequence lengths and masks, a zero length
BATCHES = [(3, 8, [2, 8, 5]), (2, 5, [5, 1]), (4, 11, [11, 0, 7, 3]), (5, 6, [1, 2, 3, 4, 6]),
           (2, 13, [9, 13]), (3, 9, [4, 4, 4])]


def _inputs(batch, seqlen, lengths, requires_grad=False):
    x = torch.randn(batch, seqlen, 32, requires_grad=requires_grad)
    return x, random_mask(batch, seqlen, "cpu", lengths=lengths)


def test_compiled_model_matches_eager_without_recompiling():
    torch._dynamo.reset()
    model = PackedCausalBlock()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for batch, seqlen, lengths in BATCHES:
        x, mask = _inputs(batch, seqlen, lengths)
        torch.testing.assert_close(compiled(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations"


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    eager = PackedCausalBlock()
    model = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for batch, seqlen, lengths in BATCHES:
        x, mask = _inputs(batch, seqlen, lengths, requires_grad=True)
        x_eager = x.detach().clone().requires_grad_()
        w = torch.randn(batch, seqlen, 32)
        (compiled(x, mask) * w).sum().backward()
        (eager(x_eager, mask) * w).sum().backward()
        torch.testing.assert_close(x.grad, x_eager.grad, atol=1e-5, rtol=1e-5)
        for (name, p), p_eager in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, p_eager.grad, atol=1e-4, rtol=1e-4, msg=name)
            p.grad = p_eager.grad = None
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations"


def _graph_listing(gm: torch.fx.GraphModule) -> str:
    """The traced graph as one line per tensor-level node. Symbolic-shape bookkeeping (size
    symbols, runtime asserts on unbacked sizes), whose spelling differs between PyTorch
    releases, is left out; any new op, graph input, host read (.item / _local_scalar_dense)
    or break still shows as a diff."""
    lines = []
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        symbolic = isinstance(value, (torch.SymInt, torch.SymBool, int)) or (value is None and node.op != "placeholder")
        if node.op == "output":
            lines.append("output")
        elif symbolic and target not in ("item", "_local_scalar_dense", "tolist"):
            continue
        elif node.op == "placeholder":
            lines.append(f"input {node.name}")
        else:
            lines.append(f"{node.op} {target}")
    return "\n".join(lines)


def test_traced_graph_is_pinned():
    torch._dynamo.reset()
    backend = torch._dynamo.testing.AotEagerAndRecordGraphs()
    model = PackedCausalBlock()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    x, mask = _inputs(3, 8, [2, 8, 5], requires_grad=True)
    compiled(x, mask).sum().backward()
    assert len(backend.graphs) == 1  # one Dynamo graph: no graph break
    for gm in backend.fw_graphs + backend.bw_graphs:
        assert "_local_scalar_dense" not in gm.code, "host sync in the traced graph"
    assert_expected_inline(_graph_listing(backend.graphs[0]), """\
input l_x_
input l_mask_
input l_self_modules_q_parameters_weight_
input l_self_modules_q_parameters_bias_
input l_self_modules_kv_parameters_weight_
input l_self_modules_kv_parameters_bias_
input l_self_modules_proj_parameters_weight_
input l_self_modules_proj_parameters_bias_
call_method size
call_function unpad
call_function getitem
call_function getitem
call_function getitem
call_function getitem
call_function linear
call_method view
call_function linear
call_method view
call_method unbind
call_function getitem
call_function getitem
call_function attention_forward
call_function getitem
call_method reshape
call_function linear
call_function pad
output""")
