"""Shared by the checkpoint and resume tests: configs/tiny.toml runs in this process, and how two runs are
compared (metrics without perf/*, weights bit for bit)."""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastprerl.config import load_config
from fastprerl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent   # the support modules (fake_rewards, ...)
TINY = ROOT / "configs" / "tiny.toml"
# small rollouts so that a step takes well under a second; one checkpoint per step, the newest 3 kept; a KL
# reference model, so that its state (re-synced at the phase switch) is part of every exactness check
FAST = ["reward.fn=fake_rewards:parity_reward", "run.threads=1", "run.checkpoint_every=1", "run.keep_checkpoints=3",
        "algo.kl_coef=0.05",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6",
        "logging.console=false", "logging.view_gap=false"]


def phases_config(tmp_path, first: int, second: int) -> Path:
    """configs/tiny.toml with phases of `first` and `second` steps (dotted overrides cannot reach phases)."""
    text = TINY.read_text()
    assert text.count("steps = 2") == 2, "tiny.toml changed: update phases_config"
    text = text.replace("steps = 2", f"steps = {first}", 1).replace("steps = 2", f"steps = {second}", 1)
    path = tmp_path / f"tiny_{first}_{second}.toml"
    path.write_text(text)
    return path


def metric_rows(run_dir: Path):
    """metrics.jsonl rows without the timing fields (perf/*), which differ from run to run."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def assert_same_weights(dir_a: Path, dir_b: Path):
    a, b = load_file(str(Path(dir_a) / "model.safetensors")), load_file(str(Path(dir_b) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weight {k} differs between {dir_a} and {dir_b}"


def run_in_process(cfg_path: Path, run_dir: Path, *extra, fast=FAST) -> Trainer:
    threads = torch.get_num_threads()
    try:
        t = Trainer(load_config(cfg_path, [f"run.output_dir={run_dir}", *fast, *extra]))
        t.status = t.train()
    finally:
        torch.set_num_threads(threads)
    return t


def signal_at_step(monkeypatch, at_step: int, signals):
    """Deliver `signals` to this process at the start of step `at_step` (inside train_step)."""
    real = Trainer.train_step

    def train_step(self, phase):
        if self.step == at_step:
            for s in signals:
                os.kill(os.getpid(), s)
        return real(self, phase)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def tiny_cfg(tmp_path, *extra):
    return load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", "reward.fn=fake_rewards:parity_reward",
                              "logging.console=false", *extra])


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
