"""Probe: which (headdim, headdim_v) pairs the Triton kernels get wrong, and under which change.

For each pair, in a child process of its own (an illegal access poisons the CUDA context), run
bf16 causal GQA forward + backward on lengths [70, 0, 130, 1, 257] and compare with the float64
reference, under variants: the default launch, num_stages=1 everywhere, and q/k/v padded with
zeros to a multiple of 16 / to a power of two (the kernel then sees no partial column masks).
Prints one JSON line per (pair, variant). Usage: python headdims.py [--sanitize D DV]
"""
import json
import subprocess
import sys
import os

CHILD = r'''
import json, os, sys, torch
import torch.nn.functional as F
sys.path.insert(0, "test")
import torch_varlen
from torch_varlen import reference
from torch_varlen.kernels import attention as ta
from samples import make_attention_sample
d, dv, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dev = os.environ.get("PROBE_DEVICE", "cuda")
torch.manual_seed(d * 1000 + dv)
s = make_attention_sample([70, 0, 130, 1, 257], [70, 0, 130, 1, 257], 4, 2, d, dv, dev,
                          getattr(torch, os.environ.get("PROBE_DTYPE", "bfloat16")), causal=True)
ta._poison_outputs = True
q, k, v = s.q, s.k, s.v
def up(n):
    if variant == "pad16":
        return -(-n // 16) * 16
    if variant == "pad2":
        return max(16, 1 << (n - 1).bit_length())
    return n
pd, pdv = up(d), up(dv)
qp, kp, vp = F.pad(q, (0, pd - d)), F.pad(k, (0, pd - d)), F.pad(v, (0, pdv - dv))
scale = d ** -0.5
cfg = None
bcfg = None
if variant == "stages1":
    c = ta._config("fwd", qp, vp, -1, 0)
    cfg = dict(c, stages=1)
    bcfg = {kind: dict(ta._config(kind, qp, vp, -1, 0), stages=1) for kind in ("dkdv", "dq")}
args = (qp, kp, vp, s.cu_seqlens_q, s.cu_seqlens_k, 257, 257, scale, -1, 0)
out, lse = ta.attention_forward(*args, config=cfg)
do = torch.randn(q.shape[0], 4, dv, device=dev, dtype=q.dtype)
dop = F.pad(do, (0, pdv - dv))
dq, dk, dv_ = ta.attention_backward(dop, qp, kp, vp, out, lse, *args[3:], config=bcfg)
if dev == "cuda":
    torch.cuda.synchronize()
out, dq, dk, dv_ = out[..., :dv], dq[..., :d], dk[..., :d], dv_[..., :dv]
q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
ro, rl, _ = reference.attention(q64, k64, v64, s.cu_seqlens_q.cpu(), s.cu_seqlens_k.cpu(), causal=True,
                                softmax_scale=scale)
g = torch.autograd.grad((ro * do.double().cpu()).sum(), (q64, k64, v64))
def err(a, b):
    a = a.double().cpu(); 
    return {"max": float((a - b).abs().max()) if a.numel() else 0.0, "nan": int(a.isnan().sum()),
            "bad_rows": int(((a - b).abs() > 0.1).flatten(1).any(1).sum()) if a.numel() else 0}
res = {"d": d, "dv": dv, "variant": variant, "out": err(out, ro.detach()), "dq": err(dq, g[0]),
       "dk": err(dk, g[1]), "dv_": err(dv_, g[2])}
print("RESULT " + json.dumps(res), flush=True)
'''

PAIRS = [(40, 24), (24, 8), (48, 24), (24, 24), (40, 40), (8, 8), (72, 40), (56, 8), (40, 64),
         (24, 32), (16, 8), (8, 16), (104, 40), (200, 136)]
VARIANTS = ["default", "stages1", "pad16", "pad2"]


def run(d, dv, variant, prefix=()):
    p = subprocess.run([*prefix, sys.executable, "-c", CHILD, str(d), str(dv), variant],
                       capture_output=True, text=True, timeout=600)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if line:
        r = json.loads(line[0][7:])
    else:
        r = {"d": d, "dv": dv, "variant": variant, "crash": (p.stderr or p.stdout)[-1500:]}
    r["rc"] = p.returncode
    if prefix:
        r["sanitizer"] = p.stdout[-6000:]
    return r


if __name__ == "__main__":
    from concurrent.futures import ThreadPoolExecutor
    if sys.argv[1:2] == ["--sanitize"]:
        d, dv = int(sys.argv[2]), int(sys.argv[3])
        print(json.dumps(run(d, dv, "default", ("compute-sanitizer", "--tool", "memcheck",
                                                "--show-backtrace", "no"))))
        sys.exit()
    jobs = [(d, dv, var) for d, dv in PAIRS for var in VARIANTS]
    with ThreadPoolExecutor(int(os.environ.get("PROBE_JOBS", "8"))) as ex:
        for r in ex.map(lambda j: run(*j), jobs):
            print(json.dumps(r), flush=True)
