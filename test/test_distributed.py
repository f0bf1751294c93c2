"""Context-parallel attention and data-parallel training on torch.distributed (gloo, 127.0.0.1).

Multi-process tests spawn one group of processes per world size (1, 2, 3, 4) with
torch.multiprocessing; every case of that world size runs in the same group, because each process
pays the torch import. A rank records each case's result in a file as it goes; the parent gives
the group a time limit, kills processes still alive past it and fails naming them, so a hung peer
never blocks CI. The groups also carry a gloo timeout, so a peer stuck in a collective raises
inside the child first. Each child destroys its process group on the way out.

Compiled models use backend="aot_eager": Inductor's C++ compile of every graph, in every spawned
process, would cost minutes on CI's two cores, and these tests are about the distributed
wrappers, not about code generation (test_compile.py covers Inductor).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_varlen
from torch_varlen.distributed import ContextParallelPlan, context_parallel_attention
from torch_varlen.merge import merge_attention_partials

from conftest import requires_cuda
from samples import cu_seqlens

LIMIT_S = 150  # per group of processes (normal runs take a fraction of it)
GLOO_TIMEOUT_S = 60


# ---------------------------------------------------------------- the process harness


def _child(rank, world_size, port, result_dir, job, backend, device):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}.jsonl")
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    try:
        for name in _jobs(world_size, device)[job]:
            start = time.time()
            try:
                _CASES[name.split("/")[0]](name, rank, world_size, device)
                error = None
            except Exception:
                error = traceback.format_exc()
            with open(path, "a") as f:
                f.write(json.dumps({"case": name, "error": error, "s": round(time.time() - start, 2)}) + "\n")
            if error:  # the peers may now be out of step: stop here, they time out and stop too
                break
    finally:
        dist.destroy_process_group()


def spawn(world_size, job, *, limit_s=LIMIT_S, backend="gloo", device="cpu"):
    """Run ``job`` on ``world_size`` fresh processes -> {case: None (passed) or an error text}.
    Raises AssertionError naming the ranks still running after ``limit_s`` (they are killed)."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=limit_s))
    with tempfile.TemporaryDirectory() as result_dir:
        procs = [ctx.Process(target=_child, args=(r, world_size, store.port, result_dir, job, backend, device),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + limit_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        results = {}
        for r in range(world_size):
            path = os.path.join(result_dir, f"rank{r}.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        rec = json.loads(line)
                        results.setdefault(rec["case"], None)
                        SECONDS[rec["case"], world_size] = max(SECONDS.get((rec["case"], world_size), 0), rec["s"])
                        if rec["error"]:  # every rank's error: the first rank's may be an echo
                            results[rec["case"]] = (results[rec["case"]] or "") + f"rank {r}: {rec['error']}\n"
    del store
    if hung:
        done = sorted(results)
        raise AssertionError(f"ranks {hung} of {world_size} did not finish job {job!r} within {limit_s} s "
                             f"(a hung peer?); cases finished: {done}")
    bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks {bad} of {world_size} exited with codes "
                             f"{[procs[r].exitcode for r in bad]} in job {job!r}; results {results}")
    return results


_RESULTS = {}
SECONDS = {}  # (case, world size) -> the slowest rank's seconds, for tuning the suite's run time


def results_of(world_size, job="all", **kw):
    """One group of processes per (world size, job), shared by that job's tests."""
    key = (world_size, job, tuple(sorted(kw.items())))
    if key not in _RESULTS:
        try:
            _RESULTS[key] = spawn(world_size, job, **kw)
        except AssertionError as e:
            _RESULTS[key] = e
    if isinstance(_RESULTS[key], AssertionError):
        raise _RESULTS[key]
    return _RESULTS[key]


def check_case(world_size, case, job="all", **kw):
    results = results_of(world_size, job, **kw)
    assert case in results, f"case {case} did not run (an earlier case failed?): ran {sorted(results)}"
    assert results[case] is None, results[case]


# ---------------------------------------------------------------- attention cases


@dataclasses.dataclass(frozen=True)
class AttnCase:
    lengths: tuple
    heads: int = 4
    heads_k: int = 2
    headdim: int = 8
    headdim_v: int = 8
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    dtype: str = "float64"
    split_min_len: int = 0
    return_lse: bool = True
    seed: int = 0


# zero-length and length-1 sequences, one sequence longer than all others, GQA and MQA
_MIX = (0, 1, 37, 5, 0, 2, 11, 1, 6)
ATTN_CASES = {
    "full_gqa": AttnCase(_MIX),
    "causal_gqa": AttnCase(_MIX, causal=True),
    "causal_some_whole": AttnCase(_MIX, causal=True, split_min_len=8, seed=1),
    "causal_mqa_dv_softcap": AttnCase(_MIX, heads_k=1, headdim_v=6, causal=True, softcap=1.5, seed=2),
    "window_both": AttnCase(_MIX, window=(3, 2), seed=3),
    "window_right_only": AttnCase(_MIX, window=(-1, 3), seed=4),
    "causal_window": AttnCase(_MIX, causal=True, window=(4, -1), split_min_len=6, seed=5),
    "causal_no_lse": AttnCase(_MIX, causal=True, return_lse=False, seed=6),
    "tiny_empty_ranks": AttnCase((0, 2, 1), causal=True, seed=7),
    "all_empty": AttnCase((0, 0), causal=True, seed=8),
    "float32_causal": AttnCase(_MIX, causal=True, dtype="float32", seed=9),
    "float32_window": AttnCase(_MIX, window=(5, 1), dtype="float32", headdim=16, seed=10),
}


def _attention_grads(q, k, v, go, gl, fn, return_lse=True):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * go).sum()
    if return_lse:
        loss = loss + (lse.double() * gl).sum()
    # also on a rank with no rows: the ring's backward is collective, every rank runs it
    grads = torch.autograd.grad(loss, (q, k, v))
    return (out.detach(), lse.detach()) + tuple(grads)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


MODES = ("ring", "allgather")


def _case_attention(name, rank, world_size, device, group=None):
    """``attention/<case>``: both modes against one single-process reference."""
    c = ATTN_CASES[name.split("/")[1]]
    g = torch.Generator().manual_seed(1000 + c.seed)
    lengths = list(c.lengths)
    n, maxlen = sum(lengths), max(lengths)
    cu = cu_seqlens(lengths, device)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    q, k, v = rnd(n, c.heads, c.headdim), rnd(n, c.heads_k, c.headdim), rnd(n, c.heads_k, c.headdim_v)
    go, gl = rnd(n, c.heads, c.headdim_v), rnd(c.heads, n)
    kw = dict(causal=c.causal, window_size=c.window, softcap=c.softcap)
    dtype = getattr(torch, c.dtype)

    def single(q, k, v):
        return torch_varlen.varlen_attention(q, k, v, cu, cu, maxlen, maxlen, **kw)

    plan = ContextParallelPlan(cu, world_size, causal=c.causal, window_size=c.window,
                               split_min_len=c.split_min_len)
    idx = plan.local_indices(rank)

    def sharded(mode):
        def fn(q, k, v):
            res = context_parallel_attention(q, k, v, plan, group=group, return_lse=c.return_lse, mode=mode, **kw)
            return res if c.return_lse else (res, torch.zeros(c.heads, q.shape[0], dtype=torch.float64))
        return fn

    ref = _attention_grads(q, k, v, go, gl, single, c.return_lse)
    ref_local = (ref[0][idx], ref[1][:, idx], ref[2][idx], ref[3][idx], ref[4][idx])
    local = lambda t: t[idx].to(dtype)  # noqa: E731
    names = ("out", "lse", "dq", "dk", "dv")
    keep = (lambda ts: ts) if c.return_lse else (lambda ts: ts[:1] + ts[2:])  # noqa: E731
    ref_local, names = keep(ref_local), keep(names)
    if dtype != torch.float64:
        low = _attention_grads(q.to(dtype), k.to(dtype), v.to(dtype), go, gl, single, c.return_lse)
        low_local = keep((low[0][idx], low[1][:, idx], low[2][idx], low[3][idx], low[4][idx]))
    for mode in MODES:
        got = keep(_attention_grads(local(q), local(k), local(v), go[idx], gl[:, idx], sharded(mode), c.return_lse))
        if dtype == torch.float64:
            for nm, a, b in zip(names, got, ref_local):
                assert a.dtype == torch.float64, nm
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {mode} {nm}: {m}")
            continue
        for nm, a, lo, b in zip(names, got, low_local, ref_local):  # the 2x rule against float64
            assert a.dtype == (torch.float32 if nm == "lse" else dtype), nm
            assert _max_err(a, b) <= 2 * _max_err(lo, b) + 1e-6, \
                f"{name} {mode} {nm}: error {_max_err(a, b):.3g} > 2 x single-process {_max_err(lo, b):.3g} + 1e-6"


# ---------------------------------------------------------------- data-parallel training


class Block(torch.nn.Module):
    """Pre-norm attention (GQA) + MLP on packed rows (N, dim)."""

    def __init__(self, dim=16, heads=4, heads_k=2, headdim=4):
        super().__init__()
        self.heads, self.heads_k, self.headdim = heads, heads_k, headdim
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * heads_k) * headdim)
        self.proj = torch.nn.Linear(heads * headdim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.Tanh(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x, attend):
        h = self.qkv(self.norm(x)).view(x.shape[0], self.heads + 2 * self.heads_k, self.headdim)
        q, k, v = h.split([self.heads, self.heads_k, self.heads_k], dim=1)
        x = x + self.proj(attend(q, k, v).flatten(1))
        return x + self.mlp(x)


class PackedModel(torch.nn.Module):
    """(B, S, dim) padded hidden states and mask -> unpad, two blocks of causal varlen
    attention, pad -> (B, S, dim). ``forward_packed`` runs the blocks on packed rows with any
    attention function (context parallelism passes its own)."""

    def __init__(self, dim=16):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(dim), Block(dim)])
        self.head = torch.nn.Linear(dim, dim)

    def forward_packed(self, x, attend):
        for blk in self.blocks:
            x = blk(x, attend)
        return self.head(x)

    def forward(self, hidden, mask):
        x, indices, cu, max_seqlen, _ = torch_varlen.unpad_input(hidden, mask)

        def attend(q, k, v):
            return torch_varlen.varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)[0]

        return torch_varlen.pad_input(self.forward_packed(x, attend), indices, hidden.shape[0], hidden.shape[1])


