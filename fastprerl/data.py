"""Prompt sources: built-in tasks, reasoning-gym generators, local files and hub datasets.

Every source yields samples as dicts with at least "prompt" (text before formatting) and "answer"
(gold answer text); reasoning-gym samples also carry "entry" (the generator's entry) for its own scorer.

  builtin:addition         "Question: What is a + b?\\nAnswer: a + b =" with `data.digits`-digit operands
  builtin:equations        the same additions after three solved examples, answered as a whole equation
                           (" a + b = c"): the response restates what it answers, so log P(y) without the
                           prompt can tell a right answer from a wrong one; scored by reward.fn = "equation"
  builtin:word_problems    two-step word problems with 1-digit numbers: "Mia has a coins. Mia gets b more coins,
                           then gives c coins to a friend. How many coins does Mia have now?" (answer a + b - c)
  reasoning_gym:<task>     any reasoning-gym generator (basic_arithmetic, chain_sum, countdown, gsm_symbolic, ...)
  path/to/file.jsonl|.json|.parquet|.csv   local data via `datasets` (fields: data.prompt_field / answer_field)
  anything else            a hub dataset id loaded with `datasets.load_dataset` (needs network)

Loading a config runs `check_source` and `check_template`: a local file of another kind, or a template that
`format_prompt` cannot fill, is an error then rather than at the first rollout.
"""
from __future__ import annotations

import json
import logging
import random
import re
import string
from pathlib import Path

log = logging.getLogger("fastprerl")

BUILTIN_TASKS = ("builtin:addition", "builtin:equations", "builtin:word_problems")
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
    if path.suffix not in LOCAL_FORMATS and (path.is_file() or _FILE_SUFFIX.fullmatch(path.suffix)) \
            and not path.is_dir():
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


