"""fastprerl.rewards: extraction modes, math-verify's verdicts through the pool, hard timeouts, guards, the same
verdict whatever ran before, reasoning-gym scoring, the registry.

The equivalence pairs and adversarial inputs below are written for this project (math-verify's own test
suite runs in tests/test_rewards_peer_suite.py). Adversarial inputs run on pools with a 2 s timeout, once
with the guards and once without them (so that math-verify/sympy really runs away and the pool's
kill-and-replace is what bounds the time).
"""

import multiprocessing
import random
import subprocess
import sys
import time

import pytest

from fastprerl.rewards import (
    RewardPool,
    RewardResult,
    extract_answer,
    extract_reasoning_gym_answer,
    from_config,
    get_reward_fn,
    guard_reason,
    score_batch,
    score_math,
    shutdown,
)

ADVERSARIAL_TIMEOUT = 2.0
STRICT = ("boxed", "gsm8k", "answer_is")
# A symbolic pair that needs sympy: proves the pool still answers.
ALIVE = (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2")


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=2, timeout=5.0) as p:
        yield p


@pytest.fixture(scope="module", autouse=True)
def stop_shared_pool():
    """The module-level functions and the registry share one pool; stop it when this file is done."""
    yield
    shutdown()


@pytest.fixture(scope="module")
def adversarial_pools():
    with RewardPool(workers=2, timeout=ADVERSARIAL_TIMEOUT) as guarded, \
            RewardPool(workers=2, timeout=ADVERSARIAL_TIMEOUT, guards=False) as unguarded:
        yield {True: guarded, False: unguarded}


def test_importing_rewards_loads_neither_torch_nor_sympy():
    code = ("import sys, fastprerl.rewards; "
            "print(sorted(m for m in ('torch', 'sympy', 'math_verify', 'reasoning_gym') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------
# Strict extraction modes
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"First \boxed{1}, then \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"nested \boxed{\frac{\sqrt{a^{2}}}{2}} done", r"\frac{\sqrt{a^{2}}}{2}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 42", "42"),
    (r"\boxed{3} and a cut-off \boxed{4", None),
    (r"\boxed{}", None),
    (r"\boxed{   }", None),
    ("Natalia sold 48 clips.\n#### 72\n", "72"),
    ("The answer is $\\frac{3}{4}$. Done.", "$\\frac{3}{4}$"),
    ("So the final answer is 42. I think.", "42"),
    ("Final Answer: 17", "17"),
    ("the answer isn't obvious", None),
    ("no answer here at all", None),
    ("", None),
])
def test_extract_answer_strict_modes(text, expected):
    assert extract_answer(text, STRICT) == expected


def test_extract_answer_modes_are_configurable():
    text = "<answer>B</answer> but also \\boxed{C} and 12 apples\nlast words"
    assert extract_answer(text, ("boxed",)) == "C"
    assert extract_answer(text, ("answer_tag",)) == "B"
    assert extract_answer(text, ("last_number",)) == "12"
    assert extract_answer(text, ("last_line",)) == "last words"
    assert extract_answer(text, ("math_verify",)) is None  # runs in the workers, not here
    with pytest.raises(ValueError, match="unknown extraction modes"):
        extract_answer(text, ("boxed", "nonsense"))
    with pytest.raises(ValueError, match="must be the last mode"):
        extract_answer(text, ("math_verify", "boxed"))


def test_extract_reasoning_gym_answer_rule():
    assert extract_reasoning_gym_answer("think\n<answer>\n1 2\n3 4\n</answer>") == ("1 2\n3 4", True)
    assert extract_reasoning_gym_answer("so \\boxed{cat}") == ("cat", True)
    assert extract_reasoning_gym_answer("reasoning\nAnswer: dog\nbye") == ("dog", True)
    assert extract_reasoning_gym_answer("reasoning\nfish\n\n") == ("fish", False)


# ---------------------------------------------------------------------------------------------------------
# The default extraction: the answers of the issue that the strict modes missed, each (response, gold, verdict).
# ---------------------------------------------------------------------------------------------------------

