"""Reward verification throughput (`pytest bench/test_reward_throughput.py -s`).

Verifications per second through `RewardPool.score_batch` with 2 workers and the default 5 s timeout, for
  plain        plain-number answers (integers, decimals, fractions, thousands separators): the cheap path;
  symbolic     answers that need sympy (radicals, pi, intervals, sets, equations, polynomials): the workers;
  typical      70% plain, 30% symbolic;
  typical+5%   the same with 5% of the items replaced by pathological answers (exponent towers, huge
               factorials, 1 MB strings, 10k nested braces, invalid LaTeX, ...).
Targets: plain >= 500/s, symbolic >= 20/s, typical+5% >= 1/4 of typical. Every item is a distinct
(answer, gold) pair, so no result is reused (in training the G answers of one prompt share a gold answer,
which the workers parse once). Appends one JSON line per case to bench/results/rewards.jsonl, with the
machine's load average: the symbolic rate is CPU-bound and drops when other work shares the cores.
"""

import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastprerl.rewards import RewardPool

RESULTS = Path(__file__).resolve().parent / "results" / "rewards.jsonl"
WORKERS = 2
TIMEOUT = 5.0


def plain_pairs(n: int, rng: random.Random) -> list[tuple[str, str, float]]:
    """(response, gold, expected): half right, in the spellings people use for numbers."""
    out = []
    for i in range(n):
        k = rng.randrange(1, 10**6)
        right = i % 2 == 0
        form = i % 5
        if form == 0:
            answer, gold = str(k), str(k if right else k + 1)
        elif form == 1:
            answer, gold = f"{k:,}", str(k if right else k * 10)
        elif form == 2:
            answer, gold = f"{k}.50", f"{k}.5" if right else f"{k}.05"
        elif form == 3:
            answer, gold = f"{k}/{2 * k + 1}", rf"\frac{{{k}}}{{{2 * k + 1}}}" if right else rf"\frac{{{k}}}{{{2 * k}}}"
        else:
            answer, gold = f"x = {k}", str(k if right else -k)
        out.append((f"Step by step ... so the result is \\boxed{{{answer}}}.", gold, float(right)))
    return out


def symbolic_pairs(n: int, rng: random.Random) -> list[tuple[str, str, float]]:
    templates = [
        lambda k: (rf"\frac{{{k}\sqrt{{3}}}}{{2}}", rf"{k}\sqrt{{3}}/2", 1.0),
        lambda k: (rf"{k}\pi", rf"\frac{{{2 * k}\pi}}{{2}}", 1.0),
        lambda k: (rf"[{k}, {k + 3})", rf"[{k},{k + 3}]", 0.0),
        lambda k: (rf"x = \frac{{{k}}}{{\sqrt{{2}}}}", rf"\frac{{{k}\sqrt{{2}}}}{{2}}", 1.0),
        lambda k: (rf"(x+{k})^2", rf"x^2 + {2 * k}x + {k * k}", 1.0),
        lambda k: (rf"\{{{k}, {k + 1}\}}", rf"\{{{k + 1}, {k}\}}", 1.0),
        lambda k: (rf"{k}\sqrt{{2}}", rf"\sqrt{{{2 * k * k + 1}}}", 0.0),
        lambda k: (rf"\frac{{{k}}}{{{k + 1}}}\pi", rf"\frac{{{k}\pi}}{{{k + 2}}}", 0.0),
    ]
    ks = rng.sample(range(2, 10**5), n)
    out = []
    for i, k in enumerate(ks):
        answer, gold, expected = templates[i % len(templates)](k)
        out.append((f"Therefore the answer is \\boxed{{{answer}}}.", gold, expected))
    return out


