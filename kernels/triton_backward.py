"""Backward kernels of the fused log-probs: recompute each logits tile, form dz (kernels/triton_tiles.py),
and accumulate d_h = dz @ W and d_W = dz^T @ h.

  _logprob_bwd_kernel     (default, fast) grid (row blocks x vocabulary blocks) in grouped order (GROUP_M
                          row blocks share each vocabulary block, for L2 reuse); one tile per program, its
                          d_h and d_W contributions added with fp32 `tl.atomic_add`. Forward + backward =
                          4 matmul-equivalents.
  _logprob_bwd_dh_kernel  (deterministic) grid over row blocks, each sweeping all vocabulary tiles and
  _logprob_bwd_dw_kernel  accumulating its own rows of d_h; grid over vocabulary blocks, each sweeping all
                          row blocks and accumulating its own rows of d_W. No atomics, a fixed summation
                          order: bitwise reproducible, one extra logits recompute.

Inputs per row (fp32, contiguous): lse, E_p[z] (entropy only), g_lp, c = g_lse - g_lp, g_ent (entropy
only). d_h (M, H) and d_W (V, H) are fp32, contiguous and zero-initialised.

The fast backward's gradient accumulation is fp32 atomic adds: every program adds a (BLOCK_M + BLOCK_N) x H
fp32 slab, so its atomic traffic grows with the number of (row block, vocabulary block) programs, beside the
matmuls. If the backward is far from the matmul rate on a GPU, accumulating d_h over several vocabulary tiles
per program before one atomic add (a split-K over V) divides that traffic by the tiles per program. The
SASS and the traffic estimate at the Qwen3-4B head (tools/triton_compile_check.py): docs/KERNELS.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_config import KernelConfig, dot_precision
from .triton_runtime import Launch, jit
from .triton_tiles import add_product_rows, dz_tile, logits_tile, row_grad_inputs

__all__ = ["backward_launch", "backward_dh_launch", "backward_dw_launch"]


@jit
def _logprob_bwd_kernel(
    h_ptr, w_ptr, t_ptr,
    lse_ptr, ez_ptr, glp_ptr, c_ptr, gent_ptr,   # (M,) fp32, contiguous
    dh_ptr, dw_ptr,                              # fp32 (M, H) / (V, H), contiguous
    M, V, H,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_t,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr, HAS_DH: tl.constexpr, HAS_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grouped ordering: GROUP_M consecutive row blocks share each vocabulary block (L2 reuse)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(V, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = (first_pid_m + ((pid % num_pid_in_group) % group_size_m)).to(tl.int64)
    pid_n = ((pid % num_pid_in_group) // group_size_m).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < V

    acc = logits_tile(h_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, H,
                      stride_hm, stride_hk, stride_wv, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    lse, glp, coef, tgt, ez, gent = row_grad_inputs(t_ptr, lse_ptr, ez_ptr, glp_ptr, c_ptr, gent_ptr,
                                                    offs_m, mask_m, stride_t, HAS_ENTROPY)
    dz = dz_tile(acc, offs_n, mask_n, lse, glp, coef, tgt, ez, gent, inv_temperature, HAS_ENTROPY)
    dzc = dz.to(w_ptr.dtype.element_ty)
    if HAS_DH:
        add_product_rows(dh_ptr, offs_m, mask_m, dzc, w_ptr, offs_n, mask_n, stride_wv, stride_wk, H,
                         BLOCK_K, DOT_PRECISION, True, 1.0, False)
    if HAS_DW:
        add_product_rows(dw_ptr, offs_n, mask_n, tl.trans(dzc), h_ptr, offs_m, mask_m, stride_hm, stride_hk,
                         H, BLOCK_K, DOT_PRECISION, True, 1.0, False)


@jit
def _logprob_bwd_dh_kernel(
    h_ptr, w_ptr, t_ptr,
    lse_ptr, ez_ptr, glp_ptr, c_ptr, gent_ptr,
    dh_ptr,                                      # fp32 (M, H), contiguous, zero-initialised
    M, V, H,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_t,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < M
    lse, glp, coef, tgt, ez, gent = row_grad_inputs(t_ptr, lse_ptr, ez_ptr, glp_ptr, c_ptr, gent_ptr,
                                                    offs_m, mask_m, stride_t, HAS_ENTROPY)
    for n0 in range(0, V, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < V
        acc = logits_tile(h_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, H, stride_hm, stride_hk,
                          stride_wv, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        dz = dz_tile(acc, offs_n, mask_n, lse, glp, coef, tgt, ez, gent, inv_temperature, HAS_ENTROPY)
        add_product_rows(dh_ptr, offs_m, mask_m, dz.to(w_ptr.dtype.element_ty), w_ptr, offs_n, mask_n,
                         stride_wv, stride_wk, H, BLOCK_K, DOT_PRECISION, False, 1.0, False)
        # this program owns these rows of d_h: order its read-modify-writes across threads
        tl.debug_barrier()


@jit
def _logprob_bwd_dw_kernel(
    h_ptr, w_ptr, t_ptr,
    lse_ptr, ez_ptr, glp_ptr, c_ptr, gent_ptr,
    dw_ptr,                                      # fp32 (V, H), contiguous, zero-initialised
    M, V, H,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_t,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < V
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        acc = logits_tile(h_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, H, stride_hm, stride_hk,
                          stride_wv, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        lse, glp, coef, tgt, ez, gent = row_grad_inputs(t_ptr, lse_ptr, ez_ptr, glp_ptr, c_ptr, gent_ptr,
                                                        offs_m, mask_m, stride_t, HAS_ENTROPY)
        dz = dz_tile(acc, offs_n, mask_n, lse, glp, coef, tgt, ez, gent, inv_temperature, HAS_ENTROPY)
        add_product_rows(dw_ptr, offs_n, mask_n, tl.trans(dz.to(w_ptr.dtype.element_ty)), h_ptr, offs_m,
                         mask_m, stride_hm, stride_hk, H, BLOCK_K, DOT_PRECISION, False, 1.0, False)
        tl.debug_barrier()


def _args(h, weight, t, rows, outs, inv_temperature) -> tuple:
    """The runtime arguments every backward kernel takes, with its output pointer(s) `outs`."""
    M, H = h.shape
    return (h, weight, t, *rows, *outs, M, weight.shape[0], H, h.stride(0), h.stride(1), weight.stride(0),
            weight.stride(1), t.stride(0), inv_temperature)


def backward_launch(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, rows: tuple,
                    dh: torch.Tensor, dw: torch.Tensor, need_dh: bool, need_dw: bool, has_entropy: bool,
                    inv_temperature: float, cfg: KernelConfig) -> Launch:
    """The atomic backward. rows = (lse, E_p[z], g_lp, c, g_ent), each (M,) fp32 contiguous (E_p[z] and
    g_ent unused without entropy); dh / dw fp32 zeros (either may stand in for the other when not needed)."""
    M, H = h.shape
    V = weight.shape[0]
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(V, cfg.block_n),)
    return Launch(
        _logprob_bwd_kernel, grid,
        _args(h, weight, t, rows, (dh, dw), inv_temperature),
        dict(HAS_ENTROPY=has_entropy, HAS_DH=need_dh, HAS_DW=need_dw, BLOCK_M=cfg.block_m,
             BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
             DOT_PRECISION=dot_precision(h.dtype)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _deterministic_launch(fn, grid, h, weight, t, rows, out, has_entropy, inv_temperature, cfg) -> Launch:
    return Launch(
        fn, grid,
        _args(h, weight, t, rows, (out,), inv_temperature),
        dict(HAS_ENTROPY=has_entropy, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
             DOT_PRECISION=dot_precision(h.dtype)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def backward_dh_launch(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, rows: tuple, dh: torch.Tensor,
                       has_entropy: bool, inv_temperature: float, cfg: KernelConfig) -> Launch:
    """The deterministic d_h: one program per row block."""
    return _deterministic_launch(_logprob_bwd_dh_kernel, (triton.cdiv(h.shape[0], cfg.block_m),), h, weight, t,
                                 rows, dh, has_entropy, inv_temperature, cfg)


def backward_dw_launch(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, rows: tuple, dw: torch.Tensor,
                       has_entropy: bool, inv_temperature: float, cfg: KernelConfig) -> Launch:
    """The deterministic d_W: one program per vocabulary block."""
    return _deterministic_launch(_logprob_bwd_dw_kernel, (triton.cdiv(weight.shape[0], cfg.block_n),), h, weight,
                                 t, rows, dw, has_entropy, inv_temperature, cfg)
