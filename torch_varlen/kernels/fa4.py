"""FlashAttention-4 (``flash_attn.cute``) as a backend of varlen::attention_forward / backward.

When FA4 is importable and supports the call (``supported``), the CUDA kernels of our attention
ops call FA4's forward and backward *inside* our registered ops: our schema, fakes and autograd,
so ``torch.compile(fullgraph=True)`` sees one opaque op and no graph break. Otherwise our Triton
kernels run. ``select`` makes that choice from the op's ``backend`` argument:

    None / "auto"   FA4 when importable and supported, else torch_varlen (logged once per reason)
    "torch_varlen"  our kernels
    "fa4"           FA4, or a RuntimeError naming why it cannot run the call

The choice is a pure function of the arguments' shapes, dtypes, flags and the GPU, so the
backward (which gets the forward's ``backend``) resolves exactly as the forward did.

FA4 JIT-compiles each new kernel configuration (dtype, head dims, GQA ratio, causal / window /
softcap, deterministic) on its first use, which takes seconds; later calls reuse it.

Three details keep FA4's results equal to our contract (DESIGN.md "Semantics"):

- ``max_seqlen_*`` are hints in our API, but FA4 trusts them as bounds: on SM100 the forward
  passes ``max_seqlen_q`` to the kernel and, when it fits one tile, schedules a single query
  tile per sequence; with ``deterministic`` the backward sizes its dQ semaphores from it. A
  hint below the true maximum would give wrong results or out-of-bounds writes, so we pass
  None and FA4 uses ``total_q`` / ``total_k`` from the shapes (on SM90 the grids come from the
  shapes anyway). No path we use reads a tensor's values on the host (no host sync).
- Rows outside every sequence (``total_q > cu_seqlens_q[-1]``) must give out 0, lse -inf and
  zero gradients; FA4 never visits them. ``_cover_tails`` appends two sequences on the device:
  (Lq 0, the spare keys) and (the spare queries, Lk 0). FA4 writes 0 / -inf for queries that
  see no key and zero dK / dV for keys that no query sees, so every row is written, with no
  host sync and nothing to do when there are no spare rows.
- Our window (-1 = unbounded, causal = right 0) maps to FA4's (None = unbounded); both align
  causal masks bottom-right.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from ..meta.attention import check_attention_shapes, check_sink

log = logging.getLogger("torch_varlen")

# "torch_varlen": our kernels (Triton; hopper.py's forward with TORCH_VARLEN_HOPPER=1 where it
# runs); "triton": the Triton kernels only; "hopper": hopper.py's forward or an error (with
# Triton's backward).
BACKENDS = ("auto", "torch_varlen", "fa4", "triton", "hopper")
TESTED = "flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1"
_CAPABILITY_MAJORS = (9, 10)  # Hopper, Blackwell datacenter: the FA4 paths we support


# ---------------------------------------------------------------- what FA4 can run


def _head_dims_ok(d: int, dv: int, major: int) -> bool:
    """FA4's _validate_head_dims for 16-bit inputs (alignment 8)."""
    if d % 8 or dv % 8:
        return False
    if major == 9:
        return 8 <= d <= 256 and 8 <= dv <= 256
    return (8 <= d <= 128 and 8 <= dv <= 128) or (d, dv) in ((192, 128), (256, 256))


@functools.lru_cache(maxsize=None)
def _capability(index: Optional[int]) -> tuple:
    return torch.cuda.get_device_capability(index)


