"""Which model an evaluation runs (`fastprerl eval` / `align` MODEL_OR_RUN) and how it is loaded: a model spec
(builtin or hub id), a model folder, a run directory (its final/, else its newest complete checkpoint), a LoRA
adapter on its base, or a torchrun run's DCP checkpoint loaded onto its run's model without a process group.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, load_config
from ..lora import ADAPTER_CONFIG
from ..models import choose_device, load_model, load_tokenizer
from ..state import checkpoint as ckpt
from ..state.checkpoint import CONFIG_TOML, DCP_METADATA
from ..state.dcp import load_weights
from .data import EvalError

log = logging.getLogger("fastprerl")


@dataclass
class ResolvedModel:
    spec: str                       # what fastprerl.models.load_model / load_tokenizer take (LoRA: the base)
    run_dir: Path | None = None  # the run directory MODEL_OR_RUN named, if it named one
    run_config: object = None       # that run's Config (from its config.toml), when readable
    adapter: str | None = None   # a LoRA adapter folder (PEFT's format) loaded onto `spec`
    base_seed: int | None = None  # the seed that built the base (a builtin random-init model): its run's
    sharded: str | None = None   # a torchrun run's DCP checkpoint folder whose weights load onto `spec`
    lora: object = None             # that run's config.LoraConfig when it trained LoRA (the DCP holds the adapter)

    def report(self) -> dict:
        """What a report says about the model it ran."""
        if self.sharded is not None:
            return {"resolved_model": self.sharded, "base_model": self.spec}
        if self.adapter is None:
            return {"resolved_model": self.spec}
        return {"resolved_model": self.adapter, "lora_base_model": self.spec}


def resolve_model(value: str) -> ResolvedModel:
    """A model spec as is; a run directory -> <run>/final, else its newest complete checkpoint. A folder
    holding a LoRA adapter (a LoRA run's final/ or checkpoint) resolves to its base plus that adapter."""
    path = Path(value)
    if value.startswith("builtin:") or not path.exists():
        if not value.startswith("builtin:") and (value.startswith((".", "/", "~")) or value.count("/") > 1):
            raise EvalError(f"model {value!r}: no such folder")
        return ResolvedModel(value)  # a builtin or a hub id
    if not path.is_dir():
        raise EvalError(f"model {value!r}: expected a model folder or a run directory, got a file")
    if (path / DCP_METADATA).is_file():
        return _sharded(ResolvedModel(str(path)))
    if (path / "config.json").is_file():
        return ResolvedModel(str(path))
    if (path / ADAPTER_CONFIG).is_file():
        return _with_adapter(ResolvedModel(str(path)))
    cfg = _run_config(path)
    if (path / "final" / "config.json").is_file() or (path / "final" / ADAPTER_CONFIG).is_file():
        return _with_adapter(ResolvedModel(str(path / "final"), path, cfg))
    latest, _ = ckpt.find_latest_valid(path / "checkpoints")
    if latest is None:
        found = ckpt.list_checkpoints(path / "checkpoints")
        latest = found[0][1] if found else None
        if latest is not None:
            log.warning("no complete checkpoint under %s; using %s", path / "checkpoints", latest)
    if latest is None:
        raise EvalError(f"model {value!r}: a directory without config.json, final/ or checkpoints/step_<N>/")
    if (latest / DCP_METADATA).is_file():
        return _sharded(ResolvedModel(str(latest), path, cfg))
    return _with_adapter(ResolvedModel(str(latest), path, cfg))


def _sharded(r: ResolvedModel) -> ResolvedModel:
    """A DCP checkpoint folder (a run under torchrun): its run's model.path built with its run.seed (and its
    LoRA settings), the checkpoint's weights loaded onto it; the config is the checkpoint's own."""
    folder = Path(r.spec)
    cfg = _run_config(folder, CONFIG_TOML)
    if cfg is None:
        raise EvalError(f"model {str(folder)!r}: a sharded (DCP) checkpoint without a readable {CONFIG_TOML}")
    return dataclasses.replace(r, spec=cfg.model.path, sharded=str(folder), base_seed=cfg.run.seed,
                               lora=cfg.model.lora if cfg.model.lora.r > 0 else None)


def _with_adapter(r: ResolvedModel) -> ResolvedModel:
    """`r` unchanged unless its folder holds a LoRA adapter (and no full model); then the adapter on its base:
    the run's model.path built with its run.seed (from the run's config.toml, or a checkpoint's own
    run_config.toml), else the base_model_name_or_path PEFT wrote into adapter_config.json."""
    import json

    folder = Path(r.spec)
    if (folder / "config.json").is_file() or not (folder / ADAPTER_CONFIG).is_file():
        return r
    cfg = r.run_config or next((c for c in (_run_config(folder, CONFIG_TOML), _run_config(folder.parent),
                                            _run_config(folder.parent.parent)) if c is not None), None)
    if cfg is not None:
        return dataclasses.replace(r, spec=cfg.model.path, adapter=str(folder), base_seed=cfg.run.seed)
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise EvalError(f"model {str(folder)!r}: unreadable {ADAPTER_CONFIG} ({e})") from None
    if not base:
        raise EvalError(f"model {str(folder)!r} holds a LoRA adapter whose base model is unknown: no config.toml "
                        f"of its run beside it and no base_model_name_or_path in its {ADAPTER_CONFIG}")
    return dataclasses.replace(r, spec=base, adapter=str(folder))


def _run_config(run_dir: Path, name: str = "config.toml"):
    p = run_dir / name
    if not p.is_file():
        return None
    try:
        return load_config(p)
    except ConfigError as e:
        log.warning("ignoring %s (%s)", p, e)
        return None


def load_tokenizer_for(spec: str):
    try:
        return load_tokenizer(spec)
    except (OSError, ValueError, RuntimeError) as e:
        raise EvalError(f"model {spec!r}: cannot load its tokenizer ({e})") from None


def load_model_on(resolved: ResolvedModel, *, dtype: str = "float32", seed: int = 0, device: str = "auto"):
    """The resolved model on the device, in eval mode (HFRollout switches it to eval while sampling anyway).
    A LoRA adapter: its base (built with base_seed when known, else `seed`) with the adapter loaded by PEFT,
    the adapter trainable and the base frozen, as in its run (`fastprerl align` differentiates the adapter).
    A DCP checkpoint: its run's model (LoRA: wrapped as in the run) with the checkpoint's weights, read by DCP
    without a process group."""
    try:
        dev = choose_device(device, "--device")
        model = load_model(resolved.spec, dtype=dtype, seed=seed if resolved.base_seed is None else resolved.base_seed,
                           lora=resolved.lora)
        if resolved.adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, resolved.adapter, is_trainable=True)
        if resolved.sharded is not None:
            load_weights(model, Path(resolved.sharded))
    except (OSError, ValueError, RuntimeError) as e:
        raise EvalError(f"model {resolved.sharded or resolved.adapter or resolved.spec!r}: {e}") from None
    return model.to(dev).eval()
