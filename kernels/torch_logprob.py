"""Tiled PyTorch implementation: the CPU default and the fallback everywhere.

The rows are cut into equal row blocks of at most `_ROW_BLOCK` rows and the vocabulary into tiles, so
that one (rows x vocab) float32 logits tile stays near `_TILE_ELEMS` elements (2 MiB: larger tiles are
no faster and raise the peak; measured: docs/KERNELS.md). Large row blocks keep every matmul efficient
(a matmul with few rows runs well below the rate of a large one), equal blocks mean a compacted row set
never ends in a tiny block that still streams the whole weight.

Per row block:
  stats sweep    z = h W^T / T tile by tile, a logsumexp per tile merged across tiles (online max /
                 sum-exp / entropy term when the entropy is asked for) -> lse, entropy     1 matmul
  gradient sweep recompute z per tile, dz = d loss / d z, dh += dz W, dW[tile] += dz^T h  3 matmuls
The target logit and the one-hot part of dz touch one column per row: they are gathered from W once
per row block instead of being picked out of every tile. Without an entropy gradient a tile of dz is
-sign(g) exp(z - lse + log|g|), so the logits matmul carries the bias (addmm) and one exp pass forms
the tile. Four matmuls are the floor at this memory: a single sweep needs each row's lse before its
first gradient tile, i.e. a row block's logits over the whole vocabulary kept alive.
Frozen head (`token_loss` with a weight that does not require a gradient): one sweep, two matmuls per
tile. The stats sweep also accumulates E_p[W] = sum_v p_v W_v flash-attention style (running max, rescale,
divide by the sum-exp at the end), and dh = g (W[target] - E_p[W]) / T once loss_fn has given g from the
final logp; no dW, no gradient sweep (see `_FusedLoss`).
`token_logprobs` runs the stats sweep in forward and the gradient sweep in backward; `token_loss`
runs both in its forward (the gradients are ready when backward is called and backward only scales
them), so neither keeps more than one logits tile alive. Half-precision inputs are computed in float32
one weight tile at a time, so the results are at least as accurate as the naive full-logits
computation in the input dtype.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

_TILE_ELEMS = 1 << 19   # 512K float32 = 2 MiB per logits tile (1024 rows x 512 vocabulary entries)
_ROW_BLOCK = 1024       # rows per block (blocks are equal-sized: ceil(N / ceil(N / 1024)))
_MIN_VOCAB_TILE = 256


@dataclass(frozen=True)
class _Plan:
    temperature: float
    with_entropy: bool
    row_block: int
    vocab_tile: int


def _plan(n: int, v: int, temperature: float, with_entropy: bool, row_block: int | None = None) -> _Plan:
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


_PIECE = 256  # rows per piece of the per-token gathers below (bounds their temporaries)


def _target_logits(hs, weight, targets):
    """z[i, targets[i]] for the rows hs (already divided by T): one gathered row of W per token."""
    out = torch.empty(hs.shape[0], dtype=hs.dtype, device=hs.device)
    for a in range(0, hs.shape[0], _PIECE):
        w_t = _f32(weight[targets[a:a + _PIECE]])
        out[a:a + _PIECE] = torch.bmm(hs[a:a + _PIECE].unsqueeze(1), w_t.unsqueeze(2)).view(-1)
    return out


def _add_target_terms(hs, weight, targets, g, dh, dw):
    """The one-hot part of dz = g (onehot(target) - p): dh += g W[target], dW[target] += g hs
    (hs may be None without dW)."""
    for a in range(0, targets.shape[0], _PIECE):
        t, gp = targets[a:a + _PIECE], g[a:a + _PIECE].unsqueeze(1)
        if dh is not None:
            dh[a:a + _PIECE].addcmul_(_f32(weight[t]), gp)
        if dw is not None:
            dw.index_add_(0, t, hs[a:a + _PIECE] * gp)


def _row_stats(hs, weight, wf_tiles, targets, p: _Plan, buf, buf2, expect=None):
    """One stats sweep over the vocabulary for the rows hs (already divided by T).

    Returns (logp, lse, entropy or None). Without entropy (and without `expect`) each tile contributes its
    own logsumexp, merged with logaddexp. Otherwise the sweep keeps a running max m and
    S = sum exp(z - m), E = sum exp(z - m) (z - m) <= 0; moving m -> m' multiplies both by
    a = exp(m - m') and adds (m - m') S to E. At the end lse = m + log S and
    entropy = lse - E_p[z] = log S - E / S (two non-negative terms: no cancellation).

    expect: an (rows, H) buffer of the working dtype, or None. When given, the sweep also accumulates
    A = sum_v exp(z_v - m) W_v the way flash attention accumulates its output (A <- a A + exp(z - m') W_tile
    per tile, a second matmul per tile) and leaves E_p[W] = A / S in it: with a frozen head that is all
    d logp / dh needs (see `_frozen_dh`)."""
    r = hs.shape[0]
    dt = hs.dtype
    zt = _target_logits(hs, weight, targets)
    if not p.with_entropy and expect is None:
        lse = torch.full((r,), -math.inf, dtype=dt, device=hs.device)
        for _, wt in wf_tiles():
            z = torch.mm(hs, wt.t(), out=buf[:r, : wt.shape[0]])
            m = z.amax(dim=1)   # in place below: torch.logsumexp would allocate a second tile
            tile_lse = z.sub_(m.unsqueeze(1)).exp_().sum(dim=1).log_().add_(m)
            lse = torch.logaddexp(lse, tile_lse)
        return zt - lse, lse, None
    m = torch.full((r,), -math.inf, dtype=dt, device=hs.device)
    s_acc = torch.zeros(r, dtype=dt, device=hs.device)
    e_acc = torch.zeros(r, dtype=dt, device=hs.device) if p.with_entropy else None
    if expect is not None:
        expect.zero_()   # the first tile multiplies it by exp(-inf) = 0: no garbage may be nan
    for a, wt in wf_tiles():
        b = a + wt.shape[0]
        z = torch.mm(hs, wt.t(), out=buf[:r, : b - a])
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)
        zs = z.sub_(m_new.unsqueeze(1))
        ex = torch.exp(zs, out=buf2[:r, : b - a]) if e_acc is not None else zs.exp_()
        tile_s = ex.sum(dim=1)
        if expect is not None:
            expect.mul_(alpha.unsqueeze(1)).addmm_(ex, wt)
        if e_acc is not None:
            shift = torch.where(s_acc > 0, s_acc * (m - m_new), 0.0)  # first tile: m = -inf, S = 0
            e_acc.add_(shift).mul_(alpha).add_(ex.mul_(zs).sum(dim=1))
        s_acc.mul_(alpha).add_(tile_s)
        m = m_new
    log_s = s_acc.log()
    lse = m + log_s
    if expect is not None:
        expect.div_(s_acc.unsqueeze(1))
    return zt - lse, lse, (log_s - e_acc / s_acc if e_acc is not None else None)


def _frozen_dh(weight, targets, g, dh):
    """dh <- g (W[target] - E_p[W]) = sum_v g (onehot_v - p_v) W_v, in place: the gradient w.r.t. hs of
    sum g logp when W is frozen; dh holds E_p[W] from `_row_stats` (the sweep accumulated it there)."""
    dh.mul_(g.neg().unsqueeze(1))
    _add_target_terms(None, weight, targets, g, dh, None)


def _grad_sweep(hs, weight, wf_tiles, targets, lse, g_logp, ent, g_ent, p: _Plan, buf, buf2, dh_out, dw):
    """dz = d loss / d z for z = hs W^T; dh_out <- dz W; dW += dz^T hs.

    d logp / dz = onehot(target) - p,  d entropy / dz = -p (z - E_p[z]),  p = exp(z - lse).
    The one-hot part touches one column per row and is applied once, outside the tile loop:
    dh += g W[target], dW[target] += g hs. Without an entropy gradient the dense part of a tile is
    -g p = -sign(g) exp(z - lse + log|g|): the bias rides in the logits matmul (addmm), one exp
    pass forms the tile, and sign(g) is applied to hs (for dW) and to the finished dh rows."""
    r = hs.shape[0]
    if dh_out is not None:
        dh_out.zero_()
    if g_ent is None:
        bias = (g_logp.abs().log() - lse).unsqueeze(1)
        sign = torch.sign(g_logp).unsqueeze(1)
        # dW[tile] -= q^T (sign hs); a uniform sign (NSR-PreRL, positive-weight losses) needs no copy
        known = not is_fake(g_logp)   # fake tensors (memory plans) take the mixed-sign branch, the largest
        if dw is None or known and bool((g_logp >= 0).all()):
            hs_dw, alpha = hs, -1.0
        elif known and bool((g_logp <= 0).all()):
            hs_dw, alpha = hs, 1.0
        else:
            hs_dw, alpha = hs * sign, -1.0
        for a, wt in wf_tiles():
            b = a + wt.shape[0]
            q = torch.addmm(bias, hs, wt.t(), out=buf[:r, : b - a]).exp_()   # |g| p >= 0
            if dh_out is not None:
                dh_out.addmm_(q, wt)
            if dw is not None:
                dw[a:b].addmm_(q.t(), hs_dw, alpha=alpha)
        if dh_out is not None:
            dh_out.mul_(sign.neg())
    else:
        gl = g_logp.unsqueeze(1)
        for a, wt in wf_tiles():
            b = a + wt.shape[0]
            z = torch.mm(hs, wt.t(), out=buf[:r, : b - a])
            zs = z.sub_(lse.unsqueeze(1))
            pr = torch.exp(zs, out=buf2[:r, : b - a])
            # z - E[z] = (z - lse) + entropy;  dz = -p * (g_logp + g_ent * (z - E[z]))
            dz = zs.add_(ent.unsqueeze(1)).mul_(g_ent.unsqueeze(1)).add_(gl).mul_(pr).neg_()
            if dh_out is not None:
                dh_out.addmm_(dz, wt)
            if dw is not None:
                dw[a:b].addmm_(dz.t(), hs)
    _add_target_terms(hs, weight, targets, g_logp, dh_out, dw)


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
            lp, ls, en = _row_stats(_scaled_rows(h, s, e, inv_t), weight, tiles, targets[s:e], p, buf, buf2)
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
            _grad_sweep(_scaled_rows(h, s, e, inv_t), weight, tiles, targets[s:e], lse[s:e], g_logp[s:e].to(dt),
                        ent[s:e] if g_ent is not None else None,
                        g_ent[s:e].to(dt) if g_ent is not None else None,
                        p, buf, buf2, dh[s:e] if need_dh else None, dw)
        # z = (h / T) W^T: dh = (dz W) / T, dW = dz^T (h / T) (already scaled in the sweep)
        gh = dh.mul_(inv_t).to(h.dtype) if need_dh else None
        gw = dw.to(weight.dtype) if need_dw else None
        return gh, gw, None, None


def chunked_token_logprobs(h, weight, targets, temperature: float, with_entropy: bool,
                           row_block: int | None = None):
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


def loss_and_grad(loss_fn: Callable, logp: torch.Tensor, rows: torch.Tensor):
    """(sum of loss_fn(logp, rows) without graph, d sum / d logp or None when the loss ignores logp)."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        loss = loss_fn(lp, rows)
        if loss.shape != lp.shape:
            raise ValueError(f"loss_fn must return per-token losses of shape {tuple(lp.shape)}, "
                             f"got {tuple(loss.shape)}")
        loss_sum = loss.sum()
        (g,) = torch.autograd.grad(loss_sum, lp, allow_unused=True)
    return loss_sum.detach(), g


class PrecomputedGradsLoss(torch.autograd.Function):
    """Backward of the token_loss Functions (inputs h, weight, targets, rows, loss_fn, params), whose forward
    forms the gradients: it scales ctx.grads = (dh or None, dW or None) once, cast to ctx.dtypes."""

    @staticmethod
    def backward(ctx, grad_out, *_grad_entropy):
        if ctx.grads is None:
            raise RuntimeError("token_loss hands its precomputed gradients to autograd once; "
                               "call token_loss again instead of backpropagating twice through one result")
        (dh, dw), ctx.grads = ctx.grads, None
        h_dtype, w_dtype = ctx.dtypes
        gh = dh.mul_(grad_out).to(h_dtype) if dh is not None else None
        gw = dw.mul_(grad_out).to(w_dtype) if dw is not None else None
        return gh, gw, None, None, None, None


class _FusedLoss(PrecomputedGradsLoss):
    """Forward: per row block a stats sweep, loss_fn, and a gradient sweep; backward scales the result.
    With p.with_entropy the stats sweep also yields each row's entropy (a second, non-differentiable output).

    Frozen head (weight without requires_grad, hidden with it): no dW, and no gradient sweep either. Per row
    block the stats sweep also accumulates E_p[W] (`_row_stats` with `expect`: two matmuls per tile), in the
    block's rows of dh itself (no extra buffer); once the sweep has ended, logp is final, loss_fn gives
    g = d loss / d logp, and dh = g (W[target] - E_p[W]) / T in place (`_frozen_dh`, no matmul). That order is
    why E_p[W] is kept normalised per row rather than scaled by g during the sweep: g is not known before logp
    is.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, rows, loss_fn, p: _Plan):
        n, v = h.shape[0], weight.shape[0]
        dt = _work_dtype(h)
        inv_t = 1.0 / p.temperature
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty(h.shape, dtype=dt, device=h.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=dt, device=h.device) if need_dw else None
        total = torch.zeros((), dtype=dt, device=h.device)
        ent = torch.empty(n, dtype=dt, device=h.device) if p.with_entropy else None
        tiles = _weight_tiles(weight, p.vocab_tile)
        buf, buf2 = _buffers(p, v, dt, h.device, p.with_entropy)
        frozen = need_dh and not need_dw
        for s in range(0, n, p.row_block):
            e = min(s + p.row_block, n)
            hs = _scaled_rows(h, s, e, inv_t)
            logp, lse, en = _row_stats(hs, weight, tiles, targets[s:e], p, buf, buf2,
                                       dh[s:e] if frozen else None)   # E_p[W], accumulated in place
            if ent is not None:
                ent[s:e] = en
            loss_sum, g = loss_and_grad(loss_fn, logp, rows[s:e])
            total += loss_sum.to(total.dtype)
            if g is None or not (need_dh or need_dw):
                if need_dh:
                    dh[s:e].zero_()
                continue
            if frozen:
                _frozen_dh(weight, targets[s:e], g.to(dt), dh[s:e])
                continue
            _grad_sweep(hs, weight, tiles, targets[s:e], lse, g.to(dt), None, None, p, buf, None,
                        dh[s:e] if need_dh else None, dw)
        if need_dh:
            dh.mul_(inv_t)
        # Plain attributes, not save_for_backward: backward hands these very tensors to autograd, which
        # can then adopt them as .grad without a copy (one d_weight in the peak, not two).
        ctx.grads, ctx.dtypes = (dh, dw), (h.dtype, weight.dtype)
        if ent is None:
            return total
        ctx.mark_non_differentiable(ent)
        return total, ent



def fused_token_loss(h, weight, targets, rows, loss_fn: Callable, temperature: float,
                     row_block: int | None = None, with_entropy: bool = False):
    """(loss, per-row entropy or None): the entropy comes from the same stats sweep, without gradient."""
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()).float() * 0, (h.new_zeros(0, dtype=torch.float32) if with_entropy else None)
    p = _plan(h.shape[0], weight.shape[0], temperature, with_entropy, row_block)
    out = _FusedLoss.apply(h, weight, targets, rows, loss_fn, p)
    return out if with_entropy else (out, None)
