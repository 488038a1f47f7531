"""Rollout backends share one interface: `generate(prompt_ids, n, seed) -> RolloutBatch`."""
from .base import RolloutBatch, make_backend

__all__ = ["RolloutBatch", "make_backend"]
