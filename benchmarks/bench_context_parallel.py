"""Context-parallel varlen attention: per-rank time and communication share vs one GPU.

One fixed global packed batch (default: 16 heads, head dim 128, bfloat16, causal, documents of
128k, 32k and 8k tokens mixed: 262144 tokens) is split by a ContextParallelPlan over the ranks.
Measured in one run, on the same inputs, each after warm-up and over >= 3 timed passes (median,
min, max; CUDA events on GPUs, perf_counter on the CPU), every rank reporting its own:

  single           rank 0 alone: varlen_attention of the whole batch (forward; forward+backward)
  ring             context_parallel_attention on every rank (forward; forward+backward)
  allgather        the same with mode="allgather" (one all-gather of K and V instead of the ring)
  ring_compute     the ring's attention calls alone, on K/V gathered beforehand (no messages);
                   the all-gather mode runs the same calls
  ring_comm        the ring's K/V exchanges alone (the same messages, no attention)
  allgather_comm   the all-gather mode's two all-gathers alone
  ring_flash_attn  zigzag_ring_flash_attn_varlen_func on the same local rows (only if importable)

comm_share = ring_comm / (ring_comm + ring_compute); exposed_comm_ms = ring - ring_compute
(the part of the messages the attention did not hide); the same for allgather with
allgather_comm. On the CPU each process gets cpu_count // world_size threads.

Usage:
  python benchmarks/bench_context_parallel.py [--out benchmarks/results/context_parallel.json]
      (spawns one process per visible GPU; NCCL)
  torchrun --nproc-per-node 8 benchmarks/bench_context_parallel.py
  python benchmarks/bench_context_parallel.py --smoke   (tiny batch, 2 CPU processes, gloo)
  python benchmarks/bench_context_parallel.py --cpu --world-size 4 --lengths 2048,512,512 --out ...
      (CPU processes, gloo, the smoke config's heads with these lengths)
The results file is rewritten: {"meta": {...}, "rows": [{"bench": "context_parallel", ...}]}.
"""

from __future__ import annotations

import os

# NVLink SHARP / multicast off, also for the processes spawned below (they inherit os.environ)
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import torch_varlen  # noqa: E402
from torch_varlen.distributed import ContextParallelPlan, _Gather, _Ring, context_parallel_attention  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "context_parallel.json"
FULL = dict(lengths=[131072, 32768, 32768] + [8192] * 8, heads=16, heads_k=16, headdim=128, dtype="bfloat16")
SMOKE = dict(lengths=[256, 64, 64, 32, 32, 16], heads=2, heads_k=1, headdim=16, dtype="float32")


def timer(device):
    """fn -> elapsed ms of one call (the caller brackets it with barriers)."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    return run


def measure(fn, device, warmup, passes, group=None):
    run = timer(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(passes):
        if group is not False:
            dist.barrier(group=group)
        times.append(run(fn))
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4),
            "max_ms": round(max(times), 4), "passes": passes}


def ring_parts(q, k, v, plan, ring, scale):
    """The ring's attention alone (K/V of every rank gathered first) and its messages alone."""
    rank, W = ring.rank, ring.world_size
    kvs, kk, vv = {}, k, v
    for step in range(W):  # collect each source rank's K/V with the ring itself
        src = (rank - step) % W
        kvs[src] = (kk, vv)
        if step < W - 1:
            n = plan.num_local_tokens((src - 1) % W)
            nxt = (k.new_empty((n,) + k.shape[1:]), v.new_empty((n,) + v.shape[1:]))
            reqs, _ = ring.exchange((kk, vv), nxt)
            for r in reqs:
                r.wait()
            kk, vv = nxt

    def compute():
        for src, (ks, vs) in kvs.items():
            for c in plan._block_calls(rank, src, q.device):
                torch.ops.varlen.attention_forward(
                    q, ks, vs, c.cu_q, c.cu_k, c.max_q, c.max_k, scale, window_left=c.left,
                    window_right=c.right, cu_seqlens_q_padded=c.cu_q_padded, cu_seqlens_k_padded=c.cu_k_padded)

    def comm():
        for step in range(W - 1):
            src = (rank - step) % W
            reqs, _ = ring.exchange(kvs[src], kvs[(src - 1) % W])
            for r in reqs:
                r.wait()

    return compute, comm


def allgather_comm(k, v, plan, comm):
    """The all-gather mode's messages alone: the all-gathers of K and V."""
    def comm_fn():
        if comm.world_size > 1 and comm.rows:
            (rk, _), (rv, _) = comm.all_gather(k), comm.all_gather(v)
            rk.wait()
            rv.wait()
    return comm_fn


def on_gpu(args):
    return torch.cuda.is_available() and not (args.smoke or args.cpu)


def worker(rank, world_size, args, port=None):
    if not on_gpu(args):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if port is not None:  # own spawn
        backend = "nccl" if on_gpu(args) else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=600))
    else:  # torchrun
        dist.init_process_group("nccl" if on_gpu(args) else "gloo")
    try:
        _run(rank, world_size, args)
    finally:
        dist.destroy_process_group()


