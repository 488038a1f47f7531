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
  A sample is right when its verdict (the verifier's `correct`, before any format penalty) is
  >= threshold (algo.reward_threshold), else wrong.
  nsr_*: negatives. rule "group_advantage" (default, reference code): a wrong answer in a group with at
         least one right one; rule "reward_threshold": r_i < threshold, with A = -1.
  psr_*: positives. "group_advantage": a right answer in a group with at least one wrong one;
         "reward_threshold": r_i >= threshold, with A = +1.
  Under "group_advantage" nsr_prerl / psr_prerl use A_pre = r_i - mean_g r and nsr_rl / psr_rl the GRPO
  advantage, restricted to the mask and clipped to <= 0 for negatives, >= 0 for positives (NSR never pushes
  a sample up, PSR never down). With binary rewards this is exactly "A_pre_i < 0" (resp. > 0), the
  reference code's rule; with a format penalty or partial credit, groups where nothing is right give no
  negatives (a formatless wrong answer beside a formatted wrong one is not a negative sample).

Per-token policy loss (PPO clip with dual-clip, identical for every objective; only the view differs)
  rho_t = exp(logp_t - old_t)
  l_t   = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))
  if A < 0:  l_t = min(l_t, -A * c)                       (dual-clip, c = 10)
  View: "cond" objectives (grpo, nsr_rl, psr_rl, w_reinforce) score log P(y_t | x, y_<t);
        "free" objectives (prerl, nsr_prerl, psr_prerl) score log P(y_t | e, y_<t).

The objectives table (`OBJECTIVES`, name -> `Objective`) states the above once per objective: its view
("cond" | "free"), its samples ("all" | "negatives" | "positives") and its advantage ("grpo" |
"mean_centred" | "w_reinforce"). `sample_terms` dispatches on these fields, and the config (allowed names,
the checks of fastprerl/config_checks.py, the adaptive switch's prompt-free test) reads them from it.

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
  k3 = exp(ref - logp) - (ref - logp) - 1, normalised by the step's response-token count).

`StepLoss` is that loss for one step, built once from the phase's terms and the packed rows: per-row
coefficients c_{o,r} = weight_o / N_o on the rows of o's view and mask (0 elsewhere), advantages, old and
behaviour log-probs, TIS and KL. Called on the log-probs of any subset of rows (a micro-batch, a chunk of
one) it returns their per-token losses and a `LossDiagnostics` (per-term sums, clipped-token counts), so
the step loss is the same whatever the micro-batches are, and nothing outside the call is changed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Objective:
    """One objective (module docstring): the log-prob it scores, the samples it uses, their advantage."""
    name: str
    view: str          # "cond": log P(y_t | x, y_<t) | "free": log P(y_t | e, y_<t)
    samples: str       # "all" | "negatives" | "positives" (masks under algo.negative_rule)
    advantage: str     # "grpo" (algo.adv_norm) | "mean_centred" (r_i - mean_g r) | "w_reinforce"

    def __post_init__(self):
        if (self.view not in ("cond", "free") or self.samples not in ("all", "negatives", "positives")
                or self.advantage not in ("grpo", "mean_centred", "w_reinforce")):
            raise ValueError(f"objective {self.name!r}: view {self.view!r}, samples {self.samples!r} or "
                             f"advantage {self.advantage!r} is not one of the known kinds")


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("grpo", "cond", "all", "grpo"),
    Objective("prerl", "free", "all", "mean_centred"),
    Objective("nsr_prerl", "free", "negatives", "mean_centred"),
    Objective("psr_prerl", "free", "positives", "mean_centred"),
    Objective("nsr_rl", "cond", "negatives", "grpo"),
    Objective("psr_rl", "cond", "positives", "grpo"),
    Objective("w_reinforce", "cond", "all", "w_reinforce"),
)}


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


def _advantages(kind: str, rewards: torch.Tensor, group_size: int, adv_norm: str, threshold: float,
                w_lambda: float) -> torch.Tensor:
    """(B,) float32 per-sample advantages of the kind named by Objective.advantage (module docstring)."""
    if kind == "grpo":
        return grpo_advantages(rewards, group_size, adv_norm)
    if kind == "mean_centred":
        return mean_centred_advantages(rewards, group_size)
    correct = rewards >= threshold   # "w_reinforce": lambda for a correct sample, -1 otherwise
    return torch.where(correct, torch.full_like(rewards, w_lambda), torch.full_like(rewards, -1.0))


@dataclass(frozen=True)
class SampleTerms:
    """Per-sample advantage and mask of one objective: A (B,) float32, mask (B,) bool."""
    advantage: torch.Tensor
    mask: torch.Tensor
    view: str


