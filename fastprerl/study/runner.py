"""`fastprerl study`: GRPO vs NSR-PreRL vs PSR-PreRL vs DSRL (fixed and adaptive switch), several seeds.

    fastprerl study --seeds 0,1,2        # every arm per seed from configs/dsrl.toml, then docs/results/dsrl.md
    fastprerl study --arms grpo,dsrl     # some arms only (finished ones are reused, stopped ones resumed)
    fastprerl study --report-only        # rebuild the report from the finished arms

Every arm is the base config (default configs/dsrl.toml: SmolLM2-135M-Instruct, 2-digit additions) with
its schedule and seed replaced:
  grpo           GRPO for `steps` steps
  nsr_prerl      NSR-PreRL for `steps` steps
  psr_prerl      PSR-PreRL for `steps` steps
  prerl          PreRL (every sample, prompt-free) for `steps` steps (not in the default arms)
  dsrl           NSR-PreRL for `warmup` steps (weight `warmup_weight`, default 0.01 as the paper's code), then
                 GRPO for the rest
  dsrl_w1        the same with the warm-up weighted 1.0 (not in the default arms)
  nsr_rl_grpo    NSR-RL (negatives in the prompt-conditioned view) for `warmup` steps, weight `warmup_weight`,
                 then GRPO: the control that separates "pre-train space" from "negative samples" (not default)
  dsrl_adaptive  NSR-PreRL until the adaptive switch of fastprerl/phases.py ends it (at most
                 `adaptive_max` steps; signal logp/free_mean unless the base config's [schedule.adaptive]
                 names one; its min_steps / window / patience / min_delta), then GRPO for the rest
and periodic evaluation switched on (fixed problems and sampling seed, eval.every). Arm `a` with seed `s`
trains into <out>/<a>/seed<s> with run.seed = s (model, prompt stream and sampling seeds); the evaluation
problems and their sampling seed are the same for every arm and seed. Every (arm, seed) writes a
checkpoint every `checkpoint_every` steps and a later call resumes it from there (the config must match the
checkpoint's); a finished one is reused only when its saved config is the one asked for. So the study can be
run in parts, e.g. one process per arm, or stopped with Ctrl-C (the step in flight finishes and is
checkpointed) and started again. The wall time of an arm is the sum over its parts.

After training, the gradient alignment of log P(y) and log P(y|x) (`fastprerl align`) is measured on the
base model and on every finished (arm, seed). The report holds the measured numbers, whatever they show:
per cell the mean over seeds and the range [min, max], and per seed the paired difference of each DSRL arm
against GRPO. Every number in it is read from the arms' output directories.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from ..config import ConfigError, config_from_dict, load_config
from ..evaluation.align import run_align
from ..evaluation.data import EvalSettings
from ..state.checkpoint import ResumeError, list_checkpoints
from ..state.resume import config_changes
from ..trainer import Trainer
from .arms import ARMS, DEFAULT_SIGNAL, WARMUP_WEIGHT, arm_dir, arm_phases
from .report import write_report


def arm_config(base_path: str, overrides: Sequence[str], arm: str, out: Path, steps: int, warmup: int,
               eval_every: int, seed: int = 0, adaptive_max: int = 0, checkpoint_every: int = 5,
               warmup_weight: float = WARMUP_WEIGHT):
    base = load_config(base_path, list(overrides))
    data = base.to_dict()
    data["schedule"]["phases"] = arm_phases(arm, steps, warmup, adaptive_max, warmup_weight)
    adaptive = data["schedule"]["adaptive"]
    adaptive["signal"] = (adaptive["signal"] or DEFAULT_SIGNAL) if arm == "dsrl_adaptive" else ""
    data["run"]["seed"] = seed
    data["run"]["output_dir"] = str(arm_dir(out, arm, seed))
    data["run"]["checkpoint_every"] = checkpoint_every
    data["run"]["resume"] = True   # from the newest checkpoint of an earlier part; none yet: from step 0
    data["eval"]["every"] = eval_every
    data["logging"]["samples_every"] = 0
    data["logging"]["progress"] = False
    return config_from_dict(data)


def finished_arm_mismatch(cfg) -> str | None:
    """None when the arm's run directory holds a finished run of exactly this config (the keys a resume may
    change aside), else what differs; a finished arm is reused only when it is the run asked for."""
    saved = Path(cfg.run.output_dir) / "config.toml"
    if not saved.is_file():
        return f"{saved} is missing"
    changes = config_changes(load_config(saved).to_dict(), cfg.to_dict())
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes) or None


class ArmStartError(ValueError):
    """An arm that cannot start (its config, data, model or run folder); `fastprerl study` exits 2."""


def run_arm(cfg) -> str:
    """Trains (or resumes) one arm; adds this part's seconds to <output_dir>/wall_s.txt (the sum of all
    parts of a run resumed from a checkpoint). A finished arm's checkpoints are deleted (its final model,
    metrics and config are what the study reuses; a 135M-parameter checkpoint with AdamW moments is 1.5 GB,
    and a study has many arms). Returns the trainer's status."""
    out = Path(cfg.run.output_dir)
    wall_file = out / "wall_s.txt"
    resumed = bool(list_checkpoints(out / "checkpoints"))
    earlier = float(wall_file.read_text()) if resumed and wall_file.exists() else 0.0
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg)
    except (ValueError, RuntimeError, OSError) as e:   # its config, data, model or folder: nothing trained
        raise ArmStartError(str(e)) from e
    status = trainer.train()
    wall_file.write_text(f"{earlier + time.perf_counter() - t0:.1f}\n")
    if status == "complete":
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return status



