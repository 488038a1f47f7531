"""Real model shapes for the benchmarks: LM-head (hidden H, vocabulary V) of models people train.

Sets (N = rows of hidden states = tokens whose log-prob is computed):
  default CPU   the headline SmolLM2-135M shape at N=4096 fp32 (every provider, fwd and fwd+bwd),
                plus the larger vocabularies at small N (fwd+bwd, fewer providers); a few minutes on
                2 cores.
  FASTPRERL_BENCH_FULL=1   bigger N for every model, and the Llama-3-8B head.
  FASTPRERL_BENCH_QUICK=1  (or `pytest bench/ --quick`) tiny N, one repeat: a smoke run, targets not
                asserted.
One-pass benchmark sizes (prompts x samples, prompt and response length ranges): default 4 x 4,
20-60, 16-128; full 16 x 4, 20-60, 16-512; quick 2 x 2, 20-60, 16-32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

#               name              hidden   vocab
MODEL_SHAPES = {
    "smollm2-135m": (576, 49152),      # HuggingFaceTB/SmolLM2-135M (tied embeddings)
    "qwen2.5-0.5b": (896, 151936),     # Qwen/Qwen2.5-0.5B (tied embeddings)
    "qwen3-4b": (2560, 151936),        # Qwen/Qwen3-4B
    "llama3-8b": (4096, 128256),       # meta-llama/Meta-Llama-3-8B
}

# SmolLM2-135M body, for the one-pass benchmark (LlamaConfig fields)
SMOLLM2_135M_CONFIG = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                           tie_word_embeddings=True, max_position_embeddings=2048,
                           rms_norm_eps=1e-5, rope_theta=100000.0)


@dataclass(frozen=True)
class LogprobShape:
    model: str
    n: int
    dtype: str = "float32"
    headline: bool = False      # every provider and both modes; targets are asserted here

    @property
    def h(self) -> int:
        return MODEL_SHAPES[self.model][0]

    @property
    def v(self) -> int:
        return MODEL_SHAPES[self.model][1]

    @property
    def label(self) -> str:
        return f"{self.model} N={self.n}"

    def flops(self, mode: str) -> float:
        """Useful matmul FLOPs: 2NHV for the logits, 3x that with the two gradient matmuls."""
        f = 2.0 * self.n * self.h * self.v
        return f * 3 if mode == "fwd+bwd" else f


def full() -> bool:
    return os.environ.get("FASTPRERL_BENCH_FULL", "") not in ("", "0")


def quick() -> bool:
    return os.environ.get("FASTPRERL_BENCH_QUICK", "") not in ("", "0")


HEADLINE = LogprobShape("smollm2-135m", 4096, "float32", headline=True)


def cpu_logprob_shapes() -> list[LogprobShape]:
    if quick():
        return [LogprobShape("smollm2-135m", 256, "float32", headline=True),
                LogprobShape("qwen2.5-0.5b", 64)]
    shapes = [HEADLINE, LogprobShape("qwen2.5-0.5b", 512), LogprobShape("qwen3-4b", 128)]
    if full():
        shapes += [LogprobShape("smollm2-135m", 16384), LogprobShape("qwen2.5-0.5b", 4096),
                   LogprobShape("qwen3-4b", 1024), LogprobShape("llama3-8b", 128),
                   LogprobShape("llama3-8b", 1024)]
    return shapes


def cuda_logprob_shapes() -> list[LogprobShape]:
    shapes = [LogprobShape("qwen3-4b", 16384, "bfloat16", headline=True),
              LogprobShape("smollm2-135m", 16384, "bfloat16"),
              LogprobShape("qwen2.5-0.5b", 16384, "bfloat16")]
    if full():
        shapes += [LogprobShape("llama3-8b", 16384, "bfloat16"), LogprobShape("qwen3-4b", 16384, "float32")]
    return shapes


@dataclass(frozen=True)
class OnepassSize:
    prompts: int
    samples: int
    prompt_len: tuple
    response_len: tuple
    max_tokens: int = 4096
    seed: int = 0

    @property
    def label(self) -> str:
        return (f"{self.prompts}x{self.samples} p{self.prompt_len[0]}-{self.prompt_len[1]} "
                f"r{self.response_len[0]}-{self.response_len[1]}")


def onepass_size() -> OnepassSize:
    if quick():
        return OnepassSize(2, 2, (20, 60), (16, 32))
    if full():
        return OnepassSize(16, 4, (20, 60), (16, 512))
    return OnepassSize(4, 4, (20, 60), (16, 128))
