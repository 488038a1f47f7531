"""The report of `fastprerl study` (fastprerl/study/runner.py trains the arms): every number read from the arms'
output directories (`metrics.jsonl`, `eval.jsonl`, `alignment.json`, and `gate.json`: a `fastprerl eval` report
of the base model), per cell the mean over seeds and the range [min, max], per seed the paired difference of
every arm against GRPO with an interval, the view probe and pass@k where the evaluation has them, a comparison
figure, and study.json with everything collected. The numbers and their statistics come from stats.py.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..evaluation.plot import plot_run
from .arms import arm_dir, arm_phases
from .stats import (
    THRESHOLDS,
    WINDOW,
    bootstrap_diff,
    cell,
    collect,
    evals_to,
    moving_average,
    paired,
    sign_test,
    spread,
)


# ---------------------------------------------------------------------------------------------- report
def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def plot_comparison(summaries: dict[str, dict[int, dict]], path: Path) -> Path:
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


def gate_section(path: Path) -> list[str]:
    """The base model's numbers on the task (a `fastprerl eval` report saved as <out>/gate.json), if any."""
    if not path.exists():
        return []
    rep = json.loads(path.read_text())
    L = ["## The gate: the base model on this task", ""]
    if rep.get("command"):
        L += ["Produced by", "", f"    {rep['command']}", ""]
    for name, d in rep["datasets"].items():
        L += [f"`{rep['model']}` on `{name}`: {d['n_problems']} problems x {d['k']} samples, Avg@{d['k']} "
              f"{d['avg@k']:.3f}, answers in the expected form {d['format']:.3f}, pass@k "
              + ", ".join(f"{kk}: {v:.3f}" for kk, v in d["pass_curve"].items()) + "."]
        pr = d.get("probe")
        if pr:
            L += ["", "| view | problems where log P(right) > log P(wrong) | mean log P(right) | mean log P(wrong) |",
                  "|---|---|---|---|"]
            for view, what in (("cond", "with the prompt, log P(y|x)"), ("free", "without it, log P(y|e)")):
                v = pr[view]
                L.append(f"| {what} | {round(v['prefers_right'] * pr['n'])}/{pr['n']} ({v['prefers_right']:.3f}) | "
                         f"{v['logp_right']:.2f} | {v['logp_wrong']:.2f} |")
        L.append("")
    return L


