"""Logging sinks (metrics.jsonl, TensorBoard, W&B, samples), behaviour counts per step, and `fastprerl plot`."""
import json
import sys

import pytest

from fastprerl.cli import main
from fastprerl.evaluation.plot import phase_spans, plot_run
from fastprerl.metrics import MetricsLogger, read_metrics

from logs import FAST, TINY, png_size, row, scalars  # noqa: F401


def test_resumed_logger_drops_rows_after_the_checkpoint_in_every_sink(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True, console=False)
    for s in range(5):
        log.log(row(s))
        log.log_samples(s, [{"prompt": "p", "response": "r", "reward": 1.0, "advantage": 0.5}])
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward/me')  # a line cut short by a kill
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]

    log = MetricsLogger(tmp_path, tensorboard=True, console=False, start_step=3)  # resumed at step 3
    for s in range(3, 6):
        log.log(row(s, **{"reward/mean": 10.0 + s}))
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in rows] == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 13.0), (4, 14.0),
                                                             (5, 15.0)]
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 1, 2]
    tb = scalars(tmp_path / "tensorboard", "reward/mean")
    assert [s for s, _ in tb] == [0, 1, 2, 3, 4, 5]
    assert [v for _, v in tb][3:] == pytest.approx([13.0, 14.0, 15.0])


def test_wandb_requested_but_not_installed_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec None, import fails
    assert main(["train", str(TINY), f"run.output_dir={tmp_path / 'r'}", "logging.wandb=true"]) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_plot_marks_phase_switches_and_survives_missing_metrics(tmp_path):
    rows = [row(s, "nsr_prerl" if s < 6 else "grpo", **{"rollout/response_len_mean": 5.0 + s}) for s in range(12)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12, "re')
    assert phase_spans(rows) == [("nsr_prerl", 0, 5), ("grpo", 6, 11)]
    out = plot_run(tmp_path, tmp_path / "plots" / "p.png")  # no accuracy/entropy/behaviour columns
    assert out.stat().st_size > 20_000 and png_size(out)[0] >= 600
    assert main(["plot", str(tmp_path / "nothing")]) == 2
