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


def make_backend(cfg, model, tokenizer, *, seed: int = 0):
    """cfg: RolloutConfig. A backend with `sync_weights(model)` holds its own copy of the weights and is told
    after every optimizer step (vllm); the HF backend samples from the trainer's model itself."""
    if cfg.backend == "hf":
        from .hf import HFRollout
        return HFRollout(cfg, model, tokenizer)
    if cfg.backend == "vllm":
        from .vllm import VLLMRollout
        return VLLMRollout(cfg, model, tokenizer, seed=seed)
    raise ValueError(f"rollout.backend: {cfg.backend!r} is not available; choose 'hf' or 'vllm'")
