"""Context-parallel varlen attention on torch.distributed (opt-in: ``import torch_varlen.distributed``).

A packed batch (N, H, D) with ``cu_seqlens`` is split across the ranks of a process group by a
``ContextParallelPlan``; each rank holds its rows, ``q[plan.local_indices(rank)]``, and
``context_parallel_attention`` returns that rank's rows of ``varlen_attention`` of the whole
batch (self-attention: q, k and v share ``cu_seqlens``).

The plan (deterministic, the same on every rank): a sequence of length L is cut into 2W chunks
(W = world size), chunk c = rows [c*L // 2W, (c+1)*L // 2W); rank r takes chunks r and 2W-1-r,
the zigzag that balances causal work (ring-flash-attn, Megatron). Sequences shorter than
``split_min_len`` stay whole on one rank, given to the least-loaded rank by attention work.

The attention: a ring. At step s rank r holds the K/V rows of rank (r - s) mod W; it sends them
on to r+1 (torch.distributed.batch_isend_irecv) while it computes attention of its queries
against them with torch.ops.varlen.attention_forward. Each (query piece, key piece) pair of a
sequence is one "sequence" of that call, addressed inside the local buffers by
``cu_seqlens_*_padded`` (no copies), with the window shifted so that the kernel's
bottom-right-aligned mask equals the global mask; pairs the mask leaves empty are skipped. The
partial (out, lse) are merged by torch_varlen.merge.merge_attention_partials. The backward
runs the same ring: torch.ops.varlen.attention_backward with the merged out and lse gives each
block's dq, dk, dv; dq stays, the dk/dv accumulator travels with its K/V and gets home after W
passes.

``mode="allgather"`` replaces the ring's messages by collectives: each rank all-gathers K and V
(padded to the largest rank's rows), runs the same blocks against every source rank's rows, and
the backward reduce-scatters the dK/dV of all sources back to their owners.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .merge import merge_attention_partials

__all__ = ["ContextParallelPlan", "context_parallel_attention"]

_ops = torch.ops.varlen


def _normalize_window(causal: bool, window_size) -> Tuple[int, int]:
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    return left, (0 if causal else right)


def _visible(pos: torch.Tensor, length: int, left: int, right: int) -> torch.Tensor:
    """How many keys of a sequence of ``length`` each query position in ``pos`` sees."""
    lo = pos - left if left >= 0 else torch.zeros_like(pos)
    hi = pos + right if right >= 0 else torch.full_like(pos, length - 1)
    return (hi.clamp(max=length - 1) - lo.clamp(min=0) + 1).clamp(min=0)


@dataclasses.dataclass(frozen=True)
class _Piece:
    seq: int  # global sequence index
    start: int  # first position inside the sequence
    end: int  # one past the last
    offset: int  # first row in its rank's local buffer


@dataclasses.dataclass(frozen=True)
class _Pair:
    q_lo: int  # query rows [q_lo, q_hi) of the local buffer
    q_hi: int
    k_lo: int  # key rows [k_lo, k_hi) of the source rank's buffer
    k_hi: int
    left: int  # the window the kernel sees for this pair
    right: int


class _Call:
    """One attention_forward call: pairs with disjoint, ordered query and key rows."""

    def __init__(self, pairs: List[_Pair], total_q: int, total_k: int, device):
        lq = [p.q_hi - p.q_lo for p in pairs]
        lk = [p.k_hi - p.k_lo for p in pairs]
        as_cu = lambda xs: torch.tensor([0] + xs, dtype=torch.int64).cumsum(0).to(torch.int32)  # noqa: E731
        self.cu_q = as_cu(lq).to(device)
        self.cu_k = as_cu(lk).to(device)
        self.cu_q_padded = torch.tensor([p.q_lo for p in pairs] + [total_q], dtype=torch.int32, device=device)
        self.cu_k_padded = torch.tensor([p.k_lo for p in pairs] + [total_k], dtype=torch.int32, device=device)
        self.max_q, self.max_k = max(lq), max(lk)
        self.left, self.right = pairs[0].left, pairs[0].right


class ContextParallelPlan:
    """How a packed batch is split across ``world_size`` ranks for context parallelism.

    Args:
        cu_seqlens: int32 or int64 (B+1,) of the global packed batch (any device; read once on
            the host). Lengths 2, 4, 3 -> ``[0, 2, 6, 9]``; zero-length sequences are legal.
        world_size: number of ranks of the context-parallel group.
        causal, window_size: the attention mask the plan is made for (they decide which blocks
            are empty and the work balance); ``context_parallel_attention`` must be called with
            the same values.
        split_min_len: sequences shorter than this stay whole on one rank (default
            ``128 * world_size``: every zigzag chunk at least 64 rows). 0 splits every sequence
            (short ones then leave some ranks with no rows of them). With ``world_size`` 1
            nothing is split.

    Example, 2 ranks, causal, lengths 8 and 3 with ``split_min_len=4``: the 8 is cut into 4
    chunks of 2 rows, rank 0 takes chunks 0 and 3 (rows 0, 1, 6, 7), rank 1 chunks 1 and 2
    (rows 2..5); the 3 stays whole on the less loaded rank::

        plan = ContextParallelPlan(torch.tensor([0, 8, 11]), 2, causal=True, split_min_len=4)
        plan.local_indices(0)     # tensor([0, 1, 6, 7, 8, 9, 10]): the 3 went to rank 0 (a tie)
        plan.local_indices(1)     # tensor([2, 3, 4, 5])
        plan.local_cu_seqlens(1)  # tensor([0, 4, 4], dtype=torch.int32): none of seq 1
    """

    def __init__(self, cu_seqlens, world_size: int, *, causal: bool = False,
                 window_size: Sequence[int] = (-1, -1), split_min_len: Optional[int] = None):
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be 1-D int32 or int64 of shape (batch+1,), got "
                             f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
        if any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
        if split_min_len is None:
            split_min_len = 128 * world_size
        if split_min_len < 0:
            raise ValueError(f"split_min_len must be >= 0, got {split_min_len}")
        self.world_size = world_size
        self.causal = bool(causal)
        self.window_size = tuple(int(w) for w in window_size)
        self.window = _normalize_window(self.causal, self.window_size)  # (left, right) with causal
        self.split_min_len = split_min_len
        self.device = cu_seqlens.device
        self.cu_seqlens = cu
        self.num_tokens = cu[-1]
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        self.lengths = lengths
        W = world_size
        left, right = self.window

        def work(length, start, end):
            return int(_visible(torch.arange(start, end), length, left, right).sum()) if end > start else 0

        ranges: List[List[Tuple[int, int, int]]] = [[] for _ in range(W)]  # (seq, start, end)
        load = [0] * W
        whole = []
        for b, length in enumerate(lengths):
            if W > 1 and length >= split_min_len:
                for r in range(W):
                    for c in (r, 2 * W - 1 - r):
                        s, e = c * length // (2 * W), (c + 1) * length // (2 * W)
                        ranges[r].append((b, s, e))
                        load[r] += work(length, s, e)
            else:
                whole.append((work(length, 0, length), b))
        # longest processing time first: biggest whole sequence to the least loaded rank
        for w, b in sorted(whole, key=lambda t: (-t[0], t[1])):
            r = min(range(W), key=lambda i: (load[i], i))
            ranges[r].append((b, 0, lengths[b]))
            load[r] += w
        self.work = load  # attention work (visible query-key pairs) per rank
        self._pieces: List[List[_Piece]] = []
        for r in range(W):
            pieces, offset = [], 0
            for b, s, e in sorted(ranges[r]):
                if e > s:
                    pieces.append(_Piece(b, s, e, offset))
                    offset += e - s
            self._pieces.append(pieces)
        self._calls: Dict[tuple, List[_Call]] = {}

    def __repr__(self):
        return (f"ContextParallelPlan(world_size={self.world_size}, sequences={len(self.lengths)}, "
                f"tokens={self.num_tokens}, causal={self.causal}, window_size={self.window_size}, "
                f"local_tokens={[self.num_local_tokens(r) for r in range(self.world_size)]})")

    def _check_rank(self, rank):
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")

    def num_local_tokens(self, rank: int) -> int:
        """Rows rank holds."""
        self._check_rank(rank)
        return sum(p.end - p.start for p in self._pieces[rank])

    def local_indices(self, rank: int) -> torch.Tensor:
        """int64 (n_local,): the rows of the global packed batch rank holds, in increasing order."""
        self._check_rank(rank)
        idx = [torch.arange(self.cu_seqlens[p.seq] + p.start, self.cu_seqlens[p.seq] + p.end)
               for p in self._pieces[rank]]
        return (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)).to(self.device)

    def local_position_ids(self, rank: int) -> torch.Tensor:
        """int64 (n_local,): each local row's position inside its sequence (for RoPE)."""
        self._check_rank(rank)
        pos = [torch.arange(p.start, p.end) for p in self._pieces[rank]]
        return (torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64)).to(self.device)

    def local_cu_seqlens(self, rank: int) -> torch.Tensor:
        """int32 (B+1,): cu_seqlens of rank's rows, one entry per global sequence (0 rows where
        rank holds none of it). The rows of a split sequence are two chunks that are not
        contiguous in the sequence: use ``context_parallel_attention``, not varlen_attention."""
        self._check_rank(rank)
        counts = [0] * len(self.lengths)
        for p in self._pieces[rank]:
            counts[p.seq] += p.end - p.start
        return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(self.device)

    def local_max_seqlen(self, rank: int) -> int:
        cu = self.local_cu_seqlens(rank).tolist()
        return max((b - a for a, b in zip(cu, cu[1:])), default=0)

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank's rows of a global packed tensor (N, *): ``x[local_indices(rank)]``."""
        if x.shape[0] != self.num_tokens:
            raise ValueError(f"x must have the plan's {self.num_tokens} rows, got shape {tuple(x.shape)}")
        return x.index_select(0, self.local_indices(rank).to(x.device))

    # ------------------------------------------------------------ attention blocks

    def _pairs(self, rank: int, src: int) -> List[_Pair]:
        """The non-empty (query piece of rank, key piece of src) pairs, with the kernel window
        that reproduces the global mask, full blocks merged."""
        left, right = self.window
        def by_seq(pieces):
            groups: Dict[int, List[_Piece]] = {}
            for p in pieces:
                groups.setdefault(p.seq, []).append(p)
            return groups

        keys = by_seq(self._pieces[src])
        pairs = []
        for seq, qps in by_seq(self._pieces[rank]).items():
            kps = keys.get(seq, [])
            if rank == src and left < 0 and right == 0:
                # causal, unbounded left: rank's own pieces of a sequence (contiguous in its
                # buffer) attend as one causal sequence, since every key of an earlier piece
                # precedes every query of a later one
                lo, hi = qps[0].offset, qps[-1].offset + qps[-1].end - qps[-1].start
                pairs.append(_Pair(lo, hi, lo, hi, -1, 0))
                continue
            for qp in qps:
                for kp in kps:
                    pair = self._pair(qp, kp, left, right)
                    if pair is not None:
                        pairs.append(pair)
        return _merge_full(pairs)

    @staticmethod
    def _pair(qp: _Piece, kp: _Piece, left: int, right: int) -> Optional[_Pair]:
        qs, qe, ks, ke = qp.start, qp.end, kp.start, kp.end
        # keys some query sees, then queries that see some of those keys
        if left >= 0:
            ks = max(ks, qs - left)
        if right >= 0:
            ke = min(ke, qe + right)
        if ks >= ke:
            return None
        if right >= 0:
            qs = max(qs, ks - right)
        if left >= 0:
            qe = min(qe, ke + left)
        if qs >= qe:
            return None
        full = (left < 0 or qe - 1 - left <= ks) and (right < 0 or qs + right >= ke - 1)
        if full:
            wl, wr = -1, -1
        else:
            # the kernel aligns the last query with the last key (bottom-right): shift the
            # window by d = ke - qe; the clipping above keeps both entries >= 0
            d = ke - qe
            wl = left + d if left >= 0 else -1
            wr = right - d if right >= 0 else -1
        return _Pair(qp.offset + qs - qp.start, qp.offset + qe - qp.start,
                     kp.offset + ks - kp.start, kp.offset + ke - kp.start, wl, wr)

    def _block_calls(self, rank: int, src: int, device) -> List[_Call]:
        key = (rank, src, str(device))
        if key not in self._calls:
            calls: List[List[_Pair]] = []
            for p in sorted(self._pairs(rank, src), key=lambda p: (p.q_lo, p.k_lo)):
                for c in calls:  # first call with this window whose rows end before the pair's
                    last = c[-1]
                    if (last.left, last.right) == (p.left, p.right) and last.q_hi <= p.q_lo and last.k_hi <= p.k_lo:
                        c.append(p)
                        break
                else:
                    calls.append([p])
            nq, nk = self.num_local_tokens(rank), self.num_local_tokens(src)
            self._calls[key] = [_Call(c, nq, nk, device) for c in calls]
        return self._calls[key]


