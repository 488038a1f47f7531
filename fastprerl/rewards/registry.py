"""The registry of reward functions, and math scoring on one shared worker pool.

Reward functions (`get_reward_fn`, `from_config`) map (responses, samples) to one `RewardResult(score,
correct, has_answer, timed_out, error)` per response; `has_answer` is the format metric, `timed_out` marks a
verdict that a timeout decided (0.0, counted by the trainer as `reward/timeouts`), `error` why the function or
its worker failed (0.0, counted as `reward/errors`; a step where every response failed stops the run):
  "math"             the response's answer against `sample["answer"]`: math-verify's own extraction and
                     `verify` by default, or the strict `extract` modes (`fastprerl.rewards.answers`);
  "reasoning_gym"    the task's own scorer (see `extract_reasoning_gym_answer` for the extraction rule);
  "module:function"  a user's `fn(responses, samples) -> list[float | RewardResult]`, called once per
                     response as `fn([response], [sample])` in the same workers under the same timeout.
All of them run in the worker processes of `RewardPool` (`fastprerl.rewards.pool`), which bound every call
by a hard timeout; `score_math` and `score_batch` are the same math scoring as plain functions.

This module imports neither torch nor sympy.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import pickle
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .answers import DEFAULT_MODES, RewardResult, check_modes, extract_reasoning_gym_answer
from .pool import RewardPool

__all__ = [
    "BUILTIN_REWARDS", "USER_REWARD", "score_math", "score_batch", "shutdown", "get_reward_fn", "from_config",
    "RewardFn", "MathReward", "ReasoningGymReward", "UserReward",
]

log = logging.getLogger("fastprerl.rewards")

# --------------------------------------------------------------------------------------------------------
# Module-level conveniences on one shared pool.
# --------------------------------------------------------------------------------------------------------

_shared: RewardPool | None = None
_shared_lock = threading.Lock()


def _shared_pool(workers: int = 2) -> RewardPool:
    global _shared
    with _shared_lock:
        if _shared is None or _shared.workers != workers:
            if _shared is not None:
                _shared.close()
            else:
                atexit.register(shutdown)
            _shared = RewardPool(workers=workers)
        return _shared


def shutdown() -> None:
    """Stop the shared pool behind `score_math`, `score_batch` and the registry's reward functions."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


def score_math(response: str, gold: str, *, timeout: float = 5.0, extract: Sequence[str] = DEFAULT_MODES) -> float:
    """1.0 if the final answer of `response` equals `gold`, else 0.0; returns within about `timeout` s."""
    return _shared_pool().verify([response], [gold], timeout=timeout, extract=extract)[0].correct


def score_batch(responses: Sequence[str], golds: Sequence[Any], *, timeout: float = 5.0, workers: int = 2,
                extract: Sequence[str] = DEFAULT_MODES) -> list[float]:
    """`score_math` over many pairs, in parallel on `workers` processes."""
    return _shared_pool(workers).score_batch(responses, golds, timeout=timeout, extract=extract)


# --------------------------------------------------------------------------------------------------------
# Registry of reward functions.
# --------------------------------------------------------------------------------------------------------

RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], list[RewardResult]]


def _check_penalty(format_penalty: float) -> None:
    if format_penalty < 0:
        raise ValueError(f"format_penalty is subtracted and must be >= 0, got {format_penalty}")


