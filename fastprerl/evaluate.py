"""Evaluation: Avg@k, pass@k, response length, truncation rate and behaviour counts of a model.

`fastprerl eval MODEL_OR_RUN --data SOURCE [--data SOURCE ...] --k 32` samples k responses per problem
with the HF rollout backend (`fastprerl.rollout.hf.HFRollout`), scores them with a reward function of
`fastprerl.rewards`, and reports per dataset and overall:

  avg@k           mean verdict over the k samples of a problem, averaged over problems (Avg@k; with binary
                  verdicts this is the mean accuracy, and it equals pass@1)
  pass@k          unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (n = samples, c = fully correct
                  samples, i.e. verdict >= 1), averaged over problems; `pass_curve` holds it for
                  k' = 1, 2, 4, ..., k
  response_len    mean response length in tokens (EOS / the stop token included)
  truncation      fraction of responses that hit --max-new-tokens without stopping
  format          fraction of responses with an extractable answer
  behaviour       mean number of transition / reflection / execution paragraphs per response
                  (`fastprerl.metrics.behaviour_counts`, the SEAL keyword rule; keyword lists are options)
  behaviour_ratio with --baseline: these means divided by the baseline model's on the same prompts

"overall" is the unweighted mean of the per-dataset values (every benchmark counts once, as in the
paper's "average over benchmarks").

MODEL_OR_RUN is a model spec of `fastprerl.models` (builtin:*, a local Hugging Face folder, a hub id) or a
run directory: its `final/` model when present, else its newest `checkpoints/step_<N>/`. A run's
`config.toml` supplies defaults: the prompt format, the empty-context token (for `fastprerl align`) and,
for the dataset the run trained on, its template, system prompt, digits and newline stop.

Datasets (`--data`, repeatable):
  builtin:addition         2-digit additions in completion format (answer: the last number, stop at newline)
  reasoning_gym:<task>     a reasoning-gym generator, scored by the task's own scorer
  champ                    the 270 CHAMP competition problems (`pip install champ-dataset`), \\boxed answers
  path.jsonl|.json|.parquet|.csv   MATH-style records with `problem` / `answer` fields, \\boxed answers
Generated sources take --n-problems problems (default 100); fixed sets use all problems, or a seeded
random subset (kept in file order) of --n-problems of them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger("fastprerl")

DEFAULT_GENERATED = 100  # problems drawn from a generator (builtin:addition, reasoning_gym:*) by default
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# str.format template: the problem, then the instruction (braces of \boxed{} escaped)
MATH_TEMPLATE = "{prompt}\n\n" + MATH_INSTRUCTION.replace("{", "{{").replace("}", "}}")
REWARDS = ("math", "last_number", "reasoning_gym")
BEHAVIOURS = ("transition", "reflection", "execution")


class EvalError(ValueError):
    """Bad user input for eval/align (the CLI turns it into exit code 2)."""


# ---------------------------------------------------------------------------------------------- metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct samples out of n (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) (no huge binomials)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(table: Sequence[Sequence[float]]) -> float:
    """Avg@k: the mean verdict of each problem's samples, averaged over problems."""
    if not table:
        raise ValueError("avg_at_k of an empty table")
    return sum(sum(row) / len(row) for row in table) / len(table)


def mean_pass_at_k(table: Sequence[Sequence[float]], k: int) -> float:
    """pass@k averaged over problems; a sample counts as correct when its verdict is >= 1 (full credit)."""
    if not table:
        raise ValueError("mean_pass_at_k of an empty table")
    return sum(pass_at_k(len(row), sum(1 for v in row if v >= 1.0 - 1e-9), k) for row in table) / len(table)


def pass_ks(k: int) -> List[int]:
    """1, 2, 4, ... up to k, and k itself."""
    out, x = [], 1
    while x < k:
        out.append(x)
        x *= 2
    return out + [k]


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataSpec:
    value: str   # as given on the command line (also the dataset's name in reports)
    kind: str    # addition | reasoning_gym | champ | file
    arg: str = ""


