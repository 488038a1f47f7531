"""Fused per-token log-probs (+ lse, + optional entropy) in Triton, with a recomputing backward.

    logits = h @ weight.T            h (M, H), weight (V, H), fp32 / bf16 / fp16
    z      = logits * inv_temperature
    lse    = logsumexp_v z_v
    logp   = z_t - lse               (t the target column of each row)
    ent    = lse - E_p[z]            p = softmax(z)

The (M, V) logits are never stored: every kernel recomputes (BLOCK_M x BLOCK_N) tiles of them by a
K-loop of `tl.dot` over BLOCK_K-wide slices of H with fp32 accumulation.

Kernels
  _logprob_fwd_kernel     grid (row blocks, vocab splits). Each program sweeps the vocabulary tiles of
                          its split with an online logsumexp and writes per-split partials (running
                          max m, sum s = sum exp(z - m), a = sum exp(z - m) * (z - m), and the target
                          logit); the launcher merges the splits (a few (M,) torch ops). One split is
                          the plain "one program per row block" sweep; more splits keep the GPU busy
                          when there are few row blocks. Keeping `a` relative to the running max gives
                          the entropy as log(s) - a / s with no cancellation between lse and E[z].
  _logprob_bwd_kernel     (default, fast) grid (row blocks x vocab blocks), grouped ordering for L2
                          reuse; recompute the tile, form dz, then for every K slice
                          d_h[rows, k] += dz @ W[cols, k] and d_W[cols, k] += dz^T @ h[rows, k] with
                          fp32 `tl.atomic_add`. Forward + backward = 4 matmul-equivalents.
  _logprob_bwd_dh_kernel  (deterministic) grid over row blocks, each sweeping all vocabulary tiles and
  _logprob_bwd_dw_kernel  accumulating its own rows of d_h; and grid over vocabulary blocks, each
                          sweeping all row blocks and accumulating its own rows of d_W. No atomics, a
                          fixed summation order: bitwise reproducible, one extra logits recompute.

Gradient of a tile (per row, with upstream g_lp, g_ent, g_lse; Ez = E_p[z] = lse - ent):
    d logp / dz_j = onehot_j - p_j
    d lse  / dz_j = p_j
    d ent  / dz_j = -p_j (z_j - Ez)      [ent = lse - sum_k p_k z_k;
                                          d/dz_j sum_k p_k z_k = p_j + p_j z_j - p_j Ez]
    dz_j = g_lp onehot_j + p_j (c - g_ent (z_j - Ez)),   c = g_lse - g_lp
    d logits_j = inv_temperature * dz_j

Conventions: int64 offsets (program ids and aranges are cast before multiplying by strides), every
stride passed explicitly, the temperature a runtime scalar, `tl.constexpr` only for block sizes,
HAS_* flags and the dot input precision ("ieee" for fp32 operands so fp32 stays exact, the default
otherwise). Only APIs common to Triton 3.6 and 3.9 are used (no block pointers, no autotune, no
libdevice), and the kernels are self-contained (no nested jit helpers) so that they can be
re-wrapped for the interpreter at launch time.

CPU: the kernels run under the Triton interpreter when TRITON_INTERPRET=1, and that flag must be in
the environment BEFORE `triton` is first imported in the process: Triton decorates its own standard
library (tl.sum, tl.max, tl.zeros, tl.cdiv, ...) when `triton.language` is imported, and kernels
interpreted later cannot call a compiled-flavour standard library. The launcher reads the flag at
launch time, re-wraps these kernels if this module was imported under the other setting, and
raises a RuntimeError naming the cause when Triton itself was imported under the other setting.
Under the interpreter bf16 / fp16 `tl.dot` is unreliable, so the launcher computes on fp32 copies
there (gradients are still returned in the input dtypes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["KernelConfig", "LogprobParams", "TritonTokenLogprobs", "triton_token_logprobs",
           "default_config", "triton_interpreted_at_import"]

# Finite stand-in for -inf on masked vocabulary columns and the initial running max:
# exp(_NEG - m) == 0 and (_NEG - m) * 0 == 0, so no inf - inf = nan can appear.
_NEG = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, t_ptr,
    m_ptr, s_ptr, a_ptr, zt_ptr,              # (splits, M) fp32 partials, row stride `stride_part`
    M, V, H, cols_per_split,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_t, stride_part,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < M
    offs_k0 = tl.arange(0, BLOCK_K).to(tl.int64)
    tgt = tl.load(t_ptr + offs_m * stride_t, mask=mask_m, other=-1).to(tl.int64)

    m_run = tl.zeros((BLOCK_M,), dtype=tl.float32) + _NEG
    s_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_M,), dtype=tl.float32)

    n_start = pid_s * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, V)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < n_end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + offs_k0
            mask_k = offs_k < H
            a = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        z = tl.where(mask_n[None, :], acc * inv_temperature, _NEG)

        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        alpha = tl.exp(m_run - m_new)
        zc = z - m_new[:, None]
        e = tl.exp(zc)
        if HAS_ENTROPY:
            # sum exp(z - m_new) (z - m_new) over the past = alpha * (a + (m_old - m_new) * s_old)
            a_run = alpha * (a_run + (m_run - m_new) * s_run) + tl.sum(e * zc, axis=1)
        s_run = s_run * alpha + tl.sum(e, axis=1)
        m_run = m_new
        zt += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)

    out = pid_s * stride_part + offs_m
    tl.store(m_ptr + out, m_run, mask=mask_m)
    tl.store(s_ptr + out, s_run, mask=mask_m)
    tl.store(zt_ptr + out, zt, mask=mask_m)
    if HAS_ENTROPY:
        tl.store(a_ptr + out, a_run, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Backward, fast: 2-D grid with atomics
# ----------------------------------------------------------------------------------------------
@triton.jit
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
    offs_k0 = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < V

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + offs_k0
        mask_k = offs_k < H
        a = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    z = acc * inv_temperature

    # rows past M load zeros everywhere -> dz == 0 there
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    glp = tl.load(glp_ptr + offs_m, mask=mask_m, other=0.0)
    coef = tl.load(c_ptr + offs_m, mask=mask_m, other=0.0)
    tgt = tl.load(t_ptr + offs_m * stride_t, mask=mask_m, other=-1).to(tl.int64)
    p = tl.exp(z - lse[:, None])
    if HAS_ENTROPY:
        ez = tl.load(ez_ptr + offs_m, mask=mask_m, other=0.0)
        gent = tl.load(gent_ptr + offs_m, mask=mask_m, other=0.0)
        dz = p * (coef[:, None] - gent[:, None] * (z - ez[:, None]))
    else:
        dz = p * coef[:, None]
    dz += tl.where(offs_n[None, :] == tgt[:, None], glp[:, None], 0.0)
    dz = tl.where(mask_n[None, :], dz * inv_temperature, 0.0)
    dzc = dz.to(w_ptr.dtype.element_ty)

    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + offs_k0
        mask_k = offs_k < H
        if HAS_DH:
            wk = tl.load(w_ptr + offs_n[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            dh = tl.dot(dzc, wk, input_precision=DOT_PRECISION)
            tl.atomic_add(dh_ptr + offs_m[:, None] * H + offs_k[None, :], dh,
                          mask=mask_m[:, None] & mask_k[None, :], sem="relaxed")
        if HAS_DW:
            hk = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            dw = tl.dot(tl.trans(dzc), hk, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_ptr + offs_n[:, None] * H + offs_k[None, :], dw,
                          mask=mask_n[:, None] & mask_k[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Backward, deterministic: no atomics, fixed summation order
# ----------------------------------------------------------------------------------------------
@triton.jit
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
    offs_k0 = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M

    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    glp = tl.load(glp_ptr + offs_m, mask=mask_m, other=0.0)
    coef = tl.load(c_ptr + offs_m, mask=mask_m, other=0.0)
    tgt = tl.load(t_ptr + offs_m * stride_t, mask=mask_m, other=-1).to(tl.int64)
    if HAS_ENTROPY:
        ez = tl.load(ez_ptr + offs_m, mask=mask_m, other=0.0)
        gent = tl.load(gent_ptr + offs_m, mask=mask_m, other=0.0)

    for n0 in range(0, V, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < V
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + offs_k0
            mask_k = offs_k < H
            a = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        z = acc * inv_temperature
        p = tl.exp(z - lse[:, None])
        if HAS_ENTROPY:
            dz = p * (coef[:, None] - gent[:, None] * (z - ez[:, None]))
        else:
            dz = p * coef[:, None]
        dz += tl.where(offs_n[None, :] == tgt[:, None], glp[:, None], 0.0)
        dz = tl.where(mask_n[None, :], dz * inv_temperature, 0.0)
        dzc = dz.to(w_ptr.dtype.element_ty)

        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + offs_k0
            mask_k = offs_k < H
            wk = tl.load(w_ptr + offs_n[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            ptrs = dh_ptr + offs_m[:, None] * H + offs_k[None, :]
            msk = mask_m[:, None] & mask_k[None, :]
            prev = tl.load(ptrs, mask=msk, other=0.0)
            tl.store(ptrs, prev + tl.dot(dzc, wk, input_precision=DOT_PRECISION), mask=msk)
        # this program owns these rows of d_h: order its read-modify-writes across threads
        tl.debug_barrier()


@triton.jit
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
    offs_k0 = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_n = offs_n < V

    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + offs_k0
            mask_k = offs_k < H
            a = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        z = acc * inv_temperature

        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        glp = tl.load(glp_ptr + offs_m, mask=mask_m, other=0.0)
        coef = tl.load(c_ptr + offs_m, mask=mask_m, other=0.0)
        tgt = tl.load(t_ptr + offs_m * stride_t, mask=mask_m, other=-1).to(tl.int64)
        p = tl.exp(z - lse[:, None])
        if HAS_ENTROPY:
            ez = tl.load(ez_ptr + offs_m, mask=mask_m, other=0.0)
            gent = tl.load(gent_ptr + offs_m, mask=mask_m, other=0.0)
            dz = p * (coef[:, None] - gent[:, None] * (z - ez[:, None]))
        else:
            dz = p * coef[:, None]
        dz += tl.where(offs_n[None, :] == tgt[:, None], glp[:, None], 0.0)
        dz = tl.where(mask_n[None, :], dz * inv_temperature, 0.0)
        dzc = tl.trans(dz.to(w_ptr.dtype.element_ty))

        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + offs_k0
            mask_k = offs_k < H
            hk = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            ptrs = dw_ptr + offs_n[:, None] * H + offs_k[None, :]
            msk = mask_n[:, None] & mask_k[None, :]
            prev = tl.load(ptrs, mask=msk, other=0.0)
            tl.store(ptrs, prev + tl.dot(dzc, hk, input_precision=DOT_PRECISION), mask=msk)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch options of one kernel.

    block_m/n/k >= 16 and powers of two (tl.dot). `vocab_splits` (forward only): number of vocabulary
    ranges swept by separate programs; 0 = choose from the device. `group_m` (fast backward only):
    row blocks that share a vocabulary block in the launch order."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    vocab_splits: int = 0

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v}")
        if self.vocab_splits < 0:
            raise ValueError(f"KernelConfig.vocab_splits must be >= 0, got {self.vocab_splits}")
        if self.group_m < 1:
            raise ValueError(f"KernelConfig.group_m must be >= 1, got {self.group_m}")


@dataclass(frozen=True)
class LogprobParams:
    """Non-tensor arguments of `TritonTokenLogprobs` (hashable, saved on the autograd context).

    `config` overrides the block sizes of every kernel (tests); None picks them per kernel."""
    temperature: float = 1.0
    with_entropy: bool = False
    deterministic: bool = False
    config: Optional[KernelConfig] = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def default_config(kind: str, M: int, V: int, H: int, dtype: torch.dtype,
                   device: torch.device) -> KernelConfig:
    """Heuristic block sizes for kind in {"fwd", "bwd", "bwd_dh", "bwd_dw"} (no autotuning).

    Interpreter: blocks large enough to keep the (serial, per-op costly) interpreter quick on test
    shapes. GPU: 16-bit operands use wgmma tiles of 128 x 128 (64 x 128 for the deterministic
    kernels, whose grids have one axis only) with 64-wide K slices, 8 warps, 3 stages; fp32 operands
    (exact IEEE dot, no tensor cores) 64 x 128 x 32 (128 rows for bwd_dw). Few rows shrink block_m
    (down to 16, 4 warps). Checked by compiling for sm_90a with Triton 3.9: the 16-bit variants do
    not spill registers at full size and use <= 160 KB shared memory; fp32 variants spill <= 44 B."""
    if kind not in ("fwd", "bwd", "bwd_dh", "bwd_dw"):
        raise ValueError(f"unknown kernel kind {kind!r}")
    if _interpreting() or device.type != "cuda":
        return KernelConfig(block_m=_pow2_clamp(M, 16, 32), block_n=_pow2_clamp(V, 16, 128),
                            block_k=_pow2_clamp(H, 16, 64), num_warps=4, num_stages=1, vocab_splits=1)
    if dtype in (torch.bfloat16, torch.float16):
        block_k = 64
        max_m = 128 if kind in ("fwd", "bwd") else 64
    else:
        block_k = 32
        max_m = 128 if kind == "bwd_dw" else 64
    block_m = _pow2_clamp(M, 16, max_m)
    num_warps = 8 if block_m >= 64 else 4
    return KernelConfig(block_m=block_m, block_n=128, block_k=block_k, num_warps=num_warps,
                        num_stages=3, group_m=8, vocab_splits=0 if kind == "fwd" else 1)


_num_sms_cache: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _num_sms_cache:
        _num_sms_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _num_sms_cache[idx]


_rewrapped: dict = {}


def triton_interpreted_at_import() -> bool:
    """Whether `triton.language` was imported with TRITON_INTERPRET=1 (its standard library, e.g.
    tl.sum, is then interpreter-flavoured for the whole process)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction)


