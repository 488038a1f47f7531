"""One checkpointer for a run, in a plain process and under torchrun.

What a run carries from one step to the next lives in objects that save and load themselves (`state_dict` /
`load_state_dict`): the Trainer's loop state (its step, the phase schedule, the prompt stream), the optimizer,
its LR scheduler, the RNG states (`RNGState`), and the weights of the policy and of the KL reference model.
The `Checkpointer` is given those objects once and writes them all at a step, atomically, in the plain format
of checkpoint.py (a process of its own) or DCP's (dcp.py; `fsdp_root` set under torchrun), and reads a
checkpoint of either kind back into either kind of model. Loading restores everything but the RNG states,
which `RNGState.load_state_dict` restores last, once everything that draws random numbers while it is built
exists.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from . import checkpoint as ckpt
from . import dcp

log = logging.getLogger("fastprerl")


class RNGState:
    """Every RNG state the loop draws from (checkpoint.capture_rng: python `random`, torch CPU and CUDA, numpy)."""

    @staticmethod
    def state_dict() -> dict:
        return ckpt.capture_rng()

    @staticmethod
    def load_state_dict(state: dict) -> None:
        ckpt.restore_rng(state)


class Checkpointer:
    def __init__(self, root: Path, *, model, tokenizer, optimizer, scheduler, config, ref_model=None,
                 fsdp_root=None, dist=None, keep: int = 2):
        """root: the run's checkpoints/ folder; config: the resolved Config (written into every checkpoint);
        fsdp_root and dist: the policy's FSDP2 root and the process group under torchrun, else None."""
        self.root, self.model, self.tokenizer = Path(root), model, tokenizer
        self.optimizer, self.scheduler, self.ref_model = optimizer, scheduler, ref_model
        self.config, self.fsdp_root, self.dist, self.keep = config, fsdp_root, dist, keep

    def save(self, step: int, state: dict) -> Path:
        """Checkpoint `step` with the loop state `state` (JSON-able: the Trainer's state_dict); the RNG states,
        versions, weights, optimizer and scheduler are added here. Returns its folder."""
        from ..config import to_toml

        state = {**state, "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
        common = dict(model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
                      state=state, config=self.config.to_dict(), config_toml=to_toml(self.config), keep=self.keep,
                      ref_model=self.ref_model)
        if self.fsdp_root is not None:
            return dcp.save_sharded_checkpoint(self.root, step, dist=self.dist, **common)
        return ckpt.save_checkpoint(self.root, step, **common)

    def load(self, path: Path) -> dict:
        """Loads weights, optimizer and scheduler state in place, from a checkpoint of either kind into either kind
        of model; returns the saved loop state with the RNG states under "rng" (restore them last)."""
        return load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               ref_model=self.ref_model)

    def save_final(self, out: Path, merge_lora: bool = False, plain_model: Callable | None = None) -> None:
        """<out>/final (and final_merged/ for LoRA with merge_lora). plain_model: builds a fresh unsharded policy
        (under torchrun, for a LoRA model's final folder)."""
        if self.fsdp_root is not None:
            dcp.save_final_sharded(self.model, self.tokenizer, out, self.dist, merge_lora=merge_lora,
                                   plain_model=plain_model)
        else:
            ckpt.save_final(self.model, self.tokenizer, out, merge_lora=merge_lora)


def load_checkpoint(path: Path, *, model, optimizer, scheduler, ref_model=None) -> dict:
    """Loads weights, optimizer and scheduler state in place, from a checkpoint of either kind into either kind
    of model; returns the trainer state with the saved RNG states under "rng" (restore them with
    `RNGState.load_state_dict` once everything else is built)."""
    path = Path(path)
    if (path / ckpt.DCP_METADATA).is_file():
        dcp.load_sharded(path, model, optimizer, ref_model)
    elif dcp.is_fsdp(model):
        dcp.load_full_into_sharded(path, model, optimizer, ref_model)
    else:
        ckpt.load_full(path, model=model, optimizer=optimizer, ref_model=ref_model)
    return ckpt.load_run_state(path, scheduler=scheduler)
