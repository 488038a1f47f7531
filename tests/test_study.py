"""`fastprerl study` end to end on the tiny config: arms, report numbers read back from the runs."""
import json
from pathlib import Path

import pytest

from fastprerl.cli import main
from fastprerl.study import arm_phases, moving_average, steps_to_reach

ROOT = Path(__file__).resolve().parents[1]


def test_steps_to_reach_uses_full_trailing_windows():
    r = [0.0, 1.0, 1.0, 1.0, 0.0, 0.2, 1.0]
    assert moving_average(r, 3) == pytest.approx([0.0, 0.5, 2 / 3, 1.0, 2 / 3, 0.4, 0.4])
    assert steps_to_reach(r, 0.6, w=3) == 2     # the first full window (steps 0-2) averages 2/3
    assert steps_to_reach(r, 0.9, w=3) == 3
    assert steps_to_reach(r, 1.1, w=3) is None


def test_arm_schedules():
    assert [(p["name"], p["steps"]) for p in arm_phases("dsrl", 40, 10)] == [("nsr_prerl", 10), ("grpo", 30)]
    assert [(p["name"], p["steps"]) for p in arm_phases("psr_prerl", 40, 10)] == [("psr_prerl", 40)]


def test_study_runs_arms_and_writes_the_report(tmp_path, one_torch_thread, capsys):
    out, doc = tmp_path / "runs", tmp_path / "docs" / "RESULTS.md"
    rc = main(["study", "--config", str(ROOT / "configs" / "tiny.toml"), "--arms", "grpo,dsrl", "--steps", "3",
               "--warmup", "1", "--eval-every", "2", "--align-n", "1", "--out", str(out), "--doc", str(doc),
               "eval.n_problems=2", "eval.k=2", "logging.console=false", "reward.fn=fake_rewards:parity_reward"])
    assert rc == 0
    study = json.loads((out / "study.json").read_text())
    assert set(study["arms"]) == {"grpo", "dsrl"}
    assert set(study["alignment"]) == {"base", "grpo", "dsrl"}
    for arm, phases in (("grpo", ["grpo"]), ("dsrl", ["nsr_prerl", "grpo"])):
        s = study["arms"][arm]
        rows = [json.loads(x) for x in (out / arm / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["phase"] != "eval"]
        assert s["phases"] == phases and s["steps"] == 3
        assert s["reward"] == [r["reward/mean"] for r in train]
        assert s["eval_steps"] == [0, 2, 3]
    assert study["arms"]["dsrl"]["switch"] == 1
    text = doc.read_text()
    for needle in ("| grpo |", "| dsrl |", "## Gradient alignment", "study/compare.png", "study/dsrl.png"):
        assert needle in text
    assert (doc.parent / "study" / "compare.png").stat().st_size > 10_000
    # a second call skips the finished arms and only rebuilds the report
    args = ["study", "--config", str(ROOT / "configs" / "tiny.toml"), "--arms", "grpo,dsrl", "--steps", "3",
            "--warmup", "1", "--eval-every", "2", "--align-n", "1", "--out", str(out), "--doc", str(doc),
            "eval.n_problems=2", "eval.k=2", "logging.console=false", "reward.fn=fake_rewards:parity_reward"]
    before = (out / "grpo" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("already finished with these settings, skipped") == 2
    # a finished arm of another budget is not passed off as this one
    assert main([("4" if a == "3" else a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "arm grpo" in err and "trained with other settings" in err and "schedule" in err
    assert (out / "grpo" / "metrics.jsonl").read_bytes() == before


def test_study_rejects_a_bad_arm_and_warmup(capsys):
    assert main(["study", "--arms", "grpo,ppo"]) == 2
    assert "unknown arm 'ppo'" in capsys.readouterr().err
    assert main(["study", "--steps", "5", "--warmup", "5"]) == 2
    assert "--warmup" in capsys.readouterr().err