def _merge_full(pairs: List[_Pair]) -> List[_Pair]:
    """Merge fully visible pairs: same query rows and adjacent key rows, then same key rows and
    adjacent query rows (order does not matter without a mask)."""
    full = [p for p in pairs if (p.left, p.right) == (-1, -1)]
    rest = [p for p in pairs if (p.left, p.right) != (-1, -1)]
    for a_lo, a_hi, b_lo, b_hi in (("q_lo", "q_hi", "k_lo", "k_hi"), ("k_lo", "k_hi", "q_lo", "q_hi")):
        full.sort(key=lambda p: (getattr(p, a_lo), getattr(p, b_lo)))
        merged: List[_Pair] = []
        for p in full:
            m = merged[-1] if merged else None
            if (m is not None and getattr(m, a_lo) == getattr(p, a_lo) and getattr(m, a_hi) == getattr(p, a_hi)
                    and getattr(m, b_hi) == getattr(p, b_lo)):
                merged[-1] = dataclasses.replace(m, **{b_hi: getattr(p, b_hi)})
            else:
                merged.append(p)
        full = merged
    return rest + full


# ---------------------------------------------------------------- the ring


class _Ring:
    """Peers and point-to-point exchange of one process group's ring (nothing for 1 rank)."""

    def __init__(self, group, rank, world_size):
        self.group, self.rank, self.world_size = group, rank, world_size
        if world_size > 1:
            to_global = lambda r: dist.get_global_rank(group, r) if group is not None else r  # noqa: E731
            self.next = to_global((rank + 1) % world_size)
            self.prev = to_global((rank - 1) % world_size)

    def exchange(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor]):
        """Post sends of ``send`` to the next rank and receives of ``recv`` from the previous
        one; returns the requests (wait on them before reading ``recv``). Empty tensors are not
        sent: both ends know every size from the plan."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in send if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv if t.numel()]
        # the tensors are kept with the requests so that nothing is freed while in flight
        return (dist.batch_isend_irecv(ops) if ops else [], list(send) + list(recv))


def _wait(pending):
    if pending:
        for r in pending[0]:
            r.wait()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_blocks(q, k, v, calls, out_acc, lse_acc, opts):
    """Attention of the local queries against one source rank's K/V rows, block by block (the
    plan's calls for that pair of ranks), merged into the running ``(out_acc, lse_acc)``."""
    for c in calls:
        o, l = _ops.attention_forward(
            q, k, v, c.cu_q, c.cu_k, c.max_q, c.max_k, opts["softmax_scale"],
            window_left=c.left, window_right=c.right, softcap=opts["softcap"],
            cu_seqlens_q_padded=c.cu_q_padded, cu_seqlens_k_padded=c.cu_k_padded,
            deterministic=opts["deterministic"], backend=opts["backend"])
        out_acc, lse_acc = merge_attention_partials([out_acc, o], [lse_acc, l])
    return out_acc, lse_acc