STEPS, LR, DIM, SEQLEN = 2, 0.1, 16, 12


def _train_data(step, batch):
    """A padded batch (B, S, DIM) with random lengths (0 and full included), and targets."""
    g = torch.Generator().manual_seed(50 + step)
    lengths = torch.randint(1, SEQLEN + 1, (batch,), generator=g)
    lengths[0], lengths[-1] = 0, SEQLEN
    mask = torch.arange(SEQLEN)[None, :] < lengths[:, None]
    hidden = torch.randn(batch, SEQLEN, DIM, generator=g, dtype=torch.float64)
    target = torch.randn(batch, SEQLEN, DIM, generator=g, dtype=torch.float64)
    return hidden, mask, target


def _loss(pred, target, mask, scale):
    return (((pred - target) ** 2) * mask[..., None]).sum() * scale


def _reference_params(batch, dp):
    """Single-process eager training on the whole batch: the loss every data-parallel run
    averages (eager, so that the compiled runs are checked against it, and one compile less)."""
    torch.manual_seed(0)
    model = PackedModel(DIM).double()
    step_fn = model
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        hidden, mask, target = _train_data(step, batch)
        _loss(step_fn(hidden, mask), target, mask, 1.0 / (100 * dp)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def _assert_params_match(named, ref, what):
    for n, p in named:
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-9, atol=1e-11, msg=lambda m: f"{what} {n}: {m}")


