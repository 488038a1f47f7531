"""Every bad input stops with exit code 2 and one message naming the key, file, row or line, before any work,
and leaves the files it found byte-identical; nothing a user wrote is overwritten (issue #25)."""
import json
import logging
from pathlib import Path

import pytest

from fastprerl.cli import main
from fastprerl.config import ConfigError, load_config
from fastprerl.data import file_problems

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
QUICK = ("rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "logging.view_gap=false", "logging.progress=false",
         "logging.console=false")
ONE_STEP = 'schedule.phases=[{ name = "grpo", steps = 1, objectives = [{ name = "grpo", weight = 1.0 }] }]'


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> tuple:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def earlier_run(folder: Path) -> Path:
    """A run folder as an earlier run and its user left it: a config with comments, metrics, a note."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text("# my notes on this experiment\n" + TINY.read_text())
    (folder / "metrics.jsonl").write_text('{"step": 0, "reward/mean": 0.5}\n')
    (folder / "notes.md").write_text("keep me\n")
    return folder


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"problem": "What is 1 + 1?", "answer": "2"})


# ------------------------------------------------------------------------------------------ the user's files
def test_the_config_file_in_the_output_folder_is_never_overwritten_by_overrides(tmp_path, capsys):
    run = earlier_run(tmp_path / "myexp")
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "train", run / "config.toml", f"run.output_dir={run}", "optim.lr=3e-3")
    assert code == 2
    assert "run.output_dir" in err and "optim.lr: 0.0001 -> 0.003" in err and "never overwritten" in err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_a_run_started_from_the_config_file_in_its_output_folder_leaves_it_as_it_is(tmp_path, capsys):
    run = tmp_path / "myexp"
    run.mkdir()
    text = ("# my experiment: one quick step\n" + TINY.read_text().split("[[schedule.phases]]")[0]
            + '[[schedule.phases]]\nname = "grpo"  # just one\nsteps = 1\n'
              'objectives = [{ name = "grpo", weight = 1.0 }]\n')
    text = text.replace("max_new_tokens = 8", "max_new_tokens = 4").replace("prompts_per_step = 4",
                                                                            "prompts_per_step = 2")
    (run / "config.toml").write_text(text)
    code, err = run_cli(capsys, "train", run / "config.toml", f"run.output_dir={run}")
    assert code == 0, err
    assert (run / "config.toml").read_text() == text
    assert (run / "metrics.jsonl").is_file() and not (run / "previous").exists()


def test_a_different_config_toml_in_the_output_folder_is_moved_aside_with_the_earlier_runs_files(tmp_path):
    from fastprerl.trainer import Trainer

    run = earlier_run(tmp_path / "run")
    before = snapshot(run)
    Trainer(load_config(TINY, [f"run.output_dir={run}", *QUICK]))
    [previous] = (run / "previous").iterdir()
    assert (previous / "config.toml").read_bytes() == before["config.toml"]
    assert (previous / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert (run / "notes.md").read_bytes() == before["notes.md"]
    assert (run / "config.toml").read_bytes() != before["config.toml"]


def test_a_lone_config_toml_of_another_run_is_kept_too(tmp_path):
    from fastprerl.trainer import Trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("# somebody's config\n")
    Trainer(load_config(TINY, [f"run.output_dir={run}", *QUICK]))
    [previous] = (run / "previous").iterdir()
    assert (previous / "config.toml").read_text() == "# somebody's config\n"


def test_a_failed_start_leaves_the_folder_as_it_found_it(tmp_path, capsys):
    run = earlier_run(tmp_path / "run")
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, '{"problem": "2 + 2", "answer": '])
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "train", TINY, f"run.output_dir={run}", f"data.source={bad}", *QUICK)
    assert code == 2 and "line 2: not valid JSON" in err
    assert snapshot(tmp_path) == before
    code, err = run_cli(capsys, "train", TINY, f"run.output_dir={tmp_path / 'new'}", f"data.source={bad}", *QUICK)
    assert code == 2 and not (tmp_path / "new").exists()
