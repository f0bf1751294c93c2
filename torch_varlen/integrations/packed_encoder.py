"""Sentence embeddings from a BERT-family encoder on packed tokens, in fixed-shape steps.

``PackedEncoder`` turns a list of tokenized sentences into mean-pooled (and, by default,
L2-normalised) embeddings, the recipe of sentence-transformers' ``all-MiniLM-L6-v2``::

    from transformers import AutoModel, AutoTokenizer
    from torch_varlen.integrations.packed_encoder import PackedEncoder

    model = AutoModel.from_pretrained(path, dtype=torch.float16).cuda().eval()
    encoder = PackedEncoder(model, tokenizer=AutoTokenizer.from_pretrained(path))
    embeddings = encoder.encode_texts(sentences)        # (len(sentences), hidden) float32
    embeddings = encoder.encode(list_of_token_id_lists)  # the same from pre-tokenized input

How a call runs:

- **Token-budget batching.** Sentences are packed into *steps* of at most ``max_tokens``
  tokens and ``max_sequences`` sentences (longest first, the gap of each step filled with the
  shortest, so every step but the last few is nearly full). No padding is computed: a step's
  tokens are one packed ``(tokens, hidden)`` matrix with ``cu_seqlens`` boundaries.
- **Static shapes.** A step is rounded up to the smallest of a handful of token *buckets*
  (``buckets``, default ``max_tokens`` and its halves down to 1/8); ``cu_seqlens`` always has
  ``max_sequences + 1`` entries (unused entries repeat the total: empty sequences). Rows past
  the last sentence belong to no sequence: attention gives them 0 and pooling drops them. So a
  step has one of ``len(buckets)`` shapes whatever the sentences are.
- **No host read in the step.** Every step's inputs are built on the host up front and copied
  to the device in one transfer; the step (embeddings, every layer through
  ``torch.ops.varlen.attention_forward``, mean pooling as a segment mean over the packed rows,
  normalisation) reads nothing back. The segment mean is ``torch.segment_reduce`` over
  ``cu_seqlens`` in float64, with no atomics, so the same sentences give bitwise the same embeddings. The only synchronisation is the caller reading the result.
- **Execution.** ``compile=True`` runs the step under ``torch.compile`` (``fullgraph``, static
  shapes: one graph per bucket); ``cuda_graph=True`` (CUDA only) captures the whole step, per
  bucket, as one ``torch.cuda.CUDAGraph`` with static input/output buffers and replays it, so
  a step costs one copy in, one replay and one copy out of host work. Defaults: compiled on the
  CPU; captured (eager kernels) on CUDA.

Limits (clear errors, never a silent change of the result): every sentence needs at least one
token and at most ``max_tokens`` tokens (and no more than the model's position embeddings):
truncate when tokenizing (``encode_texts`` truncates to ``max_length``). An empty list gives a
``(0, hidden)`` result. Inference only (the step runs under ``torch.inference_mode``); the
model must be a BERT-family encoder with absolute positions (``BertModel``, ``RobertaModel``,
``XLMRobertaModel``, or a model holding exactly one of them). RoBERTa-style position offsets
(``padding_idx + 1 + i``) are applied when the model's embeddings have a ``padding_idx``.
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass

import numpy as np
import torch

from .transformers import _check_config, _encoder_classes, _packed_layer

__all__ = ["PackedEncoder", "Plan"]


@dataclass
class Plan:
    """A packed, device-resident batch of sentences, ready for ``PackedEncoder.run``.

    ``steps``: ``(bucket, offset)`` per step: the step's inputs are
    ``staged[offset : offset + 2 * bucket + max_sequences + 1]`` (token ids, positions, then
    ``cu_seqlens``). ``rows``: for sentence i, its row in the
    concatenated step outputs (device, int64). ``tokens``: real tokens in the plan.
    """

    staged: torch.Tensor
    steps: list
    rows: torch.Tensor
    tokens: int

    @property
    def num_sentences(self) -> int:
        return self.rows.numel()


class PackedEncoder:
    """Mean-pooled sentence embeddings of a BERT-family encoder, packed in fixed-shape steps.

    Args:
        model: ``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel``, or a model holding
            exactly one (e.g. ``AutoModel.from_pretrained(...)``), already on its device and
            dtype. Its weights are used as they are (not copied); put it in ``eval()`` mode.
        tokenizer: optional Hugging Face tokenizer for ``encode_texts``.
        max_tokens: token budget of a step (default 16384 on CUDA, 4096 on the CPU). A
            sentence may have at most this many tokens.
        max_sequences: sentences per step at most (default ``max_tokens // 8``).
        buckets: the step sizes in tokens (default ``max_tokens`` and its halves down to
            ``max_tokens // 8``); the largest must be ``max_tokens``. Every distinct bucket
            is one compiled graph / one captured CUDA graph.
        normalize: L2-normalise the pooled embeddings (default True, as all-MiniLM-L6-v2).
        compile: run the step under ``torch.compile`` (default: True on the CPU, False on
            CUDA). ``compile_options``: keyword arguments for ``torch.compile`` (default
            ``fullgraph=True, dynamic=False``: one graph per bucket; ``dynamic=True`` compiles
            one graph for all buckets, which is quicker to build).
        cuda_graph: capture each bucket's step as a CUDA graph (default: True on CUDA; an
            error on the CPU).
    """

    def __init__(self, model, *, tokenizer=None, max_tokens=None, max_sequences=None, buckets=None,
                 normalize=True, compile=None, cuda_graph=None, compile_options=None):
        encoders = [m for m in model.modules() if isinstance(m, _encoder_classes())]
        if len(encoders) != 1:
            raise ValueError(f"PackedEncoder needs a model holding exactly one BERT-family encoder (BertModel, "
                             f"RobertaModel, XLMRobertaModel); found {len(encoders)} in {type(model).__name__}")
        self.model = encoders[0]
        _check_config(self.model.config)
        if self.model.training:
            raise ValueError("PackedEncoder runs inference only: call model.eval() first")
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        on_cuda = self.device.type == "cuda"
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens if max_tokens is not None else (16384 if on_cuda else 4096))
        self.max_sequences = int(max_sequences if max_sequences is not None else max(self.max_tokens // 8, 1))
        if self.max_tokens < 1 or self.max_sequences < 1:
            raise ValueError(f"max_tokens and max_sequences must be >= 1, got {self.max_tokens}, {self.max_sequences}")
        if buckets is None:
            buckets = {max(self.max_tokens // d, 1) for d in (1, 2, 4, 8)}
        self.buckets = sorted({int(b) for b in buckets})
        if self.buckets[0] < 1 or self.buckets[-1] != self.max_tokens:
            raise ValueError(f"buckets must be positive and the largest must be max_tokens={self.max_tokens}, "
                             f"got {self.buckets}")
        self.normalize = bool(normalize)
        self.compile = (not on_cuda) if compile is None else bool(compile)
        self.cuda_graph = on_cuda if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and not on_cuda:
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device (it is on {self.device})")
        if self.compile and not (compile_options or {}).get("dynamic") and \
                len(self.buckets) > torch._dynamo.config.recompile_limit:
            raise ValueError(f"{len(self.buckets)} buckets exceed torch._dynamo.config.recompile_limit="
                             f"{torch._dynamo.config.recompile_limit} (one compiled graph per bucket)")
        embeddings = self.model.embeddings
        self.max_positions = embeddings.position_embeddings.num_embeddings
        padding_idx = getattr(embeddings, "padding_idx", None)  # RoBERTa: positions start at padding_idx + 1
        self.position_offset = padding_idx + 1 if padding_idx is not None else 0
        self.pad_token_id = self.model.config.pad_token_id or 0
        self.hidden_size = self.model.config.hidden_size
        self._step_fn = self._step
        if self.compile:
            # Dynamo caches compiled graphs per code object and allows recompile_limit of them:
            # a copy of _step's code gives this encoder its own cache (one graph per bucket),
            # so that several encoders in one process never share, and exhaust, one.
            step = types.FunctionType(PackedEncoder._step.__code__.replace(), globals(), "_step")
            options = {"fullgraph": True, "dynamic": False, **(compile_options or {})}
            self._step_fn = torch.compile(types.MethodType(step, self), **options)
        self._graphs = {}  # bucket -> (CUDAGraph, static input, static output)

    # ------------------------------------------------------------ the step (device only)

    def _step(self, staged: torch.Tensor) -> torch.Tensor:
        """One packed step: int64 ``staged`` (2 * C + S + 1,) -> float32 pooled (S, hidden)."""
        S = self.max_sequences
        C = (staged.shape[0] - S - 1) // 2
        ids, positions = staged[:C], staged[C : 2 * C]
        cu_seqlens = staged[2 * C :]
        cu_seqlens_i32 = cu_seqlens.to(torch.int32)
        hidden = self.model.embeddings(input_ids=ids[None], position_ids=positions[None])[0]
        for layer in self.model.encoder.layer:
            hidden = _packed_layer(layer, hidden, cu_seqlens_i32, C)
        # segment mean: sentence s owns rows cu_seqlens[s]:cu_seqlens[s+1]. segment_reduce adds
        # each segment's rows in row order (one thread per output element on CUDA, no atomics,
        # unlike index_add_), so the embeddings are bitwise reproducible, and float64 keeps the
        # sums exact to far below float32 rounding. Not a cumsum: Inductor 2.11's split-scan
        # codegen for a long cumsum over few columns fails (TypeError in get_block_shape).
        sums = torch.segment_reduce(hidden.to(torch.float64), "sum", offsets=cu_seqlens, axis=0, unsafe=True)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).to(torch.float64)
        pooled = (sums / lengths[:, None]).to(torch.float32)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled

    def _empty_step(self, bucket: int) -> torch.Tensor:
        """Staged inputs of a step with no sentence (warm-up, capture): every segment empty, every row in none.

        Made outside inference mode, as ``plan``'s are, so that compiled graphs' guards match both."""
        with torch.inference_mode(False):
            staged = torch.zeros(2 * bucket + self.max_sequences + 1, dtype=torch.int64, device=self.device)
        return staged

    def _graph(self, bucket: int):
        graph = self._graphs.get(bucket)
        if graph is None:
            static_in = self._empty_step(bucket)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up off the capture: Triton/Inductor compile here
                for _ in range(2):
                    self._step_fn(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = self._step_fn(static_in)
            graph = self._graphs[bucket] = (g, static_in, static_out)
        return graph

    # ------------------------------------------------------------ host side: packing

    def _check_lengths(self, lengths):
        limit = min(self.max_tokens, self.max_positions - self.position_offset)
        for i, n in enumerate(lengths):
            if n < 1:
                raise ValueError(f"PackedEncoder: sentence {i} has no tokens (mean pooling needs at least one)")
            if n > limit:
                what = (f"max_tokens={self.max_tokens}" if limit == self.max_tokens else
                        f"the model's {self.max_positions - self.position_offset} position embeddings")
                raise ValueError(f"PackedEncoder: sentence {i} has {n} tokens, more than {what}: truncate it "
                                 f"(e.g. tokenizer(..., truncation=True, max_length=...)) or raise max_tokens")

    def pack(self, lengths):
        """Sentence indices of each step: longest first, each step's gap filled with the shortest."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        steps, lo, hi = [], 0, len(order) - 1
        while lo <= hi:
            step, used = [], 0
            while lo <= hi and len(step) < self.max_sequences and used + lengths[order[lo]] <= self.max_tokens:
                step.append(order[lo])
                used += lengths[order[lo]]
                lo += 1
            while lo <= hi and len(step) < self.max_sequences and used + lengths[order[hi]] <= self.max_tokens:
                step.append(order[hi])
                used += lengths[order[hi]]
                hi -= 1
            steps.append(step)
        return steps

    def plan(self, input_ids) -> Plan:
        """Pack ``input_ids`` (a list of token-id lists, or a list of 1-D tensors) and copy it to the device."""
        seqs = [s.tolist() if isinstance(s, torch.Tensor) else s for s in input_ids]
        lengths = [len(s) if hasattr(s, "__len__") else -1 for s in seqs]
        try:  # all token ids in one array (one pass, no per-sentence arrays)
            flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=sum(lengths))
        except (TypeError, ValueError):
            flat = None
        if flat is None or min(lengths, default=0) < 0:
            bad = next((i for i, s in enumerate(seqs) if np.asarray(s).ndim != 1), 0)
            raise ValueError(f"PackedEncoder: sentence {bad} must be a 1-D list of token ids, "
                             f"got shape {np.asarray(seqs[bad]).shape}")
        self._check_lengths(lengths)
        lengths_np = np.asarray(lengths, dtype=np.int64)
        starts_np = np.cumsum(lengths_np) - lengths_np
        S = self.max_sequences
        chunks, steps, rows, offset = [], [], np.empty(len(seqs), dtype=np.int64), 0
        for k, step in enumerate(self.pack(lengths)):
            step = np.asarray(step, dtype=np.int64)
            step_lengths = lengths_np[step]
            ends = np.cumsum(step_lengths)
            total = int(ends[-1])
            bucket = next(b for b in self.buckets if b >= total)
            within = np.arange(total) - np.repeat(ends - step_lengths, step_lengths)  # position in its sentence
            buf = np.empty(2 * bucket + S + 1, dtype=np.int64)
            buf[:total] = flat[np.repeat(starts_np[step], step_lengths) + within]
            buf[total:bucket] = self.pad_token_id
            buf[bucket : bucket + total] = within + self.position_offset
            buf[bucket + total : 2 * bucket] = self.position_offset
            cu = buf[2 * bucket :]
            cu[0] = 0
            cu[1 : len(step) + 1] = ends
            cu[len(step) + 1 :] = total
            rows[step] = k * S + np.arange(len(step))
            chunks.append(buf)
            steps.append((bucket, offset))
            offset += buf.size
        staged = torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64))
        rows_t = torch.from_numpy(rows)
        if self.device.type == "cuda":
            staged, rows_t = staged.pin_memory(), rows_t.pin_memory()
        return Plan(staged.to(self.device, non_blocking=True), steps, rows_t.to(self.device, non_blocking=True),
                    int(lengths_np.sum()))

    # ------------------------------------------------------------ running

    def run(self, plan: Plan) -> torch.Tensor:
        """Embeddings (num_sentences, hidden) float32 on the model's device, in input order.

        Launches every step and reads nothing back on the host (no synchronisation)."""
        if plan.num_sentences == 0:
            return torch.zeros(0, self.hidden_size, dtype=torch.float32, device=self.device)
        S = self.max_sequences
        out = torch.empty(len(plan.steps) * S, self.hidden_size, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for k, (bucket, offset) in enumerate(plan.steps):
                staged = plan.staged[offset : offset + 2 * bucket + S + 1]
                if self.cuda_graph:
                    graph, static_in, static_out = self._graph(bucket)
                    static_in.copy_(staged)
                    graph.replay()
                    out[k * S : (k + 1) * S].copy_(static_out)
                else:
                    out[k * S : (k + 1) * S] = self._step_fn(staged)
            return out[plan.rows]

    def encode(self, input_ids) -> torch.Tensor:
        """Embeddings of pre-tokenized sentences: (len(input_ids), hidden) float32, model's device."""
        return self.run(self.plan(input_ids))

    def encode_texts(self, sentences, tokenizer=None, *, max_length=None) -> torch.Tensor:
        """Tokenize ``sentences`` (truncated to ``max_length`` tokens: default the tokenizer's
        ``model_max_length``, capped at ``max_tokens`` and the model's positions) and encode them."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("PackedEncoder.encode_texts needs a tokenizer (PackedEncoder(..., tokenizer=...) "
                             "or encode_texts(sentences, tokenizer))")
        if isinstance(sentences, str):
            raise TypeError("PackedEncoder.encode_texts takes a list of sentences, not one string")
        limit = min(self.max_tokens, self.max_positions - self.position_offset)
        max_length = min(max_length or tokenizer.model_max_length, limit)
        ids = tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]
        return self.encode(ids)

    def warmup(self):
        """Compile / capture every bucket now (otherwise the first step of each bucket does)."""
        with torch.inference_mode():
            for bucket in self.buckets:
                if self.cuda_graph:
                    self._graph(bucket)
                else:
                    self._step_fn(self._empty_step(bucket))
        return self
