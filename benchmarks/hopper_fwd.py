"""The Hopper (sm_90a) Gluon forward (torch_varlen/kernels/hopper.py, issue #15): compile report,
a quick check and the forward benchmark against our Triton kernel and FA4.

Modes:
  --compile        here, without a GPU: registers, stack (spills), shared memory and instruction
                   counts of each head-dim pair's kernel, from Triton's sm_90a output;
  --bench --out F  GPU: backend='triton', backend='hopper' and FA4 direct, bf16, hd128, 16 heads,
                   65,536 tokens, causal and not, one warm-up call each, then ROUNDS rounds of
                   do_bench medians with every implementation in each round, median of rounds.
Correctness is the tests' (test/test_hopper_attention.py and the rest of `make test-gpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import triton

from torch_varlen.kernels import hopper

PAIRS = ((64, 64), (128, 128), (256, 256), (128, 64), (64, 128), (256, 128), (128, 256))


def _resource_usage(cubin):
    """Registers and stack bytes from cuobjdump (n_regs needs a GPU to load the kernel)."""
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends",
                                                     "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def compile_report(d, dv, group=1, dtype="bf16"):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    bn = hopper.block_n(d, dv)

    def desc(block):
        return f"tensordesc<{dtype}{list(block)},{gl.NVMMASharedLayout.get_default_for(block, gdt)!r}>"

    sig = {"q_desc": desc([hopper.BM, d]), "k_desc": desc([bn, d]), "v_desc": desc([bn, dv]),
           "o_ptr": f"*{dtype}", "lse_ptr": "*fp32", "cu_q": "*i32", "cu_k": "*i32",
           "start_q": "*i32", "start_k": "*i32", "qk_scale": "fp32", "cap_in": "fp32",
           "cap_out": "fp32", "window_left": "i32", "window_right": "i32", "sink_ptr": "*fp32",
           "has_sink": "i32", "total_q": "i32", "batch": "i32", "stride_o_tok": "i32",
           "stride_o_head": "i32", "stride_lse_head": "i32", "GROUP": "constexpr",
           "STAGES_": "constexpr", "REVERSE": "constexpr", "ZERO_TAIL": "constexpr",
           "BLOCK_B": "constexpr"}
    consts = {"GROUP": group, "STAGES_": hopper.STAGES, "REVERSE": True, "ZERO_TAIL": True,
              "BLOCK_B": hopper._BLOCK_B}
    src = GluonASTSource(hopper._fwd_kernel, sig, constexprs=consts)
    t0 = time.time()
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = k.asm["ptx"]
    return {"head_dims": [d, dv], "block_n": bn, "group": group, "dtype": dtype,
            "compile_s": round(time.time() - t0, 1), "shared_bytes": k.metadata.shared,
            **_resource_usage(k.asm["cubin"]),
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx))}


def bench(out_path, rounds=5):
    sys.path.insert(0, os.path.dirname(__file__))
    import bench_attention as ba
    from triton.testing import do_bench

    import torch_varlen

    fa4, fa4_version = ba.load_fa4()
    rows = []
    for mean in (512, 2048, 8192):
        cfg = ba.Config(mean=mean, total=65536, dtype="bfloat16", nheads=16, nheads_k=16,
                        headdim=128)
        x = ba.Inputs(cfg, "cuda")
        for causal in (False, True):
            def ours(backend):
                return lambda: torch_varlen.varlen_attention(
                    x.q, x.k, x.v, x.cu, x.cu, x.max_len, x.max_len, softmax_scale=x.scale,
                    causal=causal, backend=backend)[0]
            impls = {"triton": ours("triton"), "hopper": ours("hopper")}
            if fa4 is not None:
                fa4_call = ba.build_fa4(x, causal, fa4)[0]
                impls["fa4"] = lambda f=fa4_call: f(x.q, x.k, x.v)
            ref = impls["triton"]().float()
            f = ba.flops(x.lengths, cfg.nheads, cfg.headdim, causal)
            times = {name: [] for name in impls}
            diffs = {name: (fn().float() - ref).abs().max().item() for name, fn in impls.items()}
            for _ in range(rounds):  # every impl in each round, so drift hits all alike
                for name, fn in impls.items():
                    times[name].append(do_bench(fn, warmup=25, rep=200, return_mode="median"))
            for name in impls:
                ms = statistics.median(times[name])
                rows.append(dict(mean=mean, causal=causal, impl=name, ms=ms, tflops=f / ms / 1e9,
                                 rounds_ms=times[name], max_abs_diff_vs_triton=diffs[name]))
                print(f"mean {mean:5d} causal {causal!s:5} {name:7s} {ms:8.3f} ms "
                      f"{f / ms / 1e9:6.0f} TFLOP/s  diff {diffs[name]:.2e}", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, fa4=fa4_version if fa4 is not None else None,
                method=f"triton.testing.do_bench(warmup=25 ms, rep=200 ms, median) per impl, "
                       f"{rounds} rounds with every impl in each round, median of the rounds; "
                       "one warm-up call each before the rounds; bf16, hd128, 16 heads, "
                       "65,536 tokens, lengths uniform in [mean/4, 2*mean] (bench_attention)")
    with open(out_path, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.compile:
        report = [compile_report(d, dv) for d, dv in PAIRS] + [compile_report(128, 128, group=4)]
        print(json.dumps(report, indent=1), flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1)
    if args.bench:
        bench(args.out or "hopper_bench.json", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
