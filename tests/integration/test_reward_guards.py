"""The verification pool under pressure: adversarial and pathological answers stay bounded by the timeout and
the guards (on pools with a 2 s timeout); verdicts do not depend on what ran before, on order or batch, or on
busy cores. Worker processes and wall-clock timeouts: the integration tier."""
import multiprocessing
import random
import time

import pytest

from fastprerl.rewards import (
    RewardPool,
    RewardResult,
    guard_reason,
)

from reward_pools import ALIVE

pytestmark = pytest.mark.usefixtures("stop_shared_pool")   # the shared pool stops with the module

ADVERSARIAL_TIMEOUT = 2.0




@pytest.fixture(scope="module")
def adversarial_pools():
    with RewardPool(workers=2, timeout=ADVERSARIAL_TIMEOUT) as guarded, \
            RewardPool(workers=2, timeout=ADVERSARIAL_TIMEOUT, guards=False) as unguarded:
        yield {True: guarded, False: unguarded}


INFINITY_TO_THE_INFINITY = (r"\boxed{\infty^{\infty}}", "1")  # oo**oo is not 1: the verdict is 0.0


def _history(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    pairs = [(rf"\boxed{{\frac{{{k}\sqrt{{2}}}}{{2}}}}", rf"{k}\sqrt{{2}}/2") for k in rng.sample(range(2, 999), n)]
    pairs += [(rf"$({k}, {k + 1}]$", rf"({k}, {k + 1})") for k in rng.sample(range(2, 999), n)]
    rng.shuffle(pairs)
    return [r for r, _ in pairs], [g for _, g in pairs]


def test_infinity_to_the_infinity_has_one_verdict_whatever_ran_before():
    # One worker, so that every call runs after all the ones before it; a fresh server each round.
    verdicts = []
    for seed in range(3):
        with RewardPool(workers=1, timeout=10.0) as p:
            rng = random.Random(seed)
            for _ in range(4):
                p.score_batch(*_history(rng, rng.randrange(0, 6)))
                verdicts += p.score_batch([INFINITY_TO_THE_INFINITY[0]], [INFINITY_TO_THE_INFINITY[1]])
    assert verdicts == [0.0] * 12


def test_verdicts_do_not_depend_on_order_or_batch():
    responses, golds = _history(random.Random(7), 12)
    responses += [INFINITY_TO_THE_INFINITY[0], r"\boxed{\infty - \infty}"]
    golds += [INFINITY_TO_THE_INFINITY[1], r"\infty"]
    with RewardPool(workers=1, timeout=10.0) as p:
        forward = p.score_batch(responses, golds)
        backward = p.score_batch(responses[::-1], golds[::-1])[::-1]
        one_by_one = [p.score_batch([r], [g])[0] for r, g in zip(responses, golds)]
    assert forward == backward == one_by_one
    assert forward[-2:] == [0.0, 0.0] and set(forward) == {0.0, 1.0}


def _spin(stop):
    while not stop.is_set():
        pass


def test_same_verdict_with_every_core_busy(pool):
    responses, golds = _history(random.Random(3), 10)
    responses.append(INFINITY_TO_THE_INFINITY[0])
    golds.append(INFINITY_TO_THE_INFINITY[1])
    quiet = pool.score_batch(responses, golds)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    spinners = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(multiprocessing.cpu_count())]
    for s in spinners:
        s.start()
    try:
        loaded = [pool.score_batch(responses, golds) for _ in range(2)]
    finally:
        stop.set()
        for s in spinners:
            s.join(timeout=10)
    assert loaded == [quiet, quiet] and quiet[-1] == 0.0


