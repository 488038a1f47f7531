"""Forward kernel of the fused log-probs: per-row online logsumexp (+ entropy) over the vocabulary tiles.

    logits = h @ weight.T            h (M, H), weight (V, H), fp32 / bf16 / fp16
    z      = logits * inv_temperature
    lse    = logsumexp_v z_v
    logp   = z_t - lse               (t the target column of each row)
    ent    = lse - E_p[z]            p = softmax(z)

_logprob_fwd_kernel, grid (row blocks, vocabulary splits): each program sweeps the vocabulary tiles of its
split (kernels/triton_tiles.py: logits_tile) with an online logsumexp and writes per-split partials
(running max m, sum s = sum exp(z - m), a = sum exp(z - m) * (z - m), and the target logit); `merge_splits`
combines the splits (a few (M,) torch ops). One split is the plain "one program per row block" sweep; more
splits keep the GPU busy when there are few row blocks. Keeping `a` relative to the running max gives the
entropy as log(s) - a / s with no cancellation between lse and E[z].

HAS_EXPECT (frozen head, kernels/triton_logprob.py: triton_frozen_forward): the same sweep also accumulates
A = sum_v exp(z_v - m) W_v per row and split the way flash attention accumulates its output: per tile
A <- alpha A + exp(z - m_new) @ W_tile, a second `tl.dot` per tile, A held in an fp32 (splits, M, H) buffer
that the program owns (read-modify-write per K slice, as the deterministic d_h kernel does with d_h: its
(BLOCK_M x H) fp32 slab is read and written once per vocabulary tile; that traffic, not the two matmuls, is
what to measure first on a GPU). E_p[W] = sum_s exp(m_s - lse) A_s, after the launch.

Targets: on sm_90 the 128-row tile runs on wgmma with both operands staged by 16-byte cp.async in a
multi-stage pipeline; 16-row tiles (M <= 16) use mma.sync (wgmma needs 64 rows per warpgroup). On sm_80
mma.sync keeps its operands in registers, so its K slices are narrower (kernels/triton_config.py). No TMA:
Triton emits it only for tensor descriptors / block pointers, which this code does not use (their APIs
differ between Triton 3.6 and 3.9); cp.async already moves 16 bytes per thread and instruction. The SASS,
registers and spills per configuration (tools/triton_compile_check.py): docs/KERNELS.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_config import KernelConfig, dot_precision
from .triton_runtime import Launch, jit
from .triton_tiles import NEG, add_product_rows, logits_tile

__all__ = ["forward_launch", "forward_splits", "forward_partials", "merge_splits"]


@jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, t_ptr,
    m_ptr, s_ptr, a_ptr, zt_ptr,              # (splits, M) fp32 partials, row stride `stride_part`
    ew_ptr,                                   # (splits, M, H) fp32 zeros, contiguous (HAS_EXPECT only)
    M, V, H, cols_per_split,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_t, stride_part,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr, HAS_EXPECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < M
    tgt = tl.load(t_ptr + offs_m * stride_t, mask=mask_m, other=-1).to(tl.int64)

    m_run = tl.zeros((BLOCK_M,), dtype=tl.float32) + NEG
    s_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_M,), dtype=tl.float32)

    n_start = pid_s * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, V)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < n_end
        acc = logits_tile(h_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, H,
                          stride_hm, stride_hk, stride_wv, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        z = tl.where(mask_n[None, :], acc * inv_temperature, NEG)

        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        alpha = tl.exp(m_run - m_new)
        zc = z - m_new[:, None]
        e = tl.exp(zc)
        if HAS_ENTROPY:
            # sum exp(z - m_new) (z - m_new) over the past = alpha * (a + (m_old - m_new) * s_old)
            a_run = alpha * (a_run + (m_run - m_new) * s_run) + tl.sum(e * zc, axis=1)
        s_run = s_run * alpha + tl.sum(e, axis=1)
        m_run = m_new
        if HAS_EXPECT:
            # flash-attention style: A <- alpha A + exp(z - m_new) @ W_tile, A = this split's rows of ew
            add_product_rows(ew_ptr + pid_s * M * H, offs_m, mask_m, e.to(w_ptr.dtype.element_ty), w_ptr,
                             offs_n, mask_n, stride_wv, stride_wk, H, BLOCK_K, DOT_PRECISION, False, alpha, True)
            # this program owns these rows of A: order its read-modify-writes across threads
            tl.debug_barrier()
        zt += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)

    out = pid_s * stride_part + offs_m
    tl.store(m_ptr + out, m_run, mask=mask_m)
    tl.store(s_ptr + out, s_run, mask=mask_m)
    tl.store(zt_ptr + out, zt, mask=mask_m)
    if HAS_ENTROPY:
        tl.store(a_ptr + out, a_run, mask=mask_m)


def forward_splits(M: int, V: int, cfg: KernelConfig, sms: int) -> tuple:
    """(splits, vocabulary columns per split) for `cfg` on a device with `sms` multiprocessors."""
    n_tiles = triton.cdiv(V, cfg.block_n)
    row_blocks = triton.cdiv(M, cfg.block_m)
    splits = cfg.vocab_splits
    if splits == 0:
        # about two waves of programs (one program per SM at these tile sizes), each split at
        # least 4 vocabulary tiles; many row blocks -> one split (the plain per-row-block sweep)
        splits = max(1, min((2 * sms + row_blocks // 2) // row_blocks, n_tiles // 4))
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split * cfg.block_n   # no empty split


def forward_partials(M: int, splits: int, device: torch.device) -> torch.Tensor:
    """The (4, splits, M) fp32 partials buffer, its rows padded to a multiple of 16 elements so that every
    partial row starts 64-byte aligned (and the launch specialises its pointers and row stride as such)."""
    return torch.empty((4, splits, triton.cdiv(M, 16) * 16), device=device, dtype=torch.float32)[:, :, :M]


def forward_launch(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, part: torch.Tensor,
                   cols_per_split: int, inv_temperature: float, with_entropy: bool,
                   cfg: KernelConfig, ew: torch.Tensor | None = None) -> Launch:
    """The forward launch writing `part` (4, splits, M) fp32 (`forward_partials`): m, s, a, z_t per split;
    with `ew` ((splits, M, H) fp32 zeros, contiguous) also A = sum_v exp(z_v - m) W_v per split (frozen head)."""
    M, H = h.shape
    V = weight.shape[0]
    splits = part.shape[1]
    if ew is not None and (ew.shape != (splits, M, H) or ew.dtype != torch.float32 or not ew.is_contiguous()):
        raise ValueError(f"ew must be contiguous float32 ({splits}, {M}, {H}), got {tuple(ew.shape)} {ew.dtype}")
    return Launch(
        _logprob_fwd_kernel, (triton.cdiv(M, cfg.block_m), splits),
        (h, weight, t, part[0], part[1], part[2], part[3], ew if ew is not None else part[0], M, V, H,
         cols_per_split, h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), t.stride(0),
         part.stride(1), inv_temperature),
        dict(HAS_ENTROPY=with_entropy, HAS_EXPECT=ew is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
             BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(h.dtype)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def merge_splits(m_p, s_p, a_p, zt_p):
    """(splits, M) partials -> lse, entropy or None, E_p[z] or None, z_t; all (M,) float32."""
    zt = zt_p.sum(0) if zt_p.shape[0] > 1 else zt_p[0]
    if m_p.shape[0] == 1:
        m, s = m_p[0], s_p[0]
        a = a_p[0] if a_p is not None else None
    else:
        m = m_p.amax(0)
        w = torch.exp(m_p - m)
        s = (w * s_p).sum(0)
        a = (w * (a_p + (m_p - m) * s_p)).sum(0) if a_p is not None else None
    log_s = torch.log(s)
    lse = m + log_s
    if a is None:
        return lse, None, None, zt
    mean_shift = a / s                   # E_p[z] - m  (<= 0)
    return lse, log_s - mean_shift, m + mean_shift, zt
