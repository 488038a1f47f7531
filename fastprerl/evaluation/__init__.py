"""Evaluation: what a model scores on fixed problems, alone (`fastprerl eval`, `align`, `plot`) or during training.

  data.py        settings, data specs, problems, prompts; sampling and scoring k responses per problem
  model.py       which model an evaluation runs (spec, folder, run directory) and how it is loaded
  evaluator.py   Avg@k, pass@k, lengths, behaviour counts; `fastprerl eval`
  periodic.py    evaluation every eval.every steps of a training run
  probe.py       with and without the prompt: log P(right) against log P(wrong) (builtin:equations)
  align.py       gradient alignment of the prompt-free and prompt-conditioned objectives; `fastprerl align`
  plot.py        one PNG of a run's progress; `fastprerl plot`
"""
from .align import Alignment, rollout_alignment, run_align, run_align_cli
from .data import (
                   DEFAULT_GENERATED,
                   MATH_INSTRUCTION,
                   MATH_TEMPLATE,
                   REWARDS,
                   DataSpec,
                   EvalDataset,
                   EvalError,
                   EvalSettings,
                   Samples,
                   champ_problems,
                   default_reward,
                   load_eval_problems,
                   make_reward,
                   parse_data_spec,
                   prepare_datasets,
                   sample,
                   score_samples,
)
from .evaluator import (
                   SUMMARY_KEYS,
                   avg_at_k,
                   default_out,
                   evaluate,
                   format_table,
                   mean_pass_at_k,
                   parse_words,
                   pass_at_k,
                   pass_ks,
                   run_eval_cli,
                   settings_from_args,
                   summarise,
                   with_ratios,
                   write_json,
)
from .model import ResolvedModel, load_model_on, load_tokenizer_for, resolve_model
from .periodic import PeriodicEval, due
from .plot import plot_run

__all__ = [
    "Alignment", "rollout_alignment", "run_align", "run_align_cli", "DEFAULT_GENERATED", "MATH_INSTRUCTION",
    "MATH_TEMPLATE", "REWARDS", "DataSpec", "EvalDataset", "EvalError", "EvalSettings", "Samples", "champ_problems",
    "default_reward", "load_eval_problems", "make_reward", "parse_data_spec", "prepare_datasets", "sample",
    "score_samples", "SUMMARY_KEYS", "avg_at_k", "default_out", "evaluate", "format_table", "mean_pass_at_k",
    "pass_at_k", "pass_ks", "parse_words", "run_eval_cli", "settings_from_args", "summarise", "with_ratios",
    "write_json", "ResolvedModel", "load_model_on", "load_tokenizer_for", "resolve_model", "PeriodicEval", "due",
    "plot_run",
]
