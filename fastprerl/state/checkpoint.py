"""Atomic checkpoints and exact resume.

A checkpoint is the folder `<output_dir>/checkpoints/step_<N>/`, N = completed steps (= the step a resumed
run starts at). It holds:

  config.json, model.safetensors, generation_config.json   the policy in Hugging Face format (from_pretrained)
  (LoRA: adapter_config.json, adapter_model.safetensors      the adapter as PEFT saves it, instead)
  tokenizer files                                          so the folder is a complete model
  optimizer.pt, scheduler.pt                                optimizer and LR-scheduler state_dicts
  rng.pt                                                    python `random`, torch CPU (+ CUDA), numpy RNG states
  ref_model.safetensors                                     the KL reference model, when there is one
  trainer_state.json                                        step, phase, data-stream position, versions
  run_config.toml, run_config.json                          the resolved run config
  manifest.json                                             size + sha256 of every file above, written last

A run under torchrun writes the same folder with the weights and the AdamW state sharded by
torch.distributed.checkpoint (dcp/ instead of model.safetensors and optimizer.pt; fastprerl/state/dcp.py
holds that kind). `state.resume.load_checkpoint` reads both kinds into either kind of model; which checkpoint a
run resumes from, and the check that its config may resume it, are in fastprerl/state/resume.py too.

Writing is atomic: everything goes to a hidden temporary folder, each file is fsynced, the manifest is written
last, then the folder is renamed to `step_<N>` (os.replace). A folder named `step_<N>` is therefore either a
complete checkpoint or was damaged afterwards; `verify` tells which by re-hashing every file. The last
`keep` checkpoints are kept; older ones are renamed away before they are deleted, so a crash during the
clean-up never leaves a half-deleted `step_<N>`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from ..lora import is_lora, load_adapter

log = logging.getLogger("fastprerl")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
CONFIG_JSON = "run_config.json"
CONFIG_TOML = "run_config.toml"
REF_MODEL = "ref_model.safetensors"
REQUIRED = ("optimizer.pt", "scheduler.pt", "rng.pt", STATE, CONFIG_JSON)
DCP_DIR = "dcp"
DCP_METADATA = f"{DCP_DIR}/.metadata"
REQUIRED_SHARDED = (DCP_METADATA, "scheduler.pt", "rng.pt", STATE, CONFIG_JSON)
_STEP_DIR = re.compile(r"^step_(\d+)$")

class ResumeError(ValueError):
    """A run cannot start or resume in this output directory with this config."""


# ---------------------------------------------------------------------------------------------- listing
def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named step_<N> under root, newest first. Says nothing of validity."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> str | None:
    """None when the checkpoint folder is complete and every file matches its manifest entry, else why not."""
    path = Path(path)
    man = path / MANIFEST
    if not man.is_file():
        return f"no {MANIFEST} (the write did not finish)"
    try:
        entries = json.loads(man.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    missing = [r for r in (REQUIRED_SHARDED if DCP_METADATA in entries else REQUIRED) if r not in entries]
    if "config.json" not in entries and "adapter_config.json" not in entries:   # a full model or an adapter
        missing.append("config.json")
    if missing:
        return f"{MANIFEST} lists no {missing}"
    for rel, meta in sorted(entries.items()):
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{rel} has {size} bytes, the manifest says {meta['size']} (truncated?)"
        if _sha256(f) != meta["sha256"]:
            return f"{rel} does not match its sha256 in the manifest (corrupted)"
    return None


def find_latest_valid(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under root (or None) and the newer ones skipped, with the reason.

    Each skipped checkpoint is reported with a warning naming it."""
    skipped = []
    for _, path in list_checkpoints(root):
        why = verify(path)
        if why is None:
            return path, skipped
        log.warning("checkpoint %s is incomplete or corrupted: %s; skipping it", path, why)
        skipped.append((path, why))
    return None, skipped


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    """Every RNG state the loop draws from: python `random`, torch CPU and CUDA, numpy (when imported)."""
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        st["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return st


def restore_rng(st: dict) -> None:
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np
        name, keys, pos, has_gauss, cached = st["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------- saving
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def quiet_hf_progress():
    """No "Writing model shards" bar from transformers on every checkpoint."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def remove_stale(root: Path) -> None:
    """Temporary and to-be-deleted folders left by a process that died while writing or pruning."""
    for p in root.iterdir():
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def _discard(path: Path) -> None:
    """Rename first (atomic), then delete: a crash mid-delete leaves no half-deleted step_<N>."""
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, state: dict, config: dict,
                    config_toml: str, tokenizer=None, ref_model=None, keep: int = 2) -> Path:
    """Writes checkpoint `step` atomically under root, then keeps only the newest `keep`. Returns its folder.

    state: JSON-able trainer state (step, phase, data position, ...); config: the resolved config as a dict."""
    from safetensors.torch import save_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    with quiet_hf_progress():
        model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if ref_model is not None:
        save_model(ref_model, str(tmp / REF_MODEL))
    write_run_state(tmp, tokenizer=tokenizer, scheduler=scheduler, state=state, config=config,
                     config_toml=config_toml)
    return seal(tmp, final, root, step, keep)


def write_run_state(tmp: Path, *, tokenizer, scheduler, state: dict, config: dict, config_toml: str) -> None:
    """What both kinds of checkpoint hold besides weights and optimizer state."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(capture_rng(), tmp / "rng.pt")
    (tmp / STATE).write_text(json.dumps({"format": FORMAT_VERSION, **state}, indent=1))
    (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=1))
    (tmp / CONFIG_TOML).write_text(config_toml)


def seal(tmp: Path, final: Path, root: Path, step: int, keep: int) -> Path:
    """fsync every file, write the manifest last, rename tmp to final, keep the newest `keep` checkpoints."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(f)
        files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump({"format": FORMAT_VERSION, "step": step, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync(tmp)
    if final.exists():  # e.g. a corrupted step_<N> being rewritten after a resume from an older one
        _discard(final)
    os.replace(tmp, final)
    _fsync(root)
    for _, old in list_checkpoints(root)[keep:]:
        _discard(old)
    return final


# ---------------------------------------------------------------------------------------------- loading
def _load_hf_weights(model, path: Path) -> None:
    """Loads the Hugging Face weights saved in `path` into `model` in place (tied weights included); a
    LoRA model gets its adapter weights (the frozen base is rebuilt from model.path)."""
    from safetensors.torch import load_file

    if is_lora(model):
        if not (path / "adapter_config.json").is_file():
            raise ResumeError(f"{path} holds no LoRA adapter but this run trains one (model.lora.r > 0)")
        load_adapter(model, path)
        return

    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != REF_MODEL:
            sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    own = model.state_dict()
    ptrs = {own[k].data_ptr() for k in sd if k in own}
    if unexpected or any(own[k].data_ptr() not in ptrs for k in missing):
        # a model whose saved names differ from its module names: let transformers map them
        log.info("loading %s through from_pretrained (its saved weight names differ from the model's)", path)
        dtype = next(model.parameters()).dtype
        loaded = type(model).from_pretrained(path, dtype=dtype)
        model.load_state_dict(loaded.state_dict())


def load_full(path: Path, *, model, optimizer, ref_model=None) -> None:
    """The weights and the optimizer state of a plain checkpoint (model.safetensors, optimizer.pt) into a plain
    model, in place."""
    from safetensors.torch import load_model

    path = Path(path)
    dev = next(model.parameters()).device
    _load_hf_weights(model, path)
    # read to host memory: load_state_dict moves each state to its parameter's device (CPU when offloaded)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if ref_model is not None:
        if not (path / REF_MODEL).is_file():
            raise ResumeError(f"{path} has no {REF_MODEL} but this run uses a KL reference model")
        load_model(ref_model, str(path / REF_MODEL), device=str(dev))


def load_run_state(path: Path, *, scheduler) -> dict:
    """What both kinds of checkpoint hold besides weights and optimizer state: loads the scheduler state in place
    and returns the trainer state with the saved RNG states under "rng" (restore them with `restore_rng` once
    everything else is built)."""
    path = Path(path)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = json.loads((path / STATE).read_text())
    state["rng"] = torch.load(path / "rng.pt", weights_only=True)
    return state


def saved_config(path: Path) -> dict:
    return json.loads((Path(path) / CONFIG_JSON).read_text())


def save_model(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """Model and tokenizer in Hugging Face format at `path`, written to <path>.tmp and renamed into place;
    an earlier folder at `path` is renamed to <path>.old first and deleted last, so an interruption leaves
    a complete model in `path` or, between the two renames, in <path>.old. state_dict: the weights to write
    instead of the model's own (the full weights of a sharded model)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write
    with quiet_hf_progress():
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_final(model, tokenizer, out: Path, merge_lora: bool = False) -> None:
    """<out>/final: the trained model (a LoRA run: its adapter); with merge_lora and a LoRA model also
    <out>/final_merged, the base with the adapter folded in, as a plain Hugging Face model."""
    save_model(model, tokenizer, Path(out) / "final")
    if merge_lora and is_lora(model):
        save_merged(model, tokenizer, Path(out) / "final_merged")


def save_merged(model, tokenizer, folder: Path) -> None:
    """The base with the LoRA adapters folded in (W + B A * alpha / r), as a plain Hugging Face model; `model`
    itself is left unchanged (the merge runs on a copy)."""
    merged = copy.deepcopy(model).merge_and_unload()
    save_model(merged, tokenizer, folder)