ADVERSARIAL = [
    ("tower", r"\boxed{9^{9^{9^{9}}}}", "1", 0),
    ("tower of six", r"\boxed{2^{2^{2^{2^{2^{2}}}}}}", "1", 0),
    ("tower in parentheses", r"\boxed{(9^9)^(9^9)}", "1", 0),
    ("huge power", r"\boxed{10^{100000000}}", "1", 0),
    ("huge factorial", r"\boxed{1000000!}", "1", 0),
    ("factorial of a power", r"\boxed{(10^{6})!}", "1", 0),
    ("nested factorial", r"\boxed{100!!!}", "1", 0),
    ("huge binomial", r"\boxed{\binom{1000000}{500000}}", "1", 0),
    ("huge product", r"\boxed{\prod_{k=1}^{10^{6}} k}", "1", 0),  # not the 1 of k=1
    ("polynomial blow-up", r"\boxed{(x+1)^{100000}}", "1", 0),
    ("polynomial just under the guard", r"\boxed{(x+1)^{100} - (x-1)^{100}}", "1", 0),
    ("1 MB of digits in a box", "\\boxed{" + "9" * 1_000_000 + "}", "1", 0),
    ("1 MB without an answer", "a" * 1_000_000, "1", 0),
    ("1 MB after 'the answer is'", "The answer is " + "1" * 1_000_000, "1", 0),
    ("100k unclosed boxes", "\\boxed{" * 100_000, "1", 0),
    ("100k boxes", " ".join(f"\\boxed{{{i}}}" for i in range(100_000)), "99999", {"default": 0, "boxed": 1}),
    ("10k nested braces", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1", 0),
    ("5k nested parentheses", "\\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}", "1", 0),
    ("50 nested square roots", "\\boxed{" + "\\sqrt{" * 50 + "2" + "}" * 50 + "}", "1", 0),  # 2^(2^-50) != 1
    # math-verify reads an unclosed box to the end; the strict "boxed" mode finds no answer in it
    ("unclosed box", r"\boxed{\frac{1}{2}", "1/2", {"default": 1, "boxed": 0}),
    ("too many closing braces", r"\boxed{\frac{1}{2}}}}}}", "1/2", 1),
    ("empty box", r"\boxed{}", "0", 0),
    ("invalid LaTeX: empty denominator", r"\boxed{\frac{1}{}}", "1", 0),
    ("invalid LaTeX: dangling commands", r"\boxed{\sqrt{}^{}_{}\left(}", "1", 0),
    ("invalid LaTeX: mismatched environment", r"\boxed{\begin{matrix} 1 \end{pmatrix}}", "1", 0),
    ("NUL byte", "\\boxed{1\x002}", "12", 0),
    ("unusual unicode", "\\boxed{\u202e\U0001F600\u0301\ufffd}", "1", 0),
    ("zero-width space", "\\boxed{1\u200b2}", "12", 0),  # math-verify does not drop it
    ("division by zero", r"\boxed{\frac{1}{0}}", "1", 0),
    ("zero over zero", r"\boxed{\frac{0}{0}}", r"\frac{0}{0}", 1),  # the same string as the gold answer
    ("infinity minus infinity", r"\boxed{\infty - \infty}", r"\infty", 0),  # undefined, not infinity
    ("minus infinity", r"\boxed{-\infty}", r"\infty", 0),
    ("infinity to the infinity", *INFINITY_TO_THE_INFINITY, 0),
    ("overflowing float", r"\boxed{1e999999999}", "1", 0),
    ("pathological gold", r"\boxed{1}", r"9^{9^{9^{9}}}", 0),
    ("hard integral", r"\boxed{\int_0^{\infty} e^{-x^2} \sin(x^{100}) dx}", "1", "timeout"),
    ("20k-term sum", "\\boxed{" + "x+" * 20_000 + "x}", "1", 0),
]
RUNAWAY = {"tower", "tower of six", "tower in parentheses", "huge power", "huge factorial", "factorial of a power",
           "nested factorial", "huge binomial", "huge product", "polynomial blow-up", "pathological gold",
           "hard integral"}
RUNAWAY_DEFAULT_ONLY = {"100k boxes", "10k nested braces", "5k nested parentheses", "20k-term sum"}
MODES = {"default": ("math_verify",), "boxed": ("boxed",)}


def _expected(name: str, verdict, mode: str, guards: bool):
    verdict = verdict[mode] if isinstance(verdict, dict) else verdict
    if not guards and (name in RUNAWAY or mode == "default" and name in RUNAWAY_DEFAULT_ONLY):
        return "timeout"
    return verdict


@pytest.mark.parametrize("mode, guards", [("default", True), ("default", False), ("boxed", True)],
                         ids=["default-guards", "default-no-guards", "boxed-guards"])
@pytest.mark.parametrize("k", range(len(ADVERSARIAL)), ids=[name for name, *_ in ADVERSARIAL])
def test_adversarial_input_is_bounded(adversarial_pools, mode, guards, k):
    name, response, gold, verdict = ADVERSARIAL[k]
    p = adversarial_pools[guards]
    p.score_batch([ALIVE[0]], [ALIVE[1]])  # the server is up: its start is not the input's cost
    start = time.monotonic()
    [result] = p.verify([response], [gold], extract=MODES[mode])
    elapsed = time.monotonic() - start
    expected = _expected(name, verdict, mode, guards)
    if expected == "timeout":
        assert result == RewardResult(0.0, 0.0, True, timed_out=True), name
    else:
        assert (result.correct, result.timed_out) == (float(expected), False), name
    assert elapsed <= ADVERSARIAL_TIMEOUT + 1.0, f"{name} took {elapsed:.2f} s"
    assert p.score_batch([ALIVE[0]], [ALIVE[1]]) == [1.0]


def test_adversarial_inputs_in_one_batch(adversarial_pools):
    p = adversarial_pools[True]
    results = p.verify([r for _, r, _, _ in ADVERSARIAL], [g for _, _, g, _ in ADVERSARIAL])
    got = ["timeout" if r.timed_out else r.correct for r in results]
    assert got == [_expected(name, v, "default", True) for name, _, _, v in ADVERSARIAL]


def test_guards_refuse_runaway_constructs_but_not_ordinary_answers():
    for bad in [r"9^{9^{9}}", r"10^{100000000}", r"(x+1)^{1000}", r"1000000!", r"100!!", r"(10^{6})!",
                r"\binom{10^{6}}{10^{5}}", "{" * 20 + "}" * 20, "1" * 5000, "1\x002"]:
        assert guard_reason(bad), bad
    for good in [r"\frac{\sqrt{3}}{2}", r"e^{-x^2}", r"2^{2023}", r"\frac{10!}{3!7!}", r"(x+1)^{5}",
                 r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"(-\infty, 3) \cup (4, \infty)", "1\n+ 2"]:
        assert guard_reason(good) is None, good


def test_pathological_items_do_not_stall_the_batch(adversarial_pools):
    # Two runaway answers among symbolic ones: each costs its timeout, and the rest of the batch is scored right.
    p = adversarial_pools[False]
    responses = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{(10^{6})!}"]
    responses += [rf"\boxed{{\frac{{{k}\sqrt{{2}}}}{{2}}}}" for k in range(1, 21)]
    golds = ["1", "1"] + [rf"{k}\sqrt{{2}}/2" if k % 2 else rf"{k}\sqrt{{3}}/2" for k in range(1, 21)]
    timeouts = p.stats["timeouts"]
    start = time.monotonic()
    results = p.verify(responses, golds)
    elapsed = time.monotonic() - start
    assert [r.correct for r in results] == [0.0, 0.0] + [float(k % 2) for k in range(1, 21)]
    assert [r.timed_out for r in results] == [True, True] + [False] * 20
    assert p.stats["timeouts"] == timeouts + 2
    assert elapsed < 2 * ADVERSARIAL_TIMEOUT + 2.0
