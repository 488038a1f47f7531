"""Public entry points of fastprerl.kernels.

Per-token log-probs of `targets` under softmax(hidden @ weight.T / temperature), computed without
materialising the (rows x vocab) logits, for an optional compacted subset of rows.

Implementations (``impl``):
  "triton"  fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1, for tests)
  "torch"   chunked PyTorch (rows x vocab tiles, online logsumexp); the CPU default
  "naive"   full logits; the oracle, small shapes only
  "auto"    "triton" on CUDA tensors when Triton is importable, else "torch"; announced once.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import compute_logprobs, token_logprobs_op
from .reference import naive_token_logprobs

log = logging.getLogger("fastprerl.kernels")

IMPLS = ("auto", "triton", "torch", "naive")
_announced: set = set()


@dataclass
class TokenLogprobs:
    """Result of `token_logprobs`: every field has shape (N,) and dtype float32.

    Rows outside `rows` hold 0 in every field."""
    logp: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map "auto" to a concrete implementation and announce the choice once per (impl, device type).
    float64 inputs always take the torch path (the Triton kernels compute in float32)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        triton_ok = device.type == "cuda" and dtype != torch.float64 and _triton_usable(device)
        chosen = "triton" if triton_ok else "torch"
        key = (chosen, device.type)
        if key not in _announced and not torch.compiler.is_compiling():
            _announced.add(key)
            log.info("fastprerl.kernels: impl='auto' -> %r on %s", chosen, device.type)
        return chosen
    if impl == "triton" and not _triton_usable(device):
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                           f"got tensors on {device}")
    return impl


def _check_inputs(hidden, weight, targets, rows, temperature):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, H={hidden.shape[1]}), got shape {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be ({hidden.shape[0]},), got shape {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"hidden dtype must be float32/bfloat16/float16/float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if rows is not None:
        if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"rows must be a 1-D int64 index, got shape {tuple(rows.shape)} {rows.dtype}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _compact(hidden, targets, rows, vocab: int):
    """(hidden, targets) of the active rows; their targets must index the vocabulary (inactive rows
    may hold anything, e.g. an ignore index such as -100)."""
    if rows is None:
        h, t = hidden, targets.long()
    else:
        rows = rows.to(device=hidden.device, dtype=torch.long)
        h, t = hidden.index_select(0, rows), targets.index_select(0, rows).long()
    if t.numel() and not torch.compiler.is_compiling() and not _is_fake(t):   # fake tensors (memory plans, tracing) hold no values to check
        lo, hi = torch.aminmax(t)
        if int(lo) < 0 or int(hi) >= vocab:
            raise ValueError(f"targets of the active rows must lie in [0, {vocab}) (the weight's rows), "
                             f"got min {int(lo)}, max {int(hi)}; pass `rows` to leave out ignored positions")
    return h, t


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _scatter(values: torch.Tensor | None, n: int, rows):
    if values is None or rows is None:
        return values
    out = values.new_zeros(n)
    return out.index_copy(0, rows.to(device=values.device, dtype=torch.long), values)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   rows: torch.Tensor | None = None, temperature: float = 1.0,
                   with_entropy: bool = False, impl: str = "auto",
                   deterministic: bool = False) -> TokenLogprobs:
    """log softmax(hidden @ weight.T / temperature)[targets] per row, without (N, V) logits.

    hidden (N, H) fp32/bf16/fp16, weight (V, H) same dtype, targets (N,) int64.
    rows: optional int64 index of the active rows; only these are computed (compaction), the others
    get 0. Differentiable w.r.t. hidden and weight, through entropy too when `with_entropy`.
    `deterministic` selects the Triton backward that accumulates dW without atomics.
    """
    _check_inputs(hidden, weight, targets, rows, temperature)
    impl = resolve_impl(impl, hidden.device, hidden.dtype)
    n = hidden.shape[0]
    h, t = _compact(hidden, targets, rows, weight.shape[0])
    if torch.compiler.is_compiling():   # traced: one custom-op node (ops.py)
        logp, ent, lse = token_logprobs_op(h, weight, t, float(temperature), bool(with_entropy), impl)
        ent = ent if with_entropy else None
    else:
        logp, ent, lse = compute_logprobs(h, weight, t, temperature, with_entropy, impl, deterministic)
    return TokenLogprobs(logp=_scatter(logp, n, rows), entropy=_scatter(ent, n, rows),
                         lse=_scatter(lse, n, rows))


@torch.no_grad()
def token_logprobs_no_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           rows: torch.Tensor | None = None, temperature: float = 1.0,
                           with_entropy: bool = False, impl: str = "auto") -> TokenLogprobs:
    """`token_logprobs` without autograd: old-policy / reference-model log-probs."""
    return token_logprobs(hidden.detach(), weight.detach(), targets, rows=rows, temperature=temperature,
                          with_entropy=with_entropy, impl=impl)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
               rows: torch.Tensor | None = None, temperature: float = 1.0, impl: str = "auto",
               chunk_rows: int | None = None, entropy_out: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar sum over active rows of loss_fn(logp_chunk, row_index_chunk).

    loss_fn gets float32 log-probs of a chunk of active rows and the int64 indices (into the N rows) of
    those rows, and returns per-token losses of the same shape; it must be differentiable in torch.
    The loss math stays in torch; the vocabulary sweep is fused. With impl="torch" the gradients
    w.r.t. hidden and weight are formed during the forward (per row block: a stats sweep, loss_fn,
    a gradient sweep), so autograd keeps no logits and backward only scales them. With a frozen head
    (`weight.requires_grad` False, `hidden` requiring grad) no dW is formed and there is no gradient sweep:
    one sweep per row block accumulates E_p[W] beside the logsumexp (two matmuls per vocabulary tile), then,
    with logp final, loss_fn gives g = d loss / d logp and dh = g (W[target] - E_p[W]) / T (impl="torch"
    per row block; impl="triton" in one launch, then loss_fn once over all active rows). `chunk_rows`
    caps the rows per block of the torch path (default 1024). `entropy_out`, a float32 (N,) tensor on
    hidden's device, receives the entropy of every active row (0 elsewhere), without gradient, from the same
    vocabulary sweep (no second pass over the LM head).
    """
    _check_inputs(hidden, weight, targets, rows, temperature)
    impl = resolve_impl(impl, hidden.device, hidden.dtype)
    h, t = _compact(hidden, targets, rows, weight.shape[0])   # all rows: no copy of hidden (nor of its gradient)
    if rows is None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
    rows = rows.to(device=hidden.device, dtype=torch.long)
    want_ent = entropy_out is not None
    if want_ent and (entropy_out.shape != (hidden.shape[0],) or entropy_out.device != hidden.device):
        raise ValueError(f"entropy_out must be a ({hidden.shape[0]},) tensor on {hidden.device}, got "
                         f"{tuple(entropy_out.shape)} on {entropy_out.device}")
    frozen = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    if torch.compiler.is_compiling():   # traced: the log-prob custom op, then loss_fn on all rows (ops.py)
        logp, ent, _ = token_logprobs_op(h, weight, t, float(temperature), want_ent, impl)
        loss = loss_fn(logp, rows).sum()
        ent = ent if want_ent else None
    elif impl == "torch":
        from .torch_logprob import fused_token_loss
        loss, ent = fused_token_loss(h, weight, t, rows, loss_fn, temperature, row_block=chunk_rows,
                                     with_entropy=want_ent)
    elif impl == "triton" and frozen and t.numel():
        from .triton_logprob import triton_frozen_token_loss
        loss, ent = triton_frozen_token_loss(h, weight, t, rows, loss_fn, temperature, want_ent)
    else:
        if impl == "naive":
            logp, ent, _ = naive_token_logprobs(h, weight, t, temperature, with_entropy=want_ent)
        else:
            from .triton_logprob import triton_token_logprobs
            logp, ent, _ = triton_token_logprobs(h, weight, t, temperature, want_ent, False)
        if logp.numel() == 0:
            loss = (hidden.sum() * 0 + weight.sum() * 0).float()
        else:
            loss = loss_fn(logp.float(), rows).sum()
    if want_ent:
        with torch.no_grad():
            entropy_out.zero_().index_copy_(0, rows, ent.detach().to(entropy_out.dtype))
    return loss
