"""The fused log-prob op as torch custom operators, for torch.compile and fake tensors.

  fastprerl::token_logprobs(hidden, weight, targets, temperature, with_entropy, impl) -> (logp, entropy, lse)
  fastprerl::token_logprobs_backward(hidden, weight, targets, g_logp, g_entropy, temperature, impl)
      -> (d hidden, d weight)

Each has a fake implementation (register_fake: the output shapes and dtypes, nothing computed), so it runs on
fake tensors and is traced by torch.compile as one node (no graph break); the forward op has an autograd
formula (register_autograd) that calls the backward op. The real implementations are the torch path
(torch_logprob.py) and the Triton path (triton_logprob.py), chosen by `impl` ("torch" | "triton" | "naive").
The backward op recomputes the logits block by block (256 rows x the vocabulary, float32) and forms the
gradients from the explicit formula, so the op keeps nothing between forward and backward but its inputs; it is
the traced path's backward (eager calls keep the fused paths' own backward sweeps).

api.token_logprobs and api.token_loss call these ops while torch.compile traces them
(`torch.compiler.is_compiling()`); eagerly they keep their direct paths. token_loss takes a Python callable
(the loss on a chunk of log-probs), which cannot cross a custom-op boundary: traced, it is the log-prob op
followed by the callable on all rows, in plain torch (the callable's ops are traced with it).
"""
from __future__ import annotations

import torch
from torch import Tensor

_BLOCK = 256   # rows per block of the backward operator


def compute_logprobs(hidden, weight, targets, temperature, with_entropy, impl, deterministic=False):
    """(logp, entropy or None, lse) of every row by the resolved `impl` ("naive", "torch" or "triton"): the one
    dispatch that the eager path (api.token_logprobs) and the custom operator share."""
    if impl == "naive":
        from .reference import naive_token_logprobs
        logp, ent, lse = naive_token_logprobs(hidden, weight, targets, temperature, with_entropy)
        if logp.dtype != torch.float64:
            logp, lse = logp.float(), lse.float()
            ent = ent.float() if ent is not None else None
    elif impl == "torch":
        from .torch_logprob import chunked_token_logprobs
        logp, ent, lse = chunked_token_logprobs(hidden, weight, targets, temperature, with_entropy)
    else:
        from .triton_logprob import triton_token_logprobs
        logp, ent, lse = triton_token_logprobs(hidden, weight, targets, temperature, with_entropy, deterministic)
    return logp, ent, lse


@torch.library.custom_op("fastprerl::token_logprobs", mutates_args=())
def token_logprobs_op(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                      impl: str) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        logp, ent, lse = compute_logprobs(hidden, weight, targets, temperature, with_entropy, impl)
    if ent is None:
        ent = logp.new_zeros(0)
    return logp.clone(), ent.clone(), lse.clone()


@token_logprobs_op.register_fake
def _(hidden, weight, targets, temperature, with_entropy, impl):
    n = hidden.shape[0]
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32   # float64 stays, as in the paths
    f = lambda k: hidden.new_empty(k, dtype=dt)  # noqa: E731
    return f(n), f(n if with_entropy else 0), f(n)


@torch.library.custom_op("fastprerl::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(hidden: Tensor, weight: Tensor, targets: Tensor, g_logp: Tensor, g_entropy: Tensor,
                               temperature: float, impl: str) -> tuple[Tensor, Tensor]:
    # dz = g_logp (onehot(target) - p) - g_entropy p (z - E_p[z]),  dh = dz W / T,  dW = dz^T h / T,  row blocks of
    # _BLOCK rows (autograd is not available inside an operator's implementation, so the formula is explicit)
    n = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    wf = weight.to(acc)
    dh = torch.empty(hidden.shape, dtype=acc, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    with_ent = g_entropy.numel() > 0
    for s in range(0, n, _BLOCK):
        e = min(n, s + _BLOCK)
        hs = hidden[s:e].to(acc)
        z = hs @ wf.t() / temperature
        p = torch.softmax(z, dim=1)
        dz = -p * g_logp[s:e].to(acc).unsqueeze(1)
        dz.scatter_add_(1, targets[s:e].unsqueeze(1), g_logp[s:e].to(acc).unsqueeze(1))
        if with_ent:
            ez = (p * z).sum(dim=1, keepdim=True)
            dz -= g_entropy[s:e].to(acc).unsqueeze(1) * p * (z - ez)
        dz /= temperature
        dh[s:e] = dz @ wf
        dw += dz.t() @ hs
    return dh.to(hidden.dtype), dw.to(weight.dtype)


@token_logprobs_backward_op.register_fake
def _(hidden, weight, targets, g_logp, g_entropy, temperature, impl):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, with_entropy, impl = inputs
    ctx.save_for_backward(hidden, weight, targets)
    ctx.temperature, ctx.with_entropy, ctx.impl = temperature, with_entropy, impl


def _backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, targets = ctx.saved_tensors
    if g_logp is None:
        g_logp = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    if g_ent is None or not ctx.with_entropy:
        g_ent = hidden.new_zeros(0, dtype=torch.float32)
    dh, dw = token_logprobs_backward_op(hidden, weight, targets, g_logp.float(), g_ent.float(), ctx.temperature,
                                        ctx.impl)
    return dh, dw, None, None, None, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