def _case_ddp(name, rank, world_size, device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    per_rank = 2
    ref = _reference_params(per_rank * world_size, world_size)
    torch.manual_seed(0)
    model = PackedModel(DIM).double()
    ddp = DDP(model)
    step_fn = torch.compile(ddp, backend="aot_eager")
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(STEPS):
        hidden, mask, target = _train_data(step, per_rank * world_size)
        # DDP averages gradients over ranks: each rank's loss is its shard's share of the sum
        _loss(step_fn(hidden[rows], mask[rows]), target[rows], mask[rows], 1.0 / 100).backward()
        opt.step()
        opt.zero_grad()
    _assert_params_match(model.named_parameters(), ref, "DDP")


def _case_fsdp2(name, rank, world_size, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    per_rank = 2
    ref = _reference_params(per_rank * world_size, world_size)
    torch.manual_seed(0)
    model = PackedModel(DIM).double()
    mesh = init_device_mesh("cpu", (world_size,))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    step_fn = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(STEPS):
        hidden, mask, target = _train_data(step, per_rank * world_size)
        _loss(step_fn(hidden[rows], mask[rows]), target[rows], mask[rows], 1.0 / 100).backward()
        opt.step()
        opt.zero_grad()
    _assert_params_match(model.named_parameters(), ref, "FSDP2")


def _case_cp_2d_mesh(name, rank, world_size, device):
    """Data x context parallelism on a 2-D DeviceMesh: each data shard's packed rows are split
    over its context group by a plan; DDP averages gradients over all ranks. ``cp_2d_mesh/allgather``:
    the same with the all-gather mode (its collectives on the context subgroup)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    mode = name.split("/")[1] if "/" in name else "ring"
    dp, cp = 2, world_size // 2
    mesh = init_device_mesh("cpu", (dp, cp), mesh_dim_names=("dp", "cp"))
    dp_rank, cp_rank, cp_group = mesh.get_local_rank("dp"), mesh.get_local_rank("cp"), mesh.get_group("cp")
    per_rank = 2
    ref = _reference_params(per_rank * dp, dp)
    torch.manual_seed(0)
    model = PackedModel(DIM).double()
    ddp = DDP(Packed(model))
    step_fn = torch.compile(ddp, backend="aot_eager")  # the ring attention runs eagerly inside
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    for step in range(STEPS):
        hidden, mask, target = _train_data(step, per_rank * dp)
        x, _, cu, _, _ = torch_varlen.unpad_input(hidden[rows], mask[rows])
        y = torch_varlen.unpad_input(target[rows], mask[rows])[0]
        plan = ContextParallelPlan(cu, cp, causal=True, split_min_len=0)

        def attend(q, k, v):
            return context_parallel_attention(q, k, v, plan, group=cp_group, causal=True, mode=mode)

        out = step_fn(plan.shard(x, cp_rank), attend)
        # DDP divides by dp * cp; the context ranks' losses add up to their shard's loss
        (((out - plan.shard(y, cp_rank)) ** 2).sum() * (cp / 100)).backward()
        opt.step()
        opt.zero_grad()
    _assert_params_match(model.named_parameters(), ref, "DDP x context parallel")


class Packed(torch.nn.Module):
    """The model's blocks on packed rows, as a module DDP can wrap."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, attend):
        return self.model.forward_packed(x, attend)


def _jobs(world_size, device):
    attn = [f"attention/{n}" for n in ATTN_CASES]
    extra = {2: ["mismatched_plan", "ddp", "fsdp2"], 4: ["cp_2d_mesh", "cp_2d_mesh/allgather"]}.get(world_size, [])
    return {"all": attn + extra, "attention": attn, "hang": ["hang"]}


def _case_mismatched_plan(name, rank, world_size, device):
    plan = ContextParallelPlan(torch.tensor([0, 6]), world_size + 1)
    q = torch.randn(plan.num_local_tokens(rank), 2, 4)
    try:
        context_parallel_attention(q, q, q, plan)
    except ValueError as e:
        assert f"plan was made for world_size={world_size + 1}, but the group has {world_size} ranks" in str(e)
    else:
        raise AssertionError("no error for a plan of another world size")


def _case_hang(name, rank, world_size, device):
    if rank == 1:
        time.sleep(3600)  # a peer that never joins the collective
    dist.barrier()


_CASES = {"attention": _case_attention, "ddp": _case_ddp, "fsdp2": _case_fsdp2,
          "cp_2d_mesh": _case_cp_2d_mesh, "mismatched_plan": _case_mismatched_plan, "hang": _case_hang}


# ---------------------------------------------------------------- multi-process tests


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_matches_single_process(world_size, case):
    check_case(world_size, f"attention/{case}")


def test_ddp_matches_single_process():
    check_case(2, "ddp")


def test_plan_of_another_world_size_raises():
    check_case(2, "mismatched_plan")


def test_fsdp2_matches_single_process():
    check_case(2, "fsdp2")


@pytest.mark.parametrize("case", ["cp_2d_mesh", "cp_2d_mesh/allgather"])
def test_context_parallel_on_2d_mesh_matches_single_process(case):
    check_case(4, case)


def test_hung_peer_fails_within_limit():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"ranks \[0, 1\] of 2 did not finish job 'hang' within 8 s"):
        spawn(2, "hang", limit_s=8)
    assert time.monotonic() - start < 20


@requires_cuda
def test_attention_world_size_1_cuda():
    results = spawn(1, "attention", backend="nccl", device="cuda")
    failed = {k: v for k, v in results.items() if v}
    assert not failed and len(results) == len(ATTN_CASES), failed or results  # each case runs both modes


# ---------------------------------------------------------------- merge_attention_partials


def _split_keys(lengths_k, parts, generator):
    """Cut each sequence's keys into ``parts`` contiguous parts (some empty): per part, the rows
    of the packed keys it takes and its cu_seqlens."""
    cu = [0]
    for n in lengths_k:
        cu.append(cu[-1] + n)
    rows, cus = [[] for _ in range(parts)], [[0] for _ in range(parts)]
    for b, n in enumerate(lengths_k):
        cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=generator).tolist())
        bounds = [0] + cuts + [n]
        for p in range(parts):
            rows[p] += list(range(cu[b] + bounds[p], cu[b] + bounds[p + 1]))
            cus[p].append(cus[p][-1] + bounds[p + 1] - bounds[p])
    return ([torch.tensor(r, dtype=torch.int64) for r in rows],
            [torch.tensor(c, dtype=torch.int32) for c in cus])


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_merge_equals_one_shot_attention_over_all_keys(parts):
    """Attention over each part of the keys, merged, is attention over all of them (float64),
    out, lse and the gradients through both."""
    g = torch.Generator().manual_seed(parts)
    lengths_q, lengths_k = [3, 1, 5, 0, 4], [6, 1, 0, 2, 9]
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(13, 4, 8).requires_grad_(), rnd(18, 2, 8).requires_grad_(), rnd(18, 2, 5).requires_grad_()
    cu_q, cu_k = cu_seqlens(lengths_q, "cpu"), cu_seqlens(lengths_k, "cpu")
    go, gl = rnd(13, 4, 5), rnd(4, 13)
    rows, cus = _split_keys(lengths_k, parts, g)
    outs, lses = [], []
    for r, c in zip(rows, cus):
        o, l = torch_varlen.varlen_attention(q, k[r], v[r], cu_q, c, 5, 9, softcap=2.0)
        outs.append(o)
        lses.append(l)
    out, lse = merge_attention_partials(outs, lses)
    ref_out, ref_lse = torch_varlen.varlen_attention(q, k, v, cu_q, cu_k, 5, 9, softcap=2.0)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)  # -inf rows (seq 3 sees no key)
    fin = torch.isfinite(ref_lse)
    loss = lambda o, l: (o * go).sum() + (torch.where(fin, l, 0) * gl).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_merge_rows_seeing_nothing_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(5, 2, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    lses = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    for s in range(3):  # column 0 sees nothing anywhere, column 1 only in part 2
        lses[s][:, 0] = float("-inf")
        outs[s][0] = 0
        if s != 2:
            lses[s][:, 1] = float("-inf")
            outs[s][1] = 0
    outs = [o.requires_grad_() for o in outs]
    lses = [l.requires_grad_() for l in lses]
    out, lse = merge_attention_partials(outs, lses)
    assert torch.equal(out[0], torch.zeros(2, 3, dtype=torch.float64))
    assert torch.isneginf(lse[:, 0]).all()
    torch.testing.assert_close(out[1], outs[2][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[:, 1], lses[2][:, 1], rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum(), outs + lses)
    assert all(torch.isfinite(gr).all() for gr in grads)  # no NaN from the -inf rows
    finite = [l.detach()[:, 2:].clone().requires_grad_() for l in lses]
    parts = [o.detach()[2:].clone().requires_grad_() for o in outs]
    torch.autograd.gradcheck(lambda *t: merge_attention_partials(t[:3], t[3:]), parts + finite)


def test_merge_dtypes_and_bad_inputs():
    out = torch.randn(4, 2, 3).to(torch.bfloat16)
    lse = torch.randn(2, 4)
    merged, merged_lse = merge_attention_partials([out, out], [lse, lse])
    assert merged.dtype == torch.bfloat16 and merged_lse.dtype == torch.float32
    torch.testing.assert_close(merged_lse, lse + torch.log(torch.tensor(2.0)))
    acc, _ = merge_attention_partials([out.float(), out], [lse, lse])
    assert acc.dtype == torch.float32
    with pytest.raises(ValueError, match="as many outs as lses"):
        merge_attention_partials([out], [lse, lse])
    with pytest.raises(ValueError, match="as many outs as lses"):
        merge_attention_partials([], [])
    with pytest.raises(ValueError, match=r"lses\[1\] must be \(H, N\)"):
        merge_attention_partials([out, out], [lse, lse.t()])
    with pytest.raises(ValueError, match=r"outs\[1\] must be \(N, H, Dv\)"):
        merge_attention_partials([out, out[:3]], [lse, lse])


# ---------------------------------------------------------------- the plan


def _random_lengths(seed, count=40, long=3000):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 300, (count,), generator=g).tolist()
    lengths[count // 2] = long
    return lengths + [0, 1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window_size=(64, 16))])
