"""Evaluation: Avg@k, pass@k, response length, truncation rate and behaviour counts of a model.

`fastprerl eval MODEL_OR_RUN --data SOURCE [--data SOURCE ...] --k 32` samples k responses per problem
with the HF rollout backend (`fastprerl.rollout.hf.HFRollout`), scores them with a reward function of
`fastprerl.rewards`, and reports per dataset and overall:

  avg@k           mean verdict over the k samples of a problem, averaged over problems (Avg@k; with binary
                  verdicts this is the mean accuracy, and it equals pass@1)
  pass@k          unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (n = samples, c = fully correct
                  samples, i.e. verdict >= 1), averaged over problems; `pass_curve` holds it for
                  k' = 1, 2, 4, ..., k
  correct         per problem, how many of its k samples are fully correct (paired comparisons of two models)
  response_len    mean response length in tokens (EOS / the stop token included)
  truncation      fraction of responses that hit --max-new-tokens without stopping
  format          fraction of responses with an extractable answer
  behaviour       mean number of transition / reflection / execution paragraphs per response
                  (`fastprerl.metrics.behaviour_counts`, the SEAL keyword rule; keyword lists are options)
  behaviour_ratio with --baseline: these means divided by the baseline model's on the same prompts
  probe           (datasets with a view probe: builtin:equations) per view, with and without the prompt, the
                  fraction of problems where log P(right) > log P(wrong) and both means (`probe.py`)

"overall" is the unweighted mean of the per-dataset values (every benchmark counts once, as in the
paper's "average over benchmarks").

MODEL_OR_RUN is a model spec of `fastprerl.models` (builtin:*, a local Hugging Face folder, a hub id) or a
run directory: its `final/` model when present, else its newest `checkpoints/step_<N>/`. A folder that holds a
LoRA adapter (a LoRA run's `final/` or checkpoint, or the run itself) is loaded as its base (the run's
model.path, built with its run.seed) with the adapter on it through PEFT. A run's
`config.toml` supplies defaults: the prompt format, the empty-context token (for `fastprerl align`) and,
for the dataset the run trained on, its template, system prompt, digits and newline stop.

Datasets (`--data`, repeatable):
  builtin:addition         2-digit additions in completion format (answer: the last number, stop at newline)
  builtin:equations        the same after three solved examples, answered " a + b = c" (reward "equation")
  builtin:word_problems    two-step word problems, \\boxed answers
  reasoning_gym:<task>     a reasoning-gym generator, scored by the task's own scorer
  champ                    the 270 CHAMP competition problems (`pip install champ-dataset`), \\boxed answers
  path.jsonl|.json|.parquet|.csv   MATH-style records with `problem` / `answer` fields, \\boxed answers
Generated sources take --n-problems problems (default 100); fixed sets use all problems, or a seeded
random subset (kept in file order) of --n-problems of them.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..metrics import behaviour_counts, text_table
from ..models import empty_context_token
from .data import (
    REWARDS,
    EvalDataset,
    EvalError,
    EvalSettings,
    Samples,
    check_prompt_room,
    parse_data_spec,
    prepare_datasets,
    sample,
    score_samples,
)
from .model import load_model_on, load_tokenizer_for, resolve_model
from .probe import has_probe, view_probe

__all__ = ["BEHAVIOURS", "SUMMARY_KEYS", "pass_at_k", "avg_at_k", "mean_pass_at_k", "pass_ks", "summarise",
           "with_ratios", "evaluate", "format_table", "parse_words", "settings_from_args", "run_eval_cli",
           "default_out", "write_json"]

log = logging.getLogger("fastprerl")

BEHAVIOURS = ("transition", "reflection", "execution")
SUMMARY_KEYS = ("avg@k", "pass@k", "response_len", "truncation", "format", "timeouts")


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


def pass_ks(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    out, x = [], 1
    while x < k:
        out.append(x)
        x *= 2
    return out + [k]


def summarise(samples: Samples, settings: EvalSettings) -> dict:
    """The per-dataset numbers of the report (see the module doc)."""
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
        "correct": [sum(1 for v in row if v >= 1.0 - 1e-9) for row in table],
        "response_len": sum(len(r) for r in samples.response_ids) / B,
        "truncation": sum(samples.truncated) / B,
        "format": sum(samples.has_answer) / B,
        "timeouts": sum(samples.timed_out),
        "behaviour": {b: sum(c[b] for c in counts) / B for b in BEHAVIOURS},
    }


def _ratio(a: float, b: float):
    return a / b if b > 0 else None


def _overall(per: dict[str, dict]) -> dict:
    rows = list(per.values())
    mean = lambda xs: sum(xs) / len(xs)
    out = {"n_datasets": len(rows), "n_problems": sum(r["n_problems"] for r in rows)}
    for key in SUMMARY_KEYS:
        out[key] = mean([r[key] for r in rows]) if key != "timeouts" else sum(r[key] for r in rows)
    out["behaviour"] = {b: mean([r["behaviour"][b] for r in rows]) for b in BEHAVIOURS}
    return out


def with_ratios(block: dict, base: dict) -> dict:
    block["behaviour_ratio"] = {b: _ratio(block["behaviour"][b], base["behaviour"][b]) for b in BEHAVIOURS}
    return block


# ---------------------------------------------------------------------------------------------- driver
def evaluate(model_value: str, data_values: Sequence[str], settings: EvalSettings, *,
             baseline: str | None = None, device: str = "auto", dtype: str = "float32",
             samples_path: str | None = None) -> dict:
    """Runs the evaluation and returns the report (a JSON-serialisable dict)."""
    specs = [parse_data_spec(v) for v in data_values]
    if not specs:
        raise EvalError("give at least one --data")
    if len({s.value for s in specs}) != len(specs):
        raise EvalError(f"--data: a dataset is given twice: {[s.value for s in specs]}")
    for name in (settings.reward_name,) if settings.reward_name else ():
        if name not in REWARDS and ":" not in name:
            raise EvalError(f"--reward {name!r}: choose one of {list(REWARDS)} or module:function")
    resolved = resolve_model(model_value)
    base_resolved = resolve_model(baseline) if baseline else None

    tok = load_tokenizer_for(resolved.spec)
    datasets = prepare_datasets(specs, settings, tok, resolved.run_config)  # bad data fails before the model
    model = load_model_on(resolved, dtype=dtype, seed=settings.eval.seed, device=device)
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        check_prompt_room(datasets, int(context), settings.eval.max_new_tokens)
    per, records = {}, {}
    for ds in datasets:
        s = score_samples(sample(model, tok, ds, settings), ds, settings)
        per[ds.name] = summarise(s, settings)
        if has_probe(ds.problems):
            empty = getattr(getattr(resolved.run_config, "model", None), "empty_token", "auto")
            per[ds.name]["probe"] = view_probe(model, tok, ds.problems, ds.prompt_ids, empty_context_token(tok, empty))
        records[ds.name] = s
    trans, refl = settings.keywords()
    report = {
        "model": model_value,
        **resolved.report(),
        "settings": settings.report(datasets[0].data_cfg.format),
        "keywords": {"transition": list(trans), "reflection": list(refl)},
        "datasets": per,
        "overall": _overall(per),
    }
    for ds in datasets:
        per[ds.name].update(reward=ds.reward, stop_at_newline=ds.stop_at_newline)
    if base_resolved is not None:
        del model
        btok = load_tokenizer_for(base_resolved.spec)
        bmodel = load_model_on(base_resolved, dtype=dtype, seed=settings.eval.seed, device=device)
        if btok.get_vocab() != tok.get_vocab():
            log.warning("the baseline's tokenizer differs from the model's; prompts are re-tokenised for it")
        bdatasets = prepare_datasets(specs, settings, btok, resolved.run_config)  # the same prompt texts
        bper = {}
        for ds in bdatasets:
            bper[ds.name] = summarise(score_samples(sample(bmodel, btok, ds, settings), ds, settings), settings)
            with_ratios(per[ds.name], bper[ds.name])
        report["baseline"] = {"model": baseline, **base_resolved.report(), "datasets": bper,
                              "overall": _overall(bper)}
        with_ratios(report["overall"], report["baseline"]["overall"])
    if samples_path:
        _write_samples(samples_path, datasets, records, tok)
    return report


def _write_samples(path: str, datasets: list[EvalDataset], records: dict[str, Samples], tokenizer):
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
                                    "timed_out": s.timed_out[i],
                                    "tokens": len(s.response_ids[i]), "truncated": s.truncated[i]}) + "\n")


def default_out(model_value: str, name: str) -> Path:
    """<run>/<name> when MODEL_OR_RUN is a run directory, else ./<name>."""
    p = Path(model_value)
    is_run = p.is_dir() and not (p / "config.json").is_file() and (
        (p / "final").is_dir() or (p / "checkpoints").is_dir())
    return (p if is_run else Path(".")) / name


def write_json(report: dict, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(p)
    return p


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(report: dict) -> str:
    """The console table: one row per dataset and the overall row."""
    k = report["settings"]["k"]
    has_base = "baseline" in report
    cols = ["dataset", "n", f"avg@{k}", f"pass@{k}", "len", "trunc", "trans", "refl", "exec"]
    if has_base:
        cols += ["trans/base", "refl/base", f"base avg@{k}"]
    rows = []
    for name, r in list(report["datasets"].items()) + [("overall", report["overall"])]:
        b = r["behaviour"]
        row = [name, str(r["n_problems"]), _fmt(r["avg@k"]), _fmt(r["pass@k"]), _fmt(r["response_len"], ".1f"),
               _fmt(r["truncation"]), _fmt(b["transition"], ".2f"), _fmt(b["reflection"], ".2f"),
               _fmt(b["execution"], ".2f")]
        if has_base:
            base = report["baseline"]["overall"] if name == "overall" else report["baseline"]["datasets"][name]
            ratio = r.get("behaviour_ratio", {})
            row += [_fmt(ratio.get("transition"), ".2f"), _fmt(ratio.get("reflection"), ".2f"),
                    _fmt(base["avg@k"])]
        rows.append(row)
    return text_table(cols, rows)


def parse_words(text: str | None) -> tuple:
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
        torch.set_num_threads(args.threads)
    return EvalSettings.from_options(**{
        "eval.k": args.k, "eval.n_problems": args.n_problems, "eval.temperature": args.temperature,
        "rollout.top_p": args.top_p, "eval.max_new_tokens": args.max_new_tokens, "data.format": args.format,
        "data.template": args.template, "data.system_prompt": args.system_prompt,
        "rollout.stop_at_newline": args.stop_at_newline, "reward": args.reward, "data.digits": args.digits,
        "data.prompt_field": args.prompt_field, "data.answer_field": args.answer_field, "eval.seed": args.seed,
        "rollout.generation_batch_size": args.generation_batch_size, "reward.timeout": args.reward_timeout,
        "eval.transition_words": parse_words(getattr(args, "transition_words", None)) or None,
        "eval.reflection_words": parse_words(getattr(args, "reflection_words", None)) or None})


def run_eval_cli(args) -> int:
    """`fastprerl eval`: prints the table to stdout, writes the JSON report, returns the exit code."""
    try:
        settings = settings_from_args(args)
        report = evaluate(args.model, args.data, settings, baseline=args.baseline, device=args.device,
                          dtype=args.dtype, samples_path=args.samples)
    except EvalError as e:
        print(f"fastprerl eval: {e}", file=sys.stderr)
        return 2
    report = {"command": "fastprerl " + " ".join(sys.argv[1:]), **report}
    out = write_json(report, args.out or default_out(args.model, "eval.json"))
    print(format_table(report))
    print(f"fastprerl eval: report written to {out}", file=sys.stderr)
    return 0
