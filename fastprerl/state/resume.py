"""A run's start on disk: the output folder, which checkpoint a run resumes from, and whether its config may.

A checkpoint holds everything the loop carries from one step to the next (checkpointer.py saves and loads it),
so a resumed run is bit-identical on CPU to one that never stopped.

Nothing a user or an earlier run wrote is lost. A run writes to run.output_dir only once everything has loaded (a
start that fails leaves the folder as it found it, but for damaged checkpoints moved aside on --resume). A run that
starts at step 0 then moves an earlier run's outputs (RUN_OUTPUTS) from run.output_dir to previous/<UTC time>/, a
config.toml among them unless it holds exactly the resolved config about to be written; a resumed run moves a
differing config.toml there too. The config file a run was started from, when it is run.output_dir/config.toml, is
never touched (`check_config_file`: left as it is, or the start is refused).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..config import Config, to_toml
from . import checkpoint as ckpt

log = logging.getLogger("fastprerl")

RUN_OUTPUTS = ("config.toml", "metrics.jsonl", "samples.jsonl", "eval.jsonl", "tensorboard", "wandb_id.txt",
               "final")


# Keys that may change when a run is resumed: where and how fast it runs, what it logs and evaluates.
# Everything else (model, data, rollout sampling, rewards, objectives, schedule, optimizer hyperparameters,
# seed) defines the run and must match the checkpoint. rollout.vllm_max_model_len is not listed: the engine
# stops a response at that many prompt + response tokens, so it can change what is sampled. A trailing "."
# is a whole section.
RESUME_MAY_CHANGE = (
    "run.output_dir", "run.resume", "run.device", "run.threads", "run.checkpoint_every", "run.keep_checkpoints",
    "logging.", "eval.", "reward.workers", "rollout.generation_batch_size", "rollout.vllm_gpu_memory_utilization",
    "rollout.vllm_enforce_eager", "rollout.vllm_sleep", "optim.max_tokens_per_microbatch",
    "optim.offload_optimizer_state", "model.logprob_impl", "model.attn_implementation",
    "model.gradient_checkpointing", "run.merge_lora", "dist.",
)

# ---------------------------------------------------------------------------------------------- config check
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(saved: dict, current: dict, defaults: dict | None = None) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) of every key that differs and may not change on resume. A key the
    saved config lacks (one added to the schema after it was written) counts as its value in `defaults`."""
    a = _flatten(json.loads(json.dumps(defaults or {})))
    a.update(_flatten(json.loads(json.dumps(saved))))
    b = _flatten(json.loads(json.dumps(current)))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") == b.get(k, "<unset>"):
            continue
        if any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_MAY_CHANGE):
            continue
        out.append((k, a.get(k, "<unset>"), b.get(k, "<unset>")))
    return out


def check_resume_config(path: Path, current: dict) -> None:
    """Refuses (checkpoint.ResumeError) to resume checkpoint `path` with a config that changes what the run is."""
    changes = config_changes(ckpt.saved_config(path), current, defaults=Config().to_dict())
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
        raise ckpt.ResumeError(
            f"cannot resume from {path}: the config changes {listed}. A resumed run must keep the model, data, "
            f"rollout, reward, algorithm, optimizer and schedule settings; only "
            f"{', '.join(s + '*' if s.endswith('.') else s for s in RESUME_MAY_CHANGE)} may change. Start a new "
            f"run.output_dir to train with a different config.")


# ---------------------------------------------------------------------------------------------- a run's start
def resume_point(root: Path, output_dir: Path, config: dict, resume: bool) -> Path | None:
    """The checkpoint a run continues from (run.resume), checked against its config (a dict); None: step 0.
    A fresh run (resume False) into a folder that holds checkpoints is refused; damaged checkpoints newer
    than the one resumed are moved aside to <name>.corrupt."""
    existing = ckpt.list_checkpoints(root)
    if not resume:
        if existing:
            raise ckpt.ResumeError(
                f"run.output_dir {str(output_dir)!r} already holds checkpoints (newest: {existing[0][1].name}); "
                f"pass --resume (run.resume = true) to continue that run, or choose another run.output_dir")
        return None
    path, skipped = ckpt.find_latest_valid(root)
    if path is None:
        if skipped:
            raise ckpt.ResumeError(f"no complete checkpoint in {root}: "
                              + "; ".join(f"{p.name}: {why}" for p, why in skipped))
        log.info("no checkpoint in %s yet; starting at step 0", root)
        return None
    check_resume_config(path, config)
    for p, _ in skipped:  # set aside, so that they are neither verified again nor counted as the newest
        aside = p.with_name(p.name + ".corrupt")
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        os.replace(p, aside)
        log.warning("moved the damaged checkpoint %s to %s", p, aside)
    return path


def set_aside_earlier_outputs(out: Path, new_config: str | None = None,
                              names: tuple[str, ...] = RUN_OUTPUTS) -> Path | None:
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
    from ..config import ConfigError, load_config

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


def prepare_output_dir(cfg, config_file, out: Path, ckpt_root: Path) -> tuple[Path | None, bool]:
    """The checkpoint to resume from (None: step 0), and whether the run was started from its own
    run.output_dir/config.toml (check_config_file; that file is then left as it is). Writes nothing (but for
    damaged checkpoints set aside on resume): the folder is changed by `start_output_dir` once everything has
    loaded. Rank 0 only."""
    keep_config_file = check_config_file(config_file, out, cfg)
    return resume_point(ckpt_root, out, cfg.to_dict(), cfg.run.resume), keep_config_file


def start_output_dir(out: Path, cfg, resume_from: Path | None, keep_config_file: bool) -> None:
    """A fresh run sets earlier outputs aside (set_aside_earlier_outputs); a resumed one a config.toml that
    differs from its resolved config. Then config.toml: the resolved config, unless the run was started from
    that very file (left as it is). Rank 0 only."""
    text = to_toml(cfg)
    names = RUN_OUTPUTS if resume_from is None else ("config.toml",)
    set_aside_earlier_outputs(out, text, tuple(n for n in names if not (keep_config_file and n == "config.toml")))
    out.mkdir(parents=True, exist_ok=True)
    if not keep_config_file:
        (out / "config.toml").write_text(text)
