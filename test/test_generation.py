"""model.generate() with attn_implementation="varlen" against eager, on a left-padded batch.

Three cache modes: transformers' default dynamic cache, ``cache_implementation="static"``, and
the static cache under transformers' own compiled decode (``generate`` compiles the decode step
when the cache is static and a ``CompileConfig`` allows it; on the CPU only with
``_compile_all_devices``). The models are tiny randomly initialised decoders; their weights are
drawn large enough that the greedy choice is never a near tie, so "token for token" is meaningful.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import DEVICES  # noqa: E402
from torch._dynamo.backends.registry import lookup_backend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

import torch_varlen.integrations.transformers  # noqa: E402,F401  (registers "varlen")

transformers.utils.logging.set_verbosity_error()

LENGTHS = (7, 3, 5, 1)  # prompt lengths, left-padded to 7 (one prompt of a single token)
NEW_TOKENS = 6
MODES = ("dynamic", "static", "static_compiled")


def tiny_decoder(device, sliding_window=None):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)  # GQA 4/2; no eos: every step decodes
    if sliding_window is None:
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    return model.to(device).eval()


def left_padded_batch(device, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, 97, (len(lengths), width), generator=g).masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def compile_config(backend=None):
    """A CompileConfig that makes generate() compile the decode step with fullgraph=True.

    backend None: transformers' default, inductor with mode "reduce-overhead" (CUDA graphs), on
    CUDA; inductor in its default mode on the CPU, where there are no CUDA graphs.
    """
    if backend is None and torch.cuda.is_available():
        config = CompileConfig(fullgraph=True)
    else:
        config = CompileConfig(fullgraph=True, backend=backend or "inductor", mode="default")
    config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    return config


def generate(model, impl, ids, mask, mode, **kwargs):
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    if mode != "dynamic":
        kwargs["cache_implementation"] = "static"
    if mode == "static_compiled":
        kwargs.setdefault("compile_config", compile_config())
    else:
        kwargs["disable_compile"] = True
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def assert_same_generation(got, ref, device):
    atol = 1e-4 if device == "cpu" else 1e-3
    top2 = ref[1].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 10 * atol  # no near tie: tokens must agree
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=atol)
    assert torch.equal(got[0], ref[0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_generate_matches_eager(device, mode):
    model = tiny_decoder(device)
    ids, mask = left_padded_batch(device)
    ref = generate(model, "eager", ids, mask, "static" if mode == "static_compiled" else mode)
    torch._dynamo.reset()  # count this test's compiles only, from a fresh Dynamo
    counters.clear()
    got = generate(model, "varlen", ids, mask, mode)
    assert_same_generation(got, ref, device)
    if mode == "static_compiled":
        assert hasattr(model, "_compiled_call")  # generate() really took the compiled decode path
        assert counters["stats"]["unique_graphs"] == 1  # one graph for every decode step
        if device == "cuda":
            assert counters["inductor"]["cudagraph_skips"] == 0  # the decode step runs as a CUDA graph


@pytest.mark.parametrize("device", DEVICES)
def test_generate_without_padding_mask(device):
    # No attention_mask at all: with a static cache the mask function builds one from the slots
    # written so far (the unwritten ones must never be keys).
    model = tiny_decoder(device)
    ids, _ = left_padded_batch(device, lengths=(5, 5))
    for mode in ("dynamic", "static"):
        ref = generate(model, "eager", ids, None, mode)
        got = generate(model, "varlen", ids, None, mode)
        assert_same_generation(got, ref, device)


@pytest.mark.parametrize("device", DEVICES)
def test_generate_sliding_window_static_cache(device):
    # Mistral's window 4 < prompt 7: the static sliding-window cache rolls, and its mask keeps
    # the last keys; generate() passes the mask it built through the mask function again.
    model = tiny_decoder(device, sliding_window=4)
    ids, mask = left_padded_batch(device)
    for mode in ("dynamic", "static"):
        ref = generate(model, "eager", ids, mask, mode)
        got = generate(model, "varlen", ids, mask, mode)
        assert_same_generation(got, ref, device)


def traced_ops(graphs):
    return {str(n.target).removesuffix(".default") for g in graphs for n in g.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_no_graph_break_no_recompile(device):
    graphs = []

    def recording_backend(gm, example_inputs):  # generate() deep-copies its CompileConfig; a function stays itself
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    model = tiny_decoder(device)
    config = compile_config(backend=recording_backend)
    torch._dynamo.reset()
    counters.clear()
    for seed, lengths in ((1, LENGTHS), (2, (2, 7, 7, 4))):  # new prompts and padding, same shapes
        ids, mask = left_padded_batch(device, lengths=lengths, seed=seed)
        ref = generate(model, "eager", ids, mask, "static")
        got = generate(model, "varlen", ids, mask, "static_compiled", compile_config=config)
        assert_same_generation(got, ref, device)
    # fullgraph=True: a graph break would have raised. 2 x (NEW_TOKENS - 1) decode steps, one compile.
    assert len(graphs) == 1 and not counters["graph_break"]
    assert {"varlen.unpad_capacity", "varlen.attention_forward", "varlen.pad"} <= traced_ops(graphs)
    assert "varlen.unpad" not in traced_ops(graphs)  # only static-capacity unpadding: no data-dependent shape


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sliding_window_decode_compiles_as_sdpa(device):
    # transformers' StaticSlidingWindowLayer keeps a Python int (cumulative_length_int) that
    # Dynamo guards on, so its decode step compiles twice (the second time with the int
    # dynamic) whatever the attention; varlen adds no compile of its own.
    graphs = {}
    for impl in ("sdpa", "varlen"):
        model = tiny_decoder(device, sliding_window=4)
        ids, mask = left_padded_batch(device)
        ref = generate(model, "eager", ids, mask, "static")
        torch._dynamo.reset()  # forget what the other run taught Dynamo (which ints are dynamic)
        counters.clear()
        got = generate(model, impl, ids, mask, "static_compiled", compile_config=compile_config("aot_eager"))
        graphs[impl] = counters["stats"]["unique_graphs"]
        assert_same_generation(got, ref, device)
    assert graphs["varlen"] == graphs["sdpa"] <= 2


def test_unsupported_generation_errors():
    model = tiny_decoder("cpu")
    ids, mask = left_padded_batch("cpu")
    model.set_attn_implementation("varlen")
    with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation='eager'"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       output_attentions=True, return_dict_in_generate=True)
    # Right padding that ends every row (padded past the longest prompt): with a cache the
    # queries' slots come from the last valid key, so this is refused rather than misread.
    right = mask.flip(1)
    right_ids = torch.cat([ids.flip(1), torch.zeros_like(ids[:, :1])], 1)
    right_mask = torch.cat([right, torch.zeros_like(right[:, :1])], 1)
    with pytest.raises(ValueError, match="newest token is padding in every row"):
        model.generate(input_ids=right_ids, attention_mask=right_mask, max_new_tokens=2, do_sample=False,
                       cache_implementation="static", disable_compile=True)
    with pytest.raises(ValueError, match="2-D \\(batch, kv_length\\) padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(4, 1, 7, 7, dtype=torch.bool))
