"""Rewards: what a response scores, decided in worker processes that never hang.

  answers.py    results, answer extraction modes and the guards, before any verifier runs
  registry.py   the reward functions by name ("math", "equation", "reasoning_gym", "module:function") and `from_config`
  pool.py       the client of the verification server: hard timeouts, killed and replaced workers
  worker.py     the verification server (`python -m fastprerl.rewards.worker`) and its worker processes
  tasks.py      what a worker computes: math-verify, reasoning-gym scorers, a user's function
  scoring.py    reward results as the trainer and the evaluation read them (`score_responses`)

Nothing here imports torch or model code: the workers import this package.
"""
from .answers import (
                      DEFAULT_MODES,
                      EXTRACT_MODES,
                      EXTRACTORS,
                      MATH_VERIFY,
                      RewardResult,
                      check_modes,
                      extract_answer,
                      extract_reasoning_gym_answer,
                      guard_reason,
)
from .pool import MAX_RESPONSE_CHARS, RewardPool
from .registry import (
                      BUILTIN_REWARDS,
                      USER_REWARD,
                      EquationReward,
                      MathReward,
                      ReasoningGymReward,
                      RewardFn,
                      UserReward,
                      from_config,
                      get_reward_fn,
                      score_batch,
                      score_math,
                      shutdown,
)
from .scoring import Scores, score_responses

__all__ = [
    "DEFAULT_MODES", "EXTRACT_MODES", "EXTRACTORS", "MATH_VERIFY", "RewardResult", "check_modes", "extract_answer",
    "extract_reasoning_gym_answer", "guard_reason", "MAX_RESPONSE_CHARS", "RewardPool", "BUILTIN_REWARDS",
    "EquationReward", "USER_REWARD", "MathReward", "ReasoningGymReward", "RewardFn", "UserReward", "from_config", "get_reward_fn",
    "score_batch", "score_math", "shutdown", "Scores", "score_responses",
]
