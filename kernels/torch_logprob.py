"""Tiled PyTorch implementation: the CPU default and the fallback everywhere.

The rows are cut into equal row blocks of at most `_ROW_BLOCK` rows and the vocabulary into tiles, so
that one (rows x vocab) float32 logits tile stays near `_TILE_ELEMS` elements (2 MiB; tiles of 2 to 8
MiB ran equally fast on a 2-core CPU, the smallest keeps the peak lowest). Large row blocks keep every
matmul efficient (a matmul with a few dozen rows runs at half the rate), equal blocks mean a compacted
row set never ends in a tiny block that still streams the whole weight.

Per row block:
  stats sweep    z = h W^T / T tile by tile, online max / sum-exp (and the entropy term), plus the
                 target logit -> lse, log p, entropy                                       1 matmul
  gradient sweep recompute z per tile, dz = d loss / d z, dh += dz W, dW[tile] += dz^T h  3 matmuls
`token_logprobs` runs the stats sweep in forward and the gradient sweep in backward; `token_loss`
runs both in its forward (the gradients are ready when backward is called and backward only scales
them), so neither keeps more than one logits tile alive. Half-precision inputs are computed in float32
one weight tile at a time, so the results are at least as accurate as the naive full-logits
computation in the input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

_TILE_ELEMS = 1 << 19   # 512K float32 = 2 MiB per logits tile (1024 rows x 512 vocabulary entries)
_ROW_BLOCK = 1024       # rows per block (blocks are equal-sized: ceil(N / ceil(N / 1024)))
_MIN_VOCAB_TILE = 256


@dataclass(frozen=True)
class _Plan:
    temperature: float
    with_entropy: bool
    row_block: int
    vocab_tile: int


def _plan(n: int, v: int, temperature: float, with_entropy: bool, row_block: Optional[int] = None) -> _Plan:
    cap = max(1, row_block or _ROW_BLOCK)
    blocks = max(1, math.ceil(n / cap))
    r = max(1, math.ceil(n / blocks))
    vt = min(v, max(_MIN_VOCAB_TILE, _TILE_ELEMS // r))
    return _Plan(float(temperature), bool(with_entropy), r, max(1, vt))


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _scaled_rows(h: torch.Tensor, s: int, e: int, inv_t: float) -> torch.Tensor:
    """h[s:e] / T in float32 (float64 stays); the temperature is folded into the rows once."""
    hs = _f32(h[s:e])
    return hs * inv_t if inv_t != 1.0 else hs


def _row_stats(hs, wf_tiles, targets, p: _Plan, buf, buf2):
    """One stats sweep over the vocabulary for the rows hs (already divided by T).

    Returns (logp, lse, entropy or None). Online update with reference max m:
    S = sum exp(z - m), E = sum exp(z - m) (z - m) <= 0; moving m -> m' multiplies both by
    a = exp(m - m') and adds (m - m') S to E. At the end lse = m + log S and
    entropy = lse - E_p[z] = log S - E / S (two non-negative terms: no cancellation)."""
    r = hs.shape[0]
    dt = hs.dtype
    m = torch.full((r,), -math.inf, dtype=dt, device=hs.device)
    s_acc = torch.zeros(r, dtype=dt, device=hs.device)
    e_acc = torch.zeros(r, dtype=dt, device=hs.device) if p.with_entropy else None
    zt = torch.empty(r, dtype=dt, device=hs.device)
    for a, wt in wf_tiles():
        b = a + wt.shape[0]
        z = torch.mm(hs, wt.t(), out=buf[:r, : b - a])
        sel = (targets >= a) & (targets < b)
        if sel.any():
            idx = sel.nonzero().squeeze(1)
            zt[idx] = z[idx, targets[idx] - a]
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)
        zs = z.sub_(m_new.unsqueeze(1))
        if p.with_entropy:
            ex = torch.exp(zs, out=buf2[:r, : b - a])
            tile_s = ex.sum(dim=1)
            shift = torch.where(s_acc > 0, s_acc * (m - m_new), 0.0)  # first tile: m = -inf, S = 0
            e_acc.add_(shift).mul_(alpha).add_(ex.mul_(zs).sum(dim=1))
        else:
            tile_s = zs.exp_().sum(dim=1)
        s_acc.mul_(alpha).add_(tile_s)
        m = m_new
    log_s = s_acc.log()
    lse = m + log_s
    ent = (log_s - e_acc / s_acc) if p.with_entropy else None
    return zt - lse, lse, ent


def _grad_sweep(hs, wf_tiles, targets, lse, g_logp, ent, g_ent, p: _Plan, buf, buf2, dh_out, dw):
    """dz = d loss / d z for z = hs W^T per tile; dh_out <- dz W (sum over tiles); dW[tile] += dz^T hs.

    d logp / dz = onehot(target) - p,  d entropy / dz = -p (z - E_p[z]),  p = exp(z - lse)."""
    r = hs.shape[0]
    if dh_out is not None:
        dh_out.zero_()
    gl = g_logp.unsqueeze(1)
    for a, wt in wf_tiles():
        b = a + wt.shape[0]
        z = torch.mm(hs, wt.t(), out=buf[:r, : b - a])
        zs = z.sub_(lse.unsqueeze(1))
        if g_ent is not None:
            pr = torch.exp(zs, out=buf2[:r, : b - a])
            # z - E[z] = (z - lse) + entropy;  dz = -p * (g_logp + g_ent * (z - E[z]))
            dz = zs.add_(ent.unsqueeze(1)).mul_(g_ent.unsqueeze(1)).add_(gl).mul_(pr).neg_()
        else:
            dz = zs.exp_().mul_(-gl)
        sel = (targets >= a) & (targets < b)
        if sel.any():
            idx = sel.nonzero().squeeze(1)
            dz.index_put_((idx, targets[idx] - a), g_logp[idx], accumulate=True)
        if dh_out is not None:
            dh_out.addmm_(dz, wt)
        if dw is not None:
            dw[a:b].addmm_(dz.t(), hs)


def _weight_tiles(weight: torch.Tensor, vt: int):
    """Callable yielding (start, float32 tile) over the vocabulary (half weights upcast per tile)."""
    def tiles():
        for a in range(0, weight.shape[0], vt):
            yield a, _f32(weight[a:a + vt])
    return tiles


def _buffers(p: _Plan, v: int, dtype, device, two: bool):
    shape = (p.row_block, min(p.vocab_tile, v))
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf, (torch.empty(shape, dtype=dtype, device=device) if two else None)


def _work_dtype(h: torch.Tensor):
    return torch.float64 if h.dtype == torch.float64 else torch.float32


class _TiledLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, p: _Plan):
        n, v = h.shape[0], weight.shape[0]
        dt = _work_dtype(h)
        logp = torch.empty(n, dtype=dt, device=h.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if p.with_entropy else None
        inv_t = 1.0 / p.temperature
        tiles = _weight_tiles(weight, p.vocab_tile)
        buf, buf2 = _buffers(p, v, dt, h.device, p.with_entropy)
        for s in range(0, n, p.row_block):
            e = min(s + p.row_block, n)
            lp, ls, en = _row_stats(_scaled_rows(h, s, e, inv_t), tiles, targets[s:e], p, buf, buf2)
            logp[s:e], lse[s:e] = lp, ls
            if ent is not None:
                ent[s:e] = en
        ctx.p = p
        ctx.save_for_backward(h, weight, targets, lse, ent if ent is not None else lse)
        ctx.mark_non_differentiable(lse)
        return (logp, ent, lse) if ent is not None else (logp, lse)

    @staticmethod
    def backward(ctx, g_logp, *rest):
        h, weight, targets, lse, ent = ctx.saved_tensors
        p: _Plan = ctx.p
        g_ent = rest[0] if p.with_entropy else None
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v = h.shape[0], weight.shape[0]
        dt = _work_dtype(h)
        inv_t = 1.0 / p.temperature
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        tiles = _weight_tiles(weight, p.vocab_tile)
        buf, buf2 = _buffers(p, v, dt, h.device, g_ent is not None)
        dh = torch.empty(h.shape, dtype=dt, device=h.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=dt, device=h.device) if need_dw else None
        for s in range(0, n, p.row_block):
            e = min(s + p.row_block, n)
            _grad_sweep(_scaled_rows(h, s, e, inv_t), tiles, targets[s:e], lse[s:e], g_logp[s:e].to(dt),
                        ent[s:e] if g_ent is not None else None,
                        g_ent[s:e].to(dt) if g_ent is not None else None,
                        p, buf, buf2, dh[s:e] if need_dh else None, dw)
        # z = (h / T) W^T: dh = (dz W) / T, dW = dz^T (h / T) (already scaled in the sweep)
        gh = dh.mul_(inv_t).to(h.dtype) if need_dh else None
        gw = dw.to(weight.dtype) if need_dw else None
        return gh, gw, None, None


def chunked_token_logprobs(h, weight, targets, temperature: float, with_entropy: bool,
                           row_block: Optional[int] = None):
    """(logp, entropy or None, lse) for the rows of h, float32 (float64 for float64 inputs)."""
    p = _plan(h.shape[0], weight.shape[0], temperature, with_entropy, row_block)
    if h.shape[0] == 0:
        z = h.new_zeros(0, dtype=torch.float32) + (h.sum() + weight.sum()).float() * 0
        return z, (z.clone() if with_entropy else None), z.detach().clone()
    out = _TiledLogprobs.apply(h, weight, targets, p)
    if with_entropy:
        return out
    logp, lse = out
    return logp, None, lse


class _FusedLoss(torch.autograd.Function):
    """Forward: per row block a stats sweep, loss_fn, and a gradient sweep; backward scales the result."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, loss_fn, p: _Plan):
        n, v = h.shape[0], weight.shape[0]
        dt = _work_dtype(h)
        inv_t = 1.0 / p.temperature
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty(h.shape, dtype=dt, device=h.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=dt, device=h.device) if need_dw else None
        total = torch.zeros((), dtype=dt, device=h.device)
        tiles = _weight_tiles(weight, p.vocab_tile)
        buf, _ = _buffers(p, v, dt, h.device, False)
        for s in range(0, n, p.row_block):
            e = min(s + p.row_block, n)
            hs = _scaled_rows(h, s, e, inv_t)
            logp, lse, _ = _row_stats(hs, tiles, targets[s:e], p, buf, None)
            with torch.enable_grad():
                lp = logp.detach().requires_grad_(True)
                loss = loss_fn(lp, rows[s:e])
                if loss.shape != lp.shape:
                    raise ValueError(f"loss_fn must return per-token losses of shape {tuple(lp.shape)}, "
                                     f"got {tuple(loss.shape)}")
                loss_sum = loss.sum()
                (g,) = torch.autograd.grad(loss_sum, lp, allow_unused=True)
            total += loss_sum.detach().to(total.dtype)
            if g is None or not (need_dh or need_dw):
                if need_dh:
                    dh[s:e].zero_()
                continue
            _grad_sweep(hs, tiles, targets[s:e], lse, g.to(dt), None, None, p, buf, None,
                        dh[s:e] if need_dh else None, dw)
        if need_dh:
            dh.mul_(inv_t)
        # Plain attributes, not save_for_backward: backward hands these very tensors to autograd, which
        # can then adopt them as .grad without a copy (one d_weight in the peak, not two).
        ctx.grads = (dh, dw)
        ctx.meta = (need_dh, need_dw, h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("token_loss(impl='torch') hands its precomputed gradients to autograd once; "
                               "call token_loss again instead of backpropagating twice through one result")
        (dh, dw), ctx.grads = ctx.grads, None
        need_dh, need_dw, h_dtype, w_dtype = ctx.meta
        gh = dh.mul_(grad_out).to(h_dtype) if need_dh else None
        gw = dw.mul_(grad_out).to(w_dtype) if need_dw else None
        return gh, gw, None, None, None, None


def fused_token_loss(h, weight, targets, rows, loss_fn: Callable, temperature: float,
                     row_block: Optional[int] = None) -> torch.Tensor:
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()).float() * 0
    p = _plan(h.shape[0], weight.shape[0], temperature, False, row_block)
    return _FusedLoss.apply(h, weight, targets, rows, loss_fn, p)
