"""bench/gpu_memory_24gb.py (the 24 GB single-GPU measurement) runs: its CPU smoke mode goes through the real
Trainer for one NSR-PreRL and one GRPO step and writes its report, and it exits non-zero when a planted wrong
kernel result makes a step fail or a run does not fit its cap. The GPU numbers need a GPU machine."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_memory_24gb", ROOT / "bench" / "gpu_memory_24gb.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_char_tokenizer_round_trips_text_and_fills_the_vocabulary():
    tok = _script().char_tokenizer(300)
    ids = tok("Question: 12 + 7?\n")["input_ids"]
    assert len(ids) == len("Question: 12 + 7?\n") and tok.decode(ids) == "Question: 12 + 7?\n"
    assert len(tok) == 300 and tok.eos_token_id == 2 and tok.bos_token_id == 1


@pytest.mark.usefixtures("one_torch_thread")
def test_cpu_smoke_mode_runs_both_phases_through_the_trainer(tmp_path):
    rc = _script().main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--variants", "offload"])
    assert rc == 0
    recs = [json.loads(x) for x in (tmp_path / "gpu_memory_24gb_cpu_tiny.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["nsr_prerl", "grpo"]
    assert all(r["variant"] == "offload" and r["step_s"] > 0 and r["process_max_rss_gb"] > 0 for r in recs)
    assert recs[1]["rows"] > 0          # the GRPO step trained on something
    report = (tmp_path / "gpu_memory_24gb_cpu_tiny.md").read_text()
    assert "| offload | nsr_prerl | 1 |" in report and "| offload | grpo | 1 |" in report


@pytest.mark.usefixtures("one_torch_thread")
def test_a_wrong_kernel_result_makes_the_script_exit_nonzero(tmp_path, monkeypatch):
    """Planted failure: the fused loss of the torch kernels (what the trainer calls on CPU) returns NaN; the
    trainer's non-finite-loss check stops the step and the script must not report success."""
    from fastprerl.kernels import torch_logprob

    real = torch_logprob.fused_token_loss

    def wrong(*a, **k):
        loss, ent = real(*a, **k)
        return loss * float("nan"), ent

    monkeypatch.setattr(torch_logprob, "fused_token_loss", wrong)
    rc = _script().main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--variants", "offload",
                         "--grpo-steps", "0"])
    assert rc == 1
    rec = json.loads((tmp_path / "gpu_memory_24gb_cpu_tiny.jsonl").read_text().splitlines()[0])
    assert "non-finite" in rec["error"].lower() and not rec["oom"]


def test_a_run_over_its_cap_makes_the_script_exit_nonzero():
    """plan_failures: an out-of-memory under the cap, a peak above it, and a phase without a step all fail."""
    args = argparse.Namespace(variants="offload,resident", nsr_steps=1, grpo_steps=1, cap_gb=24.0)
    fails = _script().plan_failures
    ok = [{"variant": v, "phase": p, "step_s": 1.0, "peak_reserved_gb": 20.0} for v in ("offload", "resident")
          for p in ("nsr_prerl", "grpo")]
    assert fails(ok, args) == []
    oom = ok[:2] + [{"variant": "resident", "error": "OutOfMemoryError: CUDA out of memory", "oom": True}]
    assert fails(oom, args) == ["resident: does not fit the cap (out of memory): OutOfMemoryError: CUDA out of memory"]
    over = [dict(r, peak_reserved_gb=25.0) if r["variant"] == "offload" else r for r in ok]
    assert fails(over, args) == ["offload: peak 25.00 GB > cap 24.0 GB"]
    assert fails(ok[:3], args) == ["resident: no grpo step ran"]
