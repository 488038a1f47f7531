"""Rollout backends share one interface (`Rollout`): `generate(prompt_ids, n) -> RolloutBatch`."""
from .base import Rollout, RolloutBatch, make_backend, newline_token_ids

__all__ = ["Rollout", "RolloutBatch", "make_backend", "newline_token_ids"]