def _backward_blocks(grad_out, q, k, v, out, lse, grad_lse, calls, opts):
    """The blocks of ``_forward_blocks``, backward with the merged out and lse: a list of
    (dq, dk, dv), dq over the local queries, dk/dv over the source rank's rows."""
    return [_ops.attention_backward(
        grad_out, q, k, v, out, lse, c.cu_q, c.cu_k, c.max_q, c.max_k,
        opts["softmax_scale"], window_left=c.left, window_right=c.right,
        softcap=opts["softcap"], cu_seqlens_q_padded=c.cu_q_padded,
        cu_seqlens_k_padded=c.cu_k_padded, deterministic=opts["deterministic"],
        grad_lse=grad_lse, backend=opts["backend"]) for c in calls]


def _out_lse(q, out_acc, lse_acc):
    return out_acc.to(q.dtype), lse_acc.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


# A torch.autograd.Function, not an op with register_autograd (DESIGN.md rule 3): the ring's
# communication is not a torch.library op, and the forward/backward are loops over ops
# (attention_forward, attention_backward) and torch.distributed calls. Under torch.compile the
# public function is a graph break (torch.compiler.disable), the kernels inside stay ops.
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, ring, opts):
        rank, W = ring.rank, ring.world_size
        out_acc = q.new_zeros(q.shape[:2] + v.shape[2:], dtype=_acc_dtype(q.dtype))
        lse_acc = q.new_full(q.shape[1::-1], float("-inf"), dtype=_acc_dtype(q.dtype))
        kk, vv = k.contiguous(), v.contiguous()  # sent as they are
        for step in range(W):
            src = (rank - step) % W
            reqs, nxt = None, None
            if step < W - 1:  # post the next K/V before computing on these
                n = plan.num_local_tokens((src - 1) % W)
                nxt = (k.new_empty((n,) + k.shape[1:]), v.new_empty((n,) + v.shape[1:]))
                reqs = ring.exchange((kk, vv), nxt)
            out_acc, lse_acc = _forward_blocks(q, kk, vv, plan._block_calls(rank, src, q.device),
                                               out_acc, lse_acc, opts)
            _wait(reqs)
            if nxt is not None:
                kk, vv = nxt
        out, lse = _out_lse(q, out_acc, lse_acc)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.ring, ctx.opts = plan, ring, opts
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, ring, opts = ctx.plan, ctx.ring, ctx.opts
        rank, W = ring.rank, ring.world_size
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kk, vv = k.contiguous(), v.contiguous()
        # the dk/dv accumulator of the K/V this rank holds at this step; it travels with them
        dkk, dvv = torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)
        dkv_reqs = None
        for step in range(W):
            src = (rank - step) % W
            kv_reqs, nxt = None, None
            if step < W - 1:
                n = plan.num_local_tokens((src - 1) % W)
                nxt = (k.new_empty((n,) + k.shape[1:]), v.new_empty((n,) + v.shape[1:]))
                kv_reqs = ring.exchange((kk, vv), nxt)
            blocks = _backward_blocks(grad_out, q, kk, vv, out, lse, grad_lse,
                                      plan._block_calls(rank, src, q.device), opts)
            _wait(dkv_reqs)  # the accumulator for src, sent by the previous rank last step
            for bq, bk, bv in blocks:
                dq += bq
                dkk += bk
                dvv += bv
            if W > 1:  # pass the accumulator on; after W passes it is home
                n = plan.num_local_tokens((src - 1) % W)
                incoming = (torch.empty((n,) + k.shape[1:], dtype=acc, device=k.device),
                            torch.empty((n,) + v.shape[1:], dtype=acc, device=v.device))
                dkv_reqs = ring.exchange((dkk, dvv), incoming)
                dkk, dvv = incoming
            _wait(kv_reqs)
            if nxt is not None:
                kk, vv = nxt
        _wait(dkv_reqs)
        return dq.to(q.dtype), dkk.to(k.dtype), dvv.to(v.dtype), None, None, None


