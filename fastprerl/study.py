"""`fastprerl study`: GRPO vs NSR-PreRL vs PSR-PreRL vs DSRL (fixed and adaptive switch), several seeds.

    fastprerl study --seeds 0,1,2        # every arm per seed from configs/dsrl.toml, then docs/RESULTS.md
    fastprerl study --arms grpo,dsrl     # some arms only (finished ones are reused, stopped ones resumed)
    fastprerl study --report-only        # rebuild the report from the finished arms

Every arm is the base config (default configs/dsrl.toml: SmolLM2-135M-Instruct, 2-digit additions) with
its schedule and seed replaced:
  grpo           GRPO for `steps` steps
  nsr_prerl      NSR-PreRL for `steps` steps
  psr_prerl      PSR-PreRL for `steps` steps
  prerl          PreRL (every sample, prompt-free) for `steps` steps (not in the default arms)
  dsrl           NSR-PreRL for `warmup` steps, then GRPO for the rest
  dsrl_adaptive  NSR-PreRL until the adaptive switch of fastprerl/schedule.py ends it (at most
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
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ARMS = ("grpo", "nsr_prerl", "psr_prerl", "dsrl", "dsrl_adaptive")
OPTIONAL_ARMS = ("prerl",)
DSRL_ARMS = ("dsrl", "dsrl_adaptive")
THRESHOLDS = (0.4, 0.5, 0.6)
WINDOW = 5   # moving average of the training reward for "steps to reach"
DEFAULT_SIGNAL = "logp/free_mean"


def _phase(name: str, steps: int) -> Dict:
    return {"name": name, "steps": steps, "objectives": [{"name": name, "weight": 1.0}]}


def arm_phases(arm: str, steps: int, warmup: int, adaptive_max: int = 0) -> List[Dict]:
    if arm == "dsrl":
        if not 0 < warmup < steps:
            raise ValueError(f"--warmup: expected 0 < warmup < steps ({steps}), got {warmup}")
        return [_phase("nsr_prerl", warmup), _phase("grpo", steps - warmup)]
    if arm == "dsrl_adaptive":
        if not 0 < adaptive_max < steps:
            raise ValueError(f"--adaptive-max: expected 0 < adaptive_max < steps ({steps}), got {adaptive_max}")
        return [_phase("nsr_prerl", adaptive_max), _phase("grpo", steps - adaptive_max)]
    if arm not in ARMS + OPTIONAL_ARMS:
        raise ValueError(f"--arms: unknown arm {arm!r}; choose from {list(ARMS + OPTIONAL_ARMS)}")
    return [_phase(arm, steps)]


def arm_dir(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / arm / f"seed{seed}"


def arm_config(base_path: str, overrides: Sequence[str], arm: str, out: Path, steps: int, warmup: int,
               eval_every: int, seed: int = 0, adaptive_max: int = 0, checkpoint_every: int = 5):
    from .config import config_from_dict, load_config

    base = load_config(base_path, list(overrides))
    data = base.to_dict()
    data["schedule"]["phases"] = arm_phases(arm, steps, warmup, adaptive_max)
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


def finished_arm_mismatch(cfg) -> Optional[str]:
    """None when the arm's run directory holds a finished run of exactly this config (the keys a resume may
    change aside), else what differs; a finished arm is reused only when it is the run asked for."""
    from .checkpoint import config_changes
    from .config import load_config
    saved = Path(cfg.run.output_dir) / "config.toml"
    if not saved.is_file():
        return f"{saved} is missing"
    changes = config_changes(load_config(saved).to_dict(), cfg.to_dict())
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes) or None


def run_arm(cfg) -> str:
    """Trains (or resumes) one arm; adds this part's seconds to <output_dir>/wall_s.txt (the sum of all
    parts of a run resumed from a checkpoint). A finished arm's checkpoints are deleted (its final model,
    metrics and config are what the study reuses; a 135M-parameter checkpoint with AdamW moments is 1.5 GB,
    and a study has many arms). Returns the trainer's status."""
    from .checkpoint import list_checkpoints
    from .trainer import Trainer

    out = Path(cfg.run.output_dir)
    wall_file = out / "wall_s.txt"
    resumed = bool(list_checkpoints(out / "checkpoints"))
    earlier = float(wall_file.read_text()) if resumed and wall_file.exists() else 0.0
    t0 = time.perf_counter()
    status = Trainer(cfg).train()
    wall_file.write_text(f"{earlier + time.perf_counter() - t0:.1f}\n")
    if status == "complete":
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return status


