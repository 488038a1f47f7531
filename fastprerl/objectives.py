"""Advantages, sample masks and per-token losses of every objective. Tensors only: no model, no tokenizer.

Notation: a step has B = P * G samples (P prompts, G samples each, group = the samples of one prompt),
rewards r (B,), and for every kept response token t of sample i a log-prob logp_t (at the sampling
temperature) and an old log-prob old_t (the same values detached when on-policy, so rho_t = 1).

Advantages (per sample, broadcast to its tokens)
  GRPO ("std", the paper):  A_i = (r_i - mean_g r) / (std_g r + 1e-6), std unbiased (Bessel, as verl).
                            A group of one sample (G = 1) has no baseline: mean 0, std 1, A_i = r_i (verl).
  GRPO ("mean"):            A_i = r_i - mean_g r
  PreRL family:             A_i = r_i - mean_g r (mean-centred only; the reference code)
  W-REINFORCE(lambda):      A_i = lambda if the sample is correct (r_i >= threshold) else -1; no baseline.

Sample masks (which samples an objective uses)
  grpo, prerl, w_reinforce: every sample          (zero-advantage samples contribute 0 to the loss but
                                                   their tokens still count in the normaliser)
  nsr_*: negatives. rule "group_advantage" (default, reference code): A_pre_i < 0, i.e. a wrong answer
         in a group with at least one right one; rule "reward_threshold": r_i < threshold, with A = -1.
  psr_*: positives. "group_advantage": A_pre_i > 0; "reward_threshold": r_i >= threshold, with A = +1.
  The post-train-space variants nsr_rl / psr_rl use the GRPO advantage restricted to the mask (or +-1
  under "reward_threshold").

Per-token policy loss (PPO clip with dual-clip, identical for every objective; only the view differs)
  rho_t = exp(logp_t - old_t)
  l_t   = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))
  if A < 0:  l_t = min(l_t, -A * c)                       (dual-clip, c = 10)
  View: "cond" objectives (grpo, nsr_rl, psr_rl, w_reinforce) score log P(y_t | x, y_<t);
        "free" objectives (prerl, nsr_prerl, psr_prerl) score log P(y_t | e, y_<t).

Truncated importance sampling (algo.tis_cap = C > 0; off by default)
  The rollout engine (vLLM) and the trainer compute log-probs with different kernels, so the sampler's
  beh_t differs slightly from the trainer's logp_t of the same weights. With TIS every per-token policy
  loss of the "cond" view is reweighted by the detached, truncated ratio
      w_t = min(exp(logp_t.detach() - beh_t), C),      l_t <- w_t * l_t
  (gradient of logp_t only through l_t; w_t is a constant). "free"-view rows (log P(y|e)) and the k3 KL
  term are not reweighted: their tokens were not sampled from the distribution they score. Example:
  logp = -1.0, beh = -1.5, C = 2: w = min(e^0.5, 2) = min(1.6487, 2) = 1.6487; beh = -2.0: w = min(e^1, 2) = 2.

Normaliser (token-mean, once per optimizer step)
  loss_o = (1 / N_o) * sum over the kept tokens of objective o in ALL micro-batches of the step of l_t,
  N_o = number of kept tokens of objective o in the step (for grpo/prerl/w_reinforce: every response token
  of the step; for nsr_*/psr_*: only the masked samples' tokens). Empty N_o gives loss 0.
  Step loss = sum_o weight_o * loss_o  (+ kl_coef * token-mean k3 KL on the cond view when enabled,
  k3 = exp(ref - logp) - (ref - logp) - 1, normalised by the cond view's token count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

VIEW_OF = {"grpo": "cond", "nsr_rl": "cond", "psr_rl": "cond", "w_reinforce": "cond",
           "prerl": "free", "nsr_prerl": "free", "psr_prerl": "free"}


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.double().view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, norm: str = "std", eps: float = 1e-6):
    r = _groups(rewards, group_size)
    if group_size == 1:
        a = r if norm == "std" else r * 0  # verl's convention for singletons: mean 0, std 1
        return a.view(-1).float()
    mean = r.mean(dim=1, keepdim=True)
    if norm == "mean":
        return (r - mean).view(-1).float()
    std = r.std(dim=1, keepdim=True, unbiased=True)
    return ((r - mean) / (std + eps)).view(-1).float()


def mean_centred_advantages(rewards: torch.Tensor, group_size: int):
    r = _groups(rewards, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1).float()


@dataclass(frozen=True)
class SampleTerms:
    """Per-sample advantage and mask of one objective: A (B,) float32, mask (B,) bool."""
    advantage: torch.Tensor
    mask: torch.Tensor
    view: str


def sample_terms(name: str, rewards: torch.Tensor, group_size: int, *, adv_norm: str = "std",
                 negative_rule: str = "group_advantage", threshold: float = 0.5,
                 w_lambda: float = 0.1) -> SampleTerms:
    if name not in VIEW_OF:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(VIEW_OF)}")
    view = VIEW_OF[name]
    rewards = rewards.float()
    everyone = torch.ones_like(rewards, dtype=torch.bool)
    if name == "grpo":
        return SampleTerms(grpo_advantages(rewards, group_size, adv_norm), everyone, view)
    if name == "w_reinforce":
        correct = rewards >= threshold
        return SampleTerms(torch.where(correct, torch.full_like(rewards, w_lambda),
                                       torch.full_like(rewards, -1.0)), everyone, view)
    if name == "prerl":
        return SampleTerms(mean_centred_advantages(rewards, group_size), everyone, view)
    negative = name.startswith("nsr")
    if negative_rule == "reward_threshold":
        mask = rewards < threshold if negative else rewards >= threshold
        adv = torch.full_like(rewards, -1.0 if negative else 1.0)
        return SampleTerms(torch.where(mask, adv, torch.zeros_like(adv)), mask, view)
    if negative_rule != "group_advantage":
        raise ValueError(f"negative_rule must be 'group_advantage' or 'reward_threshold', got {negative_rule!r}")
    a_pre = mean_centred_advantages(rewards, group_size)
    mask = a_pre < 0 if negative else a_pre > 0
    adv = a_pre if name.endswith("prerl") else grpo_advantages(rewards, group_size, adv_norm)
    return SampleTerms(torch.where(mask, adv, torch.zeros_like(adv)), mask, view)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, *, eps_low: float = 0.2,
                eps_high: float = 0.2, dual_clip_c: Optional[float] = 10.0) -> torch.Tensor:
    """Per-token clipped surrogate with dual-clip (see module docstring). All inputs (T,)."""
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(l1, l2)
    if dual_clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip_c), loss)
    return loss


def tis_weight(logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(exp(logp.detach() - behaviour_logp), cap) per token (module docstring)."""
    if cap <= 0:
        raise ValueError(f"tis_weight: cap must be > 0, got {cap}")
    return torch.clamp(torch.exp(logp.detach() - behaviour_logp.to(logp.dtype)), max=cap)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def clip_fraction(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float,
                  eps_high: float) -> float:
    if logp.numel() == 0:
        return 0.0
    ratio = torch.exp(logp - old_logp)
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return clipped.float().mean().item()


def token_normalisers(terms: Dict[str, SampleTerms], resp_lens: torch.Tensor) -> Dict[str, int]:
    """N_o: kept tokens of objective o over the whole step (all micro-batches)."""
    return {name: int(resp_lens[t.mask].sum().item()) for name, t in terms.items()}
