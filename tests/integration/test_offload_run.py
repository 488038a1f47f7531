"""A tiny run with the optimizer state offloaded to CPU memory trains identically to one without."""
import json
from pathlib import Path

import pytest
import torch

from fastprerl.config import load_config
from fastprerl.optim import CPUOffloadAdamW
from fastprerl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_with_offloaded_optimizer_state_trains_identically(tmp_path):
    def run(name, *extra):
        cfg = load_config(TINY, [f"run.output_dir={tmp_path / name}", "reward.fn=fake_rewards:parity_reward",
                                 "logging.console=false", *extra])
        t = Trainer(cfg)
        t.train()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return t, rows

    t1, rows1 = run("resident")
    t2, rows2 = run("offload", "optim.offload_optimizer_state=true")
    assert isinstance(t2.optimizer, CPUOffloadAdamW)
    assert sum(r["train/rows"] > 0 for r in rows1) >= 2, "at least two optimizer steps must have been taken"
    assert [r["loss/policy"] for r in rows1] == [r["loss/policy"] for r in rows2]
    for p, q in zip(t1.model.parameters(), t2.model.parameters()):
        assert torch.equal(p, q)
