"""One training step from fixed rollouts, as a plain process or under torchrun, for tests/test_distributed.py.

`python tests/dist_worker.py OUT` (one plain process) or `torchrun --nproc_per_node=2 tests/dist_worker.py OUT`:
for each case (GRPO, NSR-PreRL, a phase mixing both) a fresh Trainer from the same seed takes one step on the
same rollouts and rank 0 writes OUT/<case>.pt with the metrics row and the full updated weights.

FixedRollout stands in for sampling (which differs between world sizes by design: each rank samples its own
prompts with its own RNG): the responses and their behaviour log-probs are a deterministic function of the
prompt tokens and the sample index, so every world size trains on the same rollouts.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from fastprerl.config import load_config
from fastprerl.rollout.base import RolloutBatch
from fastprerl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CASES = {"grpo": (("grpo", 1.0),), "nsr_prerl": (("nsr_prerl", 1.0),),
         "mixed": (("grpo", 0.5), ("nsr_prerl", 1.0))}
OVERRIDES = ["reward.fn=fake_rewards:parity_reward", "run.threads=1", "reward.workers=1",
             "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "optim.max_tokens_per_microbatch=40",
             "optim.grad_clip=0", "logging.console=false", "logging.progress=false", "logging.view_gap=false"]


class FixedRollout:
    """Responses of 1..9 tokens drawn from a hash of (prompt tokens, sample index); not a sampler."""

    def generate(self, prompts, n):
        flat, resp, logp, trunc = [], [], [], []
        for p in prompts:
            for i in range(n):
                h = hashlib.sha256(f"{p}:{i}".encode()).digest()
                length = 1 + h[0] % 9
                flat.append(list(p))
                resp.append([100 + b * 7 for b in h[1:1 + length]])
                logp.append([-1.0 - b / 64 for b in h[1:1 + length]])
                trunc.append(False)
        return RolloutBatch(prompt_ids=flat, response_ids=resp, behaviour_logp=logp, truncated=trunc)

    def sync_weights(self, model) -> float:
        return 0.0


def main(out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out.mkdir(parents=True, exist_ok=True)
    for name, objectives in CASES.items():
        cfg = load_config(ROOT / "configs" / "tiny.toml", OVERRIDES + [f"run.output_dir={out / name}"])
        tr = Trainer(cfg)
        tr.rollout = FixedRollout()
        phase = tr.schedule.phase_at(0)[1]
        objs = tuple(type(phase.objectives[0])(n, w) for n, w in objectives)
        phase = type(phase)(name=name, steps=1, objectives=objs)
        row = tr.train_step(phase)
        weights = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if tr.dist.is_main:
            torch.save({"row": row, "weights": {k: v.clone() for k, v in weights.items()}}, out / f"{name}.pt")
        tr.metrics.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