@pytest.mark.parametrize("split_min_len", [None, 0, 100])
def test_plan_indices_cover_every_row_once(world_size, mask, split_min_len):
    lengths = _random_lengths(world_size)
    cu = cu_seqlens(lengths, "cpu")
    plan = ContextParallelPlan(cu, world_size, split_min_len=split_min_len, **mask)
    idx = [plan.local_indices(r) for r in range(world_size)]
    for r, i in enumerate(idx):
        assert i.dtype == torch.int64 and (i[1:] > i[:-1]).all()  # in order
        assert plan.num_local_tokens(r) == i.numel()
        local_cu = plan.local_cu_seqlens(r)
        assert local_cu.dtype == torch.int32 and local_cu.shape == cu.shape and int(local_cu[-1]) == i.numel()
        seq = torch.searchsorted(cu.long(), i, right=True) - 1  # each row's sequence
        assert torch.equal(torch.bincount(seq, minlength=len(lengths)), local_cu.diff().long())
        assert torch.equal(plan.local_position_ids(r), i - cu.long()[seq])
    assert torch.equal(torch.cat(idx).sort().values, torch.arange(sum(lengths)))
    x = torch.randn(sum(lengths), 3)
    assert torch.equal(plan.shard(x, world_size - 1), x[idx[-1]])


