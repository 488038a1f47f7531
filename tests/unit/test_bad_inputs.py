"""Every bad input stops with exit code 2 and one message naming the key, file, row or line, before any work,
and leaves the files it found byte-identical; nothing a user wrote is overwritten (issue #25)."""
import json
import logging
from pathlib import Path

import pytest

from fastprerl.cli import main
from fastprerl.config import ConfigError, load_config
from fastprerl.data import file_problems

ROOT = Path(__file__).resolve().parents[2]
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


# ------------------------------------------------------------------------------------------ data files
def problems_of(path, **kw):
    return file_problems(str(path), "train", "problem", "answer", **kw)


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"problem": "2 + 2", "answer": '], "line 2: not valid JSON"),
    ([GOOD, "", json.dumps({"problem": "2 + 2"})], "line 3: no 'answer' field (it has ['problem'])"),
    ([GOOD, json.dumps({"problem": "2 + 2", "answer": None})], "line 2: 'answer' is null"),
    ([json.dumps({"problem": None, "answer": "4"}), GOOD], "line 1: 'problem' is null"),
    ([GOOD, json.dumps({"problem": "  ", "answer": "4"})], "line 2: 'problem' is empty"),
    ([GOOD, "[1, 2]"], "line 2: expected a JSON object, got list"),
])
def test_bad_rows_are_named_by_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(ValueError) as e:
        problems_of(path)
    assert message in str(e.value) and "data.source" in str(e.value) and str(path) in str(e.value)
    assert 'data.bad_rows = "skip"' in str(e.value)


def test_bad_rows_skip_leaves_them_out_with_a_count(tmp_path, caplog):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, '{"problem": ', json.dumps({"problem": "x", "answer": None}),
                                                 json.dumps({"problem": "3 + 3", "answer": 6})])
    with caplog.at_level(logging.WARNING, logger="fastprerl"):
        out = problems_of(path, bad_rows="skip")
    assert out == [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "3 + 3", "answer": "6"}]
    assert "left out 2 of 4 records" in caplog.text and "line 2" in caplog.text and "line 3" in caplog.text


@pytest.mark.parametrize("name, text, message", [
    ("empty.jsonl", "", "holds no records (an empty file)"),
    ("blank.jsonl", "\n\n", "holds no records (an empty file)"),
    ("empty.json", "[]", "holds no records (an empty file)"),
    ("latin.jsonl", None, "is not UTF-8 text"),
    ("records.json", '[{"problem": "a", "answer": "1"}, {"problem": "b"}]', "record 2: no 'answer' field"),
    ("table.csv", "problem,answer\n1+1,2\n2+2,\n", "row 2: 'answer' is null"),
    ("broken.parquet", "not parquet", "cannot read"),
    ("fields.jsonl", '{"question": "a", "answer": "1"}\n', "data.prompt_field: column 'problem' not in"),
])
def test_unreadable_files_name_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    if text is None:
        path.write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    else:
        path.write_text(text)
    with pytest.raises(ValueError) as e:
        problems_of(path)
    assert message in str(e.value) and (str(path) in str(e.value) or "data.prompt_field" in str(e.value))


def test_a_data_folder_is_read_by_split_with_file_and_line(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [GOOD, json.dumps({"problem": "2 + 2", "answer": None})])
    write_jsonl(folder / "test.jsonl", ['{"broken'])
    with pytest.raises(ValueError, match=r"train.jsonl line 2: 'answer' is null"):
        problems_of(folder)
    write_jsonl(folder / "train.jsonl", [GOOD])
    assert problems_of(folder) == [{"prompt": "What is 1 + 1?", "answer": "2"}]
    with pytest.raises(ValueError, match=r"data.split: 'validation' is not a split of the folder"):
        file_problems(str(folder), "validation", "problem", "answer")
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds no file fastprerl reads"):
        problems_of(empty)


def test_cli_bad_data_exit_2_with_the_line_for_train_and_eval(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "data.jsonl", [GOOD, json.dumps({"problem": "2 + 2", "answer": None})])
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "train", TINY, f"run.output_dir={tmp_path / 'run'}", f"data.source={bad}", *QUICK)
    assert code == 2 and "line 2: 'answer' is null" in err and "Traceback" not in err
    code, err = run_cli(capsys, "eval", "builtin:tiny-llama", "--data", bad, "--k", "1", "--out",
                        tmp_path / "eval.json")
    assert code == 2 and "line 2: 'answer' is null" in err and str(bad) in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("source, message", [
    ("missing.jsonl", "data.source: file not found"),
    ("./missing_folder", "data.source: file not found"),
])
def test_missing_data_exit_2(tmp_path, capsys, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "train", TINY, f"run.output_dir={tmp_path / 'run'}", f"data.source={source}", *QUICK)
    assert code == 2 and message in err and source.lstrip("./") in err
    assert not (tmp_path / "run").exists()


