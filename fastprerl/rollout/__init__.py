"""Rollout backends share one interface (`Rollout`): `generate(prompt_ids, n) -> RolloutBatch`.

  base.py   the interface and the batch it returns
  hf.py     Hugging Face `generate` (CPU and GPU)
  vllm.py   an in-process vLLM engine colocated with the trainer (the vllm package is imported when it is built)
"""
from .base import Rollout, RolloutBatch, newline_token_ids
from .hf import HFRollout
from .vllm import VLLMRollout

__all__ = ["Rollout", "RolloutBatch", "HFRollout", "VLLMRollout", "make_backend", "newline_token_ids"]


def make_backend(cfg, model, tokenizer, *, seed: int = 0) -> Rollout:
    """cfg: RolloutConfig."""
    if cfg.backend == "hf":
        return HFRollout(cfg, model, tokenizer)
    if cfg.backend == "vllm":
        return VLLMRollout(cfg, model, tokenizer, seed=seed)
    raise ValueError(f"rollout.backend: {cfg.backend!r} is not available; choose 'hf' or 'vllm'")
