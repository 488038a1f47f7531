"""The tile code of the Triton kernels, written once: every kernel of kernels/triton_forward.py and
kernels/triton_backward*.py is a loop over (BLOCK_M x BLOCK_N) tiles of logits built from these helpers.

    logits_tile       acc = h[rows] @ W[cols].T, a K-loop of `tl.dot` over BLOCK_K-wide slices of H with
                      fp32 accumulation (the (M, V) logits are never stored)
    row_grad_inputs   per-row inputs of the backward: lse, g_lp, c = g_lse - g_lp, target, and with
                      entropy E_p[z] and g_ent
    dz_tile           d loss / d logits of a tile (see below)
    add_product_rows  out[rows, :] += a @ B[b_rows, :], K slice by K slice, by fp32 atomics or by a
                      read-modify-write of rows the program owns (optionally rescaling out first)

Gradient of a tile (per row, with upstream g_lp, g_ent, g_lse; Ez = E_p[z] = lse - ent):
    d logp / dz_j = onehot_j - p_j
    d lse  / dz_j = p_j
    d ent  / dz_j = -p_j (z_j - Ez)      [ent = lse - sum_k p_k z_k;
                                          d/dz_j sum_k p_k z_k = p_j + p_j z_j - p_j Ez]
    dz_j = g_lp onehot_j + p_j (c - g_ent (z_j - Ez)),   c = g_lse - g_lp
    d logits_j = inv_temperature * dz_j

Conventions: int64 offsets (program ids and aranges are cast before multiplying by strides), every stride
passed explicitly (a unit stride is specialised to the constant 1 by Triton at launch, which is what makes
the K-contiguous loads vectorised), `tl.constexpr` only for block sizes, HAS_* / ATOMIC flags and the dot
input precision. Only APIs common to Triton 3.6 and 3.9 are used (no block pointers, no autotune, no
libdevice). The helpers are `@jit` functions (kernels/triton_runtime.py) that the kernels call; the Triton
interpreter runs such nested calls as plain Python and the compiler inlines them, so one source serves the
CPU tests and the GPU.
"""
from __future__ import annotations

import triton.language as tl

from .triton_runtime import jit

# Finite stand-in for -inf on masked vocabulary columns and the initial running max:
# exp(NEG - m) == 0 and (NEG - m) * 0 == 0, so no inf - inf = nan can appear.
NEG = tl.constexpr(-1.0e30)


@jit
def logits_tile(h_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, H,
                stride_hm, stride_hk, stride_wv, stride_wk,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile h[offs_m] @ W[offs_n].T (zeros outside the masks)."""
    offs_k0 = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + offs_k0
        mask_k = offs_k < H
        a = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@jit
def row_grad_inputs(t_ptr, lse_ptr, ez_ptr, glp_ptr, c_ptr, gent_ptr, offs_m, mask_m, stride_t,
                    HAS_ENTROPY: tl.constexpr):
    """(lse, g_lp, c, target, E_p[z], g_ent) of the rows; rows past M get zeros (so their dz is 0), and
    E_p[z], g_ent are zeros without entropy."""
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    glp = tl.load(glp_ptr + offs_m, mask=mask_m, other=0.0)
    coef = tl.load(c_ptr + offs_m, mask=mask_m, other=0.0)
    tgt = tl.load(t_ptr + offs_m * stride_t, mask=mask_m, other=-1).to(tl.int64)
    if HAS_ENTROPY:
        ez = tl.load(ez_ptr + offs_m, mask=mask_m, other=0.0)
        gent = tl.load(gent_ptr + offs_m, mask=mask_m, other=0.0)
    else:
        ez = tl.zeros_like(lse)
        gent = ez
    return lse, glp, coef, tgt, ez, gent


@jit
def dz_tile(acc, offs_n, mask_n, lse, glp, coef, tgt, ez, gent, inv_temperature,
            HAS_ENTROPY: tl.constexpr):
    """d loss / d logits of the tile whose logits (before the temperature) are `acc`; 0 on masked columns."""
    z = acc * inv_temperature
    p = tl.exp(z - lse[:, None])
    if HAS_ENTROPY:
        dz = p * (coef[:, None] - gent[:, None] * (z - ez[:, None]))
    else:
        dz = p * coef[:, None]
    dz += tl.where(offs_n[None, :] == tgt[:, None], glp[:, None], 0.0)
    return tl.where(mask_n[None, :], dz * inv_temperature, 0.0)


@jit
def add_product_rows(out_ptr, offs_r, mask_r, a, b_ptr, offs_b, mask_b, stride_b, stride_bk, H,
                     BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
                     scale, HAS_SCALE: tl.constexpr):
    """out[offs_r, :H] += a @ B[offs_b, :H] for a (R, Bn) tile `a` and the rows offs_b of B (row stride
    `stride_b`, column stride `stride_bk`); `out` is fp32 (rows, H), contiguous. ATOMIC: fp32
    `tl.atomic_add` (rows shared between programs); else a read-modify-write (rows this program owns).
    HAS_SCALE (read-modify-write only): out[offs_r] = scale[:, None] * out[offs_r] + a @ B, the rescale of a
    running-max accumulator (`scale` (R,) fp32; ignored otherwise)."""
    offs_k0 = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + offs_k0
        mask_k = offs_k < H
        b = tl.load(b_ptr + offs_b[:, None] * stride_b + offs_k[None, :] * stride_bk,
                    mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        part = tl.dot(a, b, input_precision=DOT_PRECISION)
        ptrs = out_ptr + offs_r[:, None] * H + offs_k[None, :]
        msk = mask_r[:, None] & mask_k[None, :]
        if ATOMIC:
            tl.atomic_add(ptrs, part, mask=msk, sem="relaxed")
        else:
            prev = tl.load(ptrs, mask=msk, other=0.0)
            if HAS_SCALE:
                prev = prev * scale[:, None]
            tl.store(ptrs, prev + part, mask=msk)
