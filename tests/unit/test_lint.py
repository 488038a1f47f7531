"""The code passes ruff with the project's configuration (pyproject.toml: pyflakes, pycodestyle, import order,
bugbear, pyupgrade). ruff is part of the test install."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-2000:]


def test_ruff_reads_the_project_configuration(tmp_path):
    # the check above can fail: an unused import in a file under the project's configuration is reported
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                        str(bad)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "F401" in p.stdout, p.stdout + p.stderr
