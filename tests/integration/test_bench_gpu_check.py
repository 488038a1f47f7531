"""bench/gpu_check.sh, the prepared device run, in its CPU smoke mode (tiny shapes, Triton interpreter): every
step runs and passes and every result lands in the output folder. bench/gpu_check.py, its first step, exits
non-zero on a planted failure: a wrong kernel result (log-probs off by 0.01), and a section that raises. Each
run is a fresh process (the smoke mode sets TRITON_INTERPRET=1 before triton is imported)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PLANTS = {
    # a wrong kernel result: every log-prob of the Triton path 0.01 too high
    "wrong_logp": """
        import fastprerl.kernels.triton_logprob as tlp
        real = tlp.triton_token_logprobs
        def wrong(*a, **k):
            logp, ent, lse = real(*a, **k)
            return logp + 0.01, ent, lse
        tlp.triton_token_logprobs = wrong
    """,
    # a section that raises: the matmul-rate section's torch.mm
    "raising_section": """
        import torch
        def broken(*a, **k):
            raise RuntimeError("planted failure")
        torch.mm = broken
    """,
}


def _run(tmp_path, plant):
    code = textwrap.dedent("""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, {bench!r})
    """).format(bench=str(ROOT / "bench")) + textwrap.dedent(PLANTS[plant]) + textwrap.dedent("""
        import gpu_check
        sys.exit(gpu_check.main(["--cpu-smoke", "--out", {out!r}]))
    """).format(out=str(tmp_path))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    summary = [json.loads(x) for x in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    return res, next(r for r in summary if r.get("section") == "summary")["failures"]


@pytest.mark.timeout(1800)   # ~5 min on quiet cores, 11 at a load average of 5; the script's own limit is 1800 s
def test_the_device_script_runs_every_step_in_cpu_smoke_mode(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", str(out)],
                         capture_output=True, text=True, env={**env, "PYTHON": sys.executable}, timeout=1800)
    logs = "".join(p.read_text()[-3000:] for p in sorted(out.glob("*.log")))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:] + logs
    for name in ("gpu_check", "gpu_memory_24gb", "onepass"):
        assert f"{name}: exit 0" in res.stdout
    report = (out / "gpu_check.md").read_text()
    for section in ("1. correctness", "2. matmul rate", "3. benchmark", "## summary"):
        assert section in report
    assert "| fastprerl_triton |" in report and "all checks passed" in report
    summary = next(json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines()
                   if json.loads(x).get("section") == "summary")
    assert summary["failures"] == []
    assert (out / "gpu_memory_24gb_cpu_tiny.md").is_file() and (out / "onepass_cpu_quick.md").is_file()
    assert "| quantity | value | target |" in res.stdout       # the short table, printed last


@pytest.mark.parametrize("plant", ["wrong_logp", "raising_section"])
def test_a_planted_failure_makes_it_exit_nonzero(tmp_path, plant):
    res, failures = _run(tmp_path, plant)
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-3000:]
    if plant == "wrong_logp":
        assert any(f.startswith("correctness:") and "failed" in f for f in failures), failures
        assert any(f.startswith("benchmark fastprerl_triton:") and "logp" in f for f in failures), failures
    else:
        assert any(f.startswith("2. matmul rate") and "planted failure" in f for f in failures), failures
