"""A config's memory plan: the training step (step.py, on fake tensors under torch's trackers) and the rollout
phase (rollout.py, by its own accounting), a table by category and phase, the overall peak and the verdict
against a GPU's memory. `make_plan` builds it; `Plan.table()` prints it; `Plan.to_json()` for scripts."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .arch import load_architecture
from .rollout import RolloutPlan, plan_rollout
from .step import StepPlan, default_prompt_tokens, plan_step

GiB = 2 ** 30
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "fused op workspace", "rollout engine")


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G', '24000MiB', '1.5TiB' -> bytes (GB/G/GiB are all read as 2**30: GPU memory
    is sold in binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-memory: expected a size such as 24GiB or 80GB, got {text!r}")
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2).upper()]
    if not m.group(2) and not m.group(3):
        scale = GiB   # a bare number is GiB
    return int(float(m.group(1)) * scale)


@dataclass
class Plan:
    config: str
    model: str
    architecture: str
    world_size: int
    prompt_tokens: int
    step: StepPlan
    rollout: RolloutPlan
    phases: dict[str, dict[str, int]]
    gpu_memory: int | None = None
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(sum(p.values()) for p in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))

    @property
    def largest(self) -> str:
        ph = self.phases[self.peak_phase]
        return max(ph, key=ph.get)

    @property
    def fits(self) -> bool | None:
        if self.rollout.error:
            return False
        return None if self.gpu_memory is None else self.peak <= self.gpu_memory

    def verdict(self) -> str:
        if self.rollout.error:
            return f"does not fit: {self.rollout.error}"
        if self.gpu_memory is None:
            return "no --gpu-memory given: no verdict"
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        if self.fits:
            return f"fits: peak {g(self.peak)} <= {g(self.gpu_memory)} ({g(self.gpu_memory - self.peak)} spare)"
        ph = self.phases[self.peak_phase]
        return (f"does not fit: peak {g(self.peak)} > {g(self.gpu_memory)} in the {self.peak_phase} phase; "
                f"largest category: {self.largest} ({g(ph[self.largest])})")

    def table(self) -> str:
        g = lambda b: f"{b / GiB:10.3f}"  # noqa: E731
        lines = [f"memory plan of {self.config}: {self.model} ({self.architecture})",
                 f"  {self.step.params / 1e9:.3f}B parameters, {self.step.trainable / 1e6:.1f}M trainable; "
                 f"world size {self.world_size} (numbers are one rank's); prompt {self.prompt_tokens} + response "
                 f"tokens; micro-batches (tokens, rows, view): {self.step.bins}",
                 "",
                 f"  {'GiB':<22}{'rollout':>10}{'training':>10}",
                 f"  {'-' * 42}"]
        for c in CATEGORIES:
            lines.append(f"  {c:<22}{g(self.phases['rollout'][c])}{g(self.phases['training'][c])}")
        lines.append(f"  {'-' * 42}")
        lines.append(f"  {'total':<22}{g(sum(self.phases['rollout'].values()))}"
                     f"{g(sum(self.phases['training'].values()))}")
        lines.append(f"  overall peak {self.peak / GiB:.3f} GiB ({self.peak_phase} phase)")
        if self.step.host_bytes:
            lines.append(f"  host memory (offloaded state): {self.step.host_bytes / GiB:.3f} GiB")
        lines.append(f"  {self.verdict()}")
        lines.append("")
        lines += [f"  note: {n}" for n in self.notes + self.step.notes + self.rollout.notes]
        lines.append(f"  training step: simulated on fake tensors in {self.step.seconds:.1f} s (torch "
                     f"{'FSDPMemTracker' if self.world_size > 1 else 'MemTracker'}); rollout: by its own accounting")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({
            "config": self.config, "model": self.model, "architecture": self.architecture,
            "world_size": self.world_size, "prompt_tokens": self.prompt_tokens,
            "parameters": self.step.params, "trainable_parameters": self.step.trainable,
            "micro_batches": [{"tokens": t, "rows": r, "view": v} for t, r, v in self.step.bins],
            "phases_bytes": self.phases, "peak_bytes": self.peak, "peak_phase": self.peak_phase,
            "largest_category": self.largest, "host_bytes": self.step.host_bytes,
            "gpu_memory_bytes": self.gpu_memory, "fits": self.fits, "verdict": self.verdict(),
            "tracker_peak_bytes": self.step.raw, "rollout_detail": self.rollout.detail,
            "rollout_error": self.rollout.error, "notes": self.notes + self.step.notes + self.rollout.notes,
            "step_seconds": self.step.seconds}, indent=2)


def make_plan(cfg, *, config_name: str = "", world_size: int = 1, gpu_memory: int | None = None,
              prompt_tokens: int | None = None, progress: Callable[[str], None] = None) -> Plan:
    arch, where = load_architecture(cfg.model.path)
    prompt = prompt_tokens or default_prompt_tokens(cfg)
    device = "cpu" if cfg.run.device == "cpu" else "cuda"
    step = plan_step(cfg, arch, prompt_tokens=prompt, world_size=world_size, device=device, progress=progress)
    c = step.categories
    base_weights = c["weights"]
    weight_bytes = _full_weight_bytes(step, cfg, world_size)
    roll = plan_rollout(cfg, arch, prompt_tokens=prompt, weight_bytes=weight_bytes, world_size=world_size,
                        gpu_memory=gpu_memory)
    # rollout phase: the trainer's resident state (weights, the optimizer's state between steps; no gradients,
    # no activations, no AdamW temporaries) + the engine
    resident_w = base_weights
    if world_size > 1 and cfg.rollout.backend == "hf":
        resident_w = weight_bytes      # generate runs on the gathered full weights
    phases = {
        "rollout": {"weights": resident_w, "gradients": 0, "optimizer": step.opt_state, "activations": 0,
                    "fused op workspace": 0, "rollout engine": roll.engine},
        "training": {**c, "rollout engine": roll.engine_in_training},
    }
    notes = [f"prompt length {prompt} tokens: "
             + ("vllm_max_model_len - max_new_tokens" if prompt_tokens is None and cfg.rollout.vllm_max_model_len
                else ("--prompt-tokens" if prompt_tokens else "the plan's default (no vllm_max_model_len)"))]
    return Plan(config=config_name, model=cfg.model.path, architecture=where, world_size=world_size,
                prompt_tokens=prompt, step=step, rollout=roll, phases=phases, gpu_memory=gpu_memory, notes=notes)


def _full_weight_bytes(step: StepPlan, cfg, world_size: int) -> int:
    """The unsharded model's weights in model.dtype (what a rollout engine or a gathered generate holds)."""
    import torch

    from ..models import DTYPES
    elem = torch.empty((), dtype=DTYPES[cfg.model.dtype]).element_size()
    base = step.params - (step.trainable if cfg.model.lora.r > 0 else 0)
    return base * elem
