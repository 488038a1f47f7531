"""`fastprerl study` end to end on the tiny config: arms, report numbers read back from the runs."""
import json
import os
import signal
import tomllib
from pathlib import Path

import pytest

from fastprerl.cli import main
from fastprerl.study import arm_phases
from fastprerl.study.stats import cell, moving_average, paired, steps_to_reach

ROOT = Path(__file__).resolve().parents[2]


def test_steps_to_reach_uses_full_trailing_windows():
    r = [0.0, 1.0, 1.0, 1.0, 0.0, 0.2, 1.0]
    assert moving_average(r, 3) == pytest.approx([0.0, 0.5, 2 / 3, 1.0, 2 / 3, 0.4, 0.4])
    assert steps_to_reach(r, 0.6, w=3) == 2     # the first full window (steps 0-2) averages 2/3
    assert steps_to_reach(r, 0.9, w=3) == 3
    assert steps_to_reach(r, 1.1, w=3) is None


def test_arm_schedules():
    assert [(p["name"], p["steps"]) for p in arm_phases("dsrl", 40, 10)] == [("nsr_prerl", 10), ("grpo", 30)]
    assert [(p["name"], p["steps"]) for p in arm_phases("psr_prerl", 40, 10)] == [("psr_prerl", 40)]
    assert [(p["name"], p["steps"]) for p in arm_phases("dsrl_adaptive", 40, 10, 25)] == [("nsr_prerl", 25),
                                                                                          ("grpo", 15)]


def test_spread_cells_and_pairs():
    assert cell([0.5, 0.7, 0.6]) == "0.600 [0.500, 0.700]"
    assert cell([0.25]) == "0.250" and cell([None, None]) == "-"
    assert cell([3, None, 5], ".1f", of=3) == "4.0 [3.0, 5.0] (2/3)" and cell([None], "d", of=1) == "- (0/1)"
    runs = {"grpo": {0: {"eval_avg": [0.2, 0.5]}, 1: {"eval_avg": [0.2, 0.75]}},
            "dsrl": {0: {"eval_avg": [0.2, 0.625]}, 2: {"eval_avg": [0.2, 0.9]}}}
    assert paired(runs, "dsrl") == [(0, 0.5, 0.625, 0.125)]   # seed 0 only: the one both arms ran


TINY_STUDY = ["--config", str(ROOT / "configs" / "tiny.toml"), "--arms", "grpo,dsrl,dsrl_adaptive", "--steps", "4",
              "--warmup", "1", "--adaptive-max", "3", "--eval-every", "2", "--seeds", "0,1", "--checkpoint-every", "2",
              "eval.n_problems=2", "eval.k=2", "logging.console=false", "reward.fn=fake_rewards:parity_reward",
              "schedule.adaptive.min_steps=1", "schedule.adaptive.window=1", "schedule.adaptive.patience=1"]