def addition_problems(n: int, digits: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    out = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append({"prompt": f"Question: What is {a} + {b}?\nAnswer: {a} + {b} =", "answer": str(a + b)})
    return out


EQUATION_SHOTS = 3
PROBE_OFFSETS = (-10, -2, -1, 1, 2, 10)


def equation(a: int, b: int, c: int) -> str:
    return f"{a} + {b} = {c}"


def equation_problems(n: int, digits: int, seed: int) -> list[dict]:
    """builtin:equations: `addition_problems`' question after EQUATION_SHOTS solved ones (drawn per problem),
    answered with the whole equation. "answer" is that equation; "probe" holds the right response and a wrong one
    of the same form (right sum + one of PROBE_OFFSETS, drawn per problem, kept positive), which the view
    probe (fastprerl/evaluation/probe.py) scores with and without the prompt."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    out = []
    for _ in range(n):
        shots = [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(EQUATION_SHOTS)]
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        wrong = a + b + rng.choice([d for d in PROBE_OFFSETS if a + b + d >= 0])
        lines = [f"Question: What is {x} + {y}?\nAnswer: {equation(x, y, x + y)}\n" for x, y in shots]
        out.append({"prompt": "".join(lines) + f"Question: What is {a} + {b}?\nAnswer:",
                    "answer": equation(a, b, a + b),
                    "probe": {"right": " " + equation(a, b, a + b), "wrong": " " + equation(a, b, wrong)}})
    return out


WORD_NAMES = ("Sam", "Mia", "Tom", "Ana", "Ben", "Lily", "Max", "Zoe")
WORD_ITEMS = ("apples", "pencils", "marbles", "cookies", "stickers", "books", "coins", "cards")


def word_problems(n: int, seed: int) -> list[dict]:
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


def reasoning_gym_problems(task: str, n: int, seed: int) -> list[dict]:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(task, size=n, seed=seed)
    except Exception as e:  # reasoning-gym raises various types for unknown names
        raise ValueError(f"data.source: reasoning-gym has no task {task!r} ({e})") from None
    return [{"prompt": e["question"], "answer": str(e["answer"]), "entry": e} for e in ds]


def file_problems(source: str, split: str, prompt_field: str, answer_field: str,
                  bad_rows: str = "error") -> list[dict]:
    """The problems of a local file or folder (local_records) or a hub dataset. A record without the prompt or
    answer field, with a null or empty one, or that cannot be read is a bad row: an error naming the file and the
    line (row) of each (bad_rows "error"), or left out with a count (bad_rows "skip", data.bad_rows)."""
    path = Path(source).expanduser()
    local = path.suffix in LOCAL_FORMATS or path.is_dir() or source.startswith(("/", ".", "~"))
    if local:
        records, bad = local_records(path, split)
    else:
        import datasets

        ds = datasets.load_dataset(source, split=split)
        records, bad = [(f"row {i + 1}", r) for i, r in enumerate(ds)], []
    for key, name in (("data.prompt_field", prompt_field), ("data.answer_field", answer_field)):
        if records and not any(isinstance(r, dict) and name in r for _, r in records):
            columns = sorted({c for _, r in records if isinstance(r, dict) for c in r})
            raise ValueError(f"{key}: column {name!r} not in {source!r}; columns: {columns}")
    out = []
    for where, r in records:
        why = _bad_record(r, prompt_field, answer_field)
        if why:
            bad.append((where, why))
        else:
            out.append({"prompt": str(r[prompt_field]), "answer": str(r[answer_field])})
    if not records and not bad:
        raise ValueError(f"data.source: {source!r} holds no records (an empty file)")
    if bad:
        shown = "; ".join(f"{w}: {why}" for w, why in bad[:5]) + (f"; ... ({len(bad) - 5} more)" if len(bad) > 5
                                                                     else "")
        total = len(out) + len(bad)
        if bad_rows != "skip" or not out:
            hint = ("; fix them, or set data.bad_rows = \"skip\" to leave them out" if bad_rows != "skip" and out
                    else "")
            raise ValueError(f"data.source: {source!r}: {len(bad)} of {total} records cannot be used ({shown})"
                             f"{hint}")
        log.warning("data.source %r: left out %d of %d records (data.bad_rows = \"skip\"): %s", source,
                    len(bad), total, shown)
    return out


def _bad_record(r, prompt_field: str, answer_field: str) -> str:
    """Why the record `r` gives no problem ("" when it does)."""
    if not isinstance(r, dict):
        return f"expected a JSON object, got {type(r).__name__}"
    for name in (prompt_field, answer_field):
        if name not in r:
            return f"no {name!r} field (it has {sorted(r)})"
        if r[name] is None:
            return f"{name!r} is null"
        if isinstance(r[name], str) and not r[name].strip():
            return f"{name!r} is empty"
    return ""


def local_records(path: Path, split: str = "train") -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """(where, record) of every record of a local file, and (where, why) of each part that cannot be read:
    where is "line N" in a .jsonl file (and a .json file of JSON lines), "record N" in a .json array, "row N"
    (data rows, from 1) in .csv and .parquet files. A folder: the files of `split` as `datasets` assigns them
    (train*, test*, ...; every file when no name says a split), those of LOCAL_FORMATS read in name order, "where"
    prefixed with the file's name. Raises ValueError naming data.source for a file that is missing, unreadable
    or not of its kind."""
    if path.is_dir():
        return _folder_records(path, split)
    if not path.is_file():
        raise ValueError(f"data.source: file not found: {str(path)!r}; expected a local "
                         f"{'/'.join(LOCAL_FORMATS)} file or a folder of them, builtin:addition, "
                         f"reasoning_gym:<task> or a hub dataset id ('org/name')")
    kind = LOCAL_FORMATS[path.suffix]
    if kind == "json":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"data.source: {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ValueError(f"data.source: cannot read {str(path)!r}: {e.strerror or e}") from None
        return _json_records(text, path)
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # pyarrow / pandas parse errors of many types; the message names the cause
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data.source: cannot read {str(path)!r} as {kind}: {cause[:300]}") from None
    return [(f"row {i + 1}", r) for i, r in enumerate(ds)], []


def _json_records(text: str, path: Path):
    if path.suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None   # perhaps JSON lines in a .json file (`datasets` reads those)
        if isinstance(whole, list):
            return [(f"record {i + 1}", r) for i, r in enumerate(whole)], []
        if isinstance(whole, dict):
            columns = list(whole.values())
            if columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
                return [(f"record {i + 1}", dict(zip(whole, row))) for i, row in enumerate(zip(*columns))], []
            return [("record 1", whole)], []
    records, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {i}", json.loads(line)))
        except ValueError as e:
            bad.append((f"line {i}", f"not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"))
    return records, bad


def _folder_records(folder: Path, split: str):
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except Exception as e:  # an empty folder: datasets' EmptyDatasetError
        raise ValueError(f"data.source: folder {str(folder)!r} holds no data files; expected files ending in "
                         f"{list(LOCAL_FORMATS)} ({type(e).__name__})") from None
    if split not in files:
        raise ValueError(f"data.split: {split!r} is not a split of the folder {str(folder)!r}; its splits: "
                         f"{sorted(files)}")
    paths = sorted(Path(f) for f in files[split])
    usable = [p for p in paths if p.suffix in LOCAL_FORMATS and not p.name.startswith(".")]
    if not usable:
        raise ValueError(f"data.source: folder {str(folder)!r} holds no file fastprerl reads for split {split!r}; "
                         f"expected files ending in {list(LOCAL_FORMATS)}, found "
                         f"{[p.name for p in paths][:10]}")
    if len(usable) < len(paths):
        log.info("data.source %s: reading %s; not reading %s (not %s)", folder, [p.name for p in usable],
                 [p.name for p in paths if p not in usable], "/".join(LOCAL_FORMATS))
    records, bad = [], []
    for p in usable:
        rel = p.relative_to(folder)
        r, b = local_records(p)
        records += [(f"{rel} {w}", x) for w, x in r]
        bad += [(f"{rel} {w}", x) for w, x in b]
    return records, bad


def problems_from_source(source: str, *, n: int, seed: int, digits: int = 2, split: str = "train",
                         prompt_field: str = "problem", answer_field: str = "answer",
                         bad_rows: str = "error") -> list[dict]:
    """The problems of a source (module docstring): n generated ones for builtin / reasoning_gym sources, every
    record of a file or hub dataset."""
    check_source(source)
    if source == "builtin:addition":
        return addition_problems(n, digits, seed)
    if source == "builtin:equations":
        return equation_problems(n, digits, seed)
    if source == "builtin:word_problems":
        return word_problems(n, seed)
    if source.startswith("reasoning_gym:"):
        return reasoning_gym_problems(source.split(":", 1)[1], n, seed)
    return file_problems(source, split, prompt_field, answer_field, bad_rows)


def load_problems(cfg, seed: int) -> list[dict]:
    """cfg: DataConfig."""
    return problems_from_source(cfg.source, n=cfg.size, seed=seed, digits=cfg.digits, split=cfg.split,
                                prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                                bad_rows=cfg.bad_rows)


def format_prompt(sample: dict, cfg, tokenizer) -> list[int]:
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


def fit_prompts(problems: list[dict], cfg, tokenizer, context: int, rollout) -> list[dict]:
    """The problems whose formatted prompt leaves room for rollout.max_new_tokens response tokens in the model's
    `context` (positions): a longer one is an error naming the count and the longest (data.long_prompts
    "error"), or is left out with a count ("skip"). cfg: DataConfig; rollout: RolloutConfig. Only prompts whose
    UTF-8 length could reach the limit are tokenized (a token holds at least one byte)."""
    max_new_tokens = rollout.max_new_tokens
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(f"rollout.max_new_tokens: expected fewer than the model's {context} positions (prompt and "
                         f"response share them), got {max_new_tokens}")
    base = len(format_prompt({"prompt": ""}, cfg, tokenizer)) + 8
    fixed = len(cfg.template.encode()) + len(cfg.system_prompt.encode())
    long = []
    for i, p in enumerate(problems):
        if base + fixed + len(p["prompt"].encode()) <= room:
            continue
        n = len(format_prompt(p, cfg, tokenizer))
        if n > room:
            long.append((n, i))
    if not long:
        return problems
    n, i = max(long)
    what = (f"{len(long)} of {len(problems)} prompts are longer than the {room} tokens the model's context of "
            f"{context} leaves beside rollout.max_new_tokens = {max_new_tokens} (the longest: problem {i + 1}, "
            f"{n} tokens: {problems[i]['prompt'][:80]!r}...)")
    if cfg.long_prompts != "skip" or len(long) == len(problems):
        raise ValueError(f"data.source: {what}; shorten them, lower rollout.max_new_tokens, or set "
                         f"data.long_prompts = \"skip\" to leave them out")
    log.warning("data.source: %s; left out (data.long_prompts = \"skip\")", what)
    drop = {i for _, i in long}
    return [p for j, p in enumerate(problems) if j not in drop]


class PromptStream:
    """Deterministic, resumable stream of problems: shuffled per epoch with (seed, epoch)."""

    def __init__(self, problems: list[dict], seed: int, shuffle: bool = True):
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

    def next_batch(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict):
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order()
