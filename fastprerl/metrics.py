"""Metric sinks: metrics.jsonl always, TensorBoard and Weights & Biases when enabled, readable console lines,
completion samples file, and the behaviour counts of responses."""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

import torch

from .objectives import tis_weight

# Behaviour keyword rule (SEAL, arXiv 2504.07986), applied per paragraph (split at blank lines).
TRANSITION_WORDS = ("alternatively", "think differently", "another way", "another approach", "another method",
                    "another solution", "another strategy", "another technique")
REFLECTION_WORDS = ("wait", "verify", "make sure", "hold on", "think again", "'s correct", "'s incorrect",
                    "let me check", "seems right")


def behaviour_counts(text: str, transition=TRANSITION_WORDS, reflection=REFLECTION_WORDS) -> dict[str, int]:
    """Counts of transition / reflection / execution paragraphs in one response."""
    out = {"transition": 0, "reflection": 0, "execution": 0}
    for para in (p for p in text.split("\n\n") if p.strip()):
        low = para.lower()
        if any(w in low for w in transition):
            out["transition"] += 1
        elif any(w in low for w in reflection):
            out["reflection"] += 1
        else:
            out["execution"] += 1
    return out


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def keep_rows_before(path: Path, step: int) -> None:
    """Drops the rows of a jsonl file with "step" >= step (and a line cut short by a crash), atomically."""
    if not path.exists():
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", step) < step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Sinks for one metrics row per step: metrics.jsonl (always), TensorBoard event files, Weights & Biases,
    a console line; completion samples go to samples.jsonl.

    start_step > 0 continues a run: rows of steps >= start_step (written after the checkpoint the run resumes
    from) are dropped from metrics.jsonl and samples.jsonl, and TensorBoard is told to purge its events from
    that step on, so every sink shows the run as if it had never stopped. Weights & Biases continues the same
    run id (saved in wandb_id.txt); it ignores rows of steps it already has."""

    CONSOLE_KEYS = ("reward/mean", "loss/policy", "rollout/response_len_mean", "train/entropy",
                    "train/grad_norm", "perf/step_s")

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, console: bool = True, start_step: int = 0,
                 wandb_project: str | None = None, run_config: dict | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            for name in ("metrics.jsonl", "samples.jsonl"):
                keep_rows_before(self.out_dir / name, start_step)
        mode = "a" if start_step > 0 else "w"
        self._jsonl = open(self.out_dir / "metrics.jsonl", mode)
        self._samples = None
        self._samples_mode = mode
        self.console = console
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                     purge_step=start_step if start_step > 0 else None)
        self._wandb = None
        if wandb_project is not None:
            self._wandb = _wandb_run(self.out_dir, wandb_project, run_config, resume=start_step > 0)

    def log(self, row: dict, write=None):
        self._jsonl.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._jsonl.flush()
        step = row["step"]
        numeric = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self.console:
            parts = [f"step {step:>4d}", f"[{row.get('phase', '')}]"]
            for k in self.CONSOLE_KEYS:
                if k in row and isinstance(row[k], (int, float)):
                    parts.append(f"{k.split('/')[-1]}={row[k]:.4g}")
            (write or (lambda s: print(s, file=sys.stderr)))("  ".join(parts))

    def log_samples(self, step: int, rows: list[dict]):
        """rows: one dict per completion (prompt, response, answer, reward, advantage)."""
        if self._samples is None:
            self._samples = open(self.out_dir / "samples.jsonl", self._samples_mode)
        for r in rows:
            self._samples.write(json.dumps({"step": step, **{k: _clean(v) for k, v in r.items()}}) + "\n")
        self._samples.flush()

    def close(self):
        self._jsonl.close()
        if self._samples is not None:
            self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            # wandb >= 0.31 can return from finish() before its service has written the run's rows (an offline
            # .wandb file then holds only its header); teardown waits for the service
            import wandb
            wandb.teardown()


def _wandb_run(out_dir: Path, project: str, run_config: dict | None, resume: bool):
    """A W&B run for this output directory; the same run id across resumes (wandb_id.txt)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("logging.wandb = true but the `wandb` package is not installed: pip install wandb "
                           "(or set logging.wandb = false)") from None
    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:12]
    run = wandb.init(project=project, id=run_id, resume="allow", dir=str(out_dir), name=out_dir.name,
                     config=run_config)
    id_file.write_text(run_id + "\n")
    return run


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl file (a last line cut short by a crash is skipped)."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise
    return rows


class StepMetrics(NamedTuple):
    """The metrics row of one step and, per mean in it, the number of items it is taken over (`reduce_rows`)."""
    row: dict
    weights: dict[str, int]