def test_long_prompts_are_refused_or_skipped_with_a_count(tmp_path, capsys, caplog):
    long = json.dumps({"problem": "1 + " * 1500 + "1", "answer": "1501"})
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, long, GOOD])
    code, err = run_cli(capsys, "train", TINY, f"run.output_dir={tmp_path / 'run'}", f"data.source={data}", *QUICK)
    assert code == 2 and "1 of 3 prompts are longer than the 2044 tokens" in err and "problem 2" in err
    assert "data.long_prompts" in err and not (tmp_path / "run").exists()
    from fastprerl.trainer import Trainer
    with caplog.at_level(logging.WARNING, logger="fastprerl"):
        tr = Trainer(load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", f"data.source={data}", *QUICK,
                                        "data.long_prompts=skip"]))
    assert len(tr.stream.problems) == 2 and "1 of 3 prompts are longer" in caplog.text


# ------------------------------------------------------------------------------------------ objectives
@pytest.mark.parametrize("overrides, message", [
    (["rollout.samples_per_prompt=1"], "rollout.samples_per_prompt: schedule.phases[0].objectives[0] is 'nsr_prerl'"),
    (["rollout.samples_per_prompt=1", 'schedule.phases=[{ name = "p", objectives = [{ name = "psr_prerl" }] }]'],
     "rollout.samples_per_prompt: schedule.phases[0].objectives[0] is 'psr_prerl'"),
    (["rollout.samples_per_prompt=1", 'schedule.phases=[{ name = "p", objectives = [{ name = "prerl" }] }]'],
     "rollout.samples_per_prompt: schedule.phases[0].objectives[0] is 'prerl'"),
    (["rollout.samples_per_prompt=1", "algo.adv_norm=mean",
      'schedule.phases=[{ name = "p", objectives = [{ name = "grpo" }] }]'],
     "rollout.samples_per_prompt: schedule.phases[0].objectives[0] is 'grpo'"),
    (['schedule.phases=[{ name = "p", objectives = [{ name = "grpo", weight = 0.0 }] }]'],
     "schedule.phases[0].objectives: the weights of phase 'p' sum to 0"),
    (['schedule.phases=[{ name = "p", objectives = [{ name = "grpo", weight = 1.0 }, '
      '{ name = "prerl", weight = -1.0 }] }]', "schedule.allow_negative_weights=true"],
     "schedule.phases[0].objectives: the weights of phase 'p' sum to 0"),
    (['schedule.phases=[{ name = "p", objectives = [{ name = "grpo", weight = -0.5 }] }]'],
     "schedule.phases[0].objectives[0].weight: expected a weight >= 0, got -0.5"),
    (["data.bad_rows=drop"], "data.bad_rows: expected one of ['error', 'skip']"),
    (["data.long_prompts=cut"], "data.long_prompts: expected one of ['error', 'skip']"),
])
def test_objectives_that_cannot_learn_are_config_errors(tmp_path, capsys, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value)
    code, err = run_cli(capsys, "train", TINY, f"run.output_dir={tmp_path / 'run'}", *overrides)
    assert code == 2 and message in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [
    ["rollout.samples_per_prompt=1", 'schedule.phases=[{ name = "p", objectives = [{ name = "grpo" }] }]'],
    ["rollout.samples_per_prompt=1", "algo.negative_rule=reward_threshold"],
    ['schedule.phases=[{ name = "p", objectives = [{ name = "grpo", weight = 1.0 }, '
     '{ name = "prerl", weight = -0.5 }] }]', "schedule.allow_negative_weights=true"],
])
def test_objectives_that_can_learn_still_load(overrides):
    load_config(TINY, overrides)


# ------------------------------------------------------------------------------------------ rewards
def test_a_reward_function_that_always_raises_stops_the_run_with_the_error_and_sample(tmp_path, capsys):
    code, err = run_cli(capsys, "train", TINY, f"run.output_dir={tmp_path / 'run'}", *QUICK, ONE_STEP,
                        "reward.fn=user_rewards:always_raises")
    assert code == 1
    assert "the reward function failed on all 8 responses" in err and "ZeroDivisionError" in err
    assert "sample: {'prompt': 'Question: What is" in err and "Traceback" not in err


def test_reward_errors_are_counted_in_every_step_row(tmp_path):
    from fastprerl.trainer import Trainer

    tr = Trainer(load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", *QUICK, ONE_STEP,
                                    "rollout.prompts_per_step=4", "reward.fn=user_rewards:raises_on_even_answers"]))
    tr.train()
    [row] = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < row["reward/errors"] < 16 and row["reward/timeouts"] == 0
    assert row["reward/errors"] % 4 == 0   # every sample of a prompt with an even answer