def parse_data_spec(value: str) -> DataSpec:
    """Checks one --data value without loading anything heavy; raises EvalError with the accepted forms."""
    from .data import LOCAL_FORMATS

    forms = ("builtin:addition, reasoning_gym:<task>, champ, or a local .jsonl/.json/.parquet/.csv file "
             "with problem/answer fields")
    if value == "builtin:addition":
        return DataSpec(value, "addition")
    if value.startswith("reasoning_gym:"):
        task = value.split(":", 1)[1]
        if not task:
            raise EvalError(f"--data {value!r}: name a reasoning-gym task, e.g. reasoning_gym:chain_sum")
        return DataSpec(value, "reasoning_gym", task)
    if value == "champ":
        return DataSpec(value, "champ")
    path = Path(value)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise EvalError(f"--data {value!r}: file not found")
        return DataSpec(value, "file", str(path))
    raise EvalError(f"--data {value!r}: unknown dataset; expected {forms}")


def champ_problems() -> List[Dict]:
    """The CHAMP problems (`champ-dataset`, MIT) in natural identifier order (a fresh list of fresh dicts)."""
    return [dict(p) for p in _champ_cached()]


@functools.lru_cache(maxsize=1)
def _champ_cached():
    try:
        import champ_dataset
    except ImportError:
        raise EvalError("--data champ needs the `champ-dataset` package: pip install champ-dataset") from None
    from natsort import natsorted

    ds = champ_dataset.load("v0")
    return tuple({"prompt": ds.problems[k].text, "answer": ds.problems[k].answer, "id": k}
                 for k in natsorted(ds.problems))


def _subset(problems: List[Dict], n: Optional[int], seed: int) -> List[Dict]:
    if n is None or n >= len(problems):
        return problems
    keep = sorted(random.Random(seed).sample(range(len(problems)), n))
    return [problems[i] for i in keep]


def load_eval_problems(spec: DataSpec, n_problems: Optional[int], seed: int, *, digits: int = 2,
                       prompt_field: str = "problem", answer_field: str = "answer") -> List[Dict]:
    from . import data

    n_gen = n_problems or DEFAULT_GENERATED
    try:
        if spec.kind == "addition":
            out = data.addition_problems(n_gen, digits, seed)
        elif spec.kind == "reasoning_gym":
            out = data.reasoning_gym_problems(spec.arg, n_gen, seed)
        elif spec.kind == "champ":
            out = _subset(champ_problems(), n_problems, seed)
        else:
            out = _subset(data.file_problems(spec.arg, "train", prompt_field, answer_field), n_problems, seed)
    except EvalError:
        raise
    except ValueError as e:
        raise EvalError(f"--data {spec.value!r}: {e}") from None
    if not out:
        raise EvalError(f"--data {spec.value!r}: no problems")
    return out


def default_reward(spec: DataSpec) -> str:
    return {"addition": "last_number", "reasoning_gym": "reasoning_gym"}.get(spec.kind, "math")


def make_reward(name: str, *, timeout: float = 5.0, workers: int = 2):
    """math (\\boxed, then GSM8K `####`, then "the answer is"), last_number, reasoning_gym, or module:function."""
    from .rewards import get_reward_fn

    if name == "last_number":
        return get_reward_fn("math", extract=("last_number",), timeout=timeout, workers=workers)
    if name in ("math", "reasoning_gym"):
        return get_reward_fn(name, timeout=timeout, workers=workers)
    if ":" in name:
        try:
            return get_reward_fn(name)
        except ValueError as e:
            raise EvalError(f"--reward: {e}") from None
    raise EvalError(f"--reward {name!r}: choose one of {list(REWARDS)} or module:function")


# ---------------------------------------------------------------------------------------------- models
@dataclass
class ResolvedModel:
    spec: str                       # what fastprerl.models.load_model / load_tokenizer take
    run_dir: Optional[Path] = None  # the run directory MODEL_OR_RUN named, if it named one
    run_config: object = None       # that run's Config (from its config.toml), when readable