def supported(q, k, v, *, alibi_slopes=None, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None,
              dropout_p=0.0, q_descale=None, k_descale=None, v_descale=None,
              capability: Optional[tuple] = None) -> tuple[bool, str]:
    """Can FA4 run this attention call? -> ``(ok, reason)``; reason says why not ('' if ok).

    Reads shapes, dtypes, flags and the GPU's compute capability only (never tensor values).
    ``capability`` (major, minor) stands in for the GPU's (tests); None reads q's device, and
    tensors not on CUDA are unsupported. Causal, windows, softcap, GQA / MQA, ``headdim_v !=
    headdim``, ``Lq != Lk``, empty sequences and ``deterministic`` are all supported.
    """
    if dropout_p > 0:
        return False, "dropout is not supported by FlashAttention-4"
    if alibi_slopes is not None:
        return False, "ALiBi (alibi_slopes) is not supported by FlashAttention-4"
    if cu_seqlens_q_padded is not None or cu_seqlens_k_padded is not None:
        return False, "cu_seqlens_q_padded / cu_seqlens_k_padded are not supported by FlashAttention-4"
    if q_descale is not None or k_descale is not None or v_descale is not None:
        return False, "FP8 (q/k/v_descale) is not routed to FlashAttention-4"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"{q.dtype} inputs are not supported by FlashAttention-4 (float16 or bfloat16 only)"
    if capability is None:
        if q.device.type != "cuda":
            return False, f"FlashAttention-4 runs on CUDA GPUs only, got {q.device.type} tensors"
        capability = _capability(q.device.index)
    major = capability[0]
    if major not in _CAPABILITY_MAJORS:
        return False, (f"compute capability {major}.{capability[1]} is not supported by "
                       "FlashAttention-4 here (9.x or 10.x)")
    d, dv = q.shape[-1], v.shape[-1]
    if not _head_dims_ok(d, dv, major):
        return False, (f"head dims (headdim, headdim_v) = ({d}, {dv}) are not supported by "
                       f"FlashAttention-4 on compute capability {major}.x")
    if major == 9 and d != dv and q.shape[-2] != k.shape[-2]:
        # FA4's SM90 backward asserts "GQA backward requires head_dim == head_dim_v" (seen on
        # the H200); the forward would run, but a call's backward must use its forward's backend.
        return False, (f"GQA/MQA with headdim_v != headdim ({d}, {dv}) is not supported by "
                       "FlashAttention-4's backward on compute capability 9.x")
    return True, ""


# ---------------------------------------------------------------- import (lazy, cached)

_interface = None
_import_error: Optional[str] = None


def _fa4_interface():
    """flash_attn.cute.interface, imported on the first call that wants it; None if it fails."""
    global _interface, _import_error
    if _interface is None and _import_error is None:
        try:
            from flash_attn.cute import interface
        except Exception as e:  # noqa: BLE001  (any failure means: not usable here)
            _import_error = f"{type(e).__name__}: {e}"
        else:
            _interface = interface
    return _interface


def available() -> tuple[bool, str]:
    """Is flash_attn.cute importable? -> ``(ok, reason)`` (imports it on the first call)."""
    if _fa4_interface() is not None:
        return True, ""
    return False, (f"flash_attn.cute is not importable ({_import_error}); "
                   f"install it with pip install torch_varlen[fa4] (tested: {TESTED})")


# ---------------------------------------------------------------- selection

_logged: set = set()


def _log_once(choice: str, reason: str) -> None:
    key = (choice, reason)
    if key in _logged:
        return
    _logged.add(key)
    if choice == "fa4":
        log.info("torch_varlen attention: backend='auto' uses FlashAttention-4 for this call "
                 "(it JIT-compiles each new kernel configuration on first use, which takes seconds)")
    else:
        log.info("torch_varlen attention: backend='auto' runs torch_varlen's kernels: %s", reason)


def select(backend: Optional[str], q, k, v, **features) -> bool:
    """True when this call runs on FA4. ``features`` are ``supported``'s keyword arguments."""
    if backend not in (None, *BACKENDS):
        raise ValueError("backend must be None, 'auto', 'torch_varlen', 'triton', 'hopper' or "
                         f"'fa4', got {backend!r}")
    if backend in ("torch_varlen", "triton", "hopper"):
        return False
    ok, reason = supported(q, k, v, **features)
    if ok:
        ok, reason = available()
    if backend == "fa4":
        if not ok:
            raise RuntimeError(f"backend='fa4' cannot run this call: {reason}")
        return True
    _log_once("fa4" if ok else "torch_varlen", reason)
    return ok


# ---------------------------------------------------------------- launches


def _window(window_left: int, window_right: int):
    """Ours (-1 = unbounded; causal = right 0) -> FA4's (None = unbounded)."""
    return (None if window_left < 0 else int(window_left)), (None if window_right < 0 else int(window_right))


