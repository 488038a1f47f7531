"""What a reward is made of, before any verifier runs: results, the extraction modes, and the guards.

Imports neither torch nor sympy: this runs in the trainer's process and in the verification workers.

Extraction modes (`reward.extract`), tried in order, the first that finds an answer wins:
  math_verify   (the default) math-verify's own extraction, run in the workers on the whole response: LaTeX
                (`$...$`, `\\[...\\]`, `\\boxed{}` first, several boxes or "a and b" as a set) and plain
                expressions and numbers ("Final answer: 1 000", "x = 5", "50%"). It finds every answer the
                other modes find, so it can only be the last mode.
  boxed         the last `\\boxed{...}` / `\\fbox{...}` (nested braces; an unclosed last box counts as none)
  gsm8k         what follows the last `####` on its line
  answer_is     what follows the last "the answer is" / "Final answer:" / "Answer:", to the end of the
                line or sentence
  answer_tag    the last `<answer>...</answer>`
  last_number   the last number in the text
  last_line     the last non-empty line
The strict modes make the format part of the reward: a response without that form scores as "no answer"
(`has_answer=False`, minus `format_penalty`). Each takes the last occurrence of its form and is linear in
the length of the text, so a 1 MB response costs milliseconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "RewardResult", "MATH_VERIFY", "EXTRACTORS", "EXTRACT_MODES", "DEFAULT_MODES", "check_modes",
    "extract_answer", "extract_reasoning_gym_answer", "guard_reason",
]


@dataclass(frozen=True)
class RewardResult:
    """One response's reward.

    score: what the trainer optimises: `correct`, minus the format penalty when no answer was found.
    correct: the verifier's verdict (1.0 / 0.0; reasoning-gym tasks may give partial credit).
    has_answer: an answer could be extracted in the expected format (logged as `reward/format`).
    timed_out: the verdict was decided by a timeout (score and correct are then 0.0; logged as
        `reward/timeouts`), never by the verifier.
    error: why the reward function (or its worker) failed on this response, "" when it did not (score and
        correct are then 0.0; logged as `reward/errors`). Not compared: results are equal whatever the text.
    """

    score: float
    correct: float
    has_answer: bool
    timed_out: bool = False
    error: str = field(default="", compare=False)


# --------------------------------------------------------------------------------------------------------
# Strict extraction modes. Each returns the LAST occurrence of its form, or None.
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
    for last in _ANSWER_IS.finditer(text):   # noqa: B007  (the last match)
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
    for last in _NUMBER_IN_TEXT.finditer(text):   # noqa: B007  (the last match)
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
MATH_VERIFY = "math_verify"
EXTRACT_MODES = (*EXTRACTORS, MATH_VERIFY)
DEFAULT_MODES = (MATH_VERIFY,)


def check_modes(modes: Sequence[str]) -> None:
    """ValueError unless `modes` is a non-empty sequence of known modes with "math_verify" only last."""
    if isinstance(modes, str) or not modes or any(m not in EXTRACT_MODES for m in modes):
        raise ValueError(f"unknown extraction modes {modes!r}; expected a non-empty list of {list(EXTRACT_MODES)}")
    if MATH_VERIFY in modes[:-1]:
        raise ValueError(f"extraction mode {MATH_VERIFY!r} finds an answer wherever any other mode does, so "
                         f"it must be the last mode, got {list(modes)}")


def extract_answer(text: str, modes: Sequence[str]) -> str | None:
    """The answer the first strict mode of `modes` finds in `text` (stripped; an empty one counts as none),
    or None. "math_verify" is skipped here: it runs inside the verification workers."""
    check_modes(modes)
    if not isinstance(text, str):
        return None
    for mode in modes:
        if mode != MATH_VERIFY:
            answer = EXTRACTORS[mode](text)
            if answer is not None and answer.strip():
                return answer.strip()
    return None


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
# Guards: constructs that make sympy run away, refused in microseconds instead of a timeout. They check the
# strings math-verify is about to hand to its LaTeX or expression parser (in the workers), and an answer a
# strict mode extracted (here, before it travels).
# --------------------------------------------------------------------------------------------------------

MAX_ANSWER_CHARS = 1000  # longer answers are matched as strings only
MAX_NESTING = 8  # of (), [], {} together; math-verify's LaTeX parser slows steeply with depth
MAX_EXPONENT = 10_000  # largest integer allowed in an exponent
MAX_GROUP_EXPONENT = 100  # ... of a bracketed base: sympy expands (x+1)^400 for seconds
MAX_BIG_OPERAND = 1_000  # largest integer allowed beside a factorial, binomial, product or sum

_INTEGER = re.compile(r"\d+")
_BIG_OPERATOR = re.compile(r"!|\\(?:binom|choose|prod|sum|Gamma|gamma)\b")
_NESTED_FACTORIAL = re.compile(r"!\s*!|![)}\]]+\s*!")
_NUMERIC_POWER = re.compile(r"(\d+)\s*\^\s*\{?\s*(\d+)")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # not tab, newline, carriage return


def _max_integer(s: str) -> int:
    # Compare digit counts first: never turn a 10,000-digit run into an int just to compare it.
    runs = _INTEGER.findall(s)
    if not runs:
        return 0
    longest = max(runs, key=lambda r: (len(r.lstrip("0")), r.lstrip("0")))
    return int(longest) if len(longest) <= 30 else 10**30


def _matching_paren(s: str, open_at: int) -> int:
    depth = 0
    for j in range(open_at, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return len(s)


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
    if _CONTROL.search(answer):
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
