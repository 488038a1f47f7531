"""The rollout phase's memory by its own accounting (arithmetic from the architecture, stated as such; nothing
is generated on fake tensors).

HF backend (rollout.backend = "hf"): the trainer's generate() holds, besides the trainer's resident state, a KV
cache of 2 x layers x key-value heads x head_dim x dtype bytes per token for min(generation_batch_size, the
step's samples on this rank) sequences of prompt + max_new_tokens tokens, and the logits of one decoding step
(sequences x vocabulary, float32, twice: logits and the sampling distribution). Under FSDP2 the weights are
gathered for the whole generate call (distributed.full_weights): every rank holds the full model then.

vLLM backend: the engine takes rollout.vllm_gpu_memory_utilization x the GPU's memory (vLLM sizes its KV cache
to fill that share after its weights and its profiled activations); its weights are the model's in
model.dtype (the merged model with LoRA). With rollout.vllm_sleep the engine frees weights and KV cache (sleep
level 2) while the trainer steps, so the training phase does not hold it; without sleep it does. The KV cache
must hold at least one sequence of vllm_max_model_len tokens or vLLM refuses to start. CUDA graphs
(vllm_enforce_eager = false) are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models import DTYPES


@dataclass
class RolloutPlan:
    engine: int                      # bytes of the rollout engine during the rollout phase (KV cache, logits, vLLM share)
    engine_in_training: int          # bytes it still holds while the trainer steps
    detail: dict[str, int] = field(default_factory=dict)
    notes: list = field(default_factory=list)
    error: str | None = None      # the engine cannot start (vLLM share too small)


def kv_bytes_per_token(arch, dtype: str) -> int:
    head_dim = getattr(arch, "head_dim", None) or arch.hidden_size // arch.num_attention_heads
    kv_heads = getattr(arch, "num_key_value_heads", None) or arch.num_attention_heads
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return 2 * arch.num_hidden_layers * kv_heads * head_dim * elem


def plan_rollout(cfg, arch, *, prompt_tokens: int, weight_bytes: int, world_size: int = 1,
                 gpu_memory: int | None = None) -> RolloutPlan:
    r = cfg.rollout
    per_tok = kv_bytes_per_token(arch, cfg.model.dtype)
    seq = prompt_tokens + r.max_new_tokens
    if r.backend == "hf":
        samples = max(1, r.prompts_per_step // world_size) * r.samples_per_prompt
        n = min(r.generation_batch_size, samples)
        kv = per_tok * seq * n
        logits = 2 * n * arch.vocab_size * 4
        return RolloutPlan(engine=kv + logits, engine_in_training=0,
                           detail={"kv_cache": kv, "decode_logits": logits, "sequences": n, "tokens_each": seq},
                           notes=[f"HF generate: KV cache of {n} sequences x {seq} tokens "
                                  f"({per_tok} bytes per token) + one step's logits"])
    util = r.vllm_gpu_memory_utilization
    if gpu_memory is None:
        return RolloutPlan(engine=0, engine_in_training=0, error="rollout.backend = 'vllm': the engine's share is "
                           "rollout.vllm_gpu_memory_utilization x the GPU's memory; give --gpu-memory")
    share = int(util * gpu_memory)
    kv = share - weight_bytes
    max_len = r.vllm_max_model_len or getattr(arch, "max_position_embeddings", seq)
    need = per_tok * max_len
    plan = RolloutPlan(engine=share, engine_in_training=0 if r.vllm_sleep else share,
                       detail={"share": share, "weights": weight_bytes, "kv_cache": max(0, kv),
                               "kv_tokens": max(0, kv) // per_tok, "max_model_len": max_len},
                       notes=[f"vLLM: {util} x {gpu_memory / 2**30:.1f} GiB = {share / 2**30:.2f} GiB for weights "
                              f"({weight_bytes / 2**30:.2f} GiB) and KV cache ({max(0, kv) / 2**30:.2f} GiB, "
                              f"{max(0, kv) // per_tok} tokens); sleep "
                              + ("on: freed while the trainer steps" if r.vllm_sleep else
                                 "off: held while the trainer steps")])
    if kv < need:
        plan.error = (f"rollout.vllm_gpu_memory_utilization = {util}: the engine's share {share / 2**30:.2f} GiB "
                      f"leaves {kv / 2**30:.2f} GiB after its weights ({weight_bytes / 2**30:.2f} GiB), less than "
                      f"one sequence of {max_len} tokens needs ({need / 2**30:.2f} GiB)")
    return plan
