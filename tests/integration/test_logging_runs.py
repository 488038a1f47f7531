"""Logging through the real sinks: a training run writes TensorBoard scalars, samples and behaviour counts that
the plot reads; the real wandb package, offline, keeps every row and the run id across a resume."""
import json

import pytest
import torch

from fastprerl.cli import main
from fastprerl.config import load_config
from fastprerl.metrics import MetricsLogger, read_metrics
from fastprerl.trainer import Trainer

from logs import FAST, TINY, png_size, row, scalars  # noqa: F401


def _wandb_history_item(key: str, value_json: str) -> bytes:
    """How a history item (key, value_json) is encoded in a run's .wandb file (protobuf HistoryItem: field 2
    `key`, field 16 `value_json`, both length-delimited strings; wandb writes 0.0 as "0")."""
    k, v = key.encode(), value_json.encode()
    return b"\x12" + bytes([len(k)]) + k + b"\x82\x01" + bytes([len(v)]) + v


def test_wandb_sink_logs_every_row_offline_and_keeps_the_run_id_on_resume(tmp_path, monkeypatch):
    """The real `wandb` package in offline mode: the run's .wandb file holds every logged value, the config
    and the run id; a resumed logger logs to the same run id."""
    import wandb  # noqa: F401  (the test extra installs it)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(tmp_path, console=False, wandb_project="proj", run_config={"optim": {"lr": 1e-6}})
    log.log(row(0, **{"groups/all_solved": 2}))
    log.log(row(1, **{"loss/policy": 0.25}))
    log.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    [first] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = first.read_bytes()
    for key, value in (("reward/mean", "0"), ("groups/all_solved", "2"), ("reward/mean", "0.1"),
                       ("loss/policy", "0.25"), ("_step", "0"), ("_step", "1")):
        assert _wandb_history_item(key, value) in data, (key, value)
    assert b"proj" in data and b"optim" in data
    again = MetricsLogger(tmp_path, console=False, wandb_project="proj", start_step=1)
    again.log(row(1, **{"reward/mean": 7.5}))
    again.close()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    # a resume within the same second as the first run goes to offline-run-<time>-<id>-1/
    files = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert any(_wandb_history_item("reward/mean", "7.5") in f.read_bytes() for f in files)


def test_training_run_logs_tensorboard_samples_and_behaviour_counts_then_plots(tmp_path):
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        Trainer(load_config(TINY, [f"run.output_dir={run}", *FAST, "logging.tensorboard=true",
                                   "logging.samples_every=2"])).train()
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert 0 <= r["reward/accuracy"] <= 1
        assert r["behaviour/execution"] > 0 and r["behaviour/transition"] >= 0 and r["behaviour/reflection"] >= 0
    tb = run / "tensorboard"
    assert [s for s, _ in scalars(tb, "reward/mean")] == [0, 1, 2, 3]
    assert [v for _, v in scalars(tb, "reward/mean")] == pytest.approx([r["reward/mean"] for r in rows])
    assert len(scalars(tb, "behaviour/execution")) == 4 and len(scalars(tb, "train/entropy")) == 4
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 2] and len(samples) == 16
    assert {"prompt", "response", "answer", "reward", "advantage"} <= set(samples[0])

    assert main(["plot", str(run)]) == 0
    png = run / "progress.png"
    width, height = png_size(png)
    assert png.stat().st_size > 20_000 and width >= 600 and height >= 800
