"""Regenerate the tuned Triton launch configs of this GPU: ``python -m torch_varlen.tune``.

For each key (kernel, dtype, head dims, mask kind; see kernels.attention.tuning_key) it times a
fixed list of candidate configs on a synthetic packed batch (16 heads, lengths uniform in
[512, 4096], 32,768 tokens), drops any candidate whose output differs from the fallback
config's by more than rounding, and writes the fastest into the JSON file (default: the one
shipped in the package, kernels/tuned_configs.json) under this GPU's name, keeping other GPUs'
entries; a key where no candidate beats the fallback config gets no entry. Set
TORCH_VARLEN_TUNED_CONFIGS to make the kernels read another file. Takes about 15-40 s per key
on an H200 (one Triton compile per candidate).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float8_e4m3fn": torch.float8_e4m3fn}

# (block_m, block_n, warps, stages) candidates per padded head dim; each is tried with and
# without TMA descriptors (forward only), and for causal forward / dQ with the reverse tile order.
_FWD = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)],
        256: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)]}
_DKDV = {64: [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3)],
         128: [(32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3)],
         256: [(32, 64, 8, 1), (32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2)]}
_DQ = {64: [(64, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
       128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
       256: [(64, 32, 8, 1), (64, 64, 8, 1), (32, 32, 4, 2), (64, 32, 4, 2)]}


def _candidates(kind, headdim, mask, fp8):
    base = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}[kind][max(64, min(256, headdim))]
    out = []
    for bm, bn, w, s in base:
        c = dict(block_m=bm, block_n=bn, warps=w, stages=s, tma=False, reverse=False)
        out.append(c)
        if kind == "fwd" and not fp8:
            out.append({**c, "tma": True})
    if kind == "fwd" and fp8:  # P @ V in FP8 (V keys-fastest) or in float16 (V widened)
        out += [{**c, "fp8_pv": True} for c in list(out)]
    if kind != "dkdv" and mask == "causal":  # the query tile with the most keys first
        out += [{**c, "reverse": True} for c in list(out)]
    return out


def _batch(dtype, headdim, total=32768, nheads=16, seed=0, device="cuda", lengths_range=(512, 4096)):
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(rng.randint(*lengths_range))
    lengths[-1] -= sum(lengths) - total
    lengths = [n for n in lengths if n > 0]
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    make = lambda: torch.randn(total, nheads, headdim, device=device, dtype=torch.bfloat16)  # noqa: E731
    q, k, v, do = (make().to(dtype) for _ in range(4))
    return q, k, v, do, cu, max(lengths)


def tune_key(kind, dtype_name, headdim, mask, log=print, **batch):
    from triton.testing import do_bench

    from .kernels import attention as A

    dtype = DTYPES[dtype_name]
    fp8 = dtype == torch.float8_e4m3fn
    q, k, v, do, cu, mx = _batch(dtype, headdim, **batch)
    wl, wr = (-1, 0) if mask == "causal" else (-1, -1)
    scale = headdim ** -0.5
    fwd = lambda cfg: A.attention_forward(q, k, v, cu, cu, mx, mx, scale, wl, wr, config=cfg)  # noqa: E731
    if kind == "fwd":
        run = lambda cfg: fwd(cfg)[0]  # noqa: E731
    else:
        out, lse = fwd(None)
        do_ = do.to(q.dtype)
        pick = 0 if kind == "dq" else 1
        run = lambda cfg: A.attention_backward(  # noqa: E731
            do_, q, k, v, out, lse, cu, cu, mx, mx, scale, wl, wr, config={kind: cfg})[pick]
    expected = run(None).float()
    tol = 0.05 if fp8 else 2e-2
    best, best_ms, fallback_ms = None, float("inf"), do_bench(lambda: run(None), warmup=10, rep=40)
    for cfg in _candidates(kind, headdim, mask, fp8):
        try:
            got = run(cfg).float()
            err = (got - expected).abs().max().item()
            if not err <= tol * max(1.0, expected.abs().max().item()):
                log(f"  reject {cfg}: differs from the fallback by {err:.3g}")
                continue
            ms = do_bench(lambda: run(cfg), warmup=10, rep=40)
        except Exception as e:  # a config the compiler cannot build on this GPU
            log(f"  skip {cfg}: {type(e).__name__}: {str(e)[:160]}")
            continue
        log(f"  {cfg}: {ms:.3f} ms")
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None or best_ms >= fallback_ms:
        log(f"  no candidate beats the fallback config ({fallback_ms:.3f} ms): no entry")
        return None
    return {**best, "ms": round(best_ms, 4), "fallback_ms": round(fallback_ms, 4)}


def main(argv=None):
    from .kernels import attention as A

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=A.TUNED_CONFIGS_PATH)
    ap.add_argument("--kinds", nargs="+", default=["fwd", "dkdv", "dq"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float8_e4m3fn"],
                    help="float16 uses bfloat16's entries unless tuned itself")
    ap.add_argument("--headdims", nargs="+", type=int, default=[128, 64, 256])
    ap.add_argument("--masks", nargs="+", default=["full", "causal"])
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting keys after this (0: none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("torch_varlen.tune needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    try:
        with open(args.out) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {"version": 1, "gpus": {}}
    table = data.setdefault("gpus", {}).setdefault(gpu, {})
    start = time.time()
    for headdim in args.headdims:
        for kind in args.kinds:
            for dtype_name in args.dtypes:
                if dtype_name == "float8_e4m3fn" and kind != "fwd":
                    continue
                for mask in args.masks:
                    if args.budget_s and time.time() - start > args.budget_s:
                        print("budget reached; stopping", flush=True)
                        return
                    key = A.tuning_key(kind, DTYPES[dtype_name], headdim, headdim, mask)
                    print(f"{gpu} {key}", flush=True)
                    entry = tune_key(kind, dtype_name, headdim, mask,
                                     log=lambda m: print(m, flush=True))
                    if entry is not None:
                        table[key] = entry
                        print(f"  -> {entry}", flush=True)
                        with open(args.out, "w") as f:
                            json.dump(data, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