# ---------------------------------------------------------------- the all-gather


class _Gather:
    """Collectives of one process group for the all-gather mode (nothing for 1 rank). Ranks may
    hold different row counts: every buffer is padded to the plan's largest rank, ``rows``."""

    def __init__(self, group, rank, world_size, plan):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.counts = [plan.num_local_tokens(r) for r in range(world_size)]
        self.rows = max(self.counts)

    def all_gather(self, t):
        """Post the all-gather of this rank's rows ``t`` (n, *) -> (request, (W, rows, *))."""
        send = t.contiguous()
        if send.shape[0] != self.rows:
            send = t.new_zeros((self.rows,) + t.shape[1:])
            send[: t.shape[0]] = t
        out = t.new_empty((self.world_size * self.rows,) + t.shape[1:])
        ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
        req = ag(out, send, group=self.group, async_op=True)
        return req, out.unflatten(0, (self.world_size, self.rows))

    def reduce_scatter(self, t):
        """Post the sum over ranks of ``t`` (W, rows, *) -> (request, this rank's (rows, *))."""
        out = t.new_empty(t.shape[1:])
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # torch < 2.13
        return rs(out, t.flatten(0, 1), group=self.group, async_op=True), out


def _sources(rank, W):
    """Source ranks in the ring's order: the local K/V first, so that the collective of the other
    ranks' rows overlaps with the attention over the local ones."""
    return [(rank - step) % W for step in range(W)]


