"""Rewards: answer extraction, answer equivalence, hard timeouts, and the registry of reward functions.

How one math answer is scored (`RewardPool.verify`, `score_math`, `score_batch`):

1. Extract the final answer from the response (`extract_answer`): by default the last `\\boxed{...}` (or
   `\\fbox{...}`), else GSM8K's `#### 42`, else "the answer is ...". No answer -> 0.0 and `has_answer=False`.
2. Normalise answer and gold (`normalise_answer`): math delimiters, `\\left`/`\\right`, spacing commands,
   `\\dfrac`, text wrappers around the whole answer, a few unicode symbols.
3. Cheap path, in the calling process: equal normalised strings -> 1.0; two plain numbers (integers,
   decimals, fractions, percentages, scientific notation, thousands separators, `x = 5`, units, currency)
   -> compared as exact fractions in Python, a decimal matching to 6 decimal places (math-verify's rounding),
   with no sympy. This is how plain numeric answers go at thousands per second.
4. Guards, in the calling process: an answer that is too long, nests too deep, or holds a construct known to
   make sympy run away (exponent towers, huge exponents or factorials) is not handed to sympy; it scores 1.0
   only by the normalised string match of step 3, else 0.0. `RewardPool(guards=False)` turns this off.
5. Everything else goes to a worker process of the pool, which runs math-verify (`parse` + `verify`, sympy).
   A worker that overruns the timeout is killed and replaced, and the answer scores 0.0; a worker that dies
   is replaced likewise. Both are counted in `RewardPool.stats`, so that a run whose rewards all time out
   shows it instead of silently training on zeros.

The workers live in a separate server process (`fastprerl/_verify_worker.py`) that imports sympy and
math-verify once and forks warm workers from itself; the caller, which may hold torch and threads, is never
forked. This module imports neither torch nor sympy.

Reward functions for the trainer (`get_reward_fn`): "math" (gold in `sample["answer"]`), "reasoning_gym"
(the task's own scorer, see `extract_reasoning_gym_answer` for the extraction rule) or "module:function"
(a user's function `fn(responses, samples) -> list[float | RewardResult]`). Each returns one
`RewardResult(score, correct, has_answer)` per response; `has_answer` is the format metric.
"""

from __future__ import annotations

import atexit
import importlib
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import connection
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "DEFAULT_MODES",
    "EXTRACTORS",
    "BUILTIN_REWARDS",
    "USER_REWARD",
    "RewardResult",
    "RewardPool",
    "extract_answer",
    "extract_reasoning_gym_answer",
    "normalise_answer",
    "guard_reason",
    "score_math",
    "score_batch",
    "shutdown",
    "get_reward_fn",
    "MathReward",
    "ReasoningGymReward",
]

DEFAULT_MODES = ("boxed", "gsm8k", "answer_is")

# Limits of the guards (step 4 of the module doc).
MAX_ANSWER_CHARS = 1000  # longer answers are matched as strings only
MAX_NESTING = 8  # of (), [], {} together; math-verify's LaTeX parser slows steeply with depth
MAX_EXPONENT = 10_000  # largest integer allowed in an exponent
MAX_GROUP_EXPONENT = 100  # ... of a bracketed base: sympy expands (x+1)^400 for seconds
MAX_BIG_OPERAND = 1_000  # largest integer allowed beside a factorial, binomial, product or sum


@dataclass(frozen=True)
class RewardResult:
    """One response's reward.

    score: what the trainer optimises: `correct`, minus the format penalty when no answer was found.
    correct: the verifier's verdict (1.0 / 0.0; reasoning-gym tasks may give partial credit).
    has_answer: an answer could be extracted in the expected format (logged as `reward/format`).
    timed_out: the verdict was decided by a timeout (score and correct are then 0.0; logged as
        `reward/timeouts`), never by the verifier.
    """

    score: float
    correct: float
    has_answer: bool
    timed_out: bool = False


# --------------------------------------------------------------------------------------------------------
# Answer extraction. Each extractor returns the LAST occurrence of its form, or None. All are linear in the
# length of the text, so a 1 MB response costs milliseconds.
# --------------------------------------------------------------------------------------------------------