DEFAULT_CASES = [
    ("Final Answer: The volume of $ABCDEFGH$ is 120.", "120", 1),
    (r"Therefore $x \geq 5$ is the solution.", r"$x \geq 5$", 1),
    (r"Therefore $x \geq 5$ is the solution.", r"$x \geq 6$", 0),
    ("-5", "-5", 1),
    (r"$\frac{10}{9}$", "10/9", 1),
    (r"$\frac{10}{9}$", "9/10", 0),
    (r"\boxed{1}, \boxed{2}", r"$\{1,2\}$", 1),
    (r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}", r"$(2, 2), (6, 2)$", 1),
    (r"so $\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}$", r"$\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}$", 1),
    (r"so $\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}$", r"$\begin{bmatrix} 1 & 2 \\ 3 & 5 \end{bmatrix}$", 0),
    (r"The answer is $25\%$.", "0.25", 1),
    ("1.22", "1,22", 1),
    ("The total is 1 000 apples.", "1000", 1),
    (r"Thus the answer is $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt3}{2}", 1),
    (r"Thus the answer is $\boxed{2\sqrt{2}}$.", r"\sqrt{8}", 1),
    (r"Thus the answer is $\boxed{2\sqrt{2}}$.", r"2\sqrt{3}", 0),
    (r"We get $x = 5$.", "5", 1),
    (r"$(-\infty, 3) \cup (4, \infty)$", r"(-\infty,3)\cup(4,\infty)", 1),
    (r"$[0, 1]$", "[0, 1)", 0),
    (r"I think it is \boxed{x^2 + 2x + 1}", "(x+1)^2", 1),
    ("Natalia sold 48 clips.\n#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1),
]


@pytest.mark.parametrize("response, gold, verdict", DEFAULT_CASES, ids=[f"{r[:30]} ~ {g[:20]}" for r, g, _ in DEFAULT_CASES])
def test_default_extraction_is_math_verify(pool, response, gold, verdict):
    [result] = pool.verify([response], [gold])
    assert result == RewardResult(float(verdict), float(verdict), True)


def test_no_answer_and_format_penalty(pool):
    results = pool.verify([r"\boxed{5}", r"\boxed{6}", "I don't know"], ["5", "5", "5"], format_penalty=0.5)
    assert results == [RewardResult(1.0, 1.0, True), RewardResult(0.0, 0.0, True), RewardResult(-0.5, 0.0, False)]
    strict = pool.verify(["The result: 5", r"\boxed{5}"], ["5", "5"], extract=("boxed",), format_penalty=0.5)
    assert strict == [RewardResult(-0.5, 0.0, False), RewardResult(1.0, 1.0, True)]


# Strict modes: the extracted answer itself goes to math-verify (bare LaTeX as $...$, plain numbers plainly).
STRICT_CASES = [
    (r"So the result is \boxed{\frac{\sqrt{3}}{2}}.", r"\sqrt{3}/2", 1),
    ("Step 1 ... Step 2 ...\n#### 1,234", "1234", 1),
    ("Reasoning first. The answer is (-\\infty, 2]", r"(-\infty, 2)", 0),
    ("The answer is $\\frac{3}{4}$.", "0.75", 1),
    (r"\boxed{x = 5}", "5", 1),
    ("So 2 + 2 = 4", "4", 0),  # no box, no ####, no "the answer is": no answer
]


@pytest.mark.parametrize("response, gold, verdict", STRICT_CASES)
def test_strict_modes(pool, response, gold, verdict):
    assert pool.score_batch([response], [gold], extract=STRICT) == [float(verdict)]


def test_last_number_mode_of_the_main_job(pool):
    responses = ["12 + 30 = 42", "12 + 30 = 41\nso 41", "I cannot", "the sum is 1,042"]
    golds = ["42", "42", "42", "1042"]
    assert [r.score for r in pool.verify(responses, golds, extract=("last_number",))] == [1.0, 0.0, 0.0, 1.0]


def test_batch_matches_single_scores(pool):
    responses = [r for r, _, _ in DEFAULT_CASES]
    golds = [g for _, g, _ in DEFAULT_CASES]
    assert pool.score_batch(responses, golds) == [float(v) for _, _, v in DEFAULT_CASES]


# ---------------------------------------------------------------------------------------------------------
# The same verdict whatever ran before in the worker, in any process, under load.
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# Adversarial inputs: (name, response, gold, verdict). With the guards every one is answered by the verifier
# (or refused by the guards: 0.0) in well under the timeout, except "hard integral", which is a defined
# timeout; without the guards the RUNAWAY ones run into the timeout (0.0, timed_out=True). Every call returns
# within timeout + 1 s and the pool still answers afterwards.
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# The pool itself: timeouts, crashes, exceptions.
# ---------------------------------------------------------------------------------------------------------

def test_pool_timeouts_run_in_parallel_and_the_rest_completes(pool):
    pool.run(abs, [(0,)])  # the server is up
    before = pool.stats
    start = time.monotonic()
    out = pool.run(time.sleep, [(30,), (30,), (0,), (0,), (0,)], timeout=1.0, default="timed out")
    elapsed = time.monotonic() - start
    assert out == ["timed out", "timed out", None, None, None]
    assert elapsed < 2.0  # the two 1 s timeouts overlapped
    assert pool.stats["timeouts"] == before["timeouts"] + 2


def test_pool_replaces_a_crashed_worker_and_reports_errors(pool):
    import os

    before = pool.stats
    assert pool.run_detailed(os._exit, [(3,)]) == [(False, "crash")]
    assert pool.run(int, [("x",), ("7",)], default=-1) == [-1, 7]  # int("x") raises in the worker
    assert pool.stats["crashes"] == before["crashes"] + 1 and pool.stats["errors"] == before["errors"] + 1
    assert pool.last_error == "ValueError"
    assert pool.run("math:factorial", [(5,)] * 4) == [120] * 4  # a "module:function" resolved in the worker


def test_closed_pool_refuses_work():
    p = RewardPool(workers=1)
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.run(abs, [(1,)])


def test_invalid_arguments():
    with pytest.raises(ValueError):
        RewardPool(workers=0)
    with pytest.raises(ValueError):
        RewardPool(timeout=0)
    with RewardPool(workers=1) as p:
        with pytest.raises(ValueError, match="2 responses but 1"):
            p.verify(["a", "b"], ["1"])
        with pytest.raises(ValueError, match="format_penalty"):
            p.verify(["a"], ["1"], format_penalty=-1)
        with pytest.raises(ValueError, match="must be the last mode"):
            p.verify(["a"], ["1"], extract=("math_verify", "boxed"))


# ---------------------------------------------------------------------------------------------------------
# Module-level functions, the registry, from_config.
# ---------------------------------------------------------------------------------------------------------

def test_module_level_score_math_and_score_batch():
    assert score_math(r"thus $\boxed{\frac{\sqrt{3}}{2}}$", r"\sqrt{3}/2", timeout=5.0) == 1.0
    assert score_math("#### 41", "42") == 0.0
    assert score_batch([r"$2\pi$", "The answer is 7.", "nothing"], [r"2\pi", "7", "7"]) == [1.0, 1.0, 0.0]


def test_scoring_works_off_the_main_thread():
    # The failure that zeroed every reward elsewhere: signal-based timeouts only work on the main thread.
    import threading

    out = []
    worker = threading.Thread(target=lambda: out.append(score_math(r"\boxed{\sqrt{8}}", r"2\sqrt{2}")))
    worker.start()
    worker.join(timeout=60)
    assert out == [1.0]


def test_math_reward_fn_uses_sample_answer():
    fn = get_reward_fn("math", timeout=5.0, format_penalty=0.25)
    samples = [{"prompt": "p", "answer": "12"}, {"prompt": "p", "answer": r"\frac{1}{2}"}, {"answer": "3"}]
    out = fn([r"\boxed{12}", r"\boxed{\sqrt{0.16}}", "no idea"], samples)
    assert [r.score for r in out] == [1.0, 0.0, -0.25]
    assert [r.has_answer for r in out] == [True, True, False]


class _RC:
    def __init__(self, **kw):
        self.__dict__.update(dict(fn="math", extract=("math_verify",), timeout=5.0, workers=2, format_penalty=0.0), **kw)


def test_from_config_builds_every_kind_and_names_the_key():
    math = from_config(_RC(extract=("last_number",), format_penalty=0.5, timeout=3.0))
    assert (math.extract, math.format_penalty, math.timeout) == (("last_number",), 0.5, 3.0)
    assert [r.score for r in math(["so 1 + 1 = 2", "no"], [{"answer": "2"}, {"answer": "2"}])] == [1.0, -0.5]
    assert from_config(_RC(fn="reasoning_gym")).timeout == 5.0
    user = from_config(_RC(fn="user_rewards:length_is_n", timeout=1.5, workers=1))
    assert (user.timeout, user.workers) == (1.5, 1)
    with pytest.raises(ValueError, match="reward.extract: .*must be the last mode"):
        from_config(_RC(extract=("math_verify", "boxed")))
    with pytest.raises(ValueError, match="reward.format_penalty: applies to the built-in rewards"):
        from_config(_RC(fn="user_rewards:length_is_n", format_penalty=0.1))
    with pytest.raises(ValueError, match="reward.fn: unknown reward function 'mathh'"):
        from_config(_RC(fn="mathh"))


def test_unknown_reward_fn_names_the_choices():
    with pytest.raises(ValueError, match="'math'.*'reasoning_gym'.*module:function"):
        get_reward_fn("mathh")
    with pytest.raises(ValueError, match="cannot load"):
        get_reward_fn("no_such_module_anywhere:fn")
    with pytest.raises(ValueError, match="apply only to built-in"):
        get_reward_fn("user_rewards:length_is_n", extract=("boxed",))
    for malformed in (":fn", "module:", "a:b:c", "my module:fn"):
        with pytest.raises(ValueError, match="unknown reward function"):
            get_reward_fn(malformed)


# reasoning-gym tasks across its families; their gold answers must score 1.0 through the registry.
REASONING_GYM_TASKS = [
    "basic_arithmetic", "chain_sum", "gsm_symbolic", "simple_equations", "polynomial_equations",
    "fraction_simplification", "complex_arithmetic", "simple_integration", "spell_backward", "word_sorting",
    "letter_counting", "family_relationships", "spiral_matrix", "base_conversion", "knights_knaves", "countdown",
]


@pytest.fixture(scope="module")
def reasoning_gym_entries():
    import reasoning_gym  # a dependency of the project: its absence is a failure, not a skip

    return [entry for name in REASONING_GYM_TASKS for entry in reasoning_gym.create_dataset(name, size=2, seed=7)]


def test_reasoning_gym_gold_answers_score_one(reasoning_gym_entries):
    fn = get_reward_fn("reasoning_gym", timeout=10.0)
    entries = reasoning_gym_entries
    responses = [f"<think>...</think>\n<answer>{e['answer']}</answer>" for e in entries]
    # Samples may carry the entry under "entry" or be the entry itself.
    samples = [{"entry": e} if i % 2 else e for i, e in enumerate(entries)]
    out = fn(responses, samples)
    failed = [(e["metadata"]["source_dataset"], e["answer"], r) for e, r in zip(entries, out) if r.score != 1.0]
    assert not failed
    boxed = fn([f"so \\boxed{{{e['answer']}}}" for e in entries[:4]], entries[:4])
    assert [r.correct for r in boxed] == [1.0] * 4


def test_reasoning_gym_wrong_answers_and_raising_scorers(reasoning_gym_entries):
    fn = get_reward_fn("reasoning_gym", timeout=10.0, format_penalty=0.5)
    entries = reasoning_gym_entries
    wrong = fn(["<answer>certainly not this</answer>"] * len(entries), entries)
    assert all(r.correct < 1.0 and r.has_answer for r in wrong)
    # prime_factorization's scorer raises on an answer it cannot parse: the reward is 0.0, not an exception.
    import reasoning_gym

    [entry] = reasoning_gym.create_dataset("prime_factorization", size=1, seed=1)
    assert fn(["no tags, just words"], [entry]) == [RewardResult(-0.5, 0.0, False)]
