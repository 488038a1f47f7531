"""A config's model from its architecture alone: the Hugging Face config of `model.path`, without weights.

Where the architecture comes from, in order:
  builtin:tiny-llama / builtin:tiny-qwen2   models.tiny_config (the trainer's own tiny models)
  builtin:smollm2-135m                      the converted model's config.json under $FASTPRERL_CACHE when it is
                                            there, else the shipped copy (architectures/builtin__smollm2-135m.json)
  a local folder                            its config.json
  a hub id ("org/name")                     the shipped copy (architectures/<org>__<name>.json: the GPU configs'
                                            models, written from their published config.json), else a
                                            config.json in the local Hugging Face cache (no network)
Anything else raises ArchitectureError naming model.path and saying how to provide a config.
"""
from __future__ import annotations

import json
from pathlib import Path

SHIPPED = Path(__file__).parent / "architectures"


class ArchitectureError(ValueError):
    """No architecture for model.path (the CLI exits 2 with this message)."""


def _from_dict(d: dict, where: str):
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if not k.startswith("_")}
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ArchitectureError(f"model.path: {where} has no model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise ArchitectureError(f"model.path: {where}: transformers cannot build model_type {model_type!r}: {e}") from None


def shipped_name(spec: str) -> Path:
    return SHIPPED / (spec.replace(":", "__").replace("/", "__") + ".json")


def _hub_cache_config(spec: str):
    """config.json of a hub id from the local Hugging Face cache only (None when absent)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(spec, "config.json")
    except Exception:   # an id the hub library refuses (bad characters): no cached file either
        return None
    return Path(found) if isinstance(found, str) else None


def load_architecture(spec: str) -> tuple[object, str]:
    """(transformers PretrainedConfig, where it came from) for a model.path value."""
    from ..models import BUILTINS, cache_dir, tiny_config

    if spec.startswith("builtin:"):
        if spec not in BUILTINS:
            raise ArchitectureError(f"model.path: unknown builtin {spec!r}; choose one of {', '.join(BUILTINS)}")
        if spec in ("builtin:tiny-llama", "builtin:tiny-qwen2"):
            return tiny_config(spec.split("-")[-1], 49152), "models.tiny_config"
        cached = cache_dir() / "smollm2-135m-instruct" / "config.json"
        path = cached if cached.is_file() else shipped_name(spec)
        return _from_dict(json.loads(path.read_text()), str(path)), str(path)
    local = Path(spec).expanduser()
    if spec.startswith(("/", ".", "~")) or local.is_dir():
        cfg = local / "config.json"
        if not cfg.is_file():
            raise ArchitectureError(f"model.path = {spec!r}: no config.json in that folder; a plan needs the "
                                    f"model's Hugging Face config.json (the weights are not read)")
        return _from_dict(json.loads(cfg.read_text()), str(cfg)), str(cfg)
    shipped = shipped_name(spec)
    if shipped.is_file():
        return _from_dict(json.loads(shipped.read_text()), str(shipped)), str(shipped)
    cached = _hub_cache_config(spec)
    if cached is not None:
        return _from_dict(json.loads(cached.read_text()), str(cached)), str(cached)
    known = sorted(p.stem.replace("__", "/") for p in SHIPPED.glob("*.json") if not p.stem.startswith("builtin"))
    raise ArchitectureError(
        f"model.path = {spec!r}: no architecture for this hub id offline (not shipped, not in the local Hugging "
        f"Face cache). Provide one: set model.path to a local folder holding the model's config.json (the "
        f"weights are not needed), or download it once (huggingface-cli download {spec} config.json). Shipped "
        f"architectures: {', '.join(known)}")
