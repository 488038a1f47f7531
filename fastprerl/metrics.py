"""Metric sinks: metrics.jsonl always, TensorBoard when enabled, readable console lines, samples file."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

# Behaviour keyword rule (SEAL, arXiv 2504.07986), applied per paragraph (split at blank lines).
TRANSITION_WORDS = ("alternatively", "think differently", "another way", "another approach", "another method",
                    "another solution", "another strategy", "another technique")
REFLECTION_WORDS = ("wait", "verify", "make sure", "hold on", "think again", "'s correct", "'s incorrect",
                    "let me check", "seems right")


def behaviour_counts(text: str, transition=TRANSITION_WORDS, reflection=REFLECTION_WORDS) -> Dict[str, int]:
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


class MetricsLogger:
    CONSOLE_KEYS = ("reward/mean", "loss/policy", "rollout/response_len_mean", "train/entropy",
                    "train/grad_norm", "perf/step_s")

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, console: bool = True, resume: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        self._jsonl = open(self.out_dir / "metrics.jsonl", mode)
        self._samples = None
        self._samples_mode = mode
        self.console = console
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def log(self, row: Dict, write=None):
        self._jsonl.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._jsonl.flush()
        step = row["step"]
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self.console:
            parts = [f"step {step:>4d}", f"[{row.get('phase', '')}]"]
            for k in self.CONSOLE_KEYS:
                if k in row and isinstance(row[k], (int, float)):
                    parts.append(f"{k.split('/')[-1]}={row[k]:.4g}")
            (write or (lambda s: print(s, file=sys.stderr)))("  ".join(parts))

    def log_samples(self, step: int, rows: List[Dict]):
        if self._samples is None:
            self._samples = open(self.out_dir / "samples.jsonl", self._samples_mode)
        for r in rows:
            self._samples.write(json.dumps({"step": step, **r}) + "\n")
        self._samples.flush()

    def close(self):
        self._jsonl.close()
        if self._samples is not None:
            self._samples.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
