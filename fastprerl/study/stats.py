"""The numbers of a study, read from its arms' output directories (`metrics.jsonl`, `eval.jsonl`): one summary
per (arm, seed), cells over seeds, pairs against GRPO and their statistics.

Intervals of a difference against GRPO: both arms are evaluated on the same problems with the same sampling
seed, so the difference of final Avg@k is paired by problem. Its 95% interval is the percentile bootstrap over
problems (BOOTSTRAP resamples of the problems, the same resample for both arms; per seed, and for the mean over
seeds with each seed resampled on its own). It covers the evaluation's sampling noise for these trained
models, not the spread of training itself; that is what the seeds show, summarised by the exact two-sided
sign test of the per-seed differences (with 3 seeds it cannot fall below 0.25).
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

from .arms import arm_dir

THRESHOLDS = (0.4, 0.5, 0.6)
BOOTSTRAP = 2000
WINDOW = 5   # moving average of the training reward for "steps to reach"

# ---------------------------------------------------------------------------------------------- numbers
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def moving_average(xs: Sequence[float], w: int) -> list[float]:
    out = []
    for i in range(len(xs)):
        part = xs[max(0, i - w + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def steps_to_reach(rewards: Sequence[float], threshold: float, w: int = WINDOW) -> int | None:
    """First step whose trailing moving average (window w, full windows only) reaches threshold."""
    ma = moving_average(rewards, w)
    for i in range(w - 1, len(ma)):
        if ma[i] >= threshold:
            return i
    return None


def arm_summary(run_dir: Path) -> dict:
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("phase") != "eval"]
    evals = _read_jsonl(run_dir / "eval.jsonl")
    rewards = [r["reward/mean"] for r in train]
    name = next(iter(evals[0]["datasets"]))
    first, last = evals[0]["datasets"][name], evals[-1]["datasets"][name]
    wall = run_dir / "wall_s.txt"
    try:
        import tomllib
        threads = tomllib.loads((run_dir / "config.toml").read_text())["run"]["threads"]
    except (OSError, KeyError, ValueError, ImportError):
        threads = None
    return {
        "threads": threads,
        "steps": len(train),
        "phases": sorted({r["phase"] for r in train}, key=[r["phase"] for r in train].index),
        "reward_first5": sum(rewards[:5]) / max(1, len(rewards[:5])),
        "reward_last5": sum(rewards[-5:]) / max(1, len(rewards[-5:])),
        "reward": rewards,
        "steps_to": {str(t): steps_to_reach(rewards, t) for t in THRESHOLDS},
        "eval_set": name,
        "eval_steps": [e["step"] for e in evals],
        "eval_avg": [e["datasets"][name]["avg@k"] for e in evals],
        "eval_pass": [e["datasets"][name]["pass@k"] for e in evals],
        "eval_correct": [e["datasets"][name].get("correct") for e in evals],
        "eval_probe": [e["datasets"][name].get("probe") for e in evals],
        "pass_curve_last": last.get("pass_curve"),
        "warmup": [{"step": r["step"], "phase": r["phase"], "negatives": r.get(f"samples/{r['phase']}"),
                    "cond": r.get("logp/cond_mean"), "free": r.get("logp/free_mean")}
                   for r in train if r["phase"] == train[0]["phase"]] if train and train[0]["phase"] != "grpo"
        else [],
        "k": first["k"], "n_problems": first["n_problems"],
        "first": first, "last": last,
        "response_len_last": last["response_len"],
        "wall_s": float(wall.read_text()) if wall.exists() else None,
        "switch": next((r["step"] for r in train if r["phase"] != train[0]["phase"]), None),
        "switch_reason": next((r["schedule/switch_reason"] for r in train if "schedule/switch_reason" in r), None),
    }


# ---------------------------------------------------------------------------------------------- seeds
def spread(values: Sequence[float | None]) -> dict | None:
    """Mean, min, max and count of the values that are not None; None when there are none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def cell(values: Sequence[float | None], spec: str = ".3f", of: int | None = None) -> str:
    """'mean [min, max]' over seeds ('mean' for one value, '-' for none); with `of`, also how many of `of`
    seeds have a value (e.g. steps to reach a threshold that some seeds never reach)."""
    sp = spread(values)
    if sp is None:
        return "-" if of is None else f"- (0/{of})"
    txt = format(sp["mean"], spec) if sp["n"] == 1 else \
        f"{format(sp['mean'], spec)} [{format(sp['min'], spec)}, {format(sp['max'], spec)}]"
    return txt if of is None or sp["n"] == of else f"{txt} ({sp['n']}/{of})"


def paired(summaries: dict[str, dict[int, dict]], arm: str, base: str = "grpo", key=lambda s: s["eval_avg"][-1]):
    """Per seed run by both arms: (seed, base value, arm value, arm - base)."""
    both = sorted(set(summaries.get(arm, {})) & set(summaries.get(base, {})))
    return [(sd, key(summaries[base][sd]), key(summaries[arm][sd]),
             key(summaries[arm][sd]) - key(summaries[base][sd])) for sd in both]


def sign_test(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test of the hypothesis 'no difference' (ties dropped): p = min(1, 2 P(X <= min(w, l)))
    with X ~ Binomial(w + l, 1/2)."""
    w, n = sum(d > 0 for d in diffs), sum(d != 0 for d in diffs)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(w, n - w) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_diff(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], k: int, n: int = BOOTSTRAP,
                   seed: int = 0) -> tuple[float, float, float]:
    """pairs: per seed, the per-problem correct counts (of k samples) of the arm and of GRPO on the same problems.
    Returns (mean over seeds of the Avg@k difference, 2.5th and 97.5th percentile of its bootstrap over
    problems, each seed's problems resampled on their own, the same draw for both arms)."""
    rng = random.Random(seed)

    def diff(arm, base, idx):
        return sum(arm[i] - base[i] for i in idx) / (k * len(idx))

    point = sum(diff(a, b, range(len(a))) for a, b in pairs) / len(pairs)
    draws = sorted(sum(diff(a, b, [rng.randrange(len(a)) for _ in a]) for a, b in pairs) / len(pairs)
                   for _ in range(n))
    return point, draws[int(0.025 * n)], draws[min(n - 1, int(0.975 * n))]


def evals_to(summary: dict, threshold: float) -> int | None:
    """The first evaluated step whose Avg@k reaches the threshold."""
    return next((st for st, v in zip(summary["eval_steps"], summary["eval_avg"]) if v >= threshold), None)


def collect(out: Path, arms: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[int, dict]]:
    """arm -> seed -> arm_summary, for every (arm, seed) with a finished run."""
    found: dict[str, dict[int, dict]] = {}
    for arm in arms:
        for sd in seeds:
            d = arm_dir(out, arm, sd)
            if (d / "final").exists() and (d / "eval.jsonl").exists():
                found.setdefault(arm, {})[sd] = arm_summary(d)
    return found