class _AllGatherAttention(torch.autograd.Function):
    """Every rank gathers all K/V rows (one all-gather each for K and V), runs the plan's blocks
    of its queries against every source rank's rows, and in the backward sends each block's
    dK/dV home with one reduce-scatter each. The gathered K/V (W x the local rows, where the
    ring holds 2x) are not kept for the backward, which gathers again."""

    @staticmethod
    def forward(ctx, q, k, v, plan, comm, opts):
        rank, W = comm.rank, comm.world_size
        out_acc = q.new_zeros(q.shape[:2] + v.shape[2:], dtype=_acc_dtype(q.dtype))
        lse_acc = q.new_full(q.shape[1::-1], float("-inf"), dtype=_acc_dtype(q.dtype))
        kv = _AllGatherAttention._gather(comm, k, v)
        for src in _sources(rank, W):
            ks, vs = kv(src)
            out_acc, lse_acc = _forward_blocks(q, ks, vs, plan._block_calls(rank, src, q.device),
                                               out_acc, lse_acc, opts)
        out, lse = _out_lse(q, out_acc, lse_acc)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.comm, ctx.opts = plan, comm, opts
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def _gather(comm, k, v):
        """src -> that rank's (K, V) rows; the local ones at once, the others after the
        all-gathers (posted here, waited for on the first remote source)."""
        if comm.world_size == 1 or comm.rows == 0:
            return lambda src: (k, v)
        (rk, gk), (rv, gv) = comm.all_gather(k), comm.all_gather(v)
        pending = [rk, rv]

        def get(src):
            if src == comm.rank:
                return k, v
            while pending:
                pending.pop().wait()
            n = comm.counts[src]
            return gk[src, :n], gv[src, :n]
        return get

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, comm, opts = ctx.plan, ctx.comm, ctx.opts
        rank, W = comm.rank, comm.world_size
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        # dK/dV of every source rank's rows, padded to comm.rows like the gathered K/V
        dk = torch.zeros((W, comm.rows) + k.shape[1:], dtype=acc, device=k.device)
        dv = torch.zeros((W, comm.rows) + v.shape[1:], dtype=acc, device=v.device)
        kv = _AllGatherAttention._gather(comm, k, v)
        for src in _sources(rank, W):
            ks, vs = kv(src)
            n = comm.counts[src]
            for bq, bk, bv in _backward_blocks(grad_out, q, ks, vs, out, lse, grad_lse,
                                               plan._block_calls(rank, src, q.device), opts):
                dq += bq
                dk[src, :n] += bk
                dv[src, :n] += bv
        n = comm.counts[rank]
        if W > 1 and comm.rows:
            (rk, dk), (rv, dv) = comm.reduce_scatter(dk), comm.reduce_scatter(dv)
            rk.wait()
            rv.wait()
            dk, dv = dk[:n], dv[:n]
        else:
            dk, dv = dk[0, :n], dv[0, :n]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# varlen_attention options the ring does not support, with the reason given in the error
