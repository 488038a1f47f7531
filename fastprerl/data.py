"""Prompt sources: built-in tasks, reasoning-gym generators, local files and hub datasets.

Every source yields samples as dicts with at least "prompt" (text before formatting) and "answer"
(gold answer text); reasoning-gym samples also carry "entry" (the generator's entry) for its own scorer.

  builtin:addition         "Question: What is a + b?\\nAnswer: a + b =" with `data.digits`-digit operands
  builtin:word_problems    two-step word problems with 1-digit numbers: "Mia has a coins. Mia gets b more coins,
                           then gives c coins to a friend. How many coins does Mia have now?" (answer a + b - c)
  reasoning_gym:<task>     any reasoning-gym generator (basic_arithmetic, chain_sum, countdown, gsm_symbolic, ...)
  path/to/file.jsonl|.json|.parquet|.csv   local data via `datasets` (fields: data.prompt_field / answer_field)
  anything else            a hub dataset id loaded with `datasets.load_dataset` (needs network)

Loading a config runs `check_source` and `check_template`: a local file of another kind, or a template that
`format_prompt` cannot fill, is an error then rather than at the first rollout.
"""
from __future__ import annotations

import random
import re
import string
from pathlib import Path
from typing import Dict, List

BUILTIN_TASKS = ("builtin:addition", "builtin:word_problems")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_FILE_SUFFIX = re.compile(r"\.[A-Za-z]+")  # ".txt" is a file suffix; the ".5" of a hub id "org/data-1.5" is not


def check_source(source: str) -> None:
    """Raise ValueError for an unknown builtin, and when `source` looks like a local file (an existing file, or
    a path with a file suffix) of a kind `file_problems` cannot read; it would otherwise be taken for a hub
    dataset id."""
    if source.startswith("builtin:") and source not in BUILTIN_TASKS:
        raise ValueError(f"data.source: unknown builtin {source!r}; choose one of {list(BUILTIN_TASKS)} or "
                         f"reasoning_gym:<task>")
    if source.startswith(("builtin:", "reasoning_gym:")):
        return
    path = Path(source)
    if path.suffix not in LOCAL_FORMATS and (path.is_file() or _FILE_SUFFIX.fullmatch(path.suffix)):
        raise ValueError(f"data.source: {source!r} looks like a local file, but local files must end in one "
                         f"of {list(LOCAL_FORMATS)}; other sources are builtin:addition, reasoning_gym:<task> "
                         f"or a hub dataset id")


def check_template(template: str) -> None:
    """Raise ValueError unless `format_prompt` can fill `template`: a str.format string whose one and only
    replacement field is {prompt}; literal braces are doubled, as in `\\boxed{{}}`."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        template.format(prompt="")
    except (ValueError, LookupError, AttributeError):  # unbalanced braces, other fields, bad format specs
        fields = None
    if fields != {"prompt"}:
        raise ValueError(f"data.template: expected {{prompt}} as the only replacement field (write literal "
                         f"braces as {{{{ and }}}}), got {template!r}")


def addition_problems(n: int, digits: int, seed: int) -> List[Dict]:
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    out = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append({"prompt": f"Question: What is {a} + {b}?\nAnswer: {a} + {b} =", "answer": str(a + b)})
    return out


WORD_NAMES = ("Sam", "Mia", "Tom", "Ana", "Ben", "Lily", "Max", "Zoe")
WORD_ITEMS = ("apples", "pencils", "marbles", "cookies", "stickers", "books", "coins", "cards")


def word_problems(n: int, seed: int) -> List[Dict]:
    """Two-step word problems: a in 2..9, b in 1..9, c in 1..a+b-1, so the answer a + b - c is in 1..17."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, item = rng.choice(WORD_NAMES), rng.choice(WORD_ITEMS)
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        c = rng.randint(1, a + b - 1)
        out.append({"prompt": f"{name} has {a} {item}. {name} gets {b} more {item}, then gives {c} {item} to a "
                              f"friend. How many {item} does {name} have now?", "answer": str(a + b - c)})
    return out


def reasoning_gym_problems(task: str, n: int, seed: int) -> List[Dict]:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(task, size=n, seed=seed)
    except Exception as e:  # reasoning-gym raises various types for unknown names
        raise ValueError(f"data.source: reasoning-gym has no task {task!r} ({e})") from None
    return [{"prompt": e["question"], "answer": str(e["answer"]), "entry": e} for e in ds]


def file_problems(source: str, split: str, prompt_field: str, answer_field: str) -> List[Dict]:
    import datasets

    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.exists():
            raise ValueError(f"data.source: file not found: {source!r}")
        ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(source, split=split)
    for key, name in (("data.prompt_field", prompt_field), ("data.answer_field", answer_field)):
        if name not in ds.column_names:
            raise ValueError(f"{key}: column {name!r} not in {source!r}; columns: {ds.column_names}")
    return [{"prompt": str(r[prompt_field]), "answer": str(r[answer_field])} for r in ds]


def problems_from_source(source: str, *, n: int, seed: int, digits: int = 2, split: str = "train",
                         prompt_field: str = "problem", answer_field: str = "answer") -> List[Dict]:
    """The problems of a source (module docstring): n generated ones for builtin / reasoning_gym sources, every
    record of a file or hub dataset."""
    check_source(source)
    if source == "builtin:addition":
        return addition_problems(n, digits, seed)
    if source == "builtin:word_problems":
        return word_problems(n, seed)
    if source.startswith("reasoning_gym:"):
        return reasoning_gym_problems(source.split(":", 1)[1], n, seed)
    return file_problems(source, split, prompt_field, answer_field)


def load_problems(cfg, seed: int) -> List[Dict]:
    """cfg: DataConfig."""
    return problems_from_source(cfg.source, n=cfg.size, seed=seed, digits=cfg.digits, split=cfg.split,
                                prompt_field=cfg.prompt_field, answer_field=cfg.answer_field)


def format_prompt(sample: Dict, cfg, tokenizer) -> List[int]:
    """Token ids of the prompt as the policy sees it (completion text or chat template)."""
    text = cfg.template.format(prompt=sample["prompt"])
    if cfg.format == "chat":
        msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        msgs.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    if cfg.system_prompt:
        text = cfg.system_prompt + "\n\n" + text
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PromptStream:
    """Deterministic, resumable stream of problems: shuffled per epoch with (seed, epoch)."""

    def __init__(self, problems: List[Dict], seed: int, shuffle: bool = True):
        if not problems:
            raise ValueError("data.source produced no problems")
        self.problems, self.seed, self.shuffle = problems, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self):
        order = list(range(len(self.problems)))
        if self.shuffle:
            random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> List[Dict]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> Dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Dict):
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order()
