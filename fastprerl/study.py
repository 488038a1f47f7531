"""`fastprerl study`: GRPO vs NSR-PreRL vs PSR-PreRL vs DSRL from one base model, one seed, one step budget.

    fastprerl study                      # all four arms from configs/dsrl.toml, then docs/RESULTS.md
    fastprerl study --arms grpo,dsrl     # some arms only (arms already finished are skipped)
    fastprerl study --report-only        # rebuild the report from the finished arms

Every arm is the base config (default configs/dsrl.toml: SmolLM2-135M-Instruct, 2-digit additions) with
its schedule replaced:
  grpo        GRPO for `steps` steps
  nsr_prerl   NSR-PreRL for `steps` steps
  psr_prerl   PSR-PreRL for `steps` steps
  dsrl        NSR-PreRL for `warmup` steps, then GRPO for the rest
and periodic evaluation switched on (fixed problems and sampling seed, eval.every). All arms share the
seed, so they start from the same weights and the same first prompts. After training, the gradient
alignment of log P(y) and log P(y|x) (`fastprerl align`) is measured on the base model and on every arm's
final model. The report (docs/RESULTS.md by default) holds the measured numbers, whatever they show,
and the plots; every number in it is read from the arms' output directories.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ARMS = ("grpo", "nsr_prerl", "psr_prerl", "dsrl")
THRESHOLDS = (0.4, 0.5, 0.6)
WINDOW = 5   # moving average of the training reward for "steps to reach"


def arm_phases(arm: str, steps: int, warmup: int) -> List[Dict]:
    if arm == "dsrl":
        if not 0 < warmup < steps:
            raise ValueError(f"--warmup: expected 0 < warmup < steps ({steps}), got {warmup}")
        return [{"name": "nsr_prerl", "steps": warmup, "objectives": [{"name": "nsr_prerl", "weight": 1.0}]},
                {"name": "grpo", "steps": steps - warmup, "objectives": [{"name": "grpo", "weight": 1.0}]}]
    if arm not in ARMS:
        raise ValueError(f"--arms: unknown arm {arm!r}; choose from {list(ARMS)}")
    return [{"name": arm, "steps": steps, "objectives": [{"name": arm, "weight": 1.0}]}]


def arm_config(base_path: str, overrides: Sequence[str], arm: str, out: Path, steps: int, warmup: int,
               eval_every: int):
    from .config import config_from_dict, load_config

    base = load_config(base_path, list(overrides))
    data = base.to_dict()
    data["schedule"]["phases"] = arm_phases(arm, steps, warmup)
    data["run"]["output_dir"] = str(out / arm)
    data["run"]["checkpoint_every"] = 0
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


def run_arm(cfg) -> float:
    from .trainer import Trainer

    t0 = time.perf_counter()
    status = Trainer(cfg).train()
    if status != "complete":
        raise RuntimeError(f"arm in {cfg.run.output_dir} ended {status}")
    wall = time.perf_counter() - t0
    (Path(cfg.run.output_dir) / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return wall


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
    }


def alignment(model_value: str, data: str, n: int, seed: int, max_new_tokens: int) -> Dict:
    from .align import run_align
    from .eval_data import EvalSettings

    settings = EvalSettings.from_options(**{"eval.max_new_tokens": max_new_tokens, "eval.seed": seed})
    rep = run_align(model_value, [data], settings, n=n, keep_tokens=False)
    return rep["overall"]


# ---------------------------------------------------------------------------------------------- report
def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def plot_comparison(summaries: Dict[str, Dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for arm, s in summaries.items():
        ax1.plot(s["eval_steps"], s["eval_avg"], marker="o", markersize=4, label=arm)
        ax2.plot(range(len(s["reward"])), moving_average(s["reward"], WINDOW), linewidth=1.4, label=arm)
    any_s = next(iter(summaries.values()))
    ax1.set_ylabel(f"eval Avg@{any_s['k']} ({any_s['n_problems']} problems)", fontsize=9)
    ax2.set_ylabel(f"training reward (moving avg {WINDOW})", fontsize=9)
    ax2.set_xlabel("step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if "dsrl" in summaries:
        switch = summaries["dsrl"].get("switch")
        if switch:
            for ax in (ax1, ax2):
                ax.axvline(switch - 0.5, color="crimson", linestyle="--", linewidth=1)
    fig.suptitle("GRPO vs NSR-PreRL vs PSR-PreRL vs DSRL (same base model, seed and step budget)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_report(out: Path, doc: Path, meta: Dict) -> Path:
    from .plot import plot_run

    summaries = {a: arm_summary(out / a) for a in ARMS if (out / a / "eval.jsonl").exists()}
    if not summaries:
        raise FileNotFoundError(f"no finished arm in {out}")
    if "dsrl" in summaries:
        rows = [r for r in _read_jsonl(out / "dsrl" / "metrics.jsonl") if r.get("phase") != "eval"]
        summaries["dsrl"]["switch"] = next((r["step"] for r in rows if r["phase"] == "grpo"), None)
    fig_dir = doc.parent / "study"
    compare = plot_comparison(summaries, fig_dir / "compare.png")
    per_arm = {a: plot_run(out / a, fig_dir / f"{a}.png") for a in summaries}
    align_path = out / "alignment.json"
    align = json.loads(align_path.read_text()) if align_path.exists() else {}
    record = json.dumps({"meta": meta, "arms": summaries, "alignment": align}, indent=1)
    (out / "study.json").write_text(record)
    (fig_dir / "study.json").write_text(record)   # kept next to the report

    rel = lambda p: Path(p).relative_to(doc.parent).as_posix()  # noqa: E731
    any_s = next(iter(summaries.values()))
    k, n = any_s["k"], any_s["n_problems"]
    threads = sorted({s["threads"] for s in summaries.values() if s["threads"] is not None})
    threads_txt = ("torch threads per arm: " + "/".join(str(t or "default") for t in threads)) if threads else ""
    L = ["# Results: a small-scale study on CPU", "",
         "GRPO vs NSR-PreRL vs PSR-PreRL vs DSRL from the same base model, seed and step budget. Produced by",
         "", f"    {meta['command']}", "",
         f"on {meta['machine']} ({meta['date']}; {threads_txt}); torch {meta['torch']}, "
         f"transformers {meta['transformers']}. "
         f"Base config `{meta['config']}` ({meta['model']}, task `{any_s['eval_set']}`), "
         f"{meta['steps']} steps per arm (DSRL: {meta['warmup']} NSR-PreRL steps, then GRPO), "
         f"{meta['prompts']} prompts x {meta['samples']} samples per step, lr {meta['lr']}, seed {meta['seed']}. "
         f"Evaluation every {meta['eval_every']} steps on {n} fixed problems x {k} samples "
         f"(temperature {meta['eval_temperature']}, eval seed {meta['eval_seed']}). "
         "Every number below is read from the arms' output directories (`metrics.jsonl`, `eval.jsonl`, "
         f"`alignment.json`; all of it collected in [{rel(fig_dir / 'study.json')}]"
         f"({rel(fig_dir / 'study.json')})); one seed, so differences of a few "
         "points are within noise.", ""]
    L += ["## Accuracy", "",
          f"| arm | eval Avg@{k} step 0 | eval Avg@{k} final | best eval Avg@{k} | eval pass@{k} final | "
          "train reward first 5 | train reward last 5 | "
          + " | ".join(f"steps to MA{WINDOW} >= {t}" for t in THRESHOLDS) + " | response len final | wall |",
          "|---|" + "---|" * (8 + len(THRESHOLDS))]
    for arm, s in summaries.items():
        wall = f"{s['wall_s'] / 60:.1f} min" if s["wall_s"] else "-"
        L.append(f"| {arm} | {_f(s['eval_avg'][0])} | {_f(s['eval_avg'][-1])} | {_f(max(s['eval_avg']))} | "
                 f"{_f(s['eval_pass'][-1])} | {_f(s['reward_first5'])} | {_f(s['reward_last5'])} | "
                 + " | ".join(_f(s["steps_to"][str(t)], "d") for t in THRESHOLDS)
                 + f" | {_f(s['response_len_last'], '.2f')} | {wall} |")
    L += ["", f"Steps to reach: the first step at which the moving average of the training reward over the "
          f"last {WINDOW} steps reaches the threshold ('-': never). Eval Avg@{k} by step:", ""]
    steps = sorted({st for s in summaries.values() for st in s["eval_steps"]})
    L += ["| arm | " + " | ".join(f"step {st}" for st in steps) + " |", "|---|" + "---|" * len(steps)]
    for arm, s in summaries.items():
        m = dict(zip(s["eval_steps"], s["eval_avg"]))
        L.append(f"| {arm} | " + " | ".join(_f(m.get(st)) for st in steps) + " |")
    L += ["", f"![comparison]({rel(compare)})", "", "## Behaviour counts", "",
          "Paragraphs per response classified with the keyword rule of fastprerl/metrics.py (transition / "
          "reflection / execution), on the evaluation samples of the final model and of the step-0 model; "
          "ratio = final / step 0 ('-' where the step-0 count is 0).", "",
          "| arm | transition step 0 | transition final | reflection step 0 | reflection final | "
          "execution step 0 | execution final | ratios (T / R / E) |", "|---|---|---|---|---|---|---|---|"]
    for arm, s in summaries.items():
        b0, b1, r = s["first"]["behaviour"], s["last"]["behaviour"], s["last"].get("behaviour_ratio") or {}
        L.append(f"| {arm} | {_f(b0['transition'])} | {_f(b1['transition'])} | {_f(b0['reflection'])} | "
                 f"{_f(b1['reflection'])} | {_f(b0['execution'])} | {_f(b1['execution'])} | "
                 f"{_f(r.get('transition'), '.2f')} / {_f(r.get('reflection'), '.2f')} / "
                 f"{_f(r.get('execution'), '.2f')} |")
    if align:
        L += ["", "## Gradient alignment of log P(y) and log P(y|x)", "",
              f"`fastprerl align` on {meta['align_n']} rollouts sampled with the prompt from each model "
              "(all trainable parameters; inner product and cosine of the two gradients; |d| = mean absolute "
              "per-token log-prob difference between the two views).", "",
              "| model | rollouts | mean inner | min | max | fraction negative | mean cosine | "
              "mean abs d, first 5 tokens | mean abs d, rest |", "|---|---|---|---|---|---|---|---|---|"]
        for name, a in align.items():
            L.append(f"| {name} | {a.get('n', '-')} | {_f(a.get('inner_mean'), '.4g')} | "
                     f"{_f(a.get('inner_min'), '.4g')} | {_f(a.get('inner_max'), '.4g')} | "
                     f"{_f(a.get('inner_frac_negative'), '.2f')} | {_f(a.get('cosine_mean'))} | "
                     f"{_f(a.get('token_abs_diff_first5'))} | {_f(a.get('token_abs_diff_rest'))} |")
    L += ["", "## Per-arm progress", ""]
    for arm, p in per_arm.items():
        L += [f"### {arm}", "", f"![{arm}]({rel(p)})", ""]
    L += ["## Reading", "", meta.get("reading", "(see the tables)"), ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(L))
    return doc


# ---------------------------------------------------------------------------------------------- driver
def run_study(args) -> int:
    import torch
    import transformers

    from .config import ConfigError

    out, doc = Path(args.out), Path(args.doc)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else list(ARMS)
    try:
        for a in arms:
            arm_phases(a, args.steps, args.warmup)
        cfgs = {a: arm_config(args.config, args.overrides, a, out, args.steps, args.warmup, args.eval_every)
                for a in arms}
    except (ConfigError, ValueError) as e:
        print(f"fastprerl study: {e}", file=sys.stderr)
        return 2
    if not args.report_only:
        for i, (a, cfg) in enumerate(cfgs.items()):
            if (Path(cfg.run.output_dir) / "final").exists():
                differs = finished_arm_mismatch(cfg)
                if differs:
                    print(f"fastprerl study: arm {a} in {cfg.run.output_dir} was trained with other settings "
                          f"({differs}); delete that folder or choose another --out", file=sys.stderr)
                    return 2
                print(f"[{i + 1}/{len(cfgs)}] {a}: already finished with these settings, skipped", file=sys.stderr)
                continue
            print(f"[{i + 1}/{len(cfgs)}] {a}: training {args.steps} steps into {cfg.run.output_dir}",
                  file=sys.stderr)
            run_arm(cfg)
        if args.align_n > 0:
            c0 = next(iter(cfgs.values()))
            path = out / "alignment.json"
            done = json.loads(path.read_text()) if path.exists() else {}
            targets = {"base": c0.model.path, **{a: str(out / a / "final") for a in ARMS
                                                   if (out / a / "final").exists()}}
            for name, value in targets.items():
                if name in done:
                    continue
                print(f"alignment: {name} ({args.align_n} rollouts)", file=sys.stderr)
                done[name] = alignment(value, c0.data.source, args.align_n, c0.eval.seed,
                                       c0.rollout.max_new_tokens)
                path.write_text(json.dumps(done, indent=1))
    c0 = next(iter(cfgs.values()))
    meta = {"command": "fastprerl study " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "fastprerl study",
            "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
            "config": args.config, "model": c0.model.path, "steps": args.steps, "warmup": args.warmup,
            "prompts": c0.rollout.prompts_per_step, "samples": c0.rollout.samples_per_prompt, "lr": c0.optim.lr,
            "seed": c0.run.seed, "eval_every": args.eval_every, "eval_temperature": c0.eval.temperature,
            "eval_seed": c0.eval.seed, "align_n": args.align_n, "out": str(out)}
    if args.reading and Path(args.reading).exists():
        meta["reading"] = Path(args.reading).read_text().strip()
    print(write_report(out, doc, meta))
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
