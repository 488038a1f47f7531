"""LoRA adapters through PEFT (`[model.lora]`, r > 0): the base model is frozen and only the adapters train.

`wrap(model, lora_cfg)` returns a `peft.PeftModel` whose base weights have requires_grad False and whose
LoRA matrices (A random, B zero, so the wrapped model starts equal to the base) are the only trainable
parameters, so `optim.make_optimizer` holds only them. The wrapped model is used wherever the plain one is:
`models.decoder_of` reaches the decoder inside the wrapper (the LoRA layers sit in it, in place), and
`models.lm_head_weight` the frozen LM head, so the fused log-prob op gets a head without a gradient.

Saved forms: a checkpoint and `final/` hold the adapter as PEFT writes it (adapter_config.json +
adapter_model.safetensors; `PeftModel.from_pretrained(base, folder)` loads it); `state.checkpoint.save_merged`
writes the base with the adapters folded in as a plain Hugging Face model (`run.merge_lora`). `merged_weights`
gives the same merged tensors under the base model's names without copying the model (what the vLLM backend
pushes).
"""
from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def wrap(model, lora_cfg):
    """The PEFT-wrapped model (lora_cfg: config.LoraConfig with r > 0)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [t for t in lora_cfg.target_modules if t not in present]
    if absent:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"model.lora.target_modules: {absent} name no module of this model; its linear layers "
                         f"are {linear}")
    peft_cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=list(lora_cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def load_adapter(model, folder: Path) -> None:
    """Loads the adapter weights saved in `folder` (by save_pretrained) into the wrapped `model` in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: the saved adapter does not fit this model (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}); was it saved with other "
                         f"model.lora settings?")


def lora_module_names(model) -> list:
    """Names (the base model's own, e.g. `model.layers.0.self_attn.q_proj`) of the modules holding a LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]


def merged_weights(model, modules=None):
    """Yields (name, tensor) pairs of the wrapped `model` with its adapters folded in: W + scale * B @ A for
    every LoRA layer (PEFT's `get_delta_weight`, the product `merge_and_unload` adds), every other tensor the
    base's own (a reference, no copy). Names and order are those of the base model's state_dict (its Hugging
    Face checkpoint names, `model.layers.0.self_attn.q_proj.weight`); the adapter matrices are not included.
    A generator: each merged weight is made when it is asked for, so a consumer that drops it after use holds
    one at a time, not a second copy of the model. modules: only the tensors under these module names (base
    naming). `model` is not changed."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in layers.items():
        if layer.lora_variant or any(layer.lora_bias.values()):
            raise NotImplementedError(f"{name}: merging supports plain LoRA layers only (no DoRA, no LoRA bias)")
    prefixes = None if modules is None else tuple(m + "." for m in modules)
    for key, t in base.state_dict().items():
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in layers), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if not rest.startswith("base_layer."):
                continue                      # lora_A / lora_B / ...: folded into the weight below
            key = f"{owner}.{rest[len('base_layer.'):]}"
        if prefixes is not None and not key.startswith(prefixes):
            continue
        if owner is not None and rest == "base_layer.weight":
            layer = layers[owner]
            with torch.no_grad():
                for a in layer.active_adapters:
                    if a in layer.lora_A and a not in layer.merged_adapters:
                        t = t + layer.get_delta_weight(a).to(t.dtype)
        yield key, t