PATHOLOGICAL = [
    r"\boxed{9^{9^{9^{9}}}}", r"\boxed{(9^9)^(9^9)}", r"\boxed{10^{100000000}}", r"\boxed{1000000!}",
    r"\boxed{(10^{6})!}", r"\boxed{\binom{1000000}{500000}}", r"\boxed{\prod_{k=1}^{10^{6}} k}",
    r"\boxed{(x+1)^{100000}}", "\\boxed{" + "9" * 1_000_000 + "}", "a" * 1_000_000, "\\boxed{" * 100_000,
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", r"\boxed{\frac{1}{}}", r"\boxed{\sqrt{}^{}_{}\left(}",
    "\\boxed{1\x002}", "\\boxed{\u202e\U0001F600\u0301}", r"\boxed{\frac{1}{0}}", r"\boxed{\infty - \infty}",
    r"\boxed{\int_0^{\infty} e^{-x^2} \sin(x^{100}) dx}", "\\boxed{" + "x+" * 20_000 + "x}",
]


def typical_pairs(n: int, rng: random.Random) -> list[tuple[str, str, float]]:
    n_symbolic = n * 3 // 10
    pairs = plain_pairs(n - n_symbolic, rng) + symbolic_pairs(n_symbolic, rng)
    rng.shuffle(pairs)
    return pairs


def with_pathological(pairs, fraction: float, rng: random.Random):
    pairs = list(pairs)
    for j, i in enumerate(rng.sample(range(len(pairs)), int(len(pairs) * fraction))):
        pairs[i] = (PATHOLOGICAL[j % len(PATHOLOGICAL)], "1", None)  # expected: 0.0 or 1.0, bounded in time
    return pairs


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=WORKERS, timeout=TIMEOUT) as p:
        p.score_batch([r"\boxed{\frac{\sqrt{2}}{2}}"], [r"\sqrt{2}/2"])  # start the server outside the timing
        yield p


@pytest.fixture(scope="module")
def rates():
    measured: dict[str, float] = {}
    yield measured
    print("\nreward verification throughput (%d workers, timeout %.0f s, %d CPUs)" % (WORKERS, TIMEOUT, os.cpu_count()))
    print(f"  {'case':<14}{'per second':>12}")
    for case, rate in measured.items():
        print(f"  {case:<14}{rate:>12.1f}")


def measure(pool: RewardPool, case: str, pairs, rates: dict) -> float:
    before = pool.stats
    load = os.getloadavg()[0]  # other work on the machine slows the workers down: recorded with the result
    start = time.perf_counter()
    scores = pool.score_batch([r for r, _, _ in pairs], [g for _, g, _ in pairs])
    seconds = time.perf_counter() - start
    for (_, _, expected), score in zip(pairs, scores):
        assert score == expected if expected is not None else score in (0.0, 1.0)
    per_second = len(pairs) / seconds
    rates[case] = per_second
    record = {
        "bench": "reward_throughput", "case": case, "n": len(pairs), "seconds": round(seconds, 4),
        "per_second": round(per_second, 1),
        "machine": f"{platform.platform()} ({os.cpu_count()} CPUs)", "python": platform.python_version(),
        "git_sha": git_sha(), "workers": WORKERS, "timeout_s": TIMEOUT, "load_avg_1m": round(load, 2),
        "timeouts": pool.stats["timeouts"] - before["timeouts"],
        "sent_to_workers": pool.stats["pooled"] - before["pooled"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"\n{case}: {len(pairs)} in {seconds:.2f} s = {per_second:.1f}/s "
          f"({record['sent_to_workers']} to workers, {record['timeouts']} timeouts, load average {load:.1f})",
          file=sys.stderr)
    return per_second


def test_plain_numbers(pool, rates):
    assert measure(pool, "plain", plain_pairs(5000, random.Random(0)), rates) >= 500


def test_symbolic(pool, rates):
    assert measure(pool, "symbolic", symbolic_pairs(240, random.Random(1)), rates) >= 20


def test_typical_mix_with_5_percent_pathological(pool, rates):
    typical = measure(pool, "typical", typical_pairs(1000, random.Random(2)), rates)
    mixed = with_pathological(typical_pairs(1000, random.Random(3)), 0.05, random.Random(4))
    assert measure(pool, "typical+5%", mixed, rates) >= typical / 4