# ---------------------------------------------------------------------------------------------- numbers
def _read_jsonl(path: Path) -> List[Dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def moving_average(xs: Sequence[float], w: int) -> List[float]:
    out = []
    for i in range(len(xs)):
        part = xs[max(0, i - w + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def steps_to_reach(rewards: Sequence[float], threshold: float, w: int = WINDOW) -> Optional[int]:
    """First step whose trailing moving average (window w, full windows only) reaches threshold."""
    ma = moving_average(rewards, w)
    for i in range(w - 1, len(ma)):
        if ma[i] >= threshold:
            return i
    return None


def arm_summary(run_dir: Path) -> Dict:
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("phase") != "eval"]
    evals = _read_jsonl(run_dir / "eval.jsonl")
    rewards = [r["reward/mean"] for r in train]
    name = next(iter(evals[0]["datasets"]))
    first, last = evals[0]["datasets"][name], evals[-1]["datasets"][name]
    wall = run_dir / "wall_s.txt"
    try:
        import tomllib
        threads = tomllib.loads((run_dir / "config.toml").read_text())["run"]["threads"]
    except (OSError, KeyError, ValueError, ImportError):
        threads = None
    return {
        "threads": threads,
        "steps": len(train),
        "phases": sorted({r["phase"] for r in train}, key=[r["phase"] for r in train].index),
        "reward_first5": sum(rewards[:5]) / max(1, len(rewards[:5])),
        "reward_last5": sum(rewards[-5:]) / max(1, len(rewards[-5:])),
        "reward": rewards,
        "steps_to": {str(t): steps_to_reach(rewards, t) for t in THRESHOLDS},
        "eval_set": name,
        "eval_steps": [e["step"] for e in evals],
        "eval_avg": [e["datasets"][name]["avg@k"] for e in evals],
        "eval_pass": [e["datasets"][name]["pass@k"] for e in evals],
        "k": first["k"], "n_problems": first["n_problems"],
        "first": first, "last": last,
        "response_len_last": last["response_len"],
        "wall_s": float(wall.read_text()) if wall.exists() else None,
        "switch": next((r["step"] for r in train if r["phase"] != train[0]["phase"]), None),
        "switch_reason": next((r["schedule/switch_reason"] for r in train if "schedule/switch_reason" in r), None),
    }


def alignment(model_value: str, data: str, n: int, seed: int, max_new_tokens: int) -> Dict:
    from .align import run_align
    from .eval_data import EvalSettings

    settings = EvalSettings.from_options(**{"eval.max_new_tokens": max_new_tokens, "eval.seed": seed})
    rep = run_align(model_value, [data], settings, n=n, keep_tokens=False)
    return rep["overall"]


# ---------------------------------------------------------------------------------------------- seeds
def spread(values: Sequence[Optional[float]]) -> Optional[Dict]:
    """Mean, min, max and count of the values that are not None; None when there are none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def cell(values: Sequence[Optional[float]], spec: str = ".3f", of: Optional[int] = None) -> str:
    """'mean [min, max]' over seeds ('mean' for one value, '-' for none); with `of`, also how many of `of`
    seeds have a value (e.g. steps to reach a threshold that some seeds never reach)."""
    sp = spread(values)
    if sp is None:
        return "-" if of is None else f"- (0/{of})"
    txt = format(sp["mean"], spec) if sp["n"] == 1 else \
        f"{format(sp['mean'], spec)} [{format(sp['min'], spec)}, {format(sp['max'], spec)}]"
    return txt if of is None or sp["n"] == of else f"{txt} ({sp['n']}/{of})"


def paired(summaries: Dict[str, Dict[int, Dict]], arm: str, base: str = "grpo", key=lambda s: s["eval_avg"][-1]):
    """Per seed run by both arms: (seed, base value, arm value, arm - base)."""
    both = sorted(set(summaries.get(arm, {})) & set(summaries.get(base, {})))
    return [(sd, key(summaries[base][sd]), key(summaries[arm][sd]),
             key(summaries[arm][sd]) - key(summaries[base][sd])) for sd in both]


# ---------------------------------------------------------------------------------------------- report
def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def plot_comparison(summaries: Dict[str, Dict[int, Dict]], path: Path) -> Path:
    """Eval Avg@k and the training reward's moving average per arm: the mean over seeds, the band min-max."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for arm, by_seed in summaries.items():
        runs = list(by_seed.values())
        steps = runs[0]["eval_steps"]
        ev = [[r["eval_avg"][i] for r in runs if r["eval_steps"] == steps] for i in range(len(steps))]
        line, = ax1.plot(steps, [sum(v) / len(v) for v in ev], marker="o", markersize=4,
                         label=f"{arm} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax1.fill_between(steps, [min(v) for v in ev], [max(v) for v in ev], color=line.get_color(), alpha=0.15)
        n = min(len(r["reward"]) for r in runs)
        ma = [moving_average(r["reward"][:n], WINDOW) for r in runs]
        col = list(zip(*ma))
        ax2.plot(range(n), [sum(c) / len(c) for c in col], linewidth=1.4, color=line.get_color(), label=arm)
        if len(runs) > 1:
            ax2.fill_between(range(n), [min(c) for c in col], [max(c) for c in col], color=line.get_color(),
                             alpha=0.15)
    any_s = next(iter(next(iter(summaries.values())).values()))
    ax1.set_ylabel(f"eval Avg@{any_s['k']} ({any_s['n_problems']} problems)", fontsize=9)
    ax2.set_ylabel(f"training reward (moving avg {WINDOW})", fontsize=9)
    ax2.set_xlabel("step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    switch = summaries.get("dsrl", {})
    for sd in switch.values():
        if sd.get("switch"):
            for ax in (ax1, ax2):
                ax.axvline(sd["switch"] - 0.5, color="crimson", linestyle="--", linewidth=1)
            break
    fig.suptitle("mean over seeds (band: min-max); dashed: DSRL's fixed switch", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def collect(out: Path, arms: Sequence[str], seeds: Sequence[int]) -> Dict[str, Dict[int, Dict]]:
    """arm -> seed -> arm_summary, for every (arm, seed) with a finished run."""
    found: Dict[str, Dict[int, Dict]] = {}
    for arm in arms:
        for sd in seeds:
            d = arm_dir(out, arm, sd)
            if (d / "final").exists() and (d / "eval.jsonl").exists():
                found.setdefault(arm, {})[sd] = arm_summary(d)
    return found


def write_report(out: Path, doc: Path, meta: Dict, arms: Sequence[str], seeds: Sequence[int]) -> Path:
    from .plot import plot_run

    summaries = collect(out, arms, seeds)
    if not summaries:
        raise FileNotFoundError(f"no finished arm in {out}")
    fig_dir = doc.parent / "study" / doc.stem
    compare = plot_comparison(summaries, fig_dir / "compare.png")
    per_arm = {a: plot_run(arm_dir(out, a, min(by)), fig_dir / f"{a}_seed{min(by)}.png")
               for a, by in summaries.items()}
    align_path = out / "alignment.json"
    align = json.loads(align_path.read_text()) if align_path.exists() else {}
    record = json.dumps({"meta": meta, "arms": {a: {str(sd): s for sd, s in by.items()} for a, by in summaries.items()},
                         "alignment": align}, indent=1)
    (out / "study.json").write_text(record)
    (fig_dir / "study.json").write_text(record)   # kept next to the report

    rel = lambda p: Path(p).relative_to(doc.parent).as_posix()  # noqa: E731
    runs = [s for by in summaries.values() for s in by.values()]
    k, n = runs[0]["k"], runs[0]["n_problems"]
    threads = sorted({s["threads"] for s in runs if s["threads"] is not None})
    threads_txt = ("torch threads per arm: " + "/".join(str(t or "default") for t in threads)) if threads else ""
    col = lambda arm, f: [f(s) for s in summaries[arm].values()]  # noqa: E731
    L = [f"# {meta.get('title') or 'Study'}", "",
         "Produced by", "", f"    {meta['command']}", "",
         f"on {meta['machine']} ({meta['date']}; {threads_txt}); torch {meta['torch']}, "
         f"transformers {meta['transformers']}. "
         f"Base config `{meta['config']}` ({meta['model']}, task `{runs[0]['eval_set']}`), "
         f"{meta['steps']} steps per arm (DSRL: {meta['warmup']} NSR-PreRL steps, then GRPO; DSRL-adaptive: "
         f"NSR-PreRL for {meta['adaptive']['min_steps']} to {meta['adaptive_max']} steps by the rule of "
         f"fastprerl/schedule.py with signal {meta['adaptive']['signal']}, window {meta['adaptive']['window']}, "
         f"patience {meta['adaptive']['patience']}, min_delta {meta['adaptive']['min_delta']}, then GRPO), "
         f"{meta['prompts']} prompts x {meta['samples']} samples per step, lr {meta['lr']}, "
         f"seeds {', '.join(map(str, meta['seeds']))}. "
         f"Evaluation every {meta['eval_every']} steps on {n} fixed problems x {k} samples "
         f"(temperature {meta['eval_temperature']}, eval seed {meta['eval_seed']}, the same for every arm and "
         "seed). Every number below is read from the arms' output directories (`metrics.jsonl`, `eval.jsonl`, "
         f"`alignment.json`; all of it collected in [{rel(fig_dir / 'study.json')}]({rel(fig_dir / 'study.json')})). "
         "A cell is the mean over seeds and [min, max] over seeds; (m/N): only m of the N seeds have a value.", ""]
    L += ["## Accuracy", "",
          f"| arm | seeds | eval Avg@{k} step 0 | eval Avg@{k} final | best eval Avg@{k} | eval pass@{k} final | "
          "train reward first 5 | train reward last 5 | "
          + " | ".join(f"steps to MA{WINDOW} >= {t}" for t in THRESHOLDS) + " | response len final | wall (min) |",
          "|---|---|" + "---|" * (8 + len(THRESHOLDS))]
    for arm, by in summaries.items():
        N = len(by)
        L.append(f"| {arm} | {N} | {cell(col(arm, lambda s: s['eval_avg'][0]))} | "
                 f"{cell(col(arm, lambda s: s['eval_avg'][-1]))} | {cell(col(arm, lambda s: max(s['eval_avg'])))} | "
                 f"{cell(col(arm, lambda s: s['eval_pass'][-1]))} | {cell(col(arm, lambda s: s['reward_first5']))} | "
                 f"{cell(col(arm, lambda s: s['reward_last5']))} | "
                 + " | ".join(cell(col(arm, lambda s: s["steps_to"][str(t)]), ".1f", of=N) for t in THRESHOLDS)
                 + f" | {cell(col(arm, lambda s: s['response_len_last']), '.1f')} | "
                 f"{cell(col(arm, lambda s: s['wall_s'] / 60 if s['wall_s'] else None), '.1f')} |")
    L += ["", f"Steps to reach: the first step at which the moving average of the training reward over the "
          f"last {WINDOW} steps reaches the threshold. Eval Avg@{k} by step (mean over seeds):", ""]
    steps = sorted({st for s in runs for st in s["eval_steps"]})
    L += ["| arm | " + " | ".join(f"step {st}" for st in steps) + " |", "|---|" + "---|" * len(steps)]
    for arm, by in summaries.items():
        per = [dict(zip(s["eval_steps"], s["eval_avg"])) for s in by.values()]
        L.append(f"| {arm} | " + " | ".join(cell([m.get(st) for m in per]) for st in steps) + " |")
    L += ["", f"![comparison]({rel(compare)})", ""]
    dsrl_arms = [a for a in DSRL_ARMS if a in summaries]
    if "grpo" in summaries and dsrl_arms:
        L += ["## DSRL against GRPO, seed by seed", "",
              f"Paired by seed (same initial weights, prompt stream and evaluation problems): final eval Avg@{k} "
              "and the training reward of the last 5 steps; diff = DSRL arm - GRPO.", ""]
        for arm in dsrl_arms:
            ev = paired(summaries, arm)
            tr = dict((sd, t) for sd, *t in paired(summaries, arm, key=lambda s: s["reward_last5"]))
            if not ev:
                continue
            L += [f"| seed | GRPO eval | {arm} eval | diff | GRPO train last 5 | {arm} train last 5 | diff |",
                  "|---|---|---|---|---|---|---|"]
            for sd, g, d, diff in ev:
                tg, td, tdiff = tr[sd]
                L.append(f"| {sd} | {g:.3f} | {d:.3f} | {diff:+.3f} | {tg:.3f} | {td:.3f} | {tdiff:+.3f} |")
            diffs = [x[3] for x in ev]
            wins = sum(x > 0 for x in diffs)
            L += [f"| mean [min, max] | | | {cell(diffs, '+.3f')} | | | "
                  f"{cell([t[2] for t in tr.values()], '+.3f')} |", "",
                  f"{arm} above GRPO on final eval in {wins} of {len(diffs)} seeds, equal in "
                  f"{sum(x == 0 for x in diffs)}.", ""]
    if "dsrl_adaptive" in summaries:
        L += ["## Where the adaptive switch fell", "",
              "| seed | first GRPO step | reason (from the metrics row of the last NSR-PreRL step) |", "|---|---|---|"]
        for sd, s in summaries["dsrl_adaptive"].items():
            L.append(f"| {sd} | {_f(s['switch'], 'd')} | {s['switch_reason'] or '-'} |")
        L.append("")
    L += ["## Behaviour counts", "",
          "Paragraphs per response classified with the keyword rule of fastprerl/metrics.py (transition / "
          "reflection / execution), on the evaluation samples of the step-0 and the final model (mean [min, max] "
          "over seeds); ratio = mean final / mean step 0 ('-' where the step-0 mean is 0).", "",
          "| arm | transition step 0 | transition final | reflection step 0 | reflection final | "
          "execution step 0 | execution final | ratios (T / R / E) |", "|---|---|---|---|---|---|---|---|"]
    for arm in summaries:
        cells, ratios = [], []
        for kind in ("transition", "reflection", "execution"):
            b0 = col(arm, lambda s: s["first"]["behaviour"][kind])
            b1 = col(arm, lambda s: s["last"]["behaviour"][kind])
            cells += [cell(b0), cell(b1)]
            m0, m1 = spread(b0)["mean"], spread(b1)["mean"]
            ratios.append(f"{m1 / m0:.2f}" if m0 > 0 else "-")
        L.append(f"| {arm} | " + " | ".join(cells) + f" | {' / '.join(ratios)} |")
    if align:
        L += ["", "## Gradient alignment of log P(y) and log P(y|x)", "",
              f"`fastprerl align` on {meta['align_n']} rollouts sampled with the prompt from each model "
              "(all trainable parameters; inner product and cosine of the two gradients; |d| = mean absolute "
              "per-token log-prob difference between the two views); arms: mean [min, max] over seeds.", "",
              "| model | seeds | mean inner | fraction negative | mean cosine | mean abs d, first 5 tokens | "
              "mean abs d, rest |", "|---|---|---|---|---|---|---|"]
        groups: Dict[str, List[Dict]] = {}
        for name, a in align.items():
            groups.setdefault(name.split("/")[0], []).append(a)
        for name, items in groups.items():
            g = lambda key, spec=".3f": cell([a.get(key) for a in items], spec)  # noqa: E731
            L.append(f"| {name} | {len(items) if name != 'base' else '-'} | {g('inner_mean', '.4g')} | "
                     f"{g('inner_frac_negative', '.2f')} | {g('cosine_mean')} | {g('token_abs_diff_first5')} | "
                     f"{g('token_abs_diff_rest')} |")
    L += ["", "## Per-arm progress (first seed)", ""]
    for arm, p in per_arm.items():
        L += [f"### {arm}", "", f"![{arm}]({rel(p)})", ""]
    if meta.get("reading"):
        L += ["## Reading", "", meta["reading"], ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(L))
    return doc


# ---------------------------------------------------------------------------------------------- driver
def parse_seeds(text: Optional[str], default: int) -> List[int]:
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
    import torch
    import transformers

    from .checkpoint import ResumeError
    from .config import ConfigError, load_config

    out, doc = Path(args.out), Path(args.doc)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else list(ARMS)
    try:
        base = load_config(args.config, list(args.overrides))
        seeds = parse_seeds(args.seeds, base.run.seed)
        for a in arms:
            arm_phases(a, args.steps, args.warmup, args.adaptive_max)
        cfgs = {(a, sd): arm_config(args.config, args.overrides, a, out, args.steps, args.warmup, args.eval_every,
                                    seed=sd, adaptive_max=args.adaptive_max, checkpoint_every=args.checkpoint_every)
                for sd in seeds for a in arms}
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
            except ResumeError as e:
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
    meta = {"command": "fastprerl study " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "fastprerl study",
            "title": args.title,
            "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
            "config": args.config, "model": c0.model.path, "steps": args.steps, "warmup": args.warmup,
            "adaptive_max": args.adaptive_max,
            "adaptive": {"signal": ad.signal or DEFAULT_SIGNAL, "min_steps": ad.min_steps, "window": ad.window,
                         "patience": ad.patience, "min_delta": ad.min_delta},
            "prompts": c0.rollout.prompts_per_step, "samples": c0.rollout.samples_per_prompt, "lr": c0.optim.lr,
            "seeds": seeds, "eval_every": args.eval_every, "eval_temperature": c0.eval.temperature,
            "eval_seed": c0.eval.seed, "align_n": args.align_n, "out": str(out)}
    if args.reading and Path(args.reading).exists():
        meta["reading"] = Path(args.reading).read_text().strip()
    print(write_report(out, doc, meta, arms, seeds))
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