def test_study_runs_arms_per_seed_and_writes_the_report(tmp_path, one_torch_thread, capsys):
    out, doc = tmp_path / "runs", tmp_path / "docs" / "RESULTS.md"
    args = ["study", *TINY_STUDY, "--align-n", "1", "--out", str(out), "--doc", str(doc)]
    assert main(args) == 0
    study = json.loads((out / "study.json").read_text())
    assert set(study["arms"]) == {"grpo", "dsrl", "dsrl_adaptive"}
    assert set(study["alignment"]) == {"base"} | {f"{a}/seed{s}" for a in study["arms"] for s in (0, 1)}
    rewards = {}
    for arm, phases in (("grpo", ["grpo"]), ("dsrl", ["nsr_prerl", "grpo"]), ("dsrl_adaptive", ["nsr_prerl", "grpo"])):
        for seed in (0, 1):
            s = study["arms"][arm][str(seed)]
            rows = [json.loads(x) for x in (out / arm / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in rows if r["phase"] != "eval"]
            assert s["phases"] == phases and s["steps"] == 4
            assert s["reward"] == [r["reward/mean"] for r in train]
            assert s["eval_steps"] == [0, 2, 4]
            rewards[arm, seed] = s["reward"]
            assert not (out / arm / f"seed{seed}" / "checkpoints").exists()   # deleted once the arm finished
            cfg = tomllib.loads((out / arm / f"seed{seed}" / "config.toml").read_text())
            assert cfg["run"]["seed"] == seed
            assert cfg["schedule"]["adaptive"]["signal"] == ("logp/free_mean" if arm == "dsrl_adaptive" else "")
    assert rewards["grpo", 0] != rewards["grpo", 1]   # another seed, another run
    assert study["arms"]["dsrl"]["0"]["switch"] == 1
    adaptive = study["arms"]["dsrl_adaptive"]["0"]
    assert adaptive["switch"] in (2, 3) and adaptive["switch_reason"]
    text = doc.read_text()
    g0, g1 = (study["arms"]["grpo"][s]["eval_avg"][-1] for s in ("0", "1"))
    d0 = study["arms"]["dsrl"]["0"]["eval_avg"][-1]
    mean = (g0 + g1) / 2
    for needle in ("| grpo | 2 | ", f"{mean:.3f} [{min(g0, g1):.3f}, {max(g0, g1):.3f}]",
                   f"| 0 | {g0:.3f} | {d0:.3f} | {d0 - g0:+.3f} |", "## Where the adaptive switch fell",
                   "## Gradient alignment", "study/RESULTS/compare.png", "study/RESULTS/dsrl_seed0.png"):
        assert needle in text, needle
    assert (doc.parent / "study" / "RESULTS" / "compare.png").stat().st_size > 10_000
    # a second call skips the finished arms and only rebuilds the report
    before = (out / "grpo" / "seed0" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("already finished with these settings, skipped") == 6
    # a finished arm of another budget is not passed off as this one
    assert main([("5" if a == "4" else a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "arm grpo seed 0" in err and "trained with other settings" in err and "schedule" in err
    assert (out / "grpo" / "seed0" / "metrics.jsonl").read_bytes() == before


def test_a_stopped_study_resumes_each_arm_where_it_stopped(tmp_path, one_torch_thread, monkeypatch, capsys):
    """SIGTERM in step 2 of the first arm: the study stops after that step's checkpoint; the same command
    continues it from step 3 and gives the metrics of a study that never stopped."""
    from fastprerl.trainer import Trainer

    common = ["study", *TINY_STUDY[:2], "--arms", "grpo", "--steps", "4", "--eval-every", "2", "--seeds", "0",
              "--checkpoint-every", "1", "--align-n", "0", *TINY_STUDY[-6:]]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(common + ["--out", str(ref), "--doc", str(tmp_path / "ref.md")]) == 0
    real = Trainer.train_step

    def train_step(self, phase):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, phase)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main(common + ["--out", str(run), "--doc", str(tmp_path / "run.md")]) == 130
    assert "grpo seed 0 stopped; run the same command again" in capsys.readouterr().err
    assert not (run / "grpo" / "seed0" / "final").exists()
    assert (run / "grpo" / "seed0" / "checkpoints" / "step_3").is_dir()   # kept while the arm is unfinished
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)   # no --doc: the report goes to docs/results/<config name>.md, never the overview
    assert main(common + ["--out", str(run)]) == 0
    assert "# " in (tmp_path / "docs" / "results" / "tiny.md").read_text()
    assert not (tmp_path / "docs" / "RESULTS.md").exists()
    strip = lambda d: [{k: v for k, v in json.loads(x).items() if not k.startswith("perf/")}  # noqa: E731
                       for x in (d / "grpo" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert strip(run) == strip(ref)
    assert float((run / "grpo" / "seed0" / "wall_s.txt").read_text()) > 0


def test_study_rejects_a_bad_arm_warmup_and_seeds(capsys):
    assert main(["study", "--arms", "grpo,ppo"]) == 2
    assert "unknown arm 'ppo'" in capsys.readouterr().err
    assert main(["study", "--steps", "5", "--warmup", "5"]) == 2
    assert "--warmup" in capsys.readouterr().err
    assert main(["study", "--steps", "5", "--warmup", "2", "--adaptive-max", "5"]) == 2
    assert "--adaptive-max" in capsys.readouterr().err
    assert main(["study", "--seeds", "0,x"]) == 2
    assert "--seeds: expected comma-separated integers" in capsys.readouterr().err
    assert main(["study", "--seeds", "1,1"]) == 2
    assert "--seeds: expected distinct" in capsys.readouterr().err