_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACES = re.compile(r"\s*")
_TOKEN = re.compile(r"[^\s$]+")


def _matching_brace(text: str, open_at: int) -> int:
    """Index of the `}` closing the `{` at `open_at` (escaped `\\{`, `\\}` are not groups), or -1."""
    depth = 0
    for m in _BRACE_OR_ESCAPE.finditer(text, open_at):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 42`). An unclosed last box -- a
    response cut off inside its answer -- gives None rather than an earlier box."""
    end = len(text)
    while True:
        at = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if at < 0:
            return None
        after = at + (6 if text.startswith("\\boxed", at) else 5)
        if after < len(text) and text[after].isalpha():  # \boxedsomething is another command
            end = at
            continue
        break
    start = _SPACES.match(text, after).end()
    if start < len(text) and text[start] == "{":
        close = _matching_brace(text, start)
        return None if close < 0 else text[start + 1 : close]
    m = _TOKEN.match(text, start)
    return m.group() if m else None


def _last_gsm8k(text: str) -> str | None:
    at = text.rfind("####")
    if at < 0:
        return None
    line_end = text.find("\n", at)
    return text[at + 4 : line_end if line_end >= 0 else len(text)]


_ANSWER_IS = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _last_answer_is(text: str) -> str | None:
    """What follows the last "the answer is" / "final answer:" / "Answer:", up to the end of that line or
    sentence; a `$...$` right after the phrase is taken whole."""
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return None
    line_end = text.find("\n", last.end())
    rest = text[last.end() : line_end if line_end >= 0 else len(text)].strip()
    if rest.startswith("$"):
        close = rest.find("$", 1) if not rest.startswith("$$") else rest.find("$$", 2)
        if close > 0:
            return rest[: close + (2 if rest.startswith("$$") else 1)]
    end = _SENTENCE_END.search(rest)
    return rest[: end.start()] if end else rest


def _last_answer_tag(text: str) -> str | None:
    at = text.rfind("<answer>")
    if at < 0:
        return None
    close = text.find("</answer>", at)
    return None if close < 0 else text[at + 8 : close]


_NUMBER_IN_TEXT = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER_IN_TEXT.finditer(text):
        pass
    return None if last is None else last.group()


def _last_line(text: str) -> str | None:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line
    return None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": _last_boxed,
    "gsm8k": _last_gsm8k,
    "answer_is": _last_answer_is,
    "answer_tag": _last_answer_tag,
    "last_number": _last_number,
    "last_line": _last_line,
}

Extract = Sequence[str] | Callable[[str], str | None]


def extract_answer(text: str, modes: Extract = DEFAULT_MODES) -> str | None:
    """The final answer in `text`, or None when there is none (an empty box counts as none).

    `modes` are tried in order and the first that finds a non-empty answer wins; each takes the last
    occurrence of its form: "boxed" (`\\boxed{}`/`\\fbox{}`, nested braces), "gsm8k" (`#### 42`),
    "answer_is" ("the answer is ...", "Final answer: ..."), "answer_tag" (`<answer>...</answer>`),
    "last_number", "last_line". `modes` may also be a callable `text -> str | None`.
    """
    _check_modes(modes)
    if not isinstance(text, str):
        return None
    if callable(modes):
        answer = modes(text)
        return answer.strip() if isinstance(answer, str) and answer.strip() else None
    for mode in modes:
        answer = EXTRACTORS[mode](text)
        if answer is not None and answer.strip():
            return answer.strip()
    return None


def _check_modes(modes: Extract) -> None:
    if callable(modes):
        return
    if isinstance(modes, str) or any(m not in EXTRACTORS for m in modes):
        raise ValueError(f"unknown extraction mode in {modes!r}; choose from {sorted(EXTRACTORS)}")


def extract_reasoning_gym_answer(text: str) -> tuple[str | None, bool]:
    """(answer, has_answer) for a reasoning-gym task. The rule, first that applies:

    1. the last `<answer>...</answer>` (reasoning-gym's own prompts ask for it; keeps multi-line answers);
    2. the last `\\boxed{...}`;
    3. the rest of the line after the last "Answer:" / "the answer is";
    4. otherwise the last non-empty line, with `has_answer=False` (scored, but counts as a format miss).
    """
    for mode in ("answer_tag", "boxed", "answer_is"):
        answer = extract_answer(text, (mode,))
        if answer is not None:
            return answer, True
    return extract_answer(text, ("last_line",)), False


# --------------------------------------------------------------------------------------------------------
# Normalisation and the cheap comparison.
# --------------------------------------------------------------------------------------------------------

_UNICODE = {i: i - 0xFEE0 for i in range(0xFF01, 0xFF5F)}  # fullwidth ASCII forms -> ASCII
_UNICODE.update({ord(k): v for k, v in {
    "\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u22c5": r"\cdot ", "\u00b7": r"\cdot ",
    "\u00f7": r"\div ", "\u03c0": r"\pi ", "\u221e": r"\infty ", "\u221a": r"\sqrt ", "\u2264": r"\le ",
    "\u2265": r"\ge ", "\u2260": r"\ne ", "\u00b2": "^2", "\u00b3": "^3", "\u00b0": r"^\circ",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u200b": "", "\u200c": "", "\u200d": "", "\ufeff": "",
}.items()})

_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|boxed|fbox)\s*\{")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?:\.|\b)|\\displaystyle\b|\\[!,]")
_WIDE_SPACE = re.compile(r"\\(?:[;: ]|q?quad\b)|~")
_FRAC_VARIANT = re.compile(r"\\[dt](frac|binom)\b")
_PLAIN_SQRT = re.compile(r"(?<![\\A-Za-z])sqrt\s*\(([^()]*)\)")
_PLAIN_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_WHITESPACE = re.compile(r"\s+")


def _unwrap_whole(s: str) -> str:
    """Drop math delimiters and text wrappers that span the whole answer (`$5$`, `\\text{5 cm}`)."""
    for _ in range(8):
        before = s
        for left, right in _DELIMITERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                inner = s[len(left) : len(s) - len(right)]
                if not (left.startswith("$") and "$" in inner):  # not "$5$ and $6$"
                    s = inner.strip()
        m = _WRAPPER.match(s)
        if m and _matching_brace(s, m.end() - 1) == len(s) - 1:
            s = s[m.end() : -1].strip()
        if s == before:
            break
    return s


def normalise_answer(answer: str) -> str:
    """A canonical spelling of an extracted answer: what two answers share when they differ only in
    presentation. Used for the exact string match and as the input to math-verify."""
    s = answer.translate(_UNICODE).strip()
    s = _unwrap_whole(s)
    s = _LEFT_RIGHT.sub("", s)
    s = _WIDE_SPACE.sub(" ", s)
    s = _FRAC_VARIANT.sub(r"\\\1", s)
    s = _PLAIN_SQRT.sub(r"\\sqrt{\1}", s)
    s = _PLAIN_PI.sub(r"\\pi ", s)
    s = _WHITESPACE.sub(" ", s).strip()
    s = s.rstrip(".").rstrip()  # "The answer is 5." -> "5"
    return _unwrap_whole(s)


def _compact(s: str) -> str:
    return _WHITESPACE.sub("", s)


_ASSIGNMENT = re.compile(r"^([A-Za-z](?:_\{?\w+\}?)?)\s*=\s*([^=<>]+)$")


def _split_assignment(s: str) -> tuple[str | None, str]:
    """'x = 5' -> ('x', '5'); anything else -> (None, s)."""
    m = _ASSIGNMENT.match(s)
    return (m.group(1), m.group(2).strip()) if m else (None, s)


@dataclass(frozen=True)
class _Number:
    value: Fraction
    decimal: bool  # written with a decimal point or an exponent: compared to 6 decimal places
    percent: bool


_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_NUMBER = re.compile(
    rf"(?P<sign>[-+]?)(?P<mant>{_DECIMAL})"
    r"(?:[eE](?P<e1>[-+]?\d+)|(?:\\times|\\cdot|\*)10\^(?:\{(?P<e2>[-+]?\d+)\}|(?P<e3>\d)))?"
)
_LATEX_FRAC = re.compile(r"(?P<sign>[-+]?)\\frac(?:\{(?P<n>[-+]?\d+)\}\{(?P<d>[-+]?\d+)\}|(?P<n1>\d)(?P<d1>\d))")
_SLASH_FRAC = re.compile(r"(?P<n>[-+]?\d+)/(?P<d>[-+]?\d+)")
_DEGREES = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree)\s*(?:[CF]\b)?$")
_TEXT_UNIT = re.compile(r"\s*\\(?:text|mbox|mathrm|textrm)\s*\{\s*[A-Za-z][A-Za-z .\-/^0-9]*\}$")
_WORD_UNIT = re.compile(r"(?<=[\d%}])\s+([A-Za-z]{2,}\.?(?:\s+[A-Za-z]+\.?){0,2})$")
_NOT_UNITS = {"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "and", "or", "mod",
              "times", "cdot", "div", "infty", "frac", "to", "i"}


def _strip_units(s: str) -> str:
    s = _DEGREES.sub("", s).strip()
    s = _TEXT_UNIT.sub("", s).strip()
    m = _WORD_UNIT.search(s)
    if m and not any(w.strip(".").lower() in _NOT_UNITS for w in m.group(1).split()):
        s = s[: m.start()].strip()
    if s.startswith("\\$") or s.startswith("$"):
        s = s[2:] if s.startswith("\\$") else s[1:]
    return s.strip()


def _as_number(s: str) -> _Number | None:
    """The exact value of a plain number written in any of the usual ways, or None."""
    if len(s) > MAX_ANSWER_CHARS:
        return None
    s = _strip_units(s)
    percent = s.endswith("%")
    if percent:
        s = s[:-2] if s.endswith("\\%") else s[:-1]
    c = _compact(_strip_units(s)).replace("{,}", ",")
    if m := _NUMBER.fullmatch(c):
        exponent = int(m["e1"] or m["e2"] or m["e3"] or 0)
        if abs(exponent) > MAX_EXPONENT:
            return None
        value = Fraction(m["mant"].replace(",", "")) * Fraction(10) ** exponent
        decimal = "." in m["mant"] or m["e1"] is not None or exponent < 0
        return _Number(-value if m["sign"] == "-" else value, decimal, percent)
    if m := (_LATEX_FRAC.fullmatch(c) or _SLASH_FRAC.fullmatch(c)):
        groups = m.groupdict()
        num, den = int(groups.get("n") or groups.get("n1")), int(groups.get("d") or groups.get("d1"))
        if den == 0:
            return None
        value = Fraction(num, den)
        return _Number(-value if groups.get("sign") == "-" else value, False, percent)
    return None


def _close(a: Fraction, a_decimal: bool, b: Fraction, b_decimal: bool) -> bool:
    # Exact forms compare exactly; a decimal agrees with anything that rounds like it to 6 decimal places
    # (math-verify's default `float_rounding`), so 0.333333 == 1/3 but 0.33 != 1/3.
    if a == b:
        return True
    return (a_decimal or b_decimal) and round(a, 6) == round(b, 6)


def _numbers_equal(a: _Number, b: _Number) -> bool:
    if a.percent == b.percent:
        return _close(a.value, a.decimal, b.value, b.decimal)
    pct, plain = (a, b) if a.percent else (b, a)
    if _close(pct.value / 100, pct.decimal, plain.value, plain.decimal):  # 50% == 0.5
        return True
    # 50% == 50 as well when both are written as integers (as math-verify has it): "what percent ...?"
    return not pct.decimal and not plain.decimal and pct.value == plain.value and pct.value.denominator == 1


# --------------------------------------------------------------------------------------------------------
# Guards: constructs that make sympy run away, caught in microseconds instead of a timeout.
# --------------------------------------------------------------------------------------------------------

_INTEGER = re.compile(r"\d+")
_BIG_OPERATOR = re.compile(r"!|\\(?:binom|choose|prod|sum|Gamma|gamma)\b")
_NESTED_FACTORIAL = re.compile(r"!\s*!|![)}\]]+\s*!")
_NUMERIC_POWER = re.compile(r"(\d+)\s*\^\s*\{?\s*(\d+)")


def _max_integer(s: str) -> int:
    # Compare digit counts first: never turn a 10,000-digit run into an int just to compare it.
    runs = _INTEGER.findall(s)
    if not runs:
        return 0
    longest = max(runs, key=lambda r: (len(r.lstrip("0")), r.lstrip("0")))
    return int(longest) if len(longest) <= 30 else 10**30


def _exponents(s: str):
    """(last character of the base, argument) of every `^` (and `**`); the argument is a {} or () group, a
    command name, or a run of digits / one character."""
    for m in re.finditer(r"\^|\*\*", s):
        base = s[: m.start()].rstrip()[-1:]
        i = _SPACES.match(s, m.end()).end()
        if i >= len(s):
            continue
        if s[i] == "{":
            close = _matching_brace(s, i)
            yield base, s[i + 1 : close] if close > 0 else s[i + 1 :]
        elif s[i] == "(":
            yield base, s[i + 1 : _matching_paren(s, i)]
        elif s[i] == "\\":
            yield base, re.match(r"\\[A-Za-z]*", s[i:]).group()
        else:
            yield base, (re.match(r"[-+]?\d+", s[i:]) or re.match(r".", s[i:])).group()


def _matching_paren(s: str, open_at: int) -> int:
    depth = 0
    for j in range(open_at, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return len(s)


def _nesting(s: str) -> int:
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    return deepest


def guard_reason(answer: str) -> str | None:
    """Why `answer` must not be handed to sympy, or None when it may be."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "too long"
    if any(ord(c) < 32 or ord(c) == 127 for c in answer):
        return "control character"
    if _nesting(answer) > MAX_NESTING:
        return "nested too deep"
    for base, exponent in _exponents(answer):
        if ("^" in exponent or "**" in exponent) and not re.search(r"[A-Za-z]", exponent):
            return "numeric exponent tower"
        if _max_integer(exponent) > (MAX_GROUP_EXPONENT if base in ")]}" and base else MAX_EXPONENT):
            return "huge exponent"
    if _BIG_OPERATOR.search(answer):
        if _NESTED_FACTORIAL.search(answer):
            return "nested factorial"
        if _max_integer(answer) > MAX_BIG_OPERAND or any(
            int(exp) * math.log10(max(int(base), 1)) > math.log10(MAX_BIG_OPERAND)  # (10^{6})!
            for base, exp in _NUMERIC_POWER.findall(answer)
        ):
            return "huge factorial, binomial, product or sum"
    return None


# --------------------------------------------------------------------------------------------------------
# The worker pool: a client of the verification server (fastprerl/_verify_worker.py).
# --------------------------------------------------------------------------------------------------------


class RewardPool:
    """Verification worker processes with a hard per-item timeout.

    The workers belong to a small server process (`python -m fastprerl._verify_worker`) that this pool
    starts on first need: a fresh interpreter that imports sympy and math-verify once and forks warm workers
    from there, so that replacing a killed worker costs milliseconds and the caller's process (torch,
    threads, CUDA) is never forked and its `__main__` never re-imported.

    `run(fn, args_list)` calls `fn(*args)` in a worker for every args tuple. A call that takes longer than
    `timeout` seconds has its worker killed and replaced and yields `default`; so does a call whose worker
    dies, and one that raises. The rest of the batch goes on on the other workers. `verify(...)` and
    `score_batch(...)` score math answers: the cheap path and the guards run in this process and only the
    answers that need sympy reach the workers. Use as a context manager or call `close()`. Safe to share
    between threads (calls are serialised).
    """

    def __init__(self, workers: int = 2, timeout: float = 5.0, *, guards: bool = True,
                 preload: Sequence[str] = (), max_memory_mb: int | None = 8192, start_timeout: float = 120.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.workers = workers
        self.timeout = float(timeout)
        self.guards = guards
        self.max_memory_mb = max_memory_mb
        self.start_timeout = start_timeout
        self._preload = tuple(preload)
        self._server: subprocess.Popen | None = None
        self._conn: connection.Connection | None = None
        self._lock = threading.RLock()
        self._closed = False
        self.last_error: str | None = None
        self._stats = dict.fromkeys(
            ("items", "no_answer", "cheap", "guarded", "pooled", "timeouts", "crashes", "errors"), 0)

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the pool was made: math items scored, of which without an answer, decided by the
        cheap path, refused by the guards, sent to workers; and calls in workers that timed out, crashed or
        raised. A trainer should log timeouts: a run whose rewards all time out is a broken run."""
        return dict(self._stats)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and its workers."""
        with self._lock:
            self._closed = True
            self._stop_server()

    def preload(self, *modules: str) -> None:
        """Make the workers import `modules` before they take work (e.g. "reasoning_gym", which takes
        seconds to import), so that the import does not count against the first item's timeout."""
        with self._lock:
            new = tuple(m for m in modules if m not in self._preload)
            if not new:
                return
            self._preload += new
            if self._conn is not None:  # a running server imports them now; a new one is started with them
                try:
                    self._request(pickle.dumps(("preload", new)), time.monotonic() + self.start_timeout)
                except _ServerDied:
                    self._stop_server()

    def _start_server(self) -> None:
        here, there = socket.socketpair()
        # The server sees the caller's import path, and runs single-threaded numeric libraries.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        command = [sys.executable, "-m", "fastprerl._verify_worker", str(there.fileno()), str(self.workers),
                   str(self.max_memory_mb or 0), *self._preload]
        self._server = subprocess.Popen(command, pass_fds=(there.fileno(),), stdin=subprocess.DEVNULL, env=env)
        there.close()
        self._conn = connection.Connection(here.detach())
        try:
            self._receive(time.monotonic() + self.start_timeout)
        except _ServerDied as exc:
            if self._server.poll() is None:
                self._server.kill()
            code = self._server.wait()
            self._stop_server()
            raise RuntimeError(f"{exc} while starting (exit code {code}); see its error output above") from None

    def _stop_server(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        if self._server is not None:
            try:
                self._server.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server = None

    def _receive(self, deadline: float):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ServerDied("the reward verification server did not answer in time")
            try:
                if self._conn.poll(min(remaining, 1.0)):
                    return self._conn.recv()
            except (EOFError, OSError) as exc:
                raise _ServerDied(f"the reward verification server died ({type(exc).__name__})") from None

    def _request(self, payload: bytes, deadline: float):
        """Send one pickled request to the server (starting it if need be) and wait for its reply."""
        if self._conn is None:
            self._start_server()
        self._conn.send_bytes(payload)
        status, replies, counts, error = self._receive(deadline)
        if status != "done":
            raise RuntimeError(f"the reward verification server could not run the request: {error}")
        return replies, counts

    # -- generic execution -------------------------------------------------------------------------------
    def run(self, fn: Callable | str, args_list: Sequence[Sequence[Any]], *, timeout: float | None = None,
            default: Any = None) -> list:
        """[fn(*args) for args in args_list], computed in the workers; `default` where a call timed out,
        crashed its worker or raised. `fn` is a picklable top-level function or a "module:function" string
        (resolved in the worker, so that this process need not import it)."""
        args_list = [tuple(a) for a in args_list]
        if not args_list:
            return []
        timeout = self.timeout if timeout is None else float(timeout)
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool is closed")
            payload = pickle.dumps(("run", fn, args_list, timeout))  # raises here if `fn` cannot be sent
            # The server bounds every call by `timeout`; this outer bound only catches a wedged server.
            rounds = -(-len(args_list) // self.workers)
            deadline = time.monotonic() + rounds * (timeout + 1.0) + 60.0
            try:
                replies, counts = self._request(payload, deadline)
            except _ServerDied as exc:
                self.last_error = str(exc)
                self._stats["crashes"] += 1
                self._stop_server()
                return [default] * len(args_list)
            except BaseException:
                # Interrupted mid-request: the server's late reply would answer the next request.
                self._stop_server()
                raise
        for key, n in counts.items():
            self._stats[key] += n
        results = []
        for ok, value in replies:
            if not ok and value not in ("timeout", "crash"):
                self.last_error = value
            results.append(value if ok else default)
        return results

    # -- math answers --------------------------------------------------------------------------------------
    def verify(self, responses: Sequence[str], golds: Sequence[Any], *, timeout: float | None = None,
               extract: Extract = DEFAULT_MODES, format_penalty: float = 0.0) -> list[RewardResult]:
        """Score each response's final answer against its gold answer (plain, or with `\\boxed`/`####`).

        `format_penalty` (>= 0) is subtracted from `score` when no answer could be extracted."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        if format_penalty < 0:
            raise ValueError(f"format_penalty is subtracted and must be >= 0, got {format_penalty}")
        _check_modes(extract)
        results: list[RewardResult | None] = [None] * len(responses)
        to_pool: dict[tuple[str, str], list[int]] = {}  # identical (answer, gold) pairs go once
        with self._lock:
            stats = self._stats
            stats["items"] += len(responses)
            gold_cache: dict[str, str] = {}
            for i, (response, gold) in enumerate(zip(responses, golds)):
                answer = extract_answer(response, extract)
                if answer is None:
                    stats["no_answer"] += 1
                    results[i] = RewardResult(-format_penalty, 0.0, False)
                    continue
                gold_key = gold if isinstance(gold, str) else str(gold)
                if gold_key not in gold_cache:
                    gold_cache[gold_key] = _gold_answer(gold_key)
                route, outcome = _decide(answer, gold_cache[gold_key], self.guards)
                if route == "pool":
                    to_pool.setdefault(outcome, []).append(i)
                else:
                    stats[route] += 1
                    results[i] = RewardResult(outcome, outcome, True)
            pairs = list(to_pool)
            stats["pooled"] += len(pairs)
            scores = self.run("fastprerl._verify_worker:verify_math", pairs, timeout=timeout, default=0.0)
        for pair, s in zip(pairs, scores):
            for i in to_pool[pair]:
                results[i] = RewardResult(float(s), float(s), True)
        return results  # type: ignore[return-value]

    def score_batch(self, responses: Sequence[str], golds: Sequence[Any], *, timeout: float | None = None,
                    extract: Extract = DEFAULT_MODES) -> list[float]:
        """1.0 / 0.0 per (response, gold) pair; see `verify`."""
        return [r.correct for r in self.verify(responses, golds, timeout=timeout, extract=extract)]


class _ServerDied(Exception):
    pass


def _gold_answer(gold: str) -> str:
    """The answer inside a gold string that is a full solution (`\\boxed{}`, `#### 42`), normalised."""
    if "\\boxed" in gold or "\\fbox" in gold:
        gold = _last_boxed(gold) or gold
    elif "####" in gold:
        gold = _last_gsm8k(gold) or gold
    return normalise_answer(gold.strip())


def _decide(answer: str, gold: str, guards: bool) -> tuple[str, Any]:
    """Steps 2-4 of the module doc for one extracted answer and its prepared gold answer:
    ("cheap", verdict), ("guarded", verdict), or ("pool", (answer, gold)) when math-verify must decide."""
    if len(answer) > MAX_ANSWER_CHARS:  # too long to be worth normalising: exact match only
        return "guarded", 1.0 if answer == gold else 0.0
    answer = normalise_answer(answer)
    if not answer:
        return "cheap", 0.0
    if _compact(answer) == _compact(gold):
        return "cheap", 1.0
    (var_a, rhs_a), (var_g, rhs_g) = _split_assignment(answer), _split_assignment(gold)
    if var_a and var_g and var_a != var_g:  # x = 5 vs y = 5
        return "cheap", 0.0
    if _compact(rhs_a) == _compact(rhs_g):  # x = 5 vs 5
        return "cheap", 1.0
    num_a, num_g = _as_number(rhs_a), _as_number(rhs_g)
    if num_a is not None and num_g is not None:
        return "cheap", 1.0 if _numbers_equal(num_a, num_g) else 0.0
    if guards and (guard_reason(answer) or guard_reason(gold)):
        return "guarded", 0.0
    return "pool", (answer, gold)


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


def score_math(response: str, gold: str, *, timeout: float = 5.0, extract: Extract = DEFAULT_MODES) -> float:
    """1.0 if the final answer of `response` equals `gold`, else 0.0; returns within about `timeout` s."""
    return _shared_pool().verify([response], [gold], timeout=timeout, extract=extract)[0].correct


def score_batch(responses: Sequence[str], golds: Sequence[Any], *, timeout: float = 5.0, workers: int = 2,
                extract: Extract = DEFAULT_MODES) -> list[float]:
    """`score_math` over many pairs, the slow ones in parallel on `workers` processes."""
    return _shared_pool(workers).score_batch(responses, golds, timeout=timeout, extract=extract)


# --------------------------------------------------------------------------------------------------------
# Registry of reward functions.
# --------------------------------------------------------------------------------------------------------

RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], list[RewardResult]]


class MathReward:
    """Reward "math": the response's final answer against `sample["answer"]`."""

    def __init__(self, *, timeout: float = 5.0, workers: int = 2, extract: Extract = DEFAULT_MODES,
                 format_penalty: float = 0.0):
        _check_modes(extract)
        self.timeout, self.workers, self.extract, self.format_penalty = timeout, workers, extract, format_penalty

    def __call__(self, responses: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        golds = [_field(s, "answer") for s in samples]
        return _shared_pool(self.workers).verify(responses, golds, timeout=self.timeout, extract=self.extract,
                                                 format_penalty=self.format_penalty)


class ReasoningGymReward:
    """Reward "reasoning_gym": the task's own `score_answer(answer, entry)`, run in the pool's workers.

    Each sample carries its reasoning-gym entry (`{"question", "answer", "metadata"}`), either as
    `sample["entry"]` or as the sample itself; the scorer is the one of `entry["metadata"]["source_dataset"]`.
    The answer is extracted by `extract_reasoning_gym_answer`."""

    def __init__(self, *, timeout: float = 5.0, workers: int = 2, format_penalty: float = 0.0):
        if format_penalty < 0:
            raise ValueError(f"format_penalty is subtracted and must be >= 0, got {format_penalty}")
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
        scores = pool.run("fastprerl._verify_worker:score_reasoning_gym", tasks, timeout=self.timeout, default=0.0)
        return [RewardResult(float(s) - (0.0 if has else self.format_penalty), float(s), has)
                for s, (_, has) in zip(scores, extracted)]


class _UserReward:
    """A user's `fn(responses, samples)`, its floats turned into RewardResults. It runs in this process."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, responses: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        out = list(self.fn(responses, samples))
        if len(out) != len(responses):
            raise ValueError(f"reward function {self.fn!r} returned {len(out)} values for {len(responses)} responses")
        return [r if isinstance(r, RewardResult) else RewardResult(float(r), float(r), True) for r in out]


BUILTIN_REWARDS = {"math": MathReward, "reasoning_gym": ReasoningGymReward}
USER_REWARD = re.compile(r"\w+(?:\.\w+)*:\w+")  # "package.module:function"


def get_reward_fn(name: str, **options: Any) -> RewardFn:
    """The reward function a config names: "math", "reasoning_gym", or "package.module:function".

    `options` go to the built-ins (timeout, workers, format_penalty, and extract for "math"); a user's
    function takes none. Every reward function maps (responses, samples) to one RewardResult each."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name](**options)
    if USER_REWARD.fullmatch(name):
        if options:
            raise ValueError(f"options {sorted(options)} apply only to built-in reward functions, not {name!r}")
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load reward function {name!r}: {exc}") from exc
        if not callable(fn):
            raise ValueError(f"reward function {name!r} is not callable")
        return _UserReward(fn)
    raise ValueError(f"unknown reward function {name!r}; choose {sorted(BUILTIN_REWARDS)} or 'module:function'")


def _field(mapping: Mapping[str, Any], key: str) -> Any:
    try:
        return mapping[key]
    except (KeyError, TypeError):
        keys = sorted(mapping) if isinstance(mapping, Mapping) else mapping
        raise ValueError(f"sample has no {key!r} field (it has {keys!r})") from None