def sample_terms(name: str, rewards: torch.Tensor, group_size: int, *, adv_norm: str = "std",
                 negative_rule: str = "group_advantage", threshold: float = 0.5,
                 w_lambda: float = 0.1, verdicts: torch.Tensor | None = None) -> SampleTerms:
    """rewards (B,): the scores optimised; verdicts (B,): the verifier's `correct` (default: the rewards),
    which decide right and wrong for the NSR / PSR masks (module docstring)."""
    obj = OBJECTIVES.get(name)
    if obj is None:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    rewards = rewards.float()
    if obj.samples == "all":
        everyone = torch.ones_like(rewards, dtype=torch.bool)
        return SampleTerms(_advantages(obj.advantage, rewards, group_size, adv_norm, threshold, w_lambda),
                           everyone, obj.view)
    negative = obj.samples == "negatives"
    if negative_rule == "reward_threshold":
        mask = rewards < threshold if negative else rewards >= threshold
        adv = torch.full_like(rewards, -1.0 if negative else 1.0)
        return SampleTerms(torch.where(mask, adv, torch.zeros_like(adv)), mask, obj.view)
    if negative_rule != "group_advantage":
        raise ValueError(f"negative_rule must be 'group_advantage' or 'reward_threshold', got {negative_rule!r}")
    right = _groups(rewards if verdicts is None else verdicts.float(), group_size) >= threshold   # (P, G)
    if negative:   # a wrong answer in a group that has a right one
        mask = (~right & right.any(dim=1, keepdim=True)).view(-1)
    else:          # a right answer in a group that has a wrong one
        mask = (right & (~right).any(dim=1, keepdim=True)).view(-1)
    adv = _advantages(obj.advantage, rewards, group_size, adv_norm, threshold, w_lambda)
    adv = adv.clamp(max=0.0) if negative else adv.clamp(min=0.0)
    return SampleTerms(torch.where(mask, adv, torch.zeros_like(adv)), mask, obj.view)


def phase_terms(objectives, rewards: torch.Tensor, group_size: int, algo,
                verdicts: torch.Tensor | None = None) -> dict[str, SampleTerms]:
    """The terms of a phase's objectives (PhaseConfig.objectives; algo: AlgoConfig), keyed by name."""
    return {o.name: sample_terms(o.name, rewards, group_size, adv_norm=algo.adv_norm,
                                 negative_rule=algo.negative_rule, threshold=algo.reward_threshold,
                                 w_lambda=algo.w_reinforce_lambda, verdicts=verdicts)
            for o in objectives}


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, *, eps_low: float = 0.2,
                eps_high: float = 0.2, dual_clip_c: float | None = 10.0) -> torch.Tensor:
    """Per-token clipped surrogate with dual-clip (see module docstring). All inputs (T,)."""
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(l1, l2)
    if dual_clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip_c), loss)
    return loss


def clipped(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float,
            eps_high: float) -> torch.Tensor:
    """(T,) bool: tokens whose ratio is clipped (the clipped branch of policy_loss holds, no gradient)."""
    ratio = torch.exp(logp.detach() - old_logp)
    return ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))


