"""`fastprerl plot RUN_DIR`: one PNG of a run's progress against step, phase switches marked.

Panels: reward, accuracy, response length, entropy, behaviour counts (transition / reflection / execution
paragraphs per response), and the Avg@k of periodic evaluation when the run has it (eval.every). Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..metrics import read_metrics

PANELS: tuple[tuple[str, Sequence[str]], ...] = (
    ("reward", ("reward/mean",)),
    ("accuracy", ("reward/accuracy",)),
    ("response length (tokens)", ("rollout/response_len_mean",)),
    ("entropy (nats)", ("train/entropy", "entropy/cond", "entropy/free")),
    ("behaviour (paragraphs / response)", ("behaviour/transition", "behaviour/reflection", "behaviour/execution")),
)


def phase_spans(rows: list[dict]) -> list[tuple[str, int, int]]:
    """(phase, first step, last step) of each run of consecutive rows with the same phase."""
    spans: list[tuple[str, int, int]] = []
    for r in rows:
        ph, st = r.get("phase", ""), r["step"]
        if spans and spans[-1][0] == ph:
            spans[-1] = (ph, spans[-1][1], st)
        else:
            spans.append((ph, st, st))
    return spans


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Renders RUN_DIR/metrics.jsonl to a PNG (default RUN_DIR/progress.png) and returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {str(run_dir)!r}; is it a run's output_dir?")
    rows = [r for r in read_metrics(path) if isinstance(r.get("step"), int)]
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    rows.sort(key=lambda r: r["step"])
    spans = phase_spans([r for r in rows if r.get("phase") != "eval"])
    panels = PANELS
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith("/avg@k")})
    if eval_keys:  # periodic evaluation (eval.every): one line per eval set
        panels = panels + (("eval Avg@k", tuple(eval_keys)),)

    fig = Figure(figsize=(9, 2.1 * len(panels) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, keys) in zip(axes, panels):
        drawn = False
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, linewidth=1.4,
                        label=key.split("/", 1)[1] if len(keys) > 1 else key)
                drawn = True
        if drawn and len(keys) > 1:
            ax.legend(fontsize=8, loc="best")
        if not drawn:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_ylabel(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for i, (_, first, last) in enumerate(spans):
            if i % 2:
                ax.axvspan(first - 0.5, last + 0.5, color="0.93", zorder=0)
            if i > 0:  # phase switch
                ax.axvline(first - 0.5, color="crimson", linestyle="--", linewidth=1.2)
    for i, (ph, first, _) in enumerate(spans):
        axes[0].annotate(ph, xy=(first - 0.5 if i else first, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, 3), textcoords="offset points", fontsize=8,
                         color="crimson" if i else "black")
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{run_dir.name}: steps {rows[0]['step']}-{rows[-1]['step']}", fontsize=11)
    out = Path(out) if out is not None else run_dir / "progress.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
