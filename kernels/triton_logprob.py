"""Fused per-token log-probs (+ lse, + optional entropy) in Triton, with a recomputing backward: the
launchers and the autograd Function.

Layout of the Triton code (one job per module):
  triton_tiles.py     the tile code, written once (logits tile K-loop, dz of a tile, gradient K-loop)
  triton_forward.py   the forward kernel (online logsumexp + entropy over vocabulary splits) and its launcher
  triton_backward.py  the atomic backward kernel and the deterministic d_h / d_W kernels, and their launchers
  triton_config.py    block sizes / warps / stages per kernel, dtype and GPU architecture
  triton_runtime.py   compiled or interpreted flavour, and the `Launch` record every launcher returns
  triton_logprob.py   this module: input checks, output allocation, the two passes, autograd; and the
                      frozen-head token_loss (one pass: the forward kernel with HAS_EXPECT gives E_p[W],
                      dh = g (W[t] - E_p[W]) / T in torch, no backward kernel)

CPU: the kernels run under the Triton interpreter when TRITON_INTERPRET=1, and that flag must be in the
environment BEFORE `triton` is first imported in the process (kernels/triton_runtime.py says why; a launch
under the other setting raises a RuntimeError naming the cause). Under the interpreter bf16 / fp16 `tl.dot`
is unreliable, so the launchers compute on fp32 copies there (gradients are still returned in the input
dtypes). The interpreter tests run with Triton 3.9; Triton 3.6's interpreter stops on these kernels with
"only 0-dimensional arrays can be converted to Python scalars",
while its compiler builds all of them (tools/triton36_env.sh).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .torch_logprob import PrecomputedGradsLoss, loss_and_grad
from .triton_backward import backward_dh_launch, backward_dw_launch, backward_launch
from .triton_config import KernelConfig, default_config, num_sms
from .triton_forward import forward_launch, forward_partials, forward_splits, merge_splits
from .triton_runtime import compute_operands, interpreting, triton_interpreted_at_import

__all__ = ["KernelConfig", "LogprobParams", "TritonTokenLogprobs", "triton_token_logprobs",
           "default_config", "triton_interpreted_at_import", "triton_forward", "triton_backward",
           "triton_frozen_forward", "triton_frozen_token_loss"]


@dataclass(frozen=True)
class LogprobParams:
    """Non-tensor arguments of `TritonTokenLogprobs` (hashable, saved on the autograd context).

    `config` overrides the block sizes of every kernel (tests); None picks them per kernel."""
    temperature: float = 1.0
    with_entropy: bool = False
    deterministic: bool = False
    config: KernelConfig | None = None


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
    if h.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"triton log-prob kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), "
                           f"got tensors on {h.device}")
    if not (float(temperature) > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _sweep(h, weight, t, temperature: float, with_entropy: bool, config: KernelConfig | None, expect: bool):
    """The forward launch and its merge: (logp, entropy or None, lse, E_p[z] or None, E_p[W] or None)."""
    _validate(h, weight, t, temperature)
    M, H = h.shape
    V = weight.shape[0]
    dev = h.device
    if M == 0:
        e = torch.empty(0, device=dev, dtype=torch.float32)
        return (e, (e.clone() if with_entropy else None), e.clone(), (e.clone() if with_entropy else None),
                torch.empty((0, H), device=dev, dtype=torch.float32) if expect else None)
    hc, wc = compute_operands(h, weight)
    cfg = config or default_config("fwd_expect" if expect else "fwd", M, V, H, h.dtype, dev)
    splits, cols = forward_splits(M, V, cfg, num_sms(dev))
    part = forward_partials(M, splits, dev)
    ew = torch.zeros((splits, M, H), device=dev, dtype=torch.float32) if expect else None
    forward_launch(hc, wc, t, part, cols, 1.0 / float(temperature), with_entropy, cfg, ew=ew)()
    lse, ent, ez, zt = merge_splits(part[0], part[1], part[2] if with_entropy else None, part[3])
    if ew is not None:   # E_p[W] = sum_s exp(m_s - lse) A_s
        ew = (ew[0].mul_(torch.exp(part[0][0] - lse).unsqueeze(1)) if splits == 1 else
              torch.einsum("sm,smh->mh", torch.exp(part[0] - lse), ew))
    return zt - lse, ent, lse, ez, ew


def triton_forward(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, temperature: float,
                   with_entropy: bool, config: KernelConfig | None = None):
    """Forward launcher: (logp, entropy or None, lse, E_p[z] or None), each (M,) float32."""
    return _sweep(h, weight, t, temperature, with_entropy, config, expect=False)[:4]


def triton_frozen_forward(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, temperature: float,
                          with_entropy: bool, config: KernelConfig | None = None):
    """Frozen-head forward, one sweep: (logp, entropy or None, E_p[W]); logp / entropy (M,) float32,
    E_p[W] = sum_v softmax(z)_v W_v (M, H) float32.

    The forward kernel with HAS_EXPECT also accumulates, per vocabulary split s, A_s = sum_v exp(z_v - m_s) W_v
    (rescaled when its running max m_s moves); E_p[W] = sum_s exp(m_s - lse) A_s. Memory: splits x M x H fp32
    (splits > 1 only when there are few row blocks, kernels/triton_forward.py: forward_splits)."""
    logp, ent, _, _, ew = _sweep(h, weight, t, temperature, with_entropy, config, expect=True)
    return logp, ent, ew


class TritonFrozenLoss(PrecomputedGradsLoss):
    """token_loss with a frozen head (h differentiable, weight not): one Triton sweep gives logp and E_p[W];
    then loss_fn gives g = d loss / d logp (logp is final only after the sweep), and
    dh = g (W[t] - E_p[W]) / T in torch, with no second sweep and no dW. Backward scales dh (once, inherited)."""

    @staticmethod
    def forward(ctx, h, weight, t, rows, loss_fn, params: LogprobParams):
        logp, ent, expect = triton_frozen_forward(h, weight, t, params.temperature, params.with_entropy,
                                                  params.config)
        loss, g = loss_and_grad(loss_fn, logp, rows)
        if g is None:
            dh = torch.zeros_like(h)
        else:   # expect <- (W[t] - E_p[W]) g / T, in place
            dh = expect.neg_().add_(weight[t].float()).mul_((g.float() / params.temperature).unsqueeze(1))
        ctx.grads, ctx.dtypes = (dh, None), (h.dtype, weight.dtype)
        if ent is None:
            return loss
        ctx.mark_non_differentiable(ent)
        return loss, ent



def triton_frozen_token_loss(h, weight, t, rows, loss_fn, temperature: float = 1.0, with_entropy: bool = False,
                             *, config: KernelConfig | None = None):
    """(loss, entropy or None) of sum loss_fn(logp, rows) for a frozen head; differentiable w.r.t. h only."""
    params = LogprobParams(temperature=float(temperature), with_entropy=bool(with_entropy), config=config)
    out = TritonFrozenLoss.apply(h, weight, t, rows, loss_fn, params)
    return out if with_entropy else (out, None)


def triton_backward(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, lse: torch.Tensor,
                    ez: torch.Tensor | None, g_lp: torch.Tensor | None,
                    g_ent: torch.Tensor | None, g_lse: torch.Tensor | None,
                    temperature: float, deterministic: bool, need_dh: bool = True,
                    need_dw: bool = True, config: KernelConfig | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
    rows = (lse.to(**f32).contiguous(), ezc, glp, coef, gent)

    hc, wc = compute_operands(h, weight)
    inv_t = 1.0 / float(temperature)
    dh = torch.zeros((M, H), **f32) if need_dh else None
    dw = torch.zeros((V, H), **f32) if need_dw else None
    if deterministic:
        if need_dh:
            cfg = config or default_config("bwd_dh", M, V, H, h.dtype, dev)
            backward_dh_launch(hc, wc, t, rows, dh, has_ent, inv_t, cfg)()
        if need_dw:
            cfg = config or default_config("bwd_dw", M, V, H, h.dtype, dev)
            backward_dw_launch(hc, wc, t, rows, dw, has_ent, inv_t, cfg)()
    else:
        cfg = config or default_config("bwd", M, V, H, h.dtype, dev)
        dummy = dh if dh is not None else dw
        backward_launch(hc, wc, t, rows, dh if dh is not None else dummy, dw if dw is not None else dummy,
                        need_dh, need_dw, has_ent, inv_t, cfg)()
    if dh is not None and h.dtype != torch.float32:
        dh = dh.to(h.dtype)
    if dw is not None and weight.dtype != torch.float32:
        dw = dw.to(weight.dtype)
    return dh, dw


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
                          deterministic: bool = False, *, config: KernelConfig | None = None):
    """log softmax(h @ weight.T / temperature)[t] per row with the fused Triton kernels.

    h (M, H) fp32/bf16/fp16 (M may be 0), weight (V, H) same dtype, t (M,) int64 in [0, V).
    Returns (logp, entropy or None, lse), each (M,) float32; differentiable w.r.t. h and weight
    (through entropy and lse too). `deterministic` selects the atomic-free backward.
    `config` overrides the block sizes of every kernel."""
    params = LogprobParams(temperature=float(temperature), with_entropy=bool(with_entropy),
                           deterministic=bool(deterministic), config=config)
    logp, ent, lse = TritonTokenLogprobs.apply(h, weight, t, params)
    return logp, (ent if with_entropy else None), lse