def against_grpo(summaries: dict[str, dict[int, dict]], k: int, threshold: float | None) -> list[str]:
    """Every other arm against GRPO, seed by seed, with bootstrap intervals and the sign test (module doc)."""
    if "grpo" not in summaries or len(summaries) < 2:
        return []
    L = ["## Every arm against GRPO, seed by seed", "",
         f"Paired by seed (same initial weights, prompt stream and evaluation problems): final eval Avg@{k} and the "
         "training reward of the last 5 steps; diff = arm - GRPO; 95% interval of the eval difference by the "
         "bootstrap over problems (module doc of fastprerl/study/stats.py); p = exact two-sided sign test over "
         "seeds." + (f" Evals to {threshold}: the first evaluated step with Avg@{k} >= {threshold}." if threshold
                     else ""), ""]
    for arm in summaries:
        if arm == "grpo":
            continue
        ev = paired(summaries, arm)
        if not ev:
            continue
        tr = {sd: t for sd, *t in paired(summaries, arm, key=lambda s: s["reward_last5"])}
        L += [f"| seed | GRPO eval | {arm} eval | diff | 95% interval | GRPO train last 5 | {arm} train last 5 | diff |"
              + (f" GRPO evals to {threshold} | {arm} evals to {threshold} |" if threshold else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|---|" if threshold else "")]
        pairs = []
        for sd, g, d, diff in ev:
            tg, td, tdiff = tr[sd]
            a, b = summaries[arm][sd]["eval_correct"][-1], summaries["grpo"][sd]["eval_correct"][-1]
            ci = "-"
            if a is not None and b is not None and len(a) == len(b):
                pairs.append((a, b))
                _, lo, hi = bootstrap_diff([(a, b)], k)
                ci = f"[{lo:+.3f}, {hi:+.3f}]"
            row = f"| {sd} | {g:.3f} | {d:.3f} | {diff:+.3f} | {ci} | {tg:.3f} | {td:.3f} | {tdiff:+.3f} |"
            if threshold:
                row += f" {_f(evals_to(summaries['grpo'][sd], threshold), 'd')} | " \
                       f"{_f(evals_to(summaries[arm][sd], threshold), 'd')} |"
            L.append(row)
        diffs = [x[3] for x in ev]
        pooled = "-"
        if len(pairs) == len(ev):
            m, lo, hi = bootstrap_diff(pairs, k)
            pooled = f"[{lo:+.3f}, {hi:+.3f}]"
        L += [f"| mean [min, max] | | | {cell(diffs, '+.3f')} | {pooled} | | | "
              f"{cell([t[2] for t in tr.values()], '+.3f')} |" + (" | |" if threshold else ""), "",
              f"{arm} above GRPO on final eval in {sum(x > 0 for x in diffs)} of {len(diffs)} seeds, equal in "
              f"{sum(x == 0 for x in diffs)}; sign test p = {sign_test(diffs):.3f}.", ""]
    return L


def probe_sections(summaries: dict[str, dict[int, dict]], k: int) -> list[str]:
    """The view probe at every evaluated step, the negatives' log-probs in both views during a warm-up, and the
    final pass@k curve (where the evaluation recorded them)."""
    L = []
    runs = [s for by in summaries.values() for s in by.values()]
    if all(p is not None for s in runs for p in s["eval_probe"]) and runs:
        steps = sorted({st for s in runs for st in s["eval_steps"]})
        L += ["## The mechanism: the view probe at every evaluation", "",
              "On the evaluation problems, a right response and a wrong one of the same form, each scored with the "
              "prompt (cond, log P(y|x)) and without it (free, log P(y|e)); fastprerl/evaluation/probe.py. "
              "Margin = mean log P(right) - mean log P(wrong), nats per response; 'right >' = the fraction of "
              "problems where log P(right) > log P(wrong). Mean over seeds.", "",
              "| arm | step | free: right > | free: log P(wrong) | free: margin | cond: right > | "
              "cond: log P(wrong) | cond: margin |", "|---|---|---|---|---|---|---|---|"]
        for arm, by in summaries.items():
            for st in steps:
                at = [s["eval_probe"][s["eval_steps"].index(st)] for s in by.values() if st in s["eval_steps"]]
                if not at:
                    continue
                c = lambda view, key: cell([p[view][key] for p in at])  # noqa: E731
                mg = lambda view: cell([p[view]["logp_right"] - p[view]["logp_wrong"] for p in at], ".2f")  # noqa: E731
                L.append(f"| {arm} | {st} | {c('free', 'prefers_right')} | "
                         f"{cell([p['free']['logp_wrong'] for p in at], '.2f')} | {mg('free')} | "
                         f"{c('cond', 'prefers_right')} | {cell([p['cond']['logp_wrong'] for p in at], '.2f')} | "
                         f"{mg('cond')} |")
        L.append("")
    warm = {a: by for a, by in summaries.items() if all(s["warmup"] for s in by.values())}
    if warm:
        L += ["## During the warm-up: the negatives in both views", "",
              "Per warm-up step, before its update: the number of negatives and the mean token log-prob of their "
              "responses with the prompt (log P(y_t|x, y_<t)) and without it (log P(y_t|e, y_<t)), from the "
              "metrics rows (logging.view_gap packs both views). Mean over seeds; a step without negatives has "
              "no value.", "", "| arm | step | negatives | cond mean log-prob | free mean log-prob |",
              "|---|---|---|---|---|"]
        for arm, by in warm.items():
            n = min(len(s["warmup"]) for s in by.values())
            for i in range(n):
                rows = [s["warmup"][i] for s in by.values()]
                L.append(f"| {arm} | {rows[0]['step']} | {cell([r['negatives'] for r in rows], '.1f')} | "
                         f"{cell([r['cond'] for r in rows])} | {cell([r['free'] for r in rows])} |")
        L.append("")
    if all(s["pass_curve_last"] for s in runs) and runs:
        ks = list(runs[0]["pass_curve_last"])
        L += ["## pass@k of the final models", "",
              "Unbiased pass@k from the final evaluation's samples (k up to the samples per problem); the paper's "
              "'reasoning horizon' reads the curve's upper end. Mean [min, max] over seeds.", "",
              "| arm | " + " | ".join(f"pass@{x}" for x in ks) + " |", "|---|" + "---|" * len(ks)]
        for arm, by in summaries.items():
            L.append(f"| {arm} | " + " | ".join(cell([s["pass_curve_last"][x] for s in by.values()]) for x in ks)
                     + " |")
        L.append("")
    return L


def schedules(meta: dict, arms: Sequence[str]) -> str:
    """The phases of the study's arms with more than one (from arms.arm_phases), in words."""
    parts = []
    for arm in arms:
        phases = arm_phases(arm, meta["steps"], meta["warmup"], meta["adaptive_max"], meta["warmup_weight"])
        if len(phases) < 2:
            continue
        (warm,), ph = phases[0]["objectives"], phases[0]
        text = (f"{arm}: {ph['steps']} {ph['name']} steps weighted {warm['weight']}, then "
                + ", then ".join(p["name"] for p in phases[1:]))
        if arm == "dsrl_adaptive":
            ad = meta["adaptive"]
            text += (f" (the switch after {ad['min_steps']} to {ph['steps']} steps by the rule of fastprerl/phases.py "
                     f"with signal {ad['signal']}, window {ad['window']}, patience {ad['patience']}, "
                     f"min_delta {ad['min_delta']})")
        parts.append(text)
    return "; ".join(parts) or "one objective each"


def write_report(out: Path, doc: Path, meta: dict, arms: Sequence[str], seeds: Sequence[int]) -> Path:
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
         f"{meta['steps']} steps per arm ({schedules(meta, summaries)}), "
         f"{meta['prompts']} prompts x {meta['samples']} samples per step, lr {meta['lr']}, "
         f"seeds {', '.join(map(str, meta['seeds']))}. "
         f"Evaluation every {meta['eval_every']} steps on {n} fixed problems x {k} samples "
         f"(temperature {meta['eval_temperature']}, eval seed {meta['eval_seed']}, the same for every arm and "
         "seed). Every number below is read from the arms' output directories (`metrics.jsonl`, `eval.jsonl`, "
         f"`alignment.json`; all of it collected in [{rel(fig_dir / 'study.json')}]({rel(fig_dir / 'study.json')})). "
         "A cell is the mean over seeds and [min, max] over seeds; (m/N): only m of the N seeds have a value.", ""]
    L += gate_section(out / "gate.json")
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
    L += against_grpo(summaries, k, meta.get("threshold"))
    L += probe_sections(summaries, k)
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
        groups: dict[str, list[dict]] = {}
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


