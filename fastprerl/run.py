"""The run folder and the run's life around the training loop: where outputs go, stop signals, start-up errors
that name their config key, and the report of a step that went non-finite.

Nothing a user or an earlier run wrote is lost. A run writes to run.output_dir only once everything has loaded (a
start that fails leaves the folder as it found it, but for damaged checkpoints moved aside on --resume). A run that
starts at step 0 then moves an earlier run's outputs (RUN_OUTPUTS) from run.output_dir to previous/<UTC time>/, a
config.toml among them unless it holds exactly the resolved config about to be written; a resumed run moves a
differing config.toml there too. The config file a run was started from, when it is run.output_dir/config.toml, is
never touched (`check_config_file`: left as it is, or the start is refused). SIGINT/SIGTERM finish the current step
and write a checkpoint; a second one abandons the step at once (StepAbandoned)."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

log = logging.getLogger("fastprerl")

RUN_OUTPUTS = ("config.toml", "metrics.jsonl", "samples.jsonl", "eval.jsonl", "tensorboard", "wandb_id.txt",
               "final")


class NonFiniteError(FloatingPointError):
    """A reward, the loss or the gradient norm of a step is NaN/inf; the step was not applied."""


class RewardFailure(RuntimeError):
    """Every response of a step failed in the reward function: the rewards would all be a made-up 0."""


def check_rewards(dist, step: int, scores, texts: List[str], samples: List[dict]) -> None:
    """Raises RewardFailure, with the first failure, its response and sample, when every response of the step
    (on every process; dist: distributed.Dist) failed in the reward function."""
    failed = len(texts) > 0 and scores.errors == len(texts)   # this process's responses all failed
    if not dist.any(not failed):
        raise reward_failure(step, scores, texts, samples)


def reward_failure(step: int, scores, texts: List[str], samples: List[dict]) -> RewardFailure:
    """The error of a step whose every reward failed: the first failure with its response and sample."""
    i = next(j for j, e in enumerate(scores.error) if e)
    sample = {k: v for k, v in samples[i].items() if k != "entry"}
    return RewardFailure(f"step {step}: the reward function failed on all {len(texts)} responses; the first "
                         f"failure: {scores.error[i]}\n  response: {texts[i][:500]!r}\n  sample: "
                         f"{str(sample)[:500]}\n  (reward.fn; the step was not applied)")


class StepAbandoned(BaseException):
    """Raised by the second SIGINT/SIGTERM (a BaseException, so that no `except Exception` swallows it)."""


def set_aside_earlier_outputs(out: Path, new_config: Optional[str] = None,
                              names: Tuple[str, ...] = RUN_OUTPUTS) -> Optional[Path]:
    """Moves the `names` (RUN_OUTPUTS) found in `out` to a new folder out/previous/<UTC time>/ and returns it;
    None when `out` holds none of them. A config.toml whose text is `new_config` (the one about to be written)
    stays: nothing of it would be lost."""
    found = [out / name for name in names if (out / name).exists()]
    if new_config is not None and (out / "config.toml") in found and _same_text(out / "config.toml", new_config):
        found.remove(out / "config.toml")
    if not found:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = out / "previous" / stamp, 0
    while True:
        try:
            dest.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            dest = dest.with_name(f"{stamp}-{n}")
    for p in found:
        os.replace(p, dest / p.name)
    log.warning("run.output_dir %s held the outputs of an earlier run (%s); moved them to %s", out,
                ", ".join(p.name for p in found), dest)
    return dest


def _same_text(path: Path, text: str) -> bool:
    try:
        return path.read_bytes() == text.encode()
    except OSError:
        return False


def check_config_file(config_file, out: Path, cfg) -> bool:
    """True when the config file the run was started from (`config_file`, the CLI's CONFIG) is
    run.output_dir/config.toml, the file where a run writes its resolved config. That file is never
    overwritten: it is left as it is when it gives this run's config but for run.output_dir and run.resume
    (the run then writes no config.toml); otherwise (overrides change it) the start is refused with a
    ConfigError naming the keys. False: another file, or none."""
    from .config import ConfigError, load_config

    target = out / "config.toml"
    if config_file is None or not target.is_file() or not Path(config_file).is_file():
        return False
    if not os.path.samefile(config_file, target):
        return False
    own = load_config(config_file).to_dict()
    now = cfg.to_dict()
    for d in (own, now):
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("output_dir", "resume")}
    changes = list(_diff(own, now))
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:8])
        raise ConfigError(f"run.output_dir: the config file {str(config_file)!r} is {str(target)!r}, where a run "
                          f"writes its resolved config, and this run's config differs from it ({listed}); it is "
                          f"never overwritten. Write the overrides into the file, start from a copy outside "
                          f"run.output_dir, or choose another run.output_dir")
    return True


def _diff(a, b, prefix=""):
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "<unset>"), b.get(k, "<unset>")
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            yield prefix + k, x, y


def check_startup(cfg, device: torch.device, dist=None) -> None:
    """What must hold before anything loads: the wandb package when logging.wandb, a usable logprob_impl;
    under torchrun (dist: distributed.Dist) `check_distributed`."""
    from .kernels import resolve_impl

    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise RuntimeError("logging.wandb = true but the `wandb` package is not installed: pip install wandb "
                           "(or set logging.wandb = false)")
    if dist is not None and dist.enabled:
        check_distributed(cfg, dist.world_size)
    try:
        resolve_impl(cfg.model.logprob_impl, device)
    except RuntimeError:
        raise RuntimeError(f"model.logprob_impl = {cfg.model.logprob_impl!r} needs a CUDA device and the triton "
                           f"package (or TRITON_INTERPRET=1, for tests); this run is on {device.type}. "
                           f"Choose 'auto' (Triton on CUDA, torch elsewhere), 'torch' or 'naive'") from None


def check_distributed(cfg, world_size: int) -> None:
    """What a run under torchrun needs and what it does not do (yet): a batch that splits over the processes;
    no vLLM engine with LoRA (the merged-adapter push from FSDP2 shards is not built) and no
    optim.offload_optimizer_state (FSDP2's own CPU offload, dist.cpu_offload, replaces it there)."""
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    if P % world_size:
        raise ValueError(f"rollout.prompts_per_step = {P} does not split over the {world_size} processes of "
                         f"this torchrun (WORLD_SIZE, --nproc_per_node x --nnodes): each process takes "
                         f"prompts_per_step / world_size prompts (and their rollout.samples_per_prompt = {G} "
                         f"samples); choose a multiple of {world_size}")
    refused = [
        (cfg.rollout.backend == "vllm" and cfg.model.lora.r > 0,
         "rollout.backend = 'vllm' with model.lora.r > 0: pushing the merged adapter from FSDP2 shards into the "
         "engines is not built; use rollout.backend = 'hf' or train LoRA in one process"),
        (cfg.optim.offload_optimizer_state, "optim.offload_optimizer_state = true: under torchrun use "
                                            "dist.cpu_offload = true (FSDP2's CPUOffloadPolicy) instead"),
    ]
    for bad, why in refused:
        if bad:
            raise ValueError(f"{why} (this run is under torchrun with {world_size} process(es))")


@contextlib.contextmanager
def naming(key: str, value: str):
    """An OSError (a missing folder or file, no network) or a ValueError (a folder that holds no model or
    tokenizer) is re-raised, as the same kind, naming the config key that gave the path; fastprerl's own
    errors, which already start with the key, pass unchanged."""
    try:
        yield
    except (OSError, ValueError) as e:
        if str(e).startswith(key):
            raise
        kind = OSError if isinstance(e, OSError) else ValueError
        raise kind(f"{key} = {value!r}: {e}") from e


class StopSignals:
    """First SIGINT/SIGTERM: `requested` is set and the loop stops after the current step and a checkpoint.
    Second one: StepAbandoned is raised wherever the loop is; the newest checkpoint stays as it was."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"fastprerl: {name}: finishing this step, then writing a checkpoint "
                  f"(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            return
        raise StepAbandoned(name)

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def batch_report(step: int, phase: str, problem: str, *, rewards, resp_lens, truncated, terms=None,
                 rows: Optional[int] = None, bins: Optional[int] = None, loss: Optional[float] = None,
                 grad_norm: Optional[float] = None, texts: Optional[List[str]] = None) -> str:
    """The message of a NonFiniteError: what went wrong and the statistics of the step's batch."""
    def stats(x: torch.Tensor) -> str:
        x = x.float()
        bad = int((~torch.isfinite(x)).sum())
        fin = x[torch.isfinite(x)]
        rng = f"min {fin.min().item():.4g}, max {fin.max().item():.4g}, " if fin.numel() else ""
        return f"mean {x.mean().item():.4g}, {rng}non-finite {bad} of {x.numel()}"

    lines = [f"step {step} (phase {phase!r}): {problem}; the step was not applied to the weights.",
             f"  rewards: {stats(rewards)}",
             f"  response length: mean {resp_lens.float().mean().item():.1f}, max {int(resp_lens.max())} tokens; "
             f"truncated {sum(truncated)} of {len(truncated)}"]
    for name, t in (terms or {}).items():
        lines.append(f"  {name}: {int(t.mask.sum())} samples in the loss; advantages {stats(t.advantage)}")
    if rows is not None:
        lines.append(f"  packed rows {rows} in {bins} micro-batches; loss {loss}; grad norm {grad_norm}")
    if texts:
        bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)][:3]
        lines += [f"  sample {i}: reward {rewards[i].item()} for response {texts[i]!r}" for i in bad]
    return "\n".join(lines)