def resolve_model(value: str) -> ResolvedModel:
    """A model spec as is; a run directory -> <run>/final, else its newest complete checkpoint."""
    from . import checkpoint as ckpt

    path = Path(value)
    if value.startswith("builtin:") or not path.exists():
        if not value.startswith("builtin:") and (value.startswith((".", "/", "~")) or value.count("/") > 1):
            raise EvalError(f"model {value!r}: no such folder")
        return ResolvedModel(value)  # a builtin or a hub id
    if not path.is_dir():
        raise EvalError(f"model {value!r}: expected a model folder or a run directory, got a file")
    if (path / "config.json").is_file():
        return ResolvedModel(str(path))
    cfg = _run_config(path)
    if (path / "final" / "config.json").is_file():
        return ResolvedModel(str(path / "final"), path, cfg)
    latest, _ = ckpt.find_latest_valid(path / "checkpoints")
    if latest is None:
        found = ckpt.list_checkpoints(path / "checkpoints")
        latest = found[0][1] if found else None
        if latest is not None:
            log.warning("no complete checkpoint under %s; using %s", path / "checkpoints", latest)
    if latest is None:
        raise EvalError(f"model {value!r}: a directory without config.json, final/ or checkpoints/step_<N>/")
    return ResolvedModel(str(latest), path, cfg)


def _run_config(run_dir: Path):
    from .config import ConfigError, load_config

    p = run_dir / "config.toml"
    if not p.is_file():
        return None
    try:
        return load_config(p)
    except ConfigError as e:
        log.warning("ignoring %s (%s)", p, e)
        return None


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device is available")
    return torch.device(name)


def load_tokenizer_for(spec: str):
    from .models import load_tokenizer

    try:
        return load_tokenizer(spec)
    except (OSError, ValueError, RuntimeError) as e:
        raise EvalError(f"model {spec!r}: cannot load its tokenizer ({e})") from None


