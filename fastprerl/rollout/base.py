"""The rollout interface: `Rollout` (a typing Protocol) and the batch it returns.

Every backend samples with `generate`. The optional parts are methods with no-op defaults, so the trainer
calls them on any backend: `sync_weights(model)` (an engine holding its own copy of the weights is told after
every optimizer step; returns the seconds it took), `sleep()` / `wake()` (free / retake an engine's memory
between rollouts) and `close()`. The HF backend samples from the trainer's model itself and keeps every
default; the vLLM backend overrides them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class RolloutBatch:
    """B = len(prompts) * n samples, sample i belongs to prompt i // n."""
    prompt_ids: list[list[int]]     # B lists: the prompt tokens of each sample
    response_ids: list[list[int]]   # B lists: sampled tokens (up to and including EOS if reached)
    behaviour_logp: list[list[float]]  # B lists: log-prob of each sampled token under the sampler (logits / T)
    truncated: list[bool]           # B: hit max_new_tokens without EOS


class Rollout(Protocol):
    holds_weights: bool = False   # True: generate() uses the backend's own copy of the weights (sync_weights
                                  # keeps it current), so the trainer need not gather sharded weights for it

    def generate(self, prompts: list[list[int]], n: int) -> RolloutBatch:
        """n samples of every prompt (token ids), prompt-major."""
        ...

    def sync_weights(self, model) -> float:
        """The trainer's weights changed; returns the seconds spent passing them on (0: nothing to do)."""
        return 0.0

    def sleep(self) -> None:
        """Free what the backend holds between rollouts (nothing by default)."""

    def wake(self) -> None:
        """Take back what `sleep` freed (nothing by default)."""

    def close(self) -> None:
        """Release the backend (nothing by default)."""


def newline_token_ids(tokenizer) -> set[int]:
    """Every token whose text contains a newline (the stop set of rollout.stop_at_newline)."""
    return {i for t, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([t])}