def test_plan_zigzag_chunks_and_whole_sequences():
    plan = ContextParallelPlan(torch.tensor([0, 40, 43]), 4, causal=True, split_min_len=8)
    for r in range(4):  # the 40 in 8 chunks of 5: rank r holds chunks r and 7 - r
        rows = plan.local_indices(r)
        rows = rows[rows < 40].tolist()
        assert rows == list(range(5 * r, 5 * r + 5)) + list(range(5 * (7 - r), 5 * (7 - r) + 5))
    # the 3 is whole on one rank; zigzag chunk pairs have equal causal work, so it goes to rank 0
    assert plan.local_indices(0)[-3:].tolist() == [40, 41, 42]
    plan1 = ContextParallelPlan(torch.tensor([0, 40, 43]), 1, causal=True, split_min_len=0)
    assert torch.equal(plan1.local_indices(0), torch.arange(43))  # one rank: nothing is split
    assert len(plan1._block_calls(0, 0, "cpu")) == 1


def test_plan_is_deterministic_and_balanced():
    lengths = _random_lengths(7, count=60, long=8000)
    for W in (2, 3, 4, 8):
        a = ContextParallelPlan(cu_seqlens(lengths, "cpu"), W, causal=True)
        b = ContextParallelPlan(cu_seqlens(lengths, "cpu").long(), W, causal=True)
        for r in range(W):
            assert torch.equal(a.local_indices(r), b.local_indices(r))
        mean = sum(a.work) / W
        assert max(a.work) <= 1.05 * mean, (W, a.work)  # causal work per rank within 5%
        assert a._pairs(0, 1) == b._pairs(0, 1)