class MathReward:
    """Reward "math": the response's final answer against `sample["answer"]`."""

    def __init__(self, *, timeout: float = 5.0, workers: int = 2, extract: Sequence[str] = DEFAULT_MODES,
                 format_penalty: float = 0.0):
        check_modes(tuple(extract))
        _check_penalty(format_penalty)
        self.timeout, self.workers, self.format_penalty = timeout, workers, format_penalty
        self.extract = tuple(extract)

    def __call__(self, responses: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        golds = [_field(s, "answer") for s in samples]
        return _shared_pool(self.workers).verify(responses, golds, timeout=self.timeout, extract=self.extract,
                                                 format_penalty=self.format_penalty)


_EQUATION = re.compile(r"-?\d+\+-?\d+=-?\d+")


class EquationReward:
    """Reward "equation" (builtin:equations): right when the response's first line is the sample's "answer"
    equation ("23 + 34 = 57"; spaces are ignored), so only a right sum in its self-contained form counts. An
    answer is found (`has_answer`) when that line is an equation "a + b = c" of integers, whatever its numbers.
    Plain string work in this process: no verifier, no timeout to enforce."""

    def __init__(self, *, timeout: float = 5.0, workers: int = 2, format_penalty: float = 0.0):
        _check_penalty(format_penalty)
        self.format_penalty = format_penalty

    def __call__(self, responses: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
        results = []
        for response, sample in zip(responses, samples):
            line = "".join(response.strip().split("\n", 1)[0].split())
            gold = "".join(str(_field(sample, "answer")).split())
            has = bool(_EQUATION.fullmatch(line))
            right = float(has and line == gold)
            results.append(RewardResult(right - (0.0 if has else self.format_penalty), right, has))
        return results


class ReasoningGymReward:
    """Reward "reasoning_gym": the task's own `score_answer(answer, entry)`, run in the pool's workers.

    Each sample carries its reasoning-gym entry (`{"question", "answer", "metadata"}`), either as
    `sample["entry"]` or as the sample itself; the scorer is the one of `entry["metadata"]["source_dataset"]`.
    The answer is extracted by `extract_reasoning_gym_answer`."""

    def __init__(self, *, timeout: float = 5.0, workers: int = 2, format_penalty: float = 0.0):
        _check_penalty(format_penalty)
        self.timeout, self.workers, self.format_penalty = timeout, workers, format_penalty

    def __call__(self, responses: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
        extracted = [extract_reasoning_gym_answer(r) for r in responses]
        tasks = []
        for sample, (answer, _) in zip(samples, extracted):
            entry = sample["entry"] if "entry" in sample else sample
            # Only what the scorers read travels to the workers (a sample may also hold token ids etc.).
            entry = {k: entry[k] for k in ("question", "answer", "metadata") if k in entry}
            dataset = _field(_field(entry, "metadata"), "source_dataset")
            tasks.append((dataset, answer, entry))
        pool = _shared_pool(self.workers)
        pool.preload("reasoning_gym")
        outcomes = pool.run_detailed("fastprerl.rewards.tasks:score_reasoning_gym", tasks, timeout=self.timeout)
        results = []
        for (ok, value), (_, has) in zip(outcomes, extracted):
            if ok:
                results.append(RewardResult(float(value) - (0.0 if has else self.format_penalty), float(value), has))
            else:  # the scorer raised, died or ran past the timeout
                results.append(RewardResult(0.0 - (0.0 if has else self.format_penalty), 0.0, has,
                                            timed_out=value == "timeout",
                                            error="" if value == "timeout" else _why(value, pool)))
        return results


class UserReward:
    """Reward "module:function": a user's `fn(responses, samples)` run in the pool's workers.

    It is called once per response, as `fn([response], [sample])`, so that one slow or failing response
    costs only its own score: a call running past `timeout` is killed and scores 0.0 with `timed_out=True`;
    one that raises (or returns other than one float or RewardResult) scores 0.0 and is reported once, with
    the response and sample, as a warning; later failures are counted in `failures`. Samples must be
    picklable (they travel to the workers)."""

    def __init__(self, name: str, *, timeout: float = 5.0, workers: int = 2):
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load reward function {name!r}: {exc}") from exc
        if not callable(fn):
            raise ValueError(f"reward function {name!r} is not callable")
        self.name, self.module, self.timeout, self.workers = name, module, timeout, workers
        self.failures = 0

    def __call__(self, responses: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
        pool = _shared_pool(self.workers)
        pool.preload(self.module)  # imported before the workers take work: not on the first call's clock
        calls = [(self.name, r, s) for r, s in zip(responses, samples)]
        try:
            outcomes = pool.run_detailed("fastprerl.rewards.tasks:call_user_reward", calls, timeout=self.timeout)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ValueError(f"reward function {self.name!r}: its samples must be picklable to reach the reward "
                             f"workers ({type(exc).__name__}: {exc})") from None
        results = []
        for (ok, value), response, sample in zip(outcomes, responses, samples):
            if ok and value[0] == "ok":
                results.append(RewardResult(*value[1:]))
                continue
            timed_out = not ok and value == "timeout"
            if not timed_out:
                why = value[1] if ok else f"its worker {'died' if value == 'crash' else f'failed ({value})'}"
                self._report(why, response, sample)
            results.append(RewardResult(0.0, 0.0, timed_out, timed_out=timed_out,   # a failure: no answer
                                        error="" if timed_out else why))
        return results

    def _report(self, why: str, response: str, sample: Mapping[str, Any]) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("reward function %s failed on a response and scores it 0.0: %s\n  response: %.500r\n"
                        "  sample: %.500r\nFurther failures of it are not reported one by one.",
                        self.name, why, response, sample)


BUILTIN_REWARDS = {"math": MathReward, "equation": EquationReward, "reasoning_gym": ReasoningGymReward}
USER_REWARD = re.compile(r"\w+(?:\.\w+)*:\w+")  # "package.module:function"


def get_reward_fn(name: str, **options: Any) -> RewardFn:
    """The reward function a config names: "math", "equation", "reasoning_gym", or "package.module:function".

    `options` go to its constructor: timeout and workers for every kind, format_penalty for the built-ins,
    extract for "math". Every reward function maps (responses, samples) to one RewardResult each."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name](**options)
    if USER_REWARD.fullmatch(name):
        extra = sorted(set(options) - {"timeout", "workers"})
        if extra:
            raise ValueError(f"options {extra} apply only to built-in reward functions, not {name!r}")
        return UserReward(name, **options)
    raise ValueError(f"unknown reward function {name!r}; choose {sorted(BUILTIN_REWARDS)} or 'module:function'")


def from_config(rc) -> RewardFn:
    """The reward function of a RewardConfig-like `rc` (fields fn, extract, timeout, workers,
    format_penalty); errors name the config key."""
    options: dict[str, Any] = {"timeout": rc.timeout, "workers": rc.workers}
    if rc.fn in BUILTIN_REWARDS:
        options["format_penalty"] = rc.format_penalty
    elif rc.format_penalty:
        raise ValueError(f"reward.format_penalty: applies to the built-in rewards {sorted(BUILTIN_REWARDS)}; the "
                         f"reward function {rc.fn!r} returns its own scores, got {rc.format_penalty}")
    if rc.fn == "math":
        options["extract"] = tuple(rc.extract)
        try:
            check_modes(options["extract"])
        except ValueError as exc:
            raise ValueError(f"reward.extract: {exc}") from None
    if rc.format_penalty < 0:
        raise ValueError(f"reward.format_penalty: expected a value >= 0, got {rc.format_penalty}")
    try:
        return get_reward_fn(rc.fn, **options)
    except ValueError as exc:
        raise ValueError(f"reward.fn: {exc}") from None


def _why(value: str, pool: RewardPool) -> str:
    """The text of a failed worker call ("crash", or the type name of what it raised): the pool's last error."""
    if value == "crash":
        return "its worker died"
    return f"{value}: {pool.last_error}" if pool.last_error and pool.last_error != value else str(value)


def _field(mapping: Mapping[str, Any], key: str) -> Any:
    try:
        return mapping[key]
    except (KeyError, TypeError):
        keys = sorted(mapping) if isinstance(mapping, Mapping) else mapping
        raise ValueError(f"sample has no {key!r} field (it has {keys!r})") from None
