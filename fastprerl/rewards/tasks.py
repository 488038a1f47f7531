"""What the verification workers compute: math answers with math-verify, reasoning-gym scorers, a user's
reward function. Imported by the verification server (`fastprerl/rewards/worker.py`) before it forks its
workers; never by the trainer's process.

How a math answer is read (`verify_math`):
- a response ("math_verify" mode): math-verify's `parse` on the whole text, with boxed answers first
  (`LatexExtractionConfig(boxed_match_priority=0)`) and plain expressions (`ExprExtractionConfig`);
- the gold answer, and an answer a strict mode extracted: text with its own math delimiters or `\\boxed{}`
  (a full solution) is parsed like a response; a GSM8K solution counts from its last `####`; a bare plain
  number (`-5`, `1,22`, `1 000`, `50%`) is read by math-verify's plain-expression reader; any other bare
  answer (`\\frac{\\sqrt{3}}{2}`, `(1, 2)`, `x = 5`) as LaTeX math, `$answer$`.
Then `verify(gold, prediction)`; math-verify's own signal-based timeouts are off (they fail off the main
thread): the pool kills a worker whose call runs past the timeout.

The same (response, gold) gets the same verdict in every worker, whatever ran there before. sympy decides
some facts (is `1 - oo**oo` zero?) by trying inference rules in an order that `sympy.core.random` shuffles
with an unseeded generator, and some of its rules disagree: `simplify(1 - oo**oo)` can give 0 (so
`\\infty^{\\infty}` "equals" 1) in one process and not in another, and which verdict a worker reaches
depends on what it verified before, which depends on the load (observed: docs/REWARDS.md). Every call
therefore starts from the same state: that generator reseeded, sympy's cache and math-verify's caches of
parsed expressions cleared, and the server runs with a fixed PYTHONHASHSEED (the rules are shuffled from a
set of strings).

The guards of `fastprerl.rewards.answers.guard_reason` sit in front of math-verify's LaTeX and expression
parsers: when math-verify is about to parse a string they refuse, the verdict is 0.0 at once, what the
unguarded library would give after running into the timeout (it must not go on to a lesser match, such as
the 1 in `\\prod_{k=1}^{10^6} k`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import re

import sympy.core.random
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify import parser as _mv_parser
from sympy.core.cache import clear_cache

from .answers import EXTRACTORS, RewardResult, guard_reason

# math-verify warns once that its timeout is disabled, and logs every parse failure; neither is news here.
for _name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(_name).setLevel(logging.ERROR)

RESPONSE_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
PLAIN_CONFIG = (ExprExtractionConfig(),)
SEED = 0

_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")
# A bare plain number: math-verify's plain reading (1,22 = 1.22, 1 000 = 1000, 50% = 0.5) is meant, not its
# LaTeX reading ({1, 22}).
_PLAIN_NUMBER = re.compile(r"[-+]?[\d.,\s]*\d[\d.,\s]*%?")


# --------------------------------------------------------------------------------------------------------
# The guards in front of math-verify's parsers, and the fresh state of every call.
# --------------------------------------------------------------------------------------------------------

class GuardRefused(ValueError):
    """Raised in place of parsing a string the guards refuse; math-verify treats it as a parse failure."""


_library_parsers = (_mv_parser.parse_latex_cached, _mv_parser.parse_expr_cached)
_guards_on = False  # set for the duration of one verify_math call
_refused: list[str] = []  # what the guards refused during the current parse


def _guarded(parse_fn):
    def guarded_parse(text: str):
        if _guards_on and (why := guard_reason(text)):
            _refused.append(why)
            raise GuardRefused(why)
        return parse_fn(text)

    return guarded_parse


_mv_parser.parse_latex_cached, _mv_parser.parse_expr_cached = map(_guarded, _library_parsers)


def _fresh_state() -> None:
    _refused.clear()
    sympy.core.random.seed(SEED)
    clear_cache()
    for cached in (*_library_parsers, _mv_parser.extract_latex):
        cached.cache_clear()


# --------------------------------------------------------------------------------------------------------
# Math answers.
# --------------------------------------------------------------------------------------------------------


def read_answer(answer: str) -> list:
    """math-verify's reading of an answer on its own (a gold answer, or what a strict mode extracted)."""
    answer = answer.strip()
    if _DELIMITED.search(answer):
        return parse(answer, RESPONSE_CONFIG, parsing_timeout=None)
    if _PLAIN_NUMBER.fullmatch(answer):
        plain = parse(answer, PLAIN_CONFIG, parsing_timeout=None)
        if plain:
            return plain
    return parse(f"${answer}$", RESPONSE_CONFIG, parsing_timeout=None)


