"""The torchrun kind of checkpoint: weights and AdamW state sharded by torch.distributed.checkpoint (DCP).

A run under torchrun (fastprerl/distributed.py) writes the checkpoint folder of checkpoint.py with the weights
and the AdamW state sharded by DCP instead of model.safetensors and optimizer.pt:

  dcp/                                                      {"model", "optim"} as DCP writes them, one file
                                                            per rank (+ .metadata), keyed by parameter name
  config.json, tokenizer files, scheduler.pt, rng.pt (rank 0's), trainer_state.json, run configs, manifest

Every rank writes its shard into the same folder (several nodes need a shared file system); rank 0 writes the
rest, the manifest, and renames the folder (checkpoint._seal: the same atomic write as a plain checkpoint).
`checkpoint.load_checkpoint` reads both kinds into either kind of model: DCP reshards a sharded checkpoint to
any world size (also to a plain process: 2 -> 1, no process group needed), and a plain checkpoint's full
weights and optimizer state are scattered to the shards of an FSDP2 model (1 -> N).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from .checkpoint import (DCP_DIR, REF_MODEL, ResumeError, _remove_stale, _seal, _write_run_state, save_model,
                         step_dir)


def sharded_state(model, optimizer, with_optim: bool) -> Dict:
    """{"model", "optim"} state dicts keyed by parameter name (DTensor shards under FSDP2). An optimizer that
    has not stepped yet has no state and is left out: get_optimizer_state_dict would create it by a step with
    lr 0, which counts as a step in AdamW's bias correction."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(model)}
    if with_optim:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    return sd


def save_sharded_checkpoint(root: Path, step: int, *, dist, model, optimizer, scheduler, state: Dict,
                            config: Dict, config_toml: str, tokenizer=None, keep: int = 2) -> Path:
    """The torchrun kind of checkpoint (module docstring); called on every rank (dist: distributed.Dist)."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp-dist"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp.mkdir()
    dist.barrier()
    dcp.save(sharded_state(model, optimizer, with_optim=bool(optimizer.state)), checkpoint_id=str(tmp / DCP_DIR))
    if dist.is_main:   # dcp.save returns after every rank's shard is written
        model.config.save_pretrained(tmp)
        _write_run_state(tmp, tokenizer=tokenizer, scheduler=scheduler, state=state, config=config,
                         config_toml=config_toml)
        _seal(tmp, final, root, step, keep)
    dist.barrier()
    return final


def save_final_sharded(model, tokenizer, out: Path, dist) -> None:
    """<out>/final from an FSDP2 model: the full weights gathered to rank 0 (on the CPU), one Hugging Face
    folder written by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):   # a tied weight is saved once, as HF does
        if first.setdefault(id(p), name) != name:
            full.pop(name, None)
    if dist.is_main:
        save_model(model, tokenizer, Path(out) / "final", state_dict=full)
    dist.barrier()


def is_fsdp(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def load_sharded(path: Path, model, optimizer) -> None:
    """A DCP checkpoint into a model of any world size (a plain process too), resharded by DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    saved = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    sd = sharded_state(model, optimizer, with_optim=any(k.startswith("optim.") for k in saved))
    dcp.load(sd, checkpoint_id=str(path / DCP_DIR))
    set_model_state_dict(model, sd["model"])
    if "optim" in sd:
        set_optimizer_state_dict(model, optimizer, sd["optim"])


def load_full_into_sharded(path: Path, model, optimizer) -> None:
    """A plain checkpoint (model.safetensors, optimizer.pt keyed by parameter index) into an FSDP2 model: every
    rank reads the full tensors and keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != REF_MODEL:
            sd.update(load_file(str(f)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]   # the optimizer's parameter order
    missing = [n for n, _ in model.named_parameters() if n not in sd]
    if missing:
        raise ResumeError(f"{path}: the saved weights lack {missing[:3]} (a model of another kind?)")
    own = set(model.state_dict())
    set_model_state_dict(model, {k: v for k, v in sd.items() if k in own},   # tied weights are saved once
                         options=StateDictOptions(full_state_dict=True, strict=False))
    full = StateDictOptions(full_state_dict=True)
    raw = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if not raw["state"]:   # saved before the first optimizer step: nothing to load (see sharded_state)
        return
    osd = {"state": {names[i]: st for i, st in raw["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in raw["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=full)