def load_model_on(spec: str, *, dtype: str = "float32", seed: int = 0, device: str = "auto"):
    """The model of `spec` on the device, in eval mode (HFRollout switches it to eval while sampling anyway)."""
    from .models import load_model

    dev = pick_device(device)
    try:
        model = load_model(spec, dtype=dtype, seed=seed)
    except (OSError, ValueError, RuntimeError) as e:
        raise EvalError(f"model {spec!r}: {e}") from None
    return model.to(dev).eval()


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class EvalSettings:
    k: int = 8
    n_problems: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    format: Optional[str] = None          # completion | chat; None = the run's, else completion
    template: Optional[str] = None        # None = per-dataset default
    system_prompt: Optional[str] = None   # None = per-dataset default
    stop_at_newline: Optional[bool] = None  # None = per-dataset default (addition: yes)
    reward: Optional[str] = None          # None = per-dataset default
    digits: Optional[int] = None          # builtin:addition operand digits (None = the run's, else 2)
    prompt_field: str = "problem"
    answer_field: str = "answer"
    seed: int = 0
    generation_batch_size: int = 32
    reward_timeout: float = 5.0
    reward_workers: int = 2
    transition_words: tuple = ()          # () = fastprerl.metrics.TRANSITION_WORDS
    reflection_words: tuple = ()          # () = fastprerl.metrics.REFLECTION_WORDS

    def check(self):
        if self.k < 1:
            raise EvalError(f"--k: expected >= 1, got {self.k}")
        if self.n_problems is not None and self.n_problems < 1:
            raise EvalError(f"--n-problems: expected >= 1, got {self.n_problems}")
        if not self.temperature > 0:
            raise EvalError(f"--temperature: expected > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"--top-p: expected 0 < top_p <= 1, got {self.top_p}")
        if self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens: expected >= 1, got {self.max_new_tokens}")
        if self.format not in (None, "completion", "chat"):
            raise EvalError(f"--format: expected completion or chat, got {self.format!r}")
        if self.generation_batch_size < 1:
            raise EvalError(f"--generation-batch-size: expected >= 1, got {self.generation_batch_size}")
        if self.digits is not None and self.digits < 1:
            raise EvalError(f"--digits: expected >= 1, got {self.digits}")
        return self

    def keywords(self):
        from .metrics import REFLECTION_WORDS, TRANSITION_WORDS

        return (tuple(w.lower() for w in self.transition_words) or TRANSITION_WORDS,
                tuple(w.lower() for w in self.reflection_words) or REFLECTION_WORDS)


@dataclass
class EvalDataset:
    """One dataset, ready to sample: its problems, prompt token ids and how to score them."""
    name: str
    problems: List[Dict]
    prompt_ids: List[List[int]]
    reward: str
    stop_at_newline: bool
    data_cfg: object   # fastprerl.config.DataConfig used for the prompts
    seed: int          # sampling seed of this dataset


def _dataset_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def prepare_datasets(specs: Sequence[DataSpec], settings: EvalSettings, tokenizer,
                     run_config=None) -> List[EvalDataset]:
    """Problems, prompts and reward per dataset (same settings + seed -> the same problems and prompts)."""
    from .config import DataConfig

    run_data = getattr(run_config, "data", None)
    fmt = settings.format or (run_data.format if run_data is not None else "completion")
    out = []
    for spec in specs:
        same_as_run = run_data is not None and run_data.source == spec.value
        run_stop = getattr(getattr(run_config, "rollout", None), "stop_at_newline", None)
        digits = settings.digits or (run_data.digits if same_as_run else 2)
        problems = load_eval_problems(spec, settings.n_problems, settings.seed, digits=digits,
                                      prompt_field=settings.prompt_field, answer_field=settings.answer_field)
        if spec.kind in ("champ", "file"):
            template, system = MATH_TEMPLATE, ""
        else:
            template, system = "{prompt}", ""
        if same_as_run:
            template, system = run_data.template, run_data.system_prompt
        if settings.template is not None:
            template = settings.template
        if settings.system_prompt is not None:
            system = settings.system_prompt
        stop = settings.stop_at_newline
        if stop is None:
            stop = run_stop if same_as_run and run_stop is not None else spec.kind == "addition"
        reward = settings.reward or default_reward(spec)
        dcfg = DataConfig(source=spec.value, format=fmt, template=template, system_prompt=system)
        try:
            prompts = [_format(p, dcfg, tokenizer) for p in problems]
        except (KeyError, IndexError) as e:
            raise EvalError(f"--template {template!r}: cannot format a prompt ({e!r}); use {{prompt}} for the "
                            f"problem text and double other braces") from None
        except ValueError as e:
            raise EvalError(f"--data {spec.value!r}: cannot build a prompt in {fmt} format ({e})") from None
        out.append(EvalDataset(spec.value, problems, prompts, reward, bool(stop), dcfg,
                               _dataset_seed(settings.seed, spec.value)))
    return out


def _format(problem, dcfg, tokenizer) -> List[int]:
    from .data import format_prompt

    ids = format_prompt(problem, dcfg, tokenizer)
    if not ids:
        raise ValueError("empty prompt")
    return list(ids)


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Samples:
    """k samples per problem, problem-major: sample j of problem i is entry i * k + j."""
    k: int
    texts: List[str]
    response_ids: List[List[int]]
    truncated: List[bool]
    verdicts: List[float] = field(default_factory=list)
    has_answer: List[bool] = field(default_factory=list)


def sample(model, tokenizer, ds: EvalDataset, settings: EvalSettings, k: Optional[int] = None) -> Samples:
    """k responses per prompt of `ds` with HFRollout, seeded per dataset (torch's global RNG is restored)."""
    import torch

    from .config import RolloutConfig
    from .rollout.hf import HFRollout

    k = k or settings.k
    rcfg = RolloutConfig(samples_per_prompt=k, max_new_tokens=settings.max_new_tokens,
                         temperature=settings.temperature, top_p=settings.top_p,
                         stop_at_newline=ds.stop_at_newline, generation_batch_size=settings.generation_batch_size)
    roll = HFRollout(rcfg, model, tokenizer)
    devices = [model.device] if next(model.parameters()).is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(ds.seed)
        out = roll.generate(ds.prompt_ids, k)
    texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
    return Samples(k, texts, out.response_ids, list(out.truncated))


def score(samples: Samples, ds: EvalDataset, settings: EvalSettings, fn=None) -> Samples:
    """Verdicts and has-answer flags of every sample; `fn` (a reward function) defaults to ds.reward's."""
    fn = fn or make_reward(ds.reward, timeout=settings.reward_timeout, workers=settings.reward_workers)
    rows = [ds.problems[i // samples.k] for i in range(len(samples.texts))]
    results = fn(samples.texts, rows)
    samples.verdicts = [float(getattr(r, "correct", getattr(r, "score", r))) for r in results]
    samples.has_answer = [bool(getattr(r, "has_answer", True)) for r in results]
    return samples


def summarise(samples: Samples, settings: EvalSettings) -> Dict:
    """The per-dataset numbers of the report (see the module doc)."""
    from .metrics import behaviour_counts

    k, B = samples.k, len(samples.texts)
    table = [samples.verdicts[i:i + k] for i in range(0, B, k)]
    trans, refl = settings.keywords()
    counts = [behaviour_counts(t, trans, refl) for t in samples.texts]
    return {
        "n_problems": len(table),
        "k": k,
        "avg@k": avg_at_k(table),
        "pass@k": mean_pass_at_k(table, k),
        "pass_curve": {str(j): mean_pass_at_k(table, j) for j in pass_ks(k)},
        "response_len": sum(len(r) for r in samples.response_ids) / B,
        "truncation": sum(samples.truncated) / B,
        "format": sum(samples.has_answer) / B,
        "behaviour": {b: sum(c[b] for c in counts) / B for b in BEHAVIOURS},
    }


def _ratio(a: float, b: float):
    return a / b if b > 0 else None


def _overall(per: Dict[str, Dict]) -> Dict:
    rows = list(per.values())
    mean = lambda xs: sum(xs) / len(xs)
    out = {"n_datasets": len(rows), "n_problems": sum(r["n_problems"] for r in rows)}
    for key in ("avg@k", "pass@k", "response_len", "truncation", "format"):
        out[key] = mean([r[key] for r in rows])
    out["behaviour"] = {b: mean([r["behaviour"][b] for r in rows]) for b in BEHAVIOURS}
    return out


def _with_ratios(block: Dict, base: Dict) -> Dict:
    block["behaviour_ratio"] = {b: _ratio(block["behaviour"][b], base["behaviour"][b]) for b in BEHAVIOURS}
    return block


# ---------------------------------------------------------------------------------------------- driver
def evaluate(model_value: str, data_values: Sequence[str], settings: EvalSettings, *,
             baseline: Optional[str] = None, device: str = "auto", dtype: str = "float32",
             samples_path: Optional[str] = None) -> Dict:
    """Runs the evaluation and returns the report (a JSON-serialisable dict)."""
    settings.check()
    specs = [parse_data_spec(v) for v in data_values]
    if not specs:
        raise EvalError("give at least one --data")
    if len({s.value for s in specs}) != len(specs):
        raise EvalError(f"--data: a dataset is given twice: {[s.value for s in specs]}")
    for name in (settings.reward,) if settings.reward else ():
        if name not in REWARDS and ":" not in name:
            raise EvalError(f"--reward {name!r}: choose one of {list(REWARDS)} or module:function")
    resolved = resolve_model(model_value)
    base_resolved = resolve_model(baseline) if baseline else None

    tok = load_tokenizer_for(resolved.spec)
    datasets = prepare_datasets(specs, settings, tok, resolved.run_config)  # bad data fails before the model
    model = load_model_on(resolved.spec, dtype=dtype, seed=settings.seed, device=device)
    per, records = {}, {}
    for ds in datasets:
        s = score(sample(model, tok, ds, settings), ds, settings)
        per[ds.name] = summarise(s, settings)
        records[ds.name] = s
    trans, refl = settings.keywords()
    report = {
        "model": model_value,
        "resolved_model": resolved.spec,
        "settings": {**{k: v for k, v in dataclasses.asdict(settings).items()
                        if k not in ("transition_words", "reflection_words")},
                     "format": datasets[0].data_cfg.format},
        "keywords": {"transition": list(trans), "reflection": list(refl)},
        "datasets": per,
        "overall": _overall(per),
    }
    for ds in datasets:
        per[ds.name].update(reward=ds.reward, stop_at_newline=ds.stop_at_newline)
    if base_resolved is not None:
        del model
        btok = load_tokenizer_for(base_resolved.spec)
        bmodel = load_model_on(base_resolved.spec, dtype=dtype, seed=settings.seed, device=device)
        if btok.get_vocab() != tok.get_vocab():
            log.warning("the baseline's tokenizer differs from the model's; prompts are re-tokenised for it")
        bdatasets = prepare_datasets(specs, settings, btok, resolved.run_config)  # the same prompt texts
        bper = {}
        for ds in bdatasets:
            bper[ds.name] = summarise(score(sample(bmodel, btok, ds, settings), ds, settings), settings)
            _with_ratios(per[ds.name], bper[ds.name])
        report["baseline"] = {"model": baseline, "resolved_model": base_resolved.spec, "datasets": bper,
                              "overall": _overall(bper)}
        _with_ratios(report["overall"], report["baseline"]["overall"])
    if samples_path:
        _write_samples(samples_path, datasets, records, tok)
    return report


def _write_samples(path: str, datasets: List[EvalDataset], records: Dict[str, Samples], tokenizer):
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        for ds in datasets:
            s = records[ds.name]
            inputs = tokenizer.batch_decode(ds.prompt_ids)
            for i, text in enumerate(s.texts):
                prob = ds.problems[i // s.k]
                f.write(json.dumps({"dataset": ds.name, "problem": i // s.k, "sample": i % s.k,
                                    "prompt": prob["prompt"], "input": inputs[i // s.k],
                                    "answer": prob["answer"], "response": text,
                                    "verdict": s.verdicts[i], "has_answer": s.has_answer[i],
                                    "tokens": len(s.response_ids[i]), "truncated": s.truncated[i]}) + "\n")


def default_out(model_value: str, name: str) -> Path:
    """<run>/<name> when MODEL_OR_RUN is a run directory, else ./<name>."""
    p = Path(model_value)
    is_run = p.is_dir() and not (p / "config.json").is_file() and (
        (p / "final").is_dir() or (p / "checkpoints").is_dir())
    return (p if is_run else Path(".")) / name


def write_json(report: Dict, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(p)
    return p


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(report: Dict) -> str:
    """The console table: one row per dataset and the overall row."""
    k = report["settings"]["k"]
    has_base = "baseline" in report
    cols = ["dataset", "n", f"avg@{k}", f"pass@{k}", "len", "trunc", "trans", "refl", "exec"]
    if has_base:
        cols += ["trans/base", "refl/base", f"base avg@{k}"]
    rows = []
    blocks = list(report["datasets"].items()) + [("overall", report["overall"])]
    for name, r in blocks:
        b = r["behaviour"]
        row = [name, str(r["n_problems"]), _fmt(r["avg@k"]), _fmt(r["pass@k"]), _fmt(r["response_len"], ".1f"),
               _fmt(r["truncation"]), _fmt(b["transition"], ".2f"), _fmt(b["reflection"], ".2f"),
               _fmt(b["execution"], ".2f")]
        if has_base:
            base = report["baseline"]["overall" if name == "overall" else "datasets"]
            base = base if name == "overall" else base[name]
            ratio = r.get("behaviour_ratio", {})
            row += [_fmt(ratio.get("transition"), ".2f"), _fmt(ratio.get("reflection"), ".2f"),
                    _fmt(base["avg@k"])]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                   enumerate(zip(cells, widths)))
    out = [line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def parse_words(text: Optional[str]) -> tuple:
    """A comma-separated keyword list ('' or None = the default list)."""
    if not text:
        return ()
    words = tuple(w.strip() for w in text.split(",") if w.strip())
    if not words:
        raise EvalError(f"keyword list {text!r} holds no keywords")
    return words


def settings_from_args(args) -> EvalSettings:
    """EvalSettings from the parsed eval/align options (also applies --threads)."""
    if getattr(args, "threads", 0):
        if args.threads < 0:
            raise EvalError(f"--threads: expected >= 0, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    return EvalSettings(
        k=args.k, n_problems=args.n_problems, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, format=args.format, template=args.template,
        system_prompt=args.system_prompt, stop_at_newline=args.stop_at_newline, reward=args.reward,
        digits=args.digits, prompt_field=args.prompt_field, answer_field=args.answer_field, seed=args.seed,
        generation_batch_size=args.generation_batch_size, reward_timeout=args.reward_timeout,
        transition_words=parse_words(getattr(args, "transition_words", None)),
        reflection_words=parse_words(getattr(args, "reflection_words", None))).check()


def run_eval_cli(args) -> int:
    """`fastprerl eval`: prints the table to stdout, writes the JSON report, returns the exit code."""
    try:
        settings = settings_from_args(args)
        report = evaluate(args.model, args.data, settings, baseline=args.baseline, device=args.device,
                          dtype=args.dtype, samples_path=args.samples)
    except EvalError as e:
        print(f"fastprerl eval: {e}", file=sys.stderr)
        return 2
    out = write_json(report, args.out or default_out(args.model, "eval.json"))
    print(format_table(report))
    print(f"fastprerl eval: report written to {out}", file=sys.stderr)
    return 0



# ---------------------------------------------------------------------------------------------- during training
class PeriodicEval:
    """`eval.every`: the numbers of `fastprerl eval` on fixed problems while a run trains.

    The problems and the sampling seed are fixed for the whole run (eval.seed, not the training stream's),
    so successive evaluations differ only by the weights. Each evaluation is appended to
    <output_dir>/eval.jsonl; behaviour counts are also given as ratios against the run's first evaluation
    (the step-0 model; read back from eval.jsonl on resume). The run's own data source is scored with the
    run's reward function, other sets with `fastprerl eval`'s default for them. Sampling forks torch's RNG,
    so evaluating does not change what the training steps sample."""

    def __init__(self, cfg, tokenizer, out_dir, run_reward_fn=None, start_step: int = 0):
        e = cfg.eval
        self.every = e.every
        values = tuple(e.data) or (cfg.data.source,)
        try:
            specs = [parse_data_spec(v) for v in values]
        except EvalError as err:
            raise EvalError(f"eval.data: {err}") from None
        self.settings = EvalSettings(k=e.k, n_problems=e.n_problems, temperature=e.temperature,
                                     top_p=cfg.rollout.top_p,
                                     max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
                                     seed=e.seed, digits=cfg.data.digits,
                                     generation_batch_size=cfg.rollout.generation_batch_size,
                                     reward_timeout=cfg.reward.timeout, reward_workers=cfg.reward.workers).check()
        self.tok = tokenizer
        self.datasets = prepare_datasets(specs, self.settings, tokenizer, run_config=cfg)
        self.rewards = {}
        for ds in self.datasets:
            if ds.name == cfg.data.source and run_reward_fn is not None:
                ds.reward = f"run ({cfg.reward.fn})"
                self.rewards[ds.name] = run_reward_fn
            else:
                self.rewards[ds.name] = make_reward(ds.reward, timeout=cfg.reward.timeout, workers=cfg.reward.workers)
        self.path = Path(out_dir) / "eval.jsonl"
        self.base = None
        if start_step > 0 and self.path.exists():  # a resumed run evaluates step start_step again
            from .metrics import _keep_rows_before
            _keep_rows_before(self.path, start_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in this directory
        if self.path.exists():
            with open(self.path) as f:
                first = f.readline().strip()
            if first:
                self.base = json.loads(first)["datasets"]

    def due(self, step: int, total: int) -> bool:
        """Before step 0, every `every` completed steps, and after the last step."""
        return self.every > 0 and (step == 0 or step == total or step % self.every == 0)

    def run(self, model, step: int) -> Dict[str, float]:
        """Evaluates `model` (its train/eval mode is restored); returns flat metrics eval/<set>/<name>."""
        per = {}
        for ds in self.datasets:
            s = score(sample(model, self.tok, ds, self.settings), ds, self.settings, fn=self.rewards[ds.name])
            per[ds.name] = summarise(s, self.settings)
        if self.base is None:
            self.base = per
        for name, block in per.items():
            _with_ratios(block, self.base.get(name, block))
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "datasets": per}) + "\n")
        flat = {}
        for name, block in per.items():
            pre = f"eval/{name}/"
            for key in ("avg@k", "pass@k", "response_len", "truncation", "format"):
                flat[pre + key] = block[key]
            for b, v in block["behaviour"].items():
                flat[pre + f"behaviour/{b}"] = v
            for b, v in (block.get("behaviour_ratio") or {}).items():
                if v is not None:
                    flat[pre + f"behaviour_ratio/{b}"] = v
        return flat
