from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass
class RolloutBatch:
    """B = len(prompts) * n samples, sample i belongs to prompt i // n."""
    prompt_ids: List[List[int]]     # B lists: the prompt tokens of each sample
    response_ids: List[List[int]]   # B lists: sampled tokens (up to and including EOS if reached)
    behaviour_logp: List[List[float]]  # B lists: log-prob of each sampled token under the sampler (logits / T)
    truncated: List[bool]           # B: hit max_new_tokens without EOS


def make_backend(cfg, model, tokenizer):
    """cfg: RolloutConfig."""
    if cfg.backend == "hf":
        from .hf import HFRollout
        return HFRollout(cfg, model, tokenizer)
    raise ValueError(f"rollout.backend: {cfg.backend!r} is not available; choose 'hf'")
