"""The adaptive phase switch in whole tiny runs: it falls where the rule says on the logged signal, and a resume
across it (stopped before and after) is exact."""
import json
import signal

import pytest

from fastprerl.state import checkpoint as ckpt

from runs import metric_rows, phases_config, run_in_process, signal_at_step

SIG = "logp/free_mean"
ADAPTIVE = ["schedule.adaptive.signal=logp/free_mean", "schedule.adaptive.min_steps=2", "schedule.adaptive.window=2",
            "schedule.adaptive.patience=1", "algo.kl_coef=0.0"]


def expected_switch(rows, min_steps, window, patience, max_steps):
    """The rule recomputed from the logged signal: 1-based step count n after which the first phase ends."""
    measured, best, stale = [], None, 0
    for n, r in enumerate(rows, start=1):
        if SIG in r:
            measured.append(r[SIG])
            if len(measured) >= window:
                avg = sum(measured[-window:]) / window
                best, stale = (avg, 0) if best is None or avg < best else (best, stale + 1)
        if (n >= min_steps and stale >= patience) or n == max_steps:
            return n
    return None


@pytest.fixture(scope="module")
def adaptive_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adaptive")
    cfg_path = phases_config(tmp, 6, 2)
    t = run_in_process(cfg_path, tmp / "run", *ADAPTIVE)
    assert t.status == "complete"
    return cfg_path, tmp / "run"


def test_a_tiny_run_switches_where_the_rule_says(adaptive_reference):
    _, run = adaptive_reference
    rows = [r for r in metric_rows(run) if r["phase"] != "eval"]
    assert len(rows) == 8   # the budget of 6 + 2 steps is kept
    n = expected_switch(rows, min_steps=2, window=2, patience=1, max_steps=6)
    assert n is not None and n < 6, f"the run did not switch before its maximum: {rows}"
    assert [r["phase"] for r in rows] == ["nsr_prerl"] * n + ["grpo"] * (8 - n)
    assert rows[n - 1]["schedule/switch_at"] == n and "plateau" in rows[n - 1]["schedule/switch_reason"]
    assert not any("schedule/switch_at" in r for i, r in enumerate(rows) if i != n - 1)


@pytest.mark.parametrize("before", [2, 1])
def test_resume_across_the_adaptive_switch_is_exact(adaptive_reference, tmp_path, monkeypatch, before):
    """Stopped `before` steps before the first GRPO step (2: the decision is still to be taken after the
    resume, from the restored history; 1: the decision is in the checkpoint), then resumed."""
    cfg_path, ref = adaptive_reference
    switch = next(r["schedule/switch_at"] for r in metric_rows(ref) if "schedule/switch_at" in r)
    run = tmp_path / "run"
    signal_at_step(monkeypatch, switch - before, [signal.SIGTERM])
    t = run_in_process(cfg_path, run, *ADAPTIVE, "run.checkpoint_every=0")
    assert t.status == "stopped" and t.step == switch - before + 1
    monkeypatch.undo()
    t = run_in_process(cfg_path, run, *ADAPTIVE, "run.resume=true")
    assert t.status == "complete"
    assert metric_rows(run) == metric_rows(ref)
    state = json.loads((ckpt.list_checkpoints(run / "checkpoints")[0][1] / ckpt.STATE).read_text())
    assert state["schedule"]["switch_at"] == switch
