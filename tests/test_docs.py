"""The README's quick-start commands stay true to what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_lines():
    return [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command():
    test_cmds = [ln for ln in _ci_lines() if "python -m pytest" in ln]
    assert len(test_cmds) == 1
    assert test_cmds[0] in (ROOT / "README.md").read_text()


def test_ci_runs_the_vllm_tests_after_the_main_suite():
    lines = _ci_lines()
    main = next(i for i, ln in enumerate(lines) if "python -m pytest" in ln)
    assert lines[main + 1:] == ["bash tests/vllm_env.sh"]
    assert (ROOT / "tests" / "vllm_env.sh").is_file()


def test_readme_main_command_runs_the_shipped_dsrl_config():
    readme = (ROOT / "README.md").read_text()
    assert "fastprerl train configs/dsrl.toml" in readme
    assert (ROOT / "configs" / "dsrl.toml").exists()