def step_metrics(*, group_size: int, rewards, scores, resp_lens, truncated: list[bool], texts: list[str], batch,
                 loss: float, grad_norm: float, diag, entropy, behaviour, terms, tis_cap: float,
                 view_gap: bool) -> StepMetrics:
    """The metrics row of one training step (without step, phase and perf/*) and the item counts of its means.
    rewards (B,), resp_lens (B,); scores: fastprerl.rewards.Scores; batch: the step's PackedBatch (R rows);
    diag: its LossDiagnostics; entropy (R,) or None; behaviour (R,) the sampler's log-probs of the rows;
    terms: name -> SampleTerms."""
    weights = {}
    B = len(texts)
    groups = rewards.view(-1, group_size)
    gmin, gmax = groups.min(1).values, groups.max(1).values
    m = {
        "reward/mean": rewards.mean().item(),
        "reward/accuracy": sum(scores.correct) / B,
        "reward/format": sum(scores.has_answer) / B,
        "reward/timeouts": scores.timeouts,
        "reward/errors": scores.errors,
        "rollout/response_len_mean": resp_lens.float().mean().item(),
        "rollout/truncated_frac": sum(truncated) / B,
        "groups/zero_adv_frac": (gmin == gmax).float().mean().item(),
        "groups/all_solved": int(((gmin == gmax) & (gmax > 0)).sum()),
        "groups/none_solved": int(((gmin == gmax) & (gmax <= 0)).sum()),
        "loss/policy": loss,
        "train/grad_norm": grad_norm,
        "train/rows": batch.rows.numel(),
        "train/packed_tokens": batch.num_tokens,
        "train/microbatches": len(batch.bins),
    }
    weights.update(dict.fromkeys(("reward/mean", "reward/accuracy", "reward/format", "rollout/response_len_mean",
                                  "rollout/truncated_frac", "groups/zero_adv_frac"), B))
    for name, s in diag.term_sums.items():
        m[f"loss/{name}"] = s.item()
        m[f"samples/{name}"] = int(terms[name].mask.sum())
        m[f"clip/{name}"] = diag.clip_fraction(name)
        weights[f"clip/{name}"] = diag.tokens[name]
    logp = diag.logp_by_row(batch.rows.numel())
    for view in ("cond", "free"):
        sel = batch.view_mask(view)
        if sel.any():
            m[f"logp/{view}_mean"] = logp[sel].mean().item()
            weights[f"logp/{view}_mean"] = int(sel.sum())
            if entropy is not None:
                m[f"entropy/{view}"] = entropy[sel].mean().item()
                weights[f"entropy/{view}"] = int(sel.sum())
    if entropy is not None and batch.rows.numel():
        m["train/entropy"] = entropy.mean().item()
        weights["train/entropy"] = batch.rows.numel()
    cond_rows = torch.nonzero(batch.view_mask("cond")).view(-1)
    if cond_rows.numel():
        m["rollout/logprob_gap"] = (behaviour[cond_rows] - logp[cond_rows]).abs().mean().item()
        weights["rollout/logprob_gap"] = cond_rows.numel()
        if tis_cap > 0:
            m["rollout/tis_weight_mean"] = tis_weight(logp[cond_rows], behaviour[cond_rows], tis_cap).mean().item()
            weights["rollout/tis_weight_mean"] = cond_rows.numel()
    if view_gap and batch.rows.numel():
        rs, rp = batch.row_sample, batch.row_pos
        c = {(s, p): v for s, p, v in zip(rs[cond_rows].tolist(), rp[cond_rows].tolist(), logp[cond_rows].tolist())}
        free_rows = torch.nonzero(batch.view_mask("free")).view(-1)
        d = [c[(s, p)] - v for s, p, v in zip(rs[free_rows].tolist(), rp[free_rows].tolist(),
                                              logp[free_rows].tolist()) if (s, p) in c]
        if d:
            m["logp/cond_minus_free"] = sum(d) / len(d)
            weights["logp/cond_minus_free"] = len(d)
    counts = [behaviour_counts(t) for t in texts]
    for kind in ("transition", "reflection", "execution"):
        m[f"behaviour/{kind}"] = sum(c[kind] for c in counts) / B
        weights[f"behaviour/{kind}"] = B
    return StepMetrics(m, weights)


SUMMED = ("reward/timeouts", "reward/errors", "groups/all_solved", "groups/none_solved", "loss/", "samples/",
          "train/rows",
          "train/packed_tokens", "train/microbatches")


def reduce_rows(rows: list[dict], weights: list[dict[str, int]]) -> dict:
    """One metrics row of a step whose samples were spread over processes, from each process's row of its own
    samples (`step_metrics`) and the item counts of its means: a mean over items (samples, tokens, rows) is
    the count-weighted mean of the processes' means; counts and loss parts (each process's loss is its share
    of the step loss) are summed; perf/* (seconds) is the slowest process's; anything else (the gradient norm,
    computed over all processes) is the first process's."""
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        have = [(r[key], w.get(key)) for r, w in zip(rows, weights) if key in r]
        vals = [v for v, _ in have]
        if key.startswith("perf/"):
            out[key] = max(vals)
        elif any(key == s or (s.endswith("/") and key.startswith(s)) for s in SUMMED):
            out[key] = sum(vals)
        elif all(n is not None for _, n in have):
            total = sum(n for _, n in have)
            out[key] = sum(v * n for v, n in have) / total if total else vals[0]
        else:
            out[key] = vals[0]
    return out


class NoMetrics:
    """The metric sinks of a process other than rank 0: nothing is written."""

    def log(self, row: dict, write=None):
        pass

    def log_samples(self, step: int, rows: list[dict]):
        pass

    def close(self):
        pass


def sample_records(samples: list[dict], texts: list[str], scores, roll, terms) -> list[dict]:
    """One samples.jsonl record per response: prompt, response, answer, reward, the advantage of the phase's
    first objective, verdict, format flag, token count and truncation."""
    adv = next(iter(terms.values())).advantage
    return [{"prompt": s["prompt"], "response": texts[i], "answer": s["answer"], "reward": scores.score[i],
             "advantage": float(adv[i]), "correct": scores.correct[i], "has_answer": scores.has_answer[i],
             "tokens": len(roll.response_ids[i]), "truncated": roll.truncated[i]} for i, s in enumerate(samples)]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A console table: the first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
