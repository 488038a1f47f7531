"""How a training run stops before its last step: the stop signals, a step that went non-finite, a step whose
every reward failed.

SIGINT/SIGTERM finish the current step and write a checkpoint; a second one abandons the step at once
(StepAbandoned). A non-finite reward, loss or gradient norm raises NonFiniteError before the optimizer step,
with the statistics of the step's batch (`batch_report`). A step in which the reward function failed on every
response raises RewardFailure with the first failure (`check_rewards`).
"""
from __future__ import annotations

import math
import signal
import sys
import threading

import torch


class NonFiniteError(FloatingPointError):
    """A reward, the loss or the gradient norm of a step is NaN/inf; the step was not applied."""


class RewardFailure(RuntimeError):
    """Every response of a step failed in the reward function: the rewards would all be a made-up 0."""


def check_rewards(dist, step: int, scores, texts: list[str], samples: list[dict]) -> None:
    """Raises RewardFailure, with the first failure, its response and sample, when every response of the step
    (on every process; dist: distributed.Dist) failed in the reward function."""
    failed = len(texts) > 0 and scores.errors == len(texts)   # this process's responses all failed
    if not dist.any(not failed):
        raise reward_failure(step, scores, texts, samples)


def reward_failure(step: int, scores, texts: list[str], samples: list[dict]) -> RewardFailure:
    """The error of a step whose every reward failed: the first failure with its response and sample."""
    i = next(j for j, e in enumerate(scores.error) if e)
    sample = {k: v for k, v in samples[i].items() if k != "entry"}
    return RewardFailure(f"step {step}: the reward function failed on all {len(texts)} responses; the first "
                         f"failure: {scores.error[i]}\n  response: {texts[i][:500]!r}\n  sample: "
                         f"{str(sample)[:500]}\n  (reward.fn; the step was not applied)")


class StepAbandoned(BaseException):
    """Raised by the second SIGINT/SIGTERM (a BaseException, so that no `except Exception` swallows it)."""


class StopSignals:
    """First SIGINT/SIGTERM: `requested` is set and the loop stops after the current step and a checkpoint.
    Second one: StepAbandoned is raised wherever the loop is; the newest checkpoint stays as it was."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"fastprerl: {name}: finishing this step, then writing a checkpoint "
                  f"(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            return
        raise StepAbandoned(name)

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def batch_report(step: int, phase: str, problem: str, *, rewards, resp_lens, truncated, terms=None,
                 rows: int | None = None, bins: int | None = None, loss: float | None = None,
                 grad_norm: float | None = None, texts: list[str] | None = None) -> str:
    """The message of a NonFiniteError: what went wrong and the statistics of the step's batch."""
    def stats(x: torch.Tensor) -> str:
        x = x.float()
        bad = int((~torch.isfinite(x)).sum())
        fin = x[torch.isfinite(x)]
        rng = f"min {fin.min().item():.4g}, max {fin.max().item():.4g}, " if fin.numel() else ""
        return f"mean {x.mean().item():.4g}, {rng}non-finite {bad} of {x.numel()}"

    lines = [f"step {step} (phase {phase!r}): {problem}; the step was not applied to the weights.",
             f"  rewards: {stats(rewards)}",
             f"  response length: mean {resp_lens.float().mean().item():.1f}, max {int(resp_lens.max())} tokens; "
             f"truncated {sum(truncated)} of {len(truncated)}"]
    for name, t in (terms or {}).items():
        lines.append(f"  {name}: {int(t.mask.sum())} samples in the loss; advantages {stats(t.advantage)}")
    if rows is not None:
        lines.append(f"  packed rows {rows} in {bins} micro-batches; loss {loss}; grad norm {grad_norm}")
    if texts:
        bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)][:3]
        lines += [f"  sample {i}: reward {rewards[i].item()} for response {texts[i]!r}" for i in bad]
    return "\n".join(lines)
