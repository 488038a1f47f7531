"""Chunked PyTorch implementation: the CPU default and the fallback everywhere.

Rows are processed in chunks of `chunk_rows`; each chunk materialises only (chunk_rows x V) float32
logits in one reused buffer, and every elementwise step runs in place on it. Row chunks are sized so
the buffer stays near 16 MiB (see `_default_chunk_rows`). Half-precision inputs are computed in float32
(the weight is upcast once per call), so the results are at least as accurate as the naive full-logits
computation in the input dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

_BUFFER_ELEMS = 1 << 22  # 4M float32 = 16 MiB of logits per chunk


def _default_chunk_rows(n: int, v: int) -> int:
    return max(16, min(max(n, 1), _BUFFER_ELEMS // max(v, 1)))


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _chunk_logits(hc: torch.Tensor, wf: torch.Tensor, buf: torch.Tensor, inv_t: float) -> torch.Tensor:
    z = torch.mm(hc, wf.t(), out=buf[: hc.shape[0]])
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z


def _exp_shifted(z: torch.Tensor, out: torch.Tensor):
    """out <- exp(z - rowmax(z)); returns (out, rowmax, rowsum)."""
    m = z.amax(dim=1, keepdim=True)
    torch.sub(z, m, out=out).exp_()
    return out, m.squeeze(1), out.sum(dim=1)


@dataclass(frozen=True)
class _Params:
    temperature: float
    with_entropy: bool
    chunk_rows: int


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, p: _Params):
        m_rows, v = h.shape[0], weight.shape[0]
        out_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        logp = torch.empty(m_rows, dtype=out_dtype, device=h.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if p.with_entropy else None
        inv_t = 1.0 / p.temperature
        wf = _f32(weight)
        c = p.chunk_rows
        buf = torch.empty(min(c, m_rows), v, dtype=wf.dtype, device=h.device)
        buf2 = torch.empty_like(buf) if p.with_entropy else None
        for s in range(0, m_rows, c):
            e = min(s + c, m_rows)
            z = _chunk_logits(_f32(h[s:e]), wf, buf, inv_t)
            zt = z.gather(1, targets[s:e].view(-1, 1)).squeeze(1)
            if p.with_entropy:
                mx = z.amax(dim=1, keepdim=True)
                zs = z.sub_(mx)
                ex = torch.exp(zs, out=buf2[: e - s])
                sm = ex.sum(dim=1)
                lse_c = mx.squeeze(1) + sm.log()
                # entropy = lse - E[z] = log(sum) - E[z - max]; a pairwise sum keeps fp32 accurate
                ent[s:e] = sm.log() - ex.mul_(zs).sum(dim=1) / sm
            else:
                m = z.amax(dim=1, keepdim=True)
                lse_c = torch.logsumexp(z.sub_(m), dim=1) + m.squeeze(1)
            lse[s:e] = lse_c
            logp[s:e] = zt - lse_c
        ctx.p = p
        ctx.save_for_backward(h, weight, targets, lse, ent if ent is not None else lse)
        if ent is not None:
            ctx.mark_non_differentiable(lse)
            return logp, ent, lse
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, g_logp, *rest):
        h, weight, targets, lse, ent = ctx.saved_tensors
        p: _Params = ctx.p
        g_ent = rest[0] if p.with_entropy else None
        m_rows, v = h.shape[0], weight.shape[0]
        inv_t = 1.0 / p.temperature
        wf = _f32(weight)
        hf_all = _f32(h)
        dh = torch.empty_like(hf_all)
        dw = torch.zeros_like(wf)
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        c = p.chunk_rows
        buf = torch.empty(min(c, m_rows), v, dtype=wf.dtype, device=h.device)
        buf2 = torch.empty_like(buf) if p.with_entropy else None
        for s in range(0, m_rows, c):
            e = min(s + c, m_rows)
            hc = hf_all[s:e]
            z = _chunk_logits(hc, wf, buf, inv_t)
            gl = g_logp[s:e].to(z.dtype)
            if g_ent is not None:
                pr = torch.sub(z, lse[s:e].unsqueeze(1), out=buf2[: e - s]).exp_()
                ez = (lse[s:e] - ent[s:e]).to(z.dtype)
                ge = g_ent[s:e].to(z.dtype)
                # dz = p * (-g_lp - g_ent * (z - E[z])) + g_lp * onehot(target)
                z.sub_(ez.unsqueeze(1)).mul_(-ge.unsqueeze(1)).sub_(gl.unsqueeze(1)).mul_(pr)
                dz = z
            else:
                # dz = -g_lp * p + g_lp * onehot(target), p = exp(z - lse)
                dz = z.sub_(lse[s:e].unsqueeze(1).to(z.dtype)).exp_().mul_(-gl.unsqueeze(1))
            dz.scatter_add_(1, targets[s:e].view(-1, 1), gl.view(-1, 1))
            if inv_t != 1.0:
                dz.mul_(inv_t)
            torch.mm(dz, wf, out=dh[s:e])
            dw.addmm_(dz.t(), hc)
        return dh.to(h.dtype), dw.to(weight.dtype), None, None


def chunked_token_logprobs(h, weight, targets, temperature: float, with_entropy: bool,
                           chunk_rows: Optional[int] = None):
    """(logp, entropy or None, lse) for the rows of h, float32 (float64 for float64 inputs)."""
    c = chunk_rows or _default_chunk_rows(h.shape[0], weight.shape[0])
    p = _Params(float(temperature), bool(with_entropy), int(c))
    if h.shape[0] == 0:
        z = h.new_zeros(0, dtype=torch.float32) + (h.sum() + weight.sum()).float() * 0
        return z, (z.clone() if with_entropy else None), z.detach().clone()
    out = _ChunkedLogprobs.apply(h, weight, targets, p)
    if with_entropy:
        return out
    logp, lse = out
    return logp, None, lse


class _FusedLoss(torch.autograd.Function):
    """Forward: one sweep computing the loss AND its gradients w.r.t. h and weight; backward scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, loss_fn, temperature: float, chunk_rows: int):
        m_rows, v = h.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        wf = _f32(weight)
        hf_all = _f32(h)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hf_all) if need_dh else None
        dw = torch.zeros_like(wf) if need_dw else None
        total = torch.zeros((), dtype=wf.dtype, device=h.device)
        c = chunk_rows
        buf = torch.empty(min(c, m_rows), v, dtype=wf.dtype, device=h.device)
        for s in range(0, m_rows, c):
            e = min(s + c, m_rows)
            hc = hf_all[s:e]
            z = _chunk_logits(hc, wf, buf, inv_t)
            zt = z.gather(1, targets[s:e].view(-1, 1)).squeeze(1)
            ex, mx, sm = _exp_shifted(z, z)
            logp = zt - (mx + sm.log())
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
                continue
            g = g.to(ex.dtype)
            # dz = g * (onehot(target) - p) / T with p = ex / sum(ex)
            dz = ex.mul_((-g * inv_t / sm).unsqueeze(1))
            dz.scatter_add_(1, targets[s:e].view(-1, 1), (g * inv_t).view(-1, 1))
            if need_dh:
                torch.mm(dz, wf, out=dh[s:e])
            if need_dw:
                dw.addmm_(dz.t(), hc)
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
        return gh, gw, None, None, None, None, None


def fused_token_loss(h, weight, targets, rows, loss_fn: Callable, temperature: float,
                     chunk_rows: Optional[int] = None) -> torch.Tensor:
    c = chunk_rows or _default_chunk_rows(h.shape[0], weight.shape[0])
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()).float() * 0
    return _FusedLoss.apply(h, weight, targets, rows, loss_fn, float(temperature), int(c))
