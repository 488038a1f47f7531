"""The torchrun kind of checkpoint: weights and AdamW state sharded by torch.distributed.checkpoint (DCP).

A run under torchrun (fastprerl/distributed.py) writes the checkpoint folder of checkpoint.py with the weights
and the AdamW state sharded by DCP instead of model.safetensors and optimizer.pt:

  dcp/                                                      {"model", "optim"(, "ref")} as DCP writes them,
                                                            one file per rank (+ .metadata), keyed by
                                                            parameter name; "ref": the KL reference model
  config.json, tokenizer files, scheduler.pt, rng.pt (rank 0's), trainer_state.json, run configs, manifest

Every rank writes its shard into the same folder (several nodes need a shared file system); rank 0 writes the
rest, the manifest, and renames the folder (checkpoint.seal: the same atomic write as a plain checkpoint).
`resume.load_checkpoint` reads both kinds into either kind of model: DCP reshards a sharded checkpoint to
any world size (also to a plain process: 2 -> 1, no process group needed), and a plain checkpoint's full
weights and optimizer state are scattered to the shards of an FSDP2 model (1 -> N).

LoRA (model.lora.r > 0): "model" holds only the trainable adapter; the frozen base is rebuilt from
model.path, as a plain LoRA checkpoint holds only the adapter. A plain LoRA checkpoint (the adapter in PEFT's
own naming) is not read into an FSDP2 model (ResumeError); a LoRA DCP checkpoint is read by a plain process.
`load_weights` reads the policy of a DCP checkpoint into a plain model without a process group
(`fastprerl eval` / `align` of a run that has no final/).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..lora import is_lora
from .checkpoint import (
    DCP_DIR,
    REF_MODEL,
    ResumeError,
    remove_stale,
    save_final,
    save_model,
    seal,
    step_dir,
    write_run_state,
)


def _policy_options(model):
    """LoRA: only the trainable parameters (the adapter); the frozen base comes from model.path."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    lora = is_lora(model)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def sharded_state(model, optimizer, with_optim: bool, ref_model=None) -> dict:
    """{"model", "optim", "ref"} state dicts keyed by parameter name (DTensor shards under FSDP2). An optimizer
    that has not stepped yet has no state and is left out: get_optimizer_state_dict would create it by a step
    with lr 0, which counts as a step in AdamW's bias correction. "ref": the whole KL reference model (its
    every weight is frozen, a LoRA reference's adapter too), only when ref_model is given."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(model, options=_policy_options(model))}
    if with_optim:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    if ref_model is not None:
        sd["ref"] = get_model_state_dict(ref_model)
    return sd


def _set_policy(model, state: dict, path: Path) -> None:
    """The "model" entry into `model`; a LoRA model must get every trainable parameter (its base is frozen)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(model, state, options=_policy_options(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trainable]
    if missing or result.unexpected_keys:
        raise ResumeError(f"{path}: the saved weights do not fit this model (missing {missing[:3]}, unexpected "
                          f"{list(result.unexpected_keys)[:3]})")


def save_sharded_checkpoint(root: Path, step: int, *, dist, model, optimizer, scheduler, state: dict,
                            config: dict, config_toml: str, tokenizer=None, ref_model=None, keep: int = 2) -> Path:
    """The torchrun kind of checkpoint (module docstring); called on every rank (dist: distributed.Dist)."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp-dist"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp.mkdir()
    dist.barrier()
    dcp.save(sharded_state(model, optimizer, with_optim=bool(optimizer.state), ref_model=ref_model),
             checkpoint_id=str(tmp / DCP_DIR))
    if dist.is_main:   # dcp.save returns after every rank's shard is written
        model.config.save_pretrained(tmp)
        write_run_state(tmp, tokenizer=tokenizer, scheduler=scheduler, state=state, config=config,
                         config_toml=config_toml)
        seal(tmp, final, root, step, keep)
    dist.barrier()
    return final


def save_final_sharded(model, tokenizer, out: Path, dist, merge_lora: bool = False, plain_model=None) -> None:
    """<out>/final from an FSDP2 model: the full weights gathered to rank 0 (on the CPU), one Hugging Face
    folder written by rank 0. A LoRA model: rank 0 loads the gathered weights into `plain_model()` (a fresh
    unsharded PEFT model of the same config) and writes final/ (and final_merged/ with merge_lora) from it
    with checkpoint.save_final, exactly as a plain LoRA run does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_lora(model):
        if dist.is_main:
            plain = plain_model()
            plain.load_state_dict(full)
            save_final(plain, tokenizer, out, merge_lora=merge_lora)
        dist.barrier()
        return
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


def load_sharded(path: Path, model, optimizer, ref_model=None) -> None:
    """A DCP checkpoint into a model of any world size (a plain process too), resharded by DCP; with
    ref_model also the KL reference model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    saved = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    if ref_model is not None and not any(k.startswith("ref.") for k in saved):
        raise ResumeError(f"{path} holds no KL reference model but this run uses one (algo.kl_coef > 0)")
    sd = sharded_state(model, optimizer, with_optim=any(k.startswith("optim.") for k in saved), ref_model=ref_model)
    dcp.load(sd, checkpoint_id=str(path / DCP_DIR))
    _set_policy(model, sd["model"], path)
    if "optim" in sd:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    if ref_model is not None:
        set_model_state_dict(ref_model, sd["ref"])


def load_weights(model, path: Path) -> None:
    """The policy weights of the DCP checkpoint folder `path` into a plain model (no process group needed);
    a LoRA model gets its adapter (its base is the run's model.path)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    sd = {"model": sharded_state(model, None, with_optim=False)["model"]}
    dcp.load(sd, checkpoint_id=str(path / DCP_DIR))
    _set_policy(model, sd["model"], path)


def _set_full_weights(model, sd: dict, path: Path, what: str) -> None:
    """Full tensors (a plain checkpoint's safetensors, tied weights saved under one of their names) into the
    shards of an FSDP2 model; every parameter must get a value."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    names: dict[int, list] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    missing = [ns[0] for ns in names.values() if not any(n in sd for n in ns)]
    if missing:
        raise ResumeError(f"{path}: the saved {what} lack {missing[:3]} (a model of another kind?)")
    own = set(model.state_dict())
    set_model_state_dict(model, {k: v for k, v in sd.items() if k in own},
                         options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_into_sharded(path: Path, model, optimizer, ref_model=None) -> None:
    """A plain checkpoint (model.safetensors, optimizer.pt keyed by parameter index, ref_model.safetensors)
    into an FSDP2 model: every rank reads the full tensors and keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if is_lora(model):
        raise ResumeError(f"{path} was written by a plain process of a LoRA run (the adapter in PEFT's own "
                          f"format); resume it in one process (without torchrun)")
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != REF_MODEL:
            sd.update(load_file(str(f)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]   # the optimizer's parameter order
    _set_full_weights(model, sd, path, "weights")
    if ref_model is not None:
        if not (path / REF_MODEL).is_file():
            raise ResumeError(f"{path} has no {REF_MODEL} but this run uses a KL reference model")
        _set_full_weights(ref_model, load_file(str(path / REF_MODEL)), path, "reference weights")
    full = StateDictOptions(full_state_dict=True)
    raw = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if not raw["state"]:   # saved before the first optimizer step: nothing to load (see sharded_state)
        return
    osd = {"state": {names[i]: st for i, st in raw["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in raw["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=full)
