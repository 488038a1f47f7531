"""The checkout shadows no installed package: every way a user starts Python in the checkout's root finds Hugging
Face's `kernels` package (which transformers >= 5.25 imports when a model module loads) and fastprerl's own
kernels as `fastprerl.kernels`.

Each check is a fresh subprocess started in the checkout's root, so the root is on `sys.path` the way it is for
`python -c`, `python -m fastprerl`, `torchrun -m fastprerl` and `python -m pytest`. Hugging Face's `kernels` is
part of the test install (the `test` extra), so these checks always meet it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def run(cmd: list, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, OMP_NUM_THREADS="1", **env)
    e.pop("PYTHONPATH", None)   # only what a user has: the root through the working directory
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def test_python_c_in_the_root_imports_hf_kernels_transformers_models_and_fastprerl_kernels():
    code = ("import json, kernels, transformers.activations, fastprerl.kernels as fk; "
            "print(json.dumps({'kernels': kernels.__file__, 'has_get_kernel': hasattr(kernels, 'get_kernel'), "
            "'fastprerl_kernels': fk.__file__, 'api': fk.api.__file__, "
            "'token_loss': callable(fk.token_loss)}))")
    p = run([sys.executable, "-c", code])
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    hf = Path(got["kernels"]).resolve()
    assert hf.parent != ROOT / "kernels" and "site-packages" in hf.parts, got   # Hugging Face's, installed
    assert got["has_get_kernel"], got                                     # its public entry point
    assert Path(got["api"]).resolve() == ROOT / "kernels" / "api.py"      # our modules from the checkout
    assert got["token_loss"]


def test_the_checkout_root_is_no_regular_kernels_package():
    # the one rule that keeps the name free: a folder with an __init__.py at the root would win over the
    # installed package whenever the root is on sys.path
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_python_m_fastprerl_help():
    p = run([sys.executable, "-m", "fastprerl", "--help"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train" in p.stdout


def test_python_m_pytest_on_a_small_test_file():
    p = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_torch_kernels.py"],
            timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert " passed" in p.stdout.strip().splitlines()[-1]


def test_torchrun_two_ranks_tiny_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastprerl", "train", "configs/tiny.toml", f"run.output_dir={out}", "run.threads=1",
           "reward.workers=1", "logging.progress=false", "logging.console=false"]
    p = run(cmd, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert (out / "final").is_dir()


def test_a_built_wheel_carries_the_kernel_modules_next_to_the_package(tmp_path):
    # the wheel has no top-level kernels/ folder to point at: setup.py copies the modules into the package
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    had_build = (ROOT / "build").exists()
    p = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
             "."], timeout=300)
    if not had_build:   # setuptools builds in the checkout's build/ (gitignored); leave none behind
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
             *map(str, wheels.glob("fastprerl-*.whl"))], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    code = "import fastprerl.kernels as k, fastprerl.kernels.torch_logprob as t; print(k.api.__file__)"
    e = dict(os.environ, PYTHONPATH=str(target))
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert Path(p.stdout.splitlines()[0]).parent == target / "fastprerl" / "kernels"