def read_gold(gold: str) -> list:
    if "####" in gold:  # a GSM8K solution: its answer follows the last ####
        gold = EXTRACTORS["gsm8k"](gold) or gold
    return read_answer(gold)


def verify_math(kind: str, text: str, gold: str, guards: bool = True) -> tuple[float, bool]:
    """(verdict, has_answer) for `text` against `gold`: `kind` "response" has math-verify find the answer
    in a whole response (has_answer: it found one); "answer" reads `text` as the answer itself."""
    global _guards_on
    _fresh_state()
    _guards_on = guards
    try:
        gold_parsed = read_gold(gold)
        pred = parse(text, RESPONSE_CONFIG, parsing_timeout=None) if kind == "response" else read_answer(text)
        if _refused:  # a runaway construct where math-verify looked for the answer (or in the gold answer)
            return 0.0, True
        if not pred:
            return 0.0, kind != "response"
        if not gold_parsed:
            return 0.0, True
        return (1.0 if verify(gold_parsed, pred, timeout_seconds=None) else 0.0), True
    finally:
        _guards_on = False


# Representative answer forms: verifying them once builds the LaTeX parser's prediction caches (the ANTLR
# DFA, kept across calls: it changes speed, not results), so that the first real answers are not ten times
# slower than the rest.
_WARM_UP = [
    ("1", "1"), (r"\frac{1}{2}", "0.5"), (r"\frac{\sqrt{3}}{2}", r"$\sqrt{3}/2$"), (r"2\pi", r"$\pi$"),
    ("5", "$x = 5$"), ("(1, 2)", "$(1, 2)$"), ("[0, 1)", "$[0, 1]$"), (r"\{1, 2, 3\}", r"$\{3, 2, 1\}$"),
    ("x^2 + 2x + 1", "$(x+1)^2$"), ("0.5", r"$50\%$"), (r"(-\infty, 3) \cup (4, \infty)", r"$(-\infty, 3)$"),
    ("3 + 2i", "$2i + 3$"), ("A", r"$\text{(A)}$"), (r"\sin x", r"$\cos x$"), ("3", r"$\log_2 8$"),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"$\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}$"),
    ("1500", r"$1.5 \times 10^{3}$"), ("2x + 3", "$y = 2x + 3$"), (r"-\infty", r"$\infty$"),
    (r"\sqrt{8}", r"The answer is $\boxed{2\sqrt{2}}$."), ("10/9", r"Final answer: $\frac{10}{9}$"),
]


def warm_up() -> None:
    for gold, response in _WARM_UP:
        try:
            verify_math("response", response, gold)
        except Exception:  # a warm-up failure only costs speed
            pass


# --------------------------------------------------------------------------------------------------------
# reasoning-gym scorers and a user's reward function.
# --------------------------------------------------------------------------------------------------------


@functools.cache
def _reasoning_gym_scorer(dataset: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset)


def score_reasoning_gym(dataset: str, answer: str | None, entry: dict) -> float:
    """The reasoning-gym dataset's own `score_answer(answer, entry)` (it may give partial credit in [0, 1])."""
    return float(_reasoning_gym_scorer(dataset)(answer, entry))


@functools.cache
def _user_function(name: str):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def call_user_reward(name: str, response: str, sample) -> tuple:
    """A user's `fn([response], [sample])` for "module:function" `name`: ("ok", score, correct, has_answer),
    or ("raised", "Type: message") when it raises or returns other than one float or RewardResult."""
    try:
        out = list(_user_function(name)([response], [sample]))
        if len(out) != 1:
            raise ValueError(f"returned {len(out)} values for 1 response")
        r = out[0]
        if isinstance(r, RewardResult):
            return "ok", float(r.score), float(r.correct), bool(r.has_answer)
        return "ok", float(r), float(r), True
    except Exception as exc:  # noqa: BLE001 -- reported to the caller with the sample
        return "raised", f"{type(exc).__name__}: {exc}"[:2000]