# ------------------------------------------------------------------------------------------ paths and folders
@pytest.mark.parametrize("make, argv, message", [
    (lambda d: d / "missing.toml", lambda c, d: ["train", c], "config file not found"),
    (lambda d: d, lambda c, d: ["train", c], "is a folder; expected a TOML file"),
    (lambda d: (d / "cfg.json").write_text('{"a": 1}') and d / "cfg.json", lambda c, d: ["train", c],
     "invalid TOML (a .json file; expected a TOML config)"),
    (lambda d: (d / "latin.toml").write_bytes(b"# caf\xe9\n") and d / "latin.toml", lambda c, d: ["train", c],
     "not UTF-8 text"),
    (lambda d: (d / "afile").write_text("x") and d / "afile", lambda c, d: ["train", TINY, f"run.output_dir={c}"],
     "run.output_dir: "),
    (lambda d: (d / "afile").write_text("x") and d / "afile", lambda c, d: ["train", TINY, f"model.path={c}"],
     "model.path: "),
    (lambda d: d / "nomodel", lambda c, d: ["train", TINY, f"model.path={c}"], "model.path: no folder at"),
    (lambda d: d, lambda c, d: ["train", TINY, f"run.output_dir={d / 'r'}", "reward.fn=nomodule:fn"],
     "reward.fn: cannot load reward function 'nomodule:fn'"),
    (lambda d: d, lambda c, d: ["eval", c, "--data", "builtin:addition", "--k", "1"],
     "a directory without config.json, final/ or checkpoints/step_<N>/"),
    (lambda d: (d / "afile").write_text("x") and d / "afile", lambda c, d: ["eval", c, "--data", "builtin:addition"],
     "expected a model folder or a run directory, got a file"),
    (lambda d: d, lambda c, d: ["eval", "builtin:tiny-llama", "--data", d / "missing.jsonl"], "file not found"),
    (lambda d: d, lambda c, d: ["eval", "builtin:tiny-llama", "--data", d], "unknown dataset"),
    (lambda d: d, lambda c, d: ["align", c, "--data", "builtin:addition", "--n", "1"],
     "a directory without config.json, final/ or checkpoints/step_<N>/"),
    (lambda d: d, lambda c, d: ["plot", c], "no metrics.jsonl in"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 0') and d, lambda c, d: ["plot", c], "has no rows yet"),
    (lambda d: d / "missing.toml", lambda c, d: ["study", "--config", c, "--out", d / "st"], "config file not found"),
    (lambda d: d, lambda c, d: ["study", "--config", TINY, "--out", d / "st", "--report-only"],
     "--report-only: no arm of this study has finished"),
    (lambda d: d, lambda c, d: ["study", "--config", TINY, "--out", d / "st", "--reading", d / "none.txt",
                                "--report-only"], "--reading: no file at"),
    (lambda d: d, lambda c, d: ["study", "--config", TINY, "--out", d / "st", "--arms", "grpo", "--steps", "1",
                                "--align-n", "0", f"data.source={d / 'missing.jsonl'}"],
     "arm grpo seed 0: data.source: file not found"),
])
def test_wrong_paths_exit_2_with_a_message_and_change_nothing(tmp_path, capsys, make, argv, message):
    target = make(tmp_path)
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, *argv(target, tmp_path))
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_a_bad_eval_set_stops_the_start_before_an_earlier_runs_eval_log_is_touched(tmp_path, capsys):
    run = earlier_run(tmp_path / "run")
    (run / "eval.jsonl").write_text('{"step": 0, "datasets": {}}\n')
    bad = write_jsonl(tmp_path / "eval.jsonl", [GOOD, '{"problem": "2 + 2", "answer": '])
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "train", TINY, f"run.output_dir={run}", *QUICK, "eval.every=1",
                        f'eval.data=["{bad}"]')
    assert code == 2 and "line 2: not valid JSON" in err and str(bad) in err
    assert snapshot(tmp_path) == before


def test_eval_refuses_prompts_beyond_the_models_context(tmp_path, capsys):
    long = json.dumps({"problem": "1 + " * 1500 + "1", "answer": "1501"})
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, long])
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "eval", "builtin:tiny-llama", "--data", data, "--k", "1", "--out", tmp_path / "e.json")
    assert code == 2 and "1 of 2 prompts are longer than the 1792 tokens" in err and "--max-new-tokens" in err
    assert snapshot(tmp_path) == before
    code, err = run_cli(capsys, "align", "builtin:tiny-llama", "--data", data, "--n", "2", "--out", tmp_path / "a.json")
    assert code == 2 and "1 of 2 prompts are longer than" in err
    assert snapshot(tmp_path) == before