def _run(rank, world_size, args):
    cfg = dict(SMOKE if args.smoke or args.cpu else FULL)
    if args.lengths:
        cfg["lengths"] = [int(x) for x in args.lengths.split(",")]
    device = torch.device("cuda", rank % torch.cuda.device_count()) if on_gpu(args) else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg["dtype"])
    lengths = cfg["lengths"]
    n, maxlen = sum(lengths), max(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    H, Hk, D = cfg["heads"], cfg["heads_k"], cfg["headdim"]
    plan = ContextParallelPlan(cu, world_size, causal=args.causal, split_min_len=args.split_min_len)
    idx = plan.local_indices(rank)
    rows, meta_rows = [], dict(world_size=world_size, device=str(torch.cuda.get_device_name(device)
                               if device.type == "cuda" else "cpu"), dtype=cfg["dtype"], heads=H,
                               heads_k=Hk, headdim=D, causal=args.causal, total_tokens=n)

    def row(impl, pass_, stats, **extra):
        rows.append({"bench": "context_parallel", "impl": impl, "pass": pass_, "rank": rank, **meta_rows,
                     "local_tokens": plan.num_local_tokens(rank), **stats, **extra})

    W, P = args.warmup, args.passes
    if rank == 0:  # the one-GPU baseline of the same batch
        q, k, v = rnd(n, H, D), rnd(n, Hk, D), rnd(n, Hk, D)
        fwd = lambda: torch_varlen.varlen_attention(q, k, v, cu, cu, maxlen, maxlen, causal=args.causal)  # noqa: E731
        row("single", "fwd", measure(fwd, device, W, P, group=False))
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def fwd_bwd():
            out, _ = torch_varlen.varlen_attention(qg, kg, vg, cu, cu, maxlen, maxlen, causal=args.causal)
            out.backward(torch.ones_like(out))
        row("single", "fwd_bwd", measure(fwd_bwd, device, W, P, group=False))
        del q, k, v, qg, kg, vg
    dist.barrier()
    nl = plan.num_local_tokens(rank)
    q, k, v = rnd(nl, H, D), rnd(nl, Hk, D), rnd(nl, Hk, D)
    modes = ("ring", "allgather")
    cp_stats = {}
    for mode in modes:  # each mode with its own warm-up, on the same inputs
        cp = lambda mode=mode: context_parallel_attention(q, k, v, plan, causal=args.causal, mode=mode)  # noqa: E731
        cp_stats[mode] = measure(cp, device, W, P)
    compute, comm = ring_parts(q, k, v, plan, _Ring(None, rank, world_size), D ** -0.5)
    comp_stats = measure(compute, device, W, P)
    gather = _Gather(None, rank, world_size, plan)
    comm_stats = {"ring": measure(comm, device, W, P),
                  "allgather": measure(allgather_comm(k, v, plan, gather), device, W, P)}
    for mode in modes:
        total = comp_stats["median_ms"] + comm_stats[mode]["median_ms"]
        row(mode, "fwd", cp_stats[mode],
            comm_share=round(comm_stats[mode]["median_ms"] / total, 4) if total else 0.0,
            exposed_comm_ms=round(max(0.0, cp_stats[mode]["median_ms"] - comp_stats["median_ms"]), 4))
    row("ring_compute", "fwd", comp_stats)
    row("ring_comm", "fwd", comm_stats["ring"], bytes_sent=int(2 * (world_size - 1) * nl * Hk * D * q.element_size()))
    row("allgather_comm", "fwd", comm_stats["allgather"],
        bytes_received=int(2 * (world_size - 1) * gather.rows * Hk * D * q.element_size()))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    for mode in modes:
        def cp_fwd_bwd(mode=mode):
            out = context_parallel_attention(qg, kg, vg, plan, causal=args.causal, mode=mode)
            out.backward(torch.ones_like(out))
        row(mode, "fwd_bwd", measure(cp_fwd_bwd, device, W, P))
    try:  # the same zigzag layout, when every length divides into 2W chunks
        from ring_flash_attn import zigzag_ring_flash_attn_varlen_func
        local_cu = plan.local_cu_seqlens(rank)
        assert args.split_min_len == 0 and all(L % (2 * world_size) == 0 for L in lengths)
        rfa = lambda: zigzag_ring_flash_attn_varlen_func(q, k, v, local_cu, plan.local_max_seqlen(rank),  # noqa: E731
                                                         causal=args.causal)
        row("ring_flash_attn", "fwd", measure(rfa, device, W, P))
    except Exception as e:  # not installed, or the layout does not fit it
        if rank == 0:
            print(f"ring_flash_attn not measured: {type(e).__name__}: {e}")
    del idx
    gathered = [None] * world_size
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        all_rows = [r for rs in gathered for r in rs]
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "lengths": lengths, "warmup": W, "passes": P,
                "smoke": args.smoke, "split_min_len": plan.split_min_len,
                "threads": torch.get_num_threads() if device.type == "cpu" else None}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": all_rows}, indent=1) + "\n")
        for r in all_rows:
            print(f"rank {r['rank']} {r['impl']:>16} {r['pass']:>7}  median {r['median_ms']:.3f} ms "
                  f"[{r['min_ms']:.3f}, {r['max_ms']:.3f}]" + (f"  comm share {r['comm_share']:.2f}" if "comm_share" in r else ""))
        print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--smoke", action="store_true", help="tiny batch on CPU processes (gloo)")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even with GPUs present; "
                   "the smoke config's heads and dtype")
    p.add_argument("--lengths", default=None, help="comma-separated document lengths (replaces the config's)")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes to spawn (default: the GPUs present; 2 with --smoke)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--split-min-len", type=int, default=0,
                   help="sequences shorter than this stay whole (0: every document is split)")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    args = p.parse_args()
    if args.passes < 3:
        p.error("--passes must be >= 3")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    world_size = args.world_size or (torch.cuda.device_count() if on_gpu(args) else 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world_size, args, port), nprocs=world_size, join=True)


if __name__ == "__main__":
    main()