def tis_weight(logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(exp(logp.detach() - behaviour_logp), cap) per token (module docstring)."""
    if cap <= 0:
        raise ValueError(f"tis_weight: cap must be > 0, got {cap}")
    return torch.clamp(torch.exp(logp.detach() - behaviour_logp.to(logp.dtype)), max=cap)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


_RESPONSE_TOKENS = "response tokens"   # the KL term's normaliser, beside the objectives' N_o


def token_normalisers(terms: dict[str, SampleTerms], resp_lens: torch.Tensor) -> dict[str, int]:
    """N_o: kept tokens of objective o over the whole step (all micro-batches)."""
    return {name: int(resp_lens[t.mask].sum().item()) for name, t in terms.items()}


# ---------------------------------------------------------------------------------------------- the step loss
@dataclass
class LossDiagnostics:
    """What a StepLoss call saw: the rows (indices into the packed rows), their detached log-probs, and per
    objective the summed weighted loss, the tokens in the loss and how many of them were clipped."""
    rows: torch.Tensor                     # (k,) int64
    logp: torch.Tensor                     # (k,) on the CPU (float32 from the fused kernels)
    term_sums: dict[str, torch.Tensor]     # name -> () float32
    tokens: dict[str, int]
    clipped: dict[str, int]

    @staticmethod
    def merge(parts: Sequence[LossDiagnostics], names: Sequence[str]) -> LossDiagnostics:
        """The diagnostics of the whole step from those of its calls (per-term sums added in call order)."""
        sums = {n: torch.zeros(()) for n in names}
        tokens, clip = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
        for d in parts:
            for n in names:
                sums[n] += d.term_sums[n]
                tokens[n] += d.tokens[n]
                clip[n] += d.clipped[n]
        cat = lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)  # noqa: E731
        return LossDiagnostics(cat([d.rows for d in parts], torch.long), cat([d.logp for d in parts], torch.float32),
                               sums, tokens, clip)

    def logp_by_row(self, num_rows: int) -> torch.Tensor:
        """(R,) the log-prob of every packed row (0 for rows no call saw)."""
        out = torch.zeros(num_rows, dtype=self.logp.dtype)
        out[self.rows] = self.logp
        return out

    def clip_fraction(self, name: str) -> float:
        return self.clipped[name] / self.tokens[name] if self.tokens[name] else 0.0


@dataclass(frozen=True)
class RowTerm:
    """One objective on the packed rows: coefficient weight_o / N_o on its rows (0 elsewhere), advantage."""
    name: str
    coef: torch.Tensor        # (R,) float32
    advantage: torch.Tensor   # (R,) float32


@dataclass(frozen=True)
class StepLoss:
    """The step loss over the R packed rows (module docstring), built once per step by `build`."""
    terms: tuple[RowTerm, ...]
    cond: torch.Tensor                  # (R,) bool: the row scores log P(y_t | x, y_<t)
    behaviour: torch.Tensor             # (R,) the sampler's log-prob of the row's token
    old: torch.Tensor | None         # (R,) old log-probs of cond rows (algo.old_logp = "rollout"), else None
    ref: torch.Tensor | None         # (R,) reference-model log-probs (KL on), else None
    kl_coef: torch.Tensor               # (R,) kl_coef / (response tokens of the step) on cond rows, else 0
    tis_cap: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = 10.0

    @classmethod
    def build(cls, terms: dict[str, SampleTerms], weights: dict[str, float], resp_lens: torch.Tensor, *,
              row_sample: torch.Tensor, cond: torch.Tensor, behaviour: torch.Tensor, algo,
              ref: torch.Tensor | None = None,
              totals: Callable[[dict[str, int]], dict[str, int]] | None = None) -> StepLoss:
        """terms / weights: per objective; resp_lens (B,); row_sample (R,) sample of each packed row; cond (R,);
        behaviour (R,); algo: AlgoConfig (clip, dual-clip, old_logp, TIS, KL); ref (R,) or None (KL off).
        totals: when the step's samples are spread over processes, maps this process's token counts to the
        step's (the sums over processes), so that every normaliser counts the whole step."""
        norms = token_normalisers(terms, resp_lens)
        norms[_RESPONSE_TOKENS] = int(resp_lens.sum())
        if totals is not None:
            norms = totals(norms)
        rows = []
        for name, t in terms.items():
            on = cond if t.view == "cond" else ~cond
            coef = torch.where(on & t.mask[row_sample], torch.tensor(weights[name] / max(norms[name], 1)),
                               torch.tensor(0.0))
            rows.append(RowTerm(name, coef, t.advantage[row_sample]))
        kl = torch.where(cond, torch.tensor(algo.kl_coef / max(norms[_RESPONSE_TOKENS], 1)), torch.tensor(0.0))
        return cls(tuple(rows), cond, behaviour, behaviour if algo.old_logp == "rollout" else None, ref, kl,
                   tis_cap=algo.tis_cap, eps_low=algo.clip_eps_low, eps_high=algo.clip_eps_high,
                   dual_clip_c=algo.dual_clip_c)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def __call__(self, lp: torch.Tensor, ridx: torch.Tensor) -> tuple[torch.Tensor, LossDiagnostics]:
        """Per-token losses (k,) of the rows ridx (indices into the R packed rows) with log-probs lp (k,)."""
        ridx = ridx.cpu()
        at = lambda x: x[ridx].to(lp.device)  # noqa: E731
        cond = at(self.cond)
        old = lp.detach() if self.old is None else torch.where(cond, at(self.old), lp.detach())
        total = torch.zeros_like(lp)
        if self.tis_cap > 0:  # truncated importance weights of the cond rows
            w = torch.where(cond, tis_weight(lp, at(self.behaviour), self.tis_cap), torch.ones_like(lp))
        sums, tokens, clip = {}, {}, {}
        for t in self.terms:
            c = at(t.coef) if self.tis_cap <= 0 else at(t.coef) * w
            adv = at(t.advantage)
            term = c * policy_loss(lp, old, adv, eps_low=self.eps_low, eps_high=self.eps_high,
                                   dual_clip_c=self.dual_clip_c)
            sums[t.name] = term.detach().sum().cpu()
            kept = at(t.coef) != 0
            tokens[t.name] = int(kept.sum())
            clip[t.name] = int((clipped(lp, old, adv, self.eps_low, self.eps_high) & kept).sum())
            total = total + term
        if self.ref is not None:
            total = total + at(self.kl_coef) * k3_kl(lp, at(self.ref))
        return total, LossDiagnostics(ridx, lp.detach().cpu(), sums, tokens, clip)