def _kernel(fn):
    """The kernel in the flavour the current TRITON_INTERPRET asks for (read at launch time)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    want_interp = _interpreting()
    if triton_interpreted_at_import() != want_interp:
        raise RuntimeError(
            f"TRITON_INTERPRET is {'1' if want_interp else 'not 1'} now but was "
            f"{'1' if not want_interp else 'not 1'} when triton was first imported in this process; "
            "Triton fixes its standard library at import, so set TRITON_INTERPRET=1 before anything "
            "imports triton (CPU), or leave it unset throughout (GPU)")
    if isinstance(fn, InterpretedFunction) == want_interp:
        return fn
    key = (fn.fn, want_interp)
    if key not in _rewrapped:
        _rewrapped[key] = InterpretedFunction(fn.fn) if want_interp else JITFunction(fn.fn)
    return _rewrapped[key]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands: exact IEEE products (no silent TF32); 16-bit operands: the default tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _validate(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, temperature: float) -> None:
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D (M, H), got shape {tuple(h.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be (V, H={h.shape[1]}), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got V=0")
    if t.dim() != 1 or t.shape[0] != h.shape[0]:
        raise ValueError(f"t must be ({h.shape[0]},), got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"t must be int64 (or int32), got {t.dtype}")
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"h dtype must be float32/bfloat16/float16, got {h.dtype}")
    if weight.dtype != h.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from h dtype {h.dtype}")
    if not (h.device == weight.device == t.device):
        raise ValueError(f"h, weight, t must share a device, got {h.device}, {weight.device}, {t.device}")
    if h.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"triton log-prob kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), "
                           f"got tensors on {h.device}")
    if not (float(temperature) > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _compute_operands(h: torch.Tensor, weight: torch.Tensor):
    """Under the interpreter 16-bit tl.dot is unreliable: compute on fp32 copies there."""
    if _interpreting() and h.dtype != torch.float32:
        return h.float(), weight.float()
    return h, weight


def _launch_fwd(h, weight, t, inv_temperature: float, with_entropy: bool, cfg: KernelConfig):
    """Returns per-split partials (m, s, a or None, zt), each (splits, M) float32."""
    M, H = h.shape
    V = weight.shape[0]
    n_tiles = triton.cdiv(V, cfg.block_n)
    row_blocks = triton.cdiv(M, cfg.block_m)
    splits = cfg.vocab_splits
    if splits == 0:
        # about two waves of programs (one program per SM at these tile sizes), each split at
        # least 4 vocabulary tiles; many row blocks -> one split (the plain per-row-block sweep)
        splits = max(1, min((2 * _num_sms(h.device) + row_blocks // 2) // row_blocks, n_tiles // 4))
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)          # no empty split
    part = torch.empty((4, splits, M), device=h.device, dtype=torch.float32)
    m_p, s_p, a_p, zt_p = part[0], part[1], part[2], part[3]
    grid = (row_blocks, splits)
    _kernel(_logprob_fwd_kernel)[grid](
        h, weight, t, m_p, s_p, a_p, zt_p,
        M, V, H, tiles_per_split * cfg.block_n,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), t.stride(0), M,
        inv_temperature,
        HAS_ENTROPY=with_entropy,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=_dot_precision(h.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return m_p, s_p, (a_p if with_entropy else None), zt_p


def _merge_splits(m_p, s_p, a_p, zt_p):
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


def triton_forward(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, temperature: float,
                   with_entropy: bool, config: Optional[KernelConfig] = None):
    """Forward launcher: (logp, entropy or None, lse, E_p[z] or None), each (M,) float32."""
    _validate(h, weight, t, temperature)
    M, H = h.shape
    V = weight.shape[0]
    dev = h.device
    if M == 0:
        e = torch.empty(0, device=dev, dtype=torch.float32)
        return e, (e.clone() if with_entropy else None), e.clone(), (e.clone() if with_entropy else None)
    hc, wc = _compute_operands(h, weight)
    cfg = config or default_config("fwd", M, V, H, h.dtype, dev)
    m_p, s_p, a_p, zt_p = _launch_fwd(hc, wc, t, 1.0 / float(temperature), with_entropy, cfg)
    lse, ent, ez, zt = _merge_splits(m_p, s_p, a_p, zt_p)
    return zt - lse, ent, lse, ez


def triton_backward(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, lse: torch.Tensor,
                    ez: Optional[torch.Tensor], g_lp: Optional[torch.Tensor],
                    g_ent: Optional[torch.Tensor], g_lse: Optional[torch.Tensor],
                    temperature: float, deterministic: bool, need_dh: bool = True,
                    need_dw: bool = True, config: Optional[KernelConfig] = None
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward launcher: (d_h in h.dtype or None, d_W in weight.dtype or None).

    lse, ez: (M,) float32 from the forward (ez = E_p[z], needed only when g_ent is given).
    g_lp, g_ent, g_lse: upstream gradients (M,) or None (= zero)."""
    M, H = h.shape
    V = weight.shape[0]
    dev = h.device
    if g_ent is not None and ez is None:
        raise ValueError("an entropy gradient needs E_p[z] from a forward with entropy")
    if M == 0 or (g_lp is None and g_ent is None and g_lse is None):
        return (torch.zeros_like(h) if need_dh else None,
                torch.zeros_like(weight) if need_dw else None)
    if not (need_dh or need_dw):
        return None, None
    f32 = dict(device=dev, dtype=torch.float32)
    glp = g_lp.to(**f32).contiguous() if g_lp is not None else torch.zeros(M, **f32)
    coef = (g_lse.to(**f32) - glp).contiguous() if g_lse is not None else (-glp).contiguous()
    has_ent = g_ent is not None
    gent = g_ent.to(**f32).contiguous() if has_ent else glp          # unused when not has_ent
    ezc = ez.to(**f32).contiguous() if has_ent else glp
    lsec = lse.to(**f32).contiguous()

    hc, wc = _compute_operands(h, weight)
    inv_t = 1.0 / float(temperature)
    prec = _dot_precision(hc.dtype)
    dh = torch.zeros((M, H), **f32) if need_dh else None
    dw = torch.zeros((V, H), **f32) if need_dw else None
    common = (hc.stride(0), hc.stride(1), wc.stride(0), wc.stride(1), t.stride(0), inv_t)
    if deterministic:
        if need_dh:
            cfg = config or default_config("bwd_dh", M, V, H, h.dtype, dev)
            _kernel(_logprob_bwd_dh_kernel)[(triton.cdiv(M, cfg.block_m),)](
                hc, wc, t, lsec, ezc, glp, coef, gent, dh, M, V, H, *common,
                HAS_ENTROPY=has_ent, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                DOT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if need_dw:
            cfg = config or default_config("bwd_dw", M, V, H, h.dtype, dev)
            _kernel(_logprob_bwd_dw_kernel)[(triton.cdiv(V, cfg.block_n),)](
                hc, wc, t, lsec, ezc, glp, coef, gent, dw, M, V, H, *common,
                HAS_ENTROPY=has_ent, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                DOT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        cfg = config or default_config("bwd", M, V, H, h.dtype, dev)
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(V, cfg.block_n),)
        dummy = dh if dh is not None else dw
        _kernel(_logprob_bwd_kernel)[grid](
            hc, wc, t, lsec, ezc, glp, coef, gent,
            dh if dh is not None else dummy, dw if dw is not None else dummy,
            M, V, H, *common,
            HAS_ENTROPY=has_ent, HAS_DH=need_dh, HAS_DW=need_dw,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            DOT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if dh is not None and h.dtype != torch.float32:
        dh = dh.to(h.dtype)
    if dw is not None and weight.dtype != torch.float32:
        dw = dw.to(weight.dtype)
    return dh, dw


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class TritonTokenLogprobs(torch.autograd.Function):
    """(h, weight, t, params) -> (logp, entropy or None, lse); differentiable in h and weight."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, params: LogprobParams):
        logp, ent, lse, ez = triton_forward(h, weight, t, params.temperature, params.with_entropy,
                                            params.config)
        ctx.set_materialize_grads(False)
        ctx.params = params
        ctx.save_for_backward(h, weight, t, lse, ez)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_lse):
        h, weight, t, lse, ez = ctx.saved_tensors
        p: LogprobParams = ctx.params
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh, dw = triton_backward(h, weight, t, lse, ez, g_lp, g_ent if p.with_entropy else None, g_lse,
                                 p.temperature, p.deterministic, need_dh, need_dw, p.config)
        return dh, dw, None, None


def triton_token_logprobs(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor,
                          temperature: float = 1.0, with_entropy: bool = False,
                          deterministic: bool = False, *, config: Optional[KernelConfig] = None):
    """log softmax(h @ weight.T / temperature)[t] per row with the fused Triton kernels.

    h (M, H) fp32/bf16/fp16 (M may be 0), weight (V, H) same dtype, t (M,) int64 in [0, V).
    Returns (logp, entropy or None, lse), each (M,) float32; differentiable w.r.t. h and weight
    (through entropy and lse too). `deterministic` selects the atomic-free backward.
    `config` overrides the block sizes of every kernel."""
    params = LogprobParams(temperature=float(temperature), with_entropy=bool(with_entropy),
                           deterministic=bool(deterministic), config=config)
    logp, ent, lse = TritonTokenLogprobs.apply(h, weight, t, params)
    return logp, (ent if with_entropy else None), lse
