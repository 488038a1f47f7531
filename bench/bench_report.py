"""The result tables of `pytest bench/`: the terminal table and bench/results/<bench>_<cpu|cuda>.md."""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

HEADER = ["provider", "shape", "dtype", "mode", "median s", "peak MB extra", "x naive", "GFLOP/s", "oracle",
          "note"]


def is_quick() -> bool:
    return os.environ.get("FASTPRERL_BENCH_QUICK", "") not in ("", "0")


def _fmt_time(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.2f}")


def _oracle_cell(r: dict[str, Any]) -> str:
    chk = r.get("check")
    if not chk:
        return "-"
    return "ok" if chk.get("ok") else "FAIL"


def _rows_for_table(results: list[dict[str, Any]]):
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        gf = (r["flops"] / r["median_s"] / 1e9) if ok and r.get("flops") else None
        rows.append([r["provider"], r["shape"], r["dtype"], r["mode"],
                     _fmt_time(r.get("median_s")) if ok else r["status"],
                     f"{r['peak_mb']:.0f}" if ok else "-",
                     f"{r['ratio_vs_naive']:.2f}" if r.get("ratio_vs_naive") is not None else "-",
                     f"{gf:.0f}" if gf else "-", _oracle_cell(r),
                     (r.get("note") or "") + ("" if ok else (r.get("reason") or ""))])
    return rows


def format_table(results: list[dict[str, Any]], markdown: bool = False, ratio_label: str = "x naive") -> str:
    rows = _rows_for_table(results)
    header = [ratio_label if h == "x naive" else h for h in HEADER]
    if markdown:
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(header[i]), *(len(str(row[i])) for row in rows)) if rows else len(header[i])
              for i in range(len(header) - 1)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + str(row[-1])  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths] + ["----"])] + [fmt(r) for r in rows])


def write_markdown(results_dir: Path, bench: str, device: str, results, meta, title: str = "", extra: str = "",
                   ratio_label: str = "x naive") -> Path:
    """<results_dir>/<bench>_<cpu|cuda>.md; a --quick smoke run writes <bench>_<cpu|cuda>_quick.md
    instead, so that it never overwrites the table of a real run."""
    suffix = "_quick" if is_quick() else ""
    path = results_dir / f"{bench}_{'cuda' if device == 'cuda' else 'cpu'}{suffix}.md"
    m, v = meta["machine"], meta["versions"]
    when = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    lines = [f"# {title or bench}", "",
             f"- machine: {m['platform']}; {m['cpu']}; {m['cores']} cores; torch threads {m.get('threads')}"
             + (f"; GPU {m['gpu']}" if m.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- git: {meta['git_sha']}; written {when}",
             f"- load average (1 min) before the first / after the last case: "
             f"{results[0].get('load1_before')} / {results[-1].get('load1_after')}",
             "- median of the timed repeats after warm-up; peak MB extra = peak over the timed repeats "
             "minus the baseline after inputs (RSS on CPU, allocated bytes on CUDA); "
             f"{ratio_label} = time / time of the baseline provider of the same shape and mode; "
             "GFLOP/s counts the useful matmul FLOPs only; oracle = full outputs and gradients of the last call "
             "against the float64 oracle with the bound of tests/tolerances.py (bench/bench_oracle.py).", ""]
    lines.append(format_table(results, markdown=True, ratio_label=ratio_label))
    if extra:
        lines += ["", extra]
    path.write_text("\n".join(lines) + "\n")
    return path
