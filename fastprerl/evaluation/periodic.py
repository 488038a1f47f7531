"""Periodic evaluation during training (eval.every): the numbers of `fastprerl eval` on fixed problems."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import DataConfig
from ..metrics import keep_rows_before
from ..models import empty_context_token
from .data import EvalError, EvalSettings, make_reward, parse_data_spec, prepare_datasets, sample, score_samples
from .evaluator import SUMMARY_KEYS, summarise, with_ratios
from .probe import has_probe, view_probe


def due(every: int, step: int, total: int) -> bool:
    """eval.every > 0: before step 0, every `every` completed steps, and after the last step."""
    return every > 0 and (step == 0 or step == total or step % every == 0)


class PeriodicEval:
    """`eval.every`: the numbers of `fastprerl eval` on fixed problems while a run trains.

    The problems and the sampling seed are fixed for the whole run (eval.seed, not the training stream's),
    so successive evaluations differ only by the weights. A dataset whose problems carry a view probe
    (builtin:equations) also gets the probe's numbers (probe.py), under eval/<set>/probe/<view>/<name>. Each evaluation is appended to
    <output_dir>/eval.jsonl; behaviour counts are also given as ratios against the run's first evaluation
    (the step-0 model; read back from eval.jsonl on resume). The run's own data source is scored with the
    run's reward function, other sets with `fastprerl eval`'s default for them. Sampling forks torch's RNG,
    so evaluating does not change what the training steps sample."""

    def __init__(self, cfg, tokenizer, out_dir, run_reward_fn=None, start_step: int = 0, open_log: bool = True):
        e = cfg.eval
        values = tuple(e.data) or (cfg.data.source,)
        try:
            specs = [parse_data_spec(v) for v in values]
        except EvalError as err:
            raise EvalError(f"eval.data: {err}") from None
        # the run's eval, rollout (top_p, generation batch) and reward (timeout, workers) settings; its digits
        self.settings = EvalSettings(eval=e, rollout=cfg.rollout, data=DataConfig(digits=cfg.data.digits),
                                     reward=cfg.reward, given=frozenset({"eval.n_problems", "data.digits"}))
        self.tok = tokenizer
        self.empty_token = empty_context_token(tokenizer, cfg.model.empty_token)
        self.datasets = prepare_datasets(specs, self.settings, tokenizer, run_config=cfg)
        self.rewards = {}
        for ds in self.datasets:
            if ds.name == cfg.data.source and run_reward_fn is not None:
                ds.reward = f"run ({cfg.reward.fn})"
                self.rewards[ds.name] = run_reward_fn
            else:
                self.rewards[ds.name] = make_reward(ds.reward, cfg.reward)
        self.path = Path(out_dir) / "eval.jsonl"
        self.base = None
        if open_log:
            self.open_log(start_step)

    def open_log(self, start_step: int = 0) -> None:
        """eval.jsonl of this run: rows from start_step on dropped (a resume), or the file removed (a fresh run;
        the trainer sets an earlier run's aside first); the run's first evaluation read back as the base."""
        if start_step > 0 and self.path.exists():  # a resumed run evaluates step start_step again
            keep_rows_before(self.path, start_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in this directory
        if self.path.exists():
            with open(self.path) as f:
                first = f.readline().strip()
            if first:
                self.base = json.loads(first)["datasets"]

    def run(self, model, step: int) -> dict[str, float]:
        """Evaluates `model` (its train/eval mode is restored); returns flat metrics eval/<set>/<name>."""
        per = {}
        for ds in self.datasets:
            s = score_samples(sample(model, self.tok, ds, self.settings), ds, self.settings, fn=self.rewards[ds.name])
            per[ds.name] = summarise(s, self.settings)
            if has_probe(ds.problems):
                per[ds.name]["probe"] = view_probe(model, self.tok, ds.problems, ds.prompt_ids, self.empty_token)
        if self.base is None:
            self.base = per
        for name, block in per.items():
            with_ratios(block, self.base.get(name, block))
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "datasets": per}) + "\n")
        flat = {}
        for name, block in per.items():
            pre = f"eval/{name}/"
            for key in SUMMARY_KEYS:
                flat[pre + key] = block[key]
            for b, v in block["behaviour"].items():
                flat[pre + f"behaviour/{b}"] = v
            for b, v in (block.get("behaviour_ratio") or {}).items():
                if v is not None:
                    flat[pre + f"behaviour_ratio/{b}"] = v
            for view in ("cond", "free"):
                for key, v in (block.get("probe") or {}).get(view, {}).items():
                    flat[pre + f"probe/{view}/{key}"] = v
        return flat
