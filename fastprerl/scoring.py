"""Reward functions as the trainer and the evaluation use them: built from a RewardConfig in one place
(`_reward_fn_from_config`) and their results read in one place (`score`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from .rewards import get_reward_fn


def _reward_fn_from_config(rc):
    """rc: RewardConfig. Built-in reward functions take the options; a user's module:function none."""
    if ":" in rc.fn:
        return get_reward_fn(rc.fn)
    opts = {"timeout": rc.timeout, "workers": rc.workers, "format_penalty": rc.format_penalty}
    if rc.fn == "math":
        opts["extract"] = tuple(rc.extract)
    return get_reward_fn(rc.fn, **opts)


@dataclass
class Scores:
    """One entry per response (B,): the reward optimised, the verdict, whether an answer was found, and
    whether a timeout decided the verdict (fastprerl.rewards.RewardResult)."""
    score: List[float]
    correct: List[float]
    has_answer: List[bool]
    timed_out: List[bool]

    @property
    def timeouts(self) -> int:
        return sum(self.timed_out)


def score(reward_fn, texts: Sequence[str], samples: Sequence[Dict]) -> Scores:
    """Calls the reward function once on every (response text, sample) pair."""
    out = reward_fn(list(texts), list(samples))
    return Scores([float(r.score) for r in out], [float(r.correct) for r in out],
                  [bool(r.has_answer) for r in out], [bool(r.timed_out) for r in out])