_UNSUPPORTED = {
    "dropout_p": "dropout (the mask is keyed by positions inside each kernel call, which differ per rank)",
    "rng_state": "dropout",
    "alibi_slopes": "ALiBi (its bias depends on the bottom-right alignment, which the ring shifts per block)",
    "sink": "attention sinks",
    "cu_seqlens_q_padded": "padded cu_seqlens (the plan addresses the buffers itself)",
    "cu_seqlens_k_padded": "padded cu_seqlens (the plan addresses the buffers itself)",
    "q_descale": "FP8 attention", "k_descale": "FP8 attention", "v_descale": "FP8 attention",
}


@torch.compiler.disable
def context_parallel_attention(q, k, v, plan: ContextParallelPlan, *, group=None, causal: bool = False,
                               softmax_scale: Optional[float] = None, window_size: Sequence[int] = (-1, -1),
                               softcap: float = 0.0, return_lse: bool = False, deterministic: bool = False,
                               backend: Optional[str] = None, mode: str = "ring", **unsupported):
    """This rank's rows of ``varlen_attention`` of the whole (self-attention) packed batch.

    Args:
        q (n_local, H, D), k (n_local, Hk, D), v (n_local, Hk, Dv): this rank's rows, in the
            order of ``plan.local_indices(rank)`` (e.g. ``plan.shard(q_global, rank)``).
            float16, bfloat16, float32 or float64, on any device the group's backend serves
            (gloo: CPU, NCCL: CUDA); H % Hk == 0.
        plan: a ``ContextParallelPlan`` made for this group's size, causal and window.
        group: the context-parallel process group (None: the default group). With a plan for
            1 rank no process group is needed.
        causal, softmax_scale, window_size, softcap: as ``varlen_attention`` (global positions:
            query i of a sequence sees key j when ``j <= i`` with causal, within the window).
        return_lse: also return lse (H, n_local), float32 (float64 for float64 inputs).
        deterministic, backend: passed to the attention ops.
        mode: how the K/V rows reach the queries; both give the same result.
            ``"ring"`` (default): W-1 point-to-point steps, each overlapped with the attention
            over the K/V received last; memory 2x the local K/V.
            ``"allgather"``: one all-gather of K and of V (overlapped with the attention over the
            local rows), then the attention over every rank's rows; the backward gathers again
            and sends dK/dV home with one reduce-scatter each. Fewer, larger messages (less
            latency per step) for W x the local K/V in memory: meant for small worlds.

    Returns ``out`` (n_local, H, Dv), or ``(out, lse)``; differentiable in q, k and v (and
    through lse). Every rank of the group must call it with its rows (possibly none). Dropout,
    ALiBi, sinks, FP8 and padded cu_seqlens raise NotImplementedError. Under torch.compile
    this function runs eagerly (a graph break): communication is not an op.
    """
    for name, value in unsupported.items():
        if name not in _UNSUPPORTED:
            raise TypeError(f"context_parallel_attention() got an unexpected keyword argument {name!r}")
        if value is not None and not (name == "dropout_p" and value == 0):
            raise NotImplementedError(f"context_parallel_attention does not support {name} "
                                      f"({_UNSUPPORTED[name]})")
    if not isinstance(plan, ContextParallelPlan):
        raise TypeError(f"plan must be a ContextParallelPlan, got {type(plan).__name__}")
    if mode not in ("ring", "allgather"):
        raise ValueError(f"mode must be 'ring' or 'allgather', got {mode!r}")
    if _normalize_window(causal, window_size) != plan.window or bool(causal) != plan.causal:
        raise ValueError(f"causal={causal}, window_size={tuple(window_size)} differ from the plan's "
                         f"causal={plan.causal}, window_size={plan.window_size}: make the plan with "
                         f"the attention's mask")
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    elif group is None and plan.world_size == 1:
        world_size, rank = 1, 0
    else:
        raise ValueError(f"no process group: torch.distributed is not initialized and the plan is for "
                         f"{plan.world_size} ranks")
    if world_size != plan.world_size:
        raise ValueError(f"plan was made for world_size={plan.world_size}, but the group has "
                         f"{world_size} ranks")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a (n_local, heads, headdim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.dtype == torch.float8_e4m3fn or q.dtype == torch.float8_e5m2:
        raise NotImplementedError(f"context_parallel_attention does not support FP8 q, k, v (q is {q.dtype})")
    n = plan.num_local_tokens(rank)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] != n:
            raise ValueError(f"{name} must hold rank {rank}'s {n} rows of the plan "
                             f"(plan.local_indices({rank})), got {t.shape[0]}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap}")
    opts = {
        "softmax_scale": float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale),
        "softcap": float(softcap), "deterministic": bool(deterministic), "backend": backend,
    }
    if mode == "ring":
        out, lse = _RingAttention.apply(q, k, v, plan, _Ring(group, rank, world_size), opts)
    else:
        out, lse = _AllGatherAttention.apply(q, k, v, plan, _Gather(group, rank, world_size, plan), opts)
    return (out, lse) if return_lse else out
