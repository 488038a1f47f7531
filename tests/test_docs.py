"""The README's quick-start commands stay true to what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    test_cmd = ci_lines[-1].strip()
    assert "pytest" in test_cmd
    assert test_cmd in (ROOT / "README.md").read_text()


def test_readme_main_command_runs_the_shipped_dsrl_config():
    readme = (ROOT / "README.md").read_text()
    assert "fastprerl train configs/dsrl.toml" in readme
    assert (ROOT / "configs" / "dsrl.toml").exists()
