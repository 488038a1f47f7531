"""One training step from fixed rollouts, as a plain process or under torchrun, for tests/integration/test_distributed.py.

`python tests/integration/dist_worker.py OUT [CASE ...]` (one plain process) or `torchrun --nproc_per_node=2
tests/integration/dist_worker.py OUT [CASE ...]`: for each case (default: GRPO, NSR-PreRL, a phase mixing both; also
"lora", "kl", "offload": the mixed phase with LoRA, GRPO with a KL reference model, the mixed phase with
dist.cpu_offload) a fresh Trainer from the same seed takes one step on the same rollouts and rank 0 writes
OUT/<case>.pt with the metrics row, the full updated weights, the names of the parameters that had a gradient
at the optimizer step, the number of optimizer states and the requires_grad of every LM-head weight the fused
op got.

The "lora" case sets optim.eps = 1e-2, above its gradients: AdamW's first step maps a gradient element g to
lr * g / (|g| + eps), about +-lr for every element when eps is tiny, so lora_B (which starts at 0) would be
nothing but that sign pattern, and the fp32 summation-order difference of its smallest gradient elements
(2 ranks sum in another order than one process) shows up at about 2e-5 of lr. With eps above the gradients the
step is linear in the gradient and the comparison measures the gradient's own difference.

The "kl" case doubles the reference model's weights before the step (exact and elementwise, so the same on
shards as on full tensors): a reference equal to the policy gives a KL term and gradient of exactly 0.

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

ROOT = Path(__file__).resolve().parents[2]
MIXED = (("grpo", 0.5), ("nsr_prerl", 1.0))
CASES = {"grpo": ((("grpo", 1.0),), []), "nsr_prerl": ((("nsr_prerl", 1.0),), []), "mixed": (MIXED, []),
         "lora": (MIXED, ["model.lora.r=4", "model.lora.alpha=8", "optim.eps=1e-2"]),
         "kl": ((("grpo", 1.0),), ["algo.kl_coef=0.5"]),
         "offload": (MIXED, ["dist.cpu_offload=true"])}
DEFAULT = ("grpo", "nsr_prerl", "mixed")
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


def spy_on_head(seen: list) -> None:
    """Records weight.requires_grad of every fused-op call of the training passes (the real token_loss runs)."""
    import fastprerl.passes as passes_module

    real = passes_module.token_loss

    def token_loss(hidden, weight, *args, **kwargs):
        seen.append(bool(weight.requires_grad))
        return real(hidden, weight, *args, **kwargs)
    passes_module.token_loss = token_loss


def spy_on_step(tr, with_grad: list) -> None:
    """Records the names of the parameters holding a gradient when the optimizer steps (the real step runs)."""
    real = tr.optimizer.step

    def step(*args, **kwargs):
        with_grad.extend(n for n, p in tr.model.named_parameters() if p.grad is not None)
        return real(*args, **kwargs)
    tr.optimizer.step = step


def main(out: Path, cases) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    out.mkdir(parents=True, exist_ok=True)
    heads: list = []
    spy_on_head(heads)
    for name in cases:
        objectives, extra = CASES[name]
        cfg = load_config(ROOT / "configs" / "tiny.toml", OVERRIDES + extra + [f"run.output_dir={out / name}"])
        tr = Trainer(cfg)
        tr.rollout = FixedRollout()
        if tr.ref_model is not None:
            with torch.no_grad():
                for p in tr.ref_model.parameters():
                    p.mul_(2.0)
        phase = tr.schedule.phase_at(0)[1]
        objs = tuple(type(phase.objectives[0])(n, w) for n, w in objectives)
        phase = type(phase)(name=name, steps=1, objectives=objs)
        with_grad: list = []
        spy_on_step(tr, with_grad)
        del heads[:]
        row = tr.train_step(phase)
        weights = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if tr.dist.is_main:
            torch.save({"row": row, "weights": {k: v.clone() for k, v in weights.items()}, "with_grad": with_grad,
                        "optim_states": len(tr.optimizer.state), "head_requires_grad": sorted(set(heads))},
                       out / f"{name}.pt")
        tr.metrics.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or DEFAULT)