def _cover_tails(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int):
    """Append (Lq 0, keys cu_k[-1]:total_k) and (queries cu_q[-1]:total_q, Lk 0) on the device."""
    cu_q = torch.cat([cu_seqlens_q, cu_seqlens_q[-1:], cu_seqlens_q.new_full((1,), total_q)])
    cu_k = F.pad(cu_seqlens_k, (0, 2), value=total_k)
    return cu_q, cu_k


def _like(grad, ref):
    """grad in the layout of torch.empty_like(ref), which the backward's fake promises."""
    if ref.is_contiguous():
        return grad
    out = torch.empty_like(ref)
    return grad if out.stride() == grad.stride() else out.copy_(grad)


def _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, window_left, window_right, softcap):
    """Checks, then (interface, cu_seqlens_q/k with the tails covered, FA4's window)."""
    check_attention_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, window_left=window_left,
                           window_right=window_right, softcap=softcap)
    cu_q, cu_k = _cover_tails(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    return (_fa4_interface(), cu_q, cu_k, *_window(window_left, window_right))


def merge_sink(out, lse, sink, cu_seqlens_q):
    """Fold sink logits (H,) into attention over the keys alone, exactly: with the keys' lse,
    the sink-inclusive lse' = logaddexp(lse, sink_h) and out' = out * exp(lse - lse'), computed
    in lse's dtype (float32 for FA4's inputs; out' is rounded to out's dtype once more). Rows past cu_seqlens_q[-1] (in no
    sequence) keep out 0 and lse -inf; a row that sees no key gets out 0 and lse sink_h. Plain
    torch ops on the device, no host sync."""
    merged = torch.logaddexp(lse, sink.to(lse.dtype)[:, None])
    rows = torch.arange(lse.shape[1], device=lse.device)
    merged = torch.where(rows < cu_seqlens_q[-1], merged, lse)
    scale = torch.where(merged == float("-inf"), 0.0, torch.exp(lse - merged))  # (H, total_q)
    return (out.to(lse.dtype) * scale.transpose(0, 1)[:, :, None]).to(out.dtype), merged


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left=-1, window_right=-1,
            softcap=0.0, sink=None):
    """FA4 forward -> (out (total_q, H, Dv) in q's dtype, lse (H, total_q) float32).

    ``sink`` (H,) float32: FA4's ``learnable_sink`` takes bfloat16 logits (flash-attn-4
    4.0.0b36; float32 would be rounded) and its backward gives no gradient for them, so FA4
    runs over the keys alone and ``merge_sink`` folds the sink in exactly. The backward needs
    no change: FA4's backward with the sink-inclusive lse and out gives dq, dk, dv, and
    autograd.py's ``sink_grad`` gives dsink."""
    check_sink(q, sink)
    fa4, cu_q, cu_k, left, right = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, window_left,
                                            window_right, softcap)
    with torch.cuda.device(q.device):
        out, lse = fa4._flash_attn_fwd(
            q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=None, max_seqlen_k=None, softmax_scale=float(softmax_scale),
            causal=False, softcap=float(softcap), window_size_left=left,
            window_size_right=right, return_lse=True,
        )[:2]
    return (out, lse) if sink is None else merge_sink(out, lse, sink, cu_seqlens_q)


def backward(grad_out, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, softmax_scale,
             window_left=-1, window_right=-1, softcap=0.0, deterministic=False, grad_lse=None):
    """FA4 backward -> (grad_q, grad_k, grad_v), each in its input's dtype and layout."""
    fa4, cu_q, cu_k, left, right = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, window_left,
                                            window_right, softcap)
    with torch.cuda.device(q.device):
        dq, dk, dv = fa4._flash_attn_bwd(
            q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
            grad_out.to(q.dtype).contiguous(), softmax_lse.float().contiguous(),
            float(softmax_scale), False, float(softcap), window_size_left=left,
            window_size_right=right, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=None,
            max_seqlen_k=None, deterministic=bool(deterministic),
            dlse=None if grad_lse is None else grad_lse.float().contiguous(),
        )[:3]
    return _like(dq, q), _like(dk, k), _like(dv, v)
