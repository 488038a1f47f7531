"""Two vLLM engines under torchrun, one per rank, fed from FSDP2 shards: the worker of the torchrun tests in
tests/integration/test_vllm_backend.py (run in the vLLM environment of tools/vllm_env.sh).

`torchrun --standalone --nproc_per_node=2 tests/integration/vllm_dist_worker.py MODEL_DIR OUT`: every rank loads the
model, shards it with FSDP2 (distributed.shard_model, as the trainer does) and builds its own engine
(VLLMRollout); then, with the same prompts on both ranks,
- samples twice after re-seeding from the same step seed (distributed.Dist.seed_step),
- takes greedy continuations (the engine's first push: the initial weights),
- perturbs its local shards in place, pushes (sync_weights: one gathered tensor at a time) and takes greedy
  continuations again,
- closes its engine and runs a collective on the trainer's process group, which must outlive the engine.
Each rank writes OUT/rank<r>.json with what its engine returned; rank 0 also writes OUT/weights.pt with the
full weights before and after the perturbation (gathered from the shards), from which the test builds its
own Hugging Face references. No comparison happens here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from fastprerl import distributed
from fastprerl.config import RolloutConfig
from fastprerl.models import load_tokenizer
from fastprerl.rollout import make_backend

PROMPTS = [[1, 504, 2170, 30, 216], [1, 33, 4567], [1, 9000, 12, 13, 14, 15, 16, 17]]
SAMPLES, NEW_TOKENS, GREEDY_TOKENS = 4, 10, 8


def full_state(model) -> dict:
    """Every rank: the full weights, gathered from the FSDP2 shards (a collective)."""
    return {name: distributed.full_tensor(t).detach().clone() for name, t in model.state_dict().items()}


def main(model_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    d = distributed.init("cpu", 600)
    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    distributed.shard_model(model, d, torch.float32)
    cfg = RolloutConfig(backend="vllm", samples_per_prompt=SAMPLES, max_new_tokens=NEW_TOKENS, temperature=1.0,
                        stop_at_newline=False, vllm_gpu_memory_utilization=0.1, vllm_enforce_eager=True)
    eng = make_backend(cfg, model, tok, seed=0)
    res = {"rank": d.rank,
           "executor": eng.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend}
    before = full_state(model)

    d.seed_step(0, 3)
    first = eng.generate(PROMPTS, SAMPLES)
    d.seed_step(0, 3)
    again = eng.generate(PROMPTS, SAMPLES)
    res.update(samples=first.response_ids, logp=first.behaviour_logp, samples_again=again.response_ids,
               greedy=eng.greedy(PROMPTS, GREEDY_TOKENS))

    with torch.no_grad():   # an "update": every rank moves its own shards of the 2-D weights
        g = torch.Generator().manual_seed(100 + d.rank)
        for p in model.parameters():
            if p.ndim == 2:
                local = p.to_local()
                local.add_(0.5 * local.std() * torch.randn(local.shape, generator=g))
    res["sync_s"] = eng.sync_weights(model)
    res["push_names"] = eng.last_push_names
    res["greedy_after"] = eng.greedy(PROMPTS, GREEDY_TOKENS)
    after = full_state(model)

    eng.close()
    res["ranks_after_close"] = d.all_reduce_counts({"ranks": 1})["ranks"]
    if d.is_main:
        torch.save({"before": before, "after": after}, out / "weights.pt")
    (out / f"rank{d.rank}.json").write_text(json.dumps(res))
    d.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