def alignment(model_value: str, data: str, n: int, seed: int, max_new_tokens: int) -> dict:
    settings = EvalSettings.from_options(**{"eval.max_new_tokens": max_new_tokens, "eval.seed": seed})
    rep = run_align(model_value, [data], settings, n=n, keep_tokens=False)
    return rep["overall"]


# ---------------------------------------------------------------------------------------------- driver
def parse_seeds(text: str | None, default: int) -> list[int]:
    if not text:
        return [default]
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, e.g. 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: expected distinct integers >= 0, got {text!r}")
    return seeds


def run_study(args) -> int:
    out = Path(args.out)
    doc = Path(args.doc) if args.doc else Path("docs/results") / f"{Path(args.config).stem}.md"
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else list(ARMS)
    try:
        base = load_config(args.config, list(args.overrides))
        seeds = parse_seeds(args.seeds, base.run.seed)
        for a in arms:
            arm_phases(a, args.steps, args.warmup, args.adaptive_max, args.warmup_weight)
        if not args.warmup_weight > 0:
            raise ValueError(f"--warmup-weight: expected a weight > 0, got {args.warmup_weight}")
        cfgs = {(a, sd): arm_config(args.config, args.overrides, a, out, args.steps, args.warmup, args.eval_every,
                                    seed=sd, adaptive_max=args.adaptive_max, checkpoint_every=args.checkpoint_every,
                                    warmup_weight=args.warmup_weight)
                for sd in seeds for a in arms}
        if args.reading and not Path(args.reading).is_file():
            raise ValueError(f"--reading: no file at {args.reading!r}; expected a text file with the reading")
        if args.report_only and not any((Path(c.run.output_dir) / "final").exists() and
                                        (Path(c.run.output_dir) / "eval.jsonl").exists() for c in cfgs.values()):
            raise ValueError(f"--report-only: no arm of this study has finished in {str(out)!r} (an arm's folder "
                             f"with final/ and eval.jsonl); run it without --report-only first, or pass its --out")
    except (ConfigError, ValueError) as e:
        print(f"fastprerl study: {e}", file=sys.stderr)
        return 2
    if not args.report_only:
        for i, ((a, sd), cfg) in enumerate(cfgs.items()):
            tag = f"[{i + 1}/{len(cfgs)}] {a} seed {sd}"
            if (Path(cfg.run.output_dir) / "final").exists():
                differs = finished_arm_mismatch(cfg)
                if differs:
                    print(f"fastprerl study: arm {a} seed {sd} in {cfg.run.output_dir} was trained with other "
                          f"settings ({differs}); delete that folder or choose another --out", file=sys.stderr)
                    return 2
                print(f"{tag}: already finished with these settings, skipped", file=sys.stderr)
                continue
            print(f"{tag}: training {args.steps} steps into {cfg.run.output_dir}", file=sys.stderr)
            try:
                status = run_arm(cfg)
            except (ResumeError, ArmStartError) as e:
                print(f"fastprerl study: arm {a} seed {sd}: {e}", file=sys.stderr)
                return 2
            if status != "complete":
                print(f"fastprerl study: arm {a} seed {sd} {status}; run the same command again to continue",
                      file=sys.stderr)
                return 130
        if args.align_n > 0:
            c0 = next(iter(cfgs.values()))
            path = out / "alignment.json"
            done = json.loads(path.read_text()) if path.exists() else {}
            targets = {"base": c0.model.path}
            targets.update({f"{a}/seed{sd}": str(arm_dir(out, a, sd) / "final") for (a, sd) in cfgs
                            if (arm_dir(out, a, sd) / "final").exists()})
            for name, value in targets.items():
                if name in done:
                    continue
                print(f"alignment: {name} ({args.align_n} rollouts)", file=sys.stderr)
                done[name] = alignment(value, c0.data.source, args.align_n, c0.eval.seed,
                                       c0.rollout.max_new_tokens)
                path.write_text(json.dumps(done, indent=1))
    c0 = next(iter(cfgs.values()))
    ad = cfgs.get(("dsrl_adaptive", seeds[0]), c0).schedule.adaptive
    meta = {"command": "fastprerl study " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 else "fastprerl study",
            "title": args.title,
            "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
            "config": args.config, "model": c0.model.path, "steps": args.steps, "warmup": args.warmup,
            "warmup_weight": args.warmup_weight, "threshold": args.threshold,
            "adaptive_max": args.adaptive_max,
            "adaptive": {"signal": ad.signal or DEFAULT_SIGNAL, "min_steps": ad.min_steps, "window": ad.window,
                         "patience": ad.patience, "min_delta": ad.min_delta},
            "prompts": c0.rollout.prompts_per_step, "samples": c0.rollout.samples_per_prompt, "lr": c0.optim.lr,
            "seeds": seeds, "eval_every": args.eval_every, "eval_temperature": c0.eval.temperature,
            "eval_seed": c0.eval.seed, "align_n": args.align_n, "out": str(out)}
    if args.reading:
        meta["reading"] = Path(args.reading).read_text().strip()
    try:
        print(write_report(out, doc, meta, arms, seeds))
    except FileNotFoundError as e:   # no arm finished (e.g. --steps or --arms that none of the runs used)
        print(f"fastprerl study: {e}", file=sys.stderr)
        return 2
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