# ---------------------------------------------------------------- one rank without a group, bad inputs


@pytest.mark.parametrize("mode", ["ring", "allgather"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_world_size_1_needs_no_process_group(device, mode):
    lengths = [3, 0, 9, 1]
    cu = cu_seqlens(lengths, device)
    q, k, v = (torch.randn(13, h, 8, dtype=torch.float64, device=device, requires_grad=True) for h in (4, 2, 2))
    plan = ContextParallelPlan(cu, 1, causal=True, window_size=(3, -1))
    out, lse = context_parallel_attention(q, k, v, plan, causal=True, window_size=(3, -1), return_lse=True,
                                          mode=mode)
    ref, ref_lse = torch_varlen.varlen_attention(q, k, v, cu, cu, 9, 9, causal=True, window_size=(3, -1))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * ref).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_plan_bad_inputs_raise():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        ContextParallelPlan(cu, 0)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        ContextParallelPlan(cu, 2.0)
    with pytest.raises(TypeError, match="cu_seqlens must be a tensor"):
        ContextParallelPlan([0, 3, 5], 2)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D int32 or int64"):
        ContextParallelPlan(cu.float(), 2)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D int32 or int64"):
        ContextParallelPlan(cu[None], 2)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        ContextParallelPlan(cu + 1, 2)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        ContextParallelPlan(torch.tensor([0, 5, 3]), 2)
    with pytest.raises(ValueError, match="window_size entries must be >= -1"):
        ContextParallelPlan(cu, 2, window_size=(-2, 0))
    with pytest.raises(ValueError, match=r"window_size must be \(left, right\)"):
        ContextParallelPlan(cu, 2, window_size=(1, 2, 3))
    with pytest.raises(ValueError, match="split_min_len must be >= 0"):
        ContextParallelPlan(cu, 2, split_min_len=-1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        ContextParallelPlan(cu, 2).local_indices(2)
    with pytest.raises(ValueError, match="x must have the plan's 5 rows"):
        ContextParallelPlan(cu, 2).shard(torch.zeros(4, 2), 0)


@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_attention_bad_inputs_raise(mode):
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    plan = ContextParallelPlan(cu, 1, causal=True)
    q, k = torch.randn(5, 2, 8), torch.randn(5, 1, 8)
    call = lambda **kw: context_parallel_attention(q, k, k, plan, **{"causal": True, "mode": mode, **kw})  # noqa: E731
    call()
    for name, value in (("dropout_p", 0.1), ("alibi_slopes", torch.ones(2)), ("sink", torch.zeros(2)),
                        ("cu_seqlens_q_padded", cu), ("cu_seqlens_k_padded", cu), ("q_descale", torch.ones(1)),
                        ("rng_state", torch.zeros(2, dtype=torch.int64))):
        with pytest.raises(NotImplementedError, match=f"does not support {name}"):
            call(**{name: value})
    call(dropout_p=0.0, alibi_slopes=None)  # the defaults are fine
    with pytest.raises(TypeError, match="unexpected keyword argument 'dropout'"):
        call(dropout=0.1)
    with pytest.raises(ValueError, match="differ from the plan's causal=True"):
        call(causal=False)
    with pytest.raises(ValueError, match="differ from the plan's"):
        call(window_size=(2, 0))
    with pytest.raises(TypeError, match="plan must be a ContextParallelPlan"):
        context_parallel_attention(q, k, k, cu, causal=True)
    with pytest.raises(ValueError, match="q must hold rank 0's 5 rows of the plan"):
        context_parallel_attention(q[:4], k, k, plan, causal=True)
    with pytest.raises(ValueError, match="k must hold rank 0's 5 rows"):
        context_parallel_attention(q, k[:4], k, plan, causal=True)
    with pytest.raises(ValueError, match=r"q must be a \(n_local, heads, headdim\) tensor"):
        context_parallel_attention(q[0], k, k, plan, causal=True)
    with pytest.raises(NotImplementedError, match="does not support FP8"):
        f8 = lambda t: t.to(torch.float8_e4m3fn)  # noqa: E731
        context_parallel_attention(f8(q), f8(k), f8(k), plan, causal=True)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        call(softcap=-1.0)
    with pytest.raises(ValueError, match="torch.distributed is not initialized and the plan is for 2 ranks"):
        context_parallel_attention(q, k, k, ContextParallelPlan(cu, 2), causal=False, mode=mode)
    with pytest.raises(ValueError, match="mode must be 'ring' or 'allgather', got 'all_gather'"):
        call(mode="all_gather")


def test_bench_context_parallel_smoke(tmp_path):
    """benchmarks/bench_context_parallel.py --smoke runs on 2 CPU processes and writes its rows."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "cp.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_context_parallel.py"), "--smoke",
                           "--passes", "3", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=root,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["bench"] for r in rows} == {"context_parallel"}
    assert {(r["impl"], r["pass"]) for r in rows} >= {("single", "fwd"), ("single", "fwd_bwd"), ("ring", "fwd"),
                                                      ("ring", "fwd_bwd"), ("ring_compute", "fwd"), ("ring_comm", "fwd"),
                                                      ("allgather", "fwd"), ("allgather", "fwd_bwd"),
                                                      ("allgather_comm", "fwd")}
    assert {r["rank"] for r in rows} == {0, 1}
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["passes"] == 3 for r in rows)
