"""Reward results as the trainer and the evaluation read them, in one place (`score_responses`). Reward functions are
built from a RewardConfig by `fastprerl.rewards.from_config`."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Scores:
    """One entry per response (B,): the reward optimised, the verdict, whether an answer was found, and
    whether a timeout decided the verdict (fastprerl.rewards.RewardResult)."""
    score: list[float]
    correct: list[float]
    has_answer: list[bool]
    timed_out: list[bool]
    error: list[str] = field(default_factory=list)   # why the reward function failed, "" where it did not

    @property
    def timeouts(self) -> int:
        return sum(self.timed_out)

    @property
    def errors(self) -> int:
        return sum(1 for e in self.error if e)


def score_responses(reward_fn, texts: Sequence[str], samples: Sequence[dict]) -> Scores:
    """Calls the reward function once on every (response text, sample) pair."""
    out = reward_fn(list(texts), list(samples))
    return Scores([float(r.score) for r in out], [float(r.correct) for r in out],
                  [bool(r.has_answer) for r in out], [bool(r.timed_out) for r in out],
                  [str(getattr(r, "error", "") or "") for r in out])
