"""fastprerl.rewards: extraction modes, math-verify's verdicts through the pool, the pool's timeouts and crashes,
reasoning-gym scoring, the registry.

The equivalence pairs below are written for this project (math-verify's own test suite runs in
tests/integration/test_rewards_peer_suite.py; adversarial inputs and verdict stability under load in
tests/integration/test_reward_guards.py).
"""

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
    score_batch,
    score_math,
)

pytestmark = pytest.mark.usefixtures("stop_shared_pool")   # the shared pool stops with the module

STRICT = ("boxed", "gsm8k", "answer_is")




def test_importing_rewards_loads_neither_torch_nor_sympy():
    code = ("import sys, fastprerl.rewards; "
            "print(sorted(m for m in ('torch', 'sympy', 'math_verify', 'reasoning_gym') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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
