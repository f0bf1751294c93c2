"""Probe 2: every (BLOCK_D, BLOCK_DV) tile class of the Triton kernels, with a head dim that is a
multiple of 16 and one that is 8 mod 16 in each class, bf16 causal GQA, forward + backward
against the float64 reference. Variants: "default" (today's launch), "square" (the q/k and v
tiles both max(BLOCK_D, BLOCK_DV) wide), "stages1"/"stages2" (pipelining depth). One child
process per group of pairs; one JSON line per (pair, variant).
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CHILD = r'''
import json, os, sys, torch
sys.path.insert(0, "test")
import torch_varlen
from torch_varlen import reference
from torch_varlen.kernels import attention as ta
from samples import make_attention_sample
jobs = json.loads(sys.argv[1])
dtype = getattr(torch, os.environ.get("PROBE_DTYPE", "bfloat16"))
ta._poison_outputs = True
init = ta._Common.__init__
def run(d, dv, variant):
    torch.manual_seed(d * 1000 + dv)
    s = make_attention_sample([70, 0, 130, 1, 257], [70, 0, 130, 1, 257], 4, 2, d, dv, "cuda", dtype,
                              causal=True)
    def patched(self, *a, **k):
        init(self, *a, **k)
        if variant == "square":
            b = max(self.block_d, self.block_dv)
            self.block_d = self.block_dv = b
            self.flags.update(BLOCK_D=b, BLOCK_DV=b)
    ta._Common.__init__ = patched
    cfg = bcfg = None
    if variant.startswith("stages"):
        st = int(variant[-1])
        cfg = dict(ta._config("fwd", s.q, s.v, -1, 0), stages=st)
        bcfg = {kind: dict(ta._config(kind, s.q, s.v, -1, 0), stages=st) for kind in ("dkdv", "dq")}
    scale = d ** -0.5
    args = (s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, 257, 257, scale, -1, 0)
    out, lse = ta.attention_forward(*args, config=cfg)
    do = torch.randn(s.q.shape[0], 4, dv, device="cuda", dtype=dtype)
    dq, dk, dvv = ta.attention_backward(do, s.q, s.k, s.v, out, lse, *args[3:], config=bcfg)
    torch.cuda.synchronize()
    q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (s.q, s.k, s.v))
    ro, rl, _ = reference.attention(q64, k64, v64, s.cu_seqlens_q.cpu(), s.cu_seqlens_k.cpu(),
                                    causal=True, softmax_scale=scale)
    g = torch.autograd.grad((ro * do.double().cpu()).sum(), (q64, k64, v64))
    e = lambda a, b: float((a.double().cpu() - b).abs().max()) if a.numel() else 0.0
    return {"d": d, "dv": dv, "variant": variant, "dtype": str(dtype), "out": e(out, ro.detach()),
            "lse": e(torch.where(torch.isfinite(lse), lse, 0), torch.where(torch.isfinite(rl), rl, 0)),
            "dq": e(dq, g[0]), "dk": e(dk, g[1]), "dv_": e(dvv, g[2])}
for d, dv, variant in jobs:
    try:
        r = run(d, dv, variant)
    except Exception as ex:
        r = {"d": d, "dv": dv, "variant": variant, "error": repr(ex)[-500:]}
    print("RESULT " + json.dumps(r), flush=True)
'''

REPS = [8, 24, 40, 72, 136, 16, 32, 48, 96, 192]


def child(jobs):
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True,
                       text=True, timeout=900)
    got = [json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if len(got) < len(jobs):
        got.append({"jobs": jobs[len(got):], "crash": p.stderr[-1500:], "rc": p.returncode})
    return got


if __name__ == "__main__":
    groups = []
    for d in REPS:
        for dv in REPS:
            variants = ["default", "square"]
            if max(d, dv) <= 64:
                variants += ["stages1", "stages2"]
            groups.append([(d, dv, v) for v in variants])
    with ThreadPoolExecutor(int(os.environ.get("PROBE_JOBS", "14"))) as ex:
        for rs in ex.map(child, groups):
            for r in rs:
                print(json.dumps(r), flush=True)
