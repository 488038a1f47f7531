"""bench/gpu_memory_24gb.py (the 24 GB single-GPU measurement) runs: its CPU smoke mode goes through the real
Trainer for one NSR-PreRL and one GRPO step and writes its report. The GPU numbers need a GPU machine."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
