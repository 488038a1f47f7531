"""Exact resume of whole runs: after SIGKILL at random moments, across a data-epoch boundary, past corrupted
newest checkpoints, with offloaded optimizer state and evaluation on; the refusal of a changed config; the
SIGTERM and SIGINT stops. Each compares with one uninterrupted run (the `reference` fixture)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastprerl.cli import main
from fastprerl.config import load_config
from fastprerl.optim import CPUOffloadAdamW
from fastprerl.state import checkpoint as ckpt
from fastprerl.trainer import Trainer

from runs import (
    FAST,
    ROOT,
    TESTS,
    assert_same_weights,
    metric_rows,
    phases_config,
    run_in_process,
    signal_at_step,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4+4-step run with a checkpoint after every step (the newest 3 kept)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg_path = phases_config(tmp, 4, 4)
    t = run_in_process(cfg_path, tmp / "run")
    assert t.status == "complete"
    return cfg_path, tmp / "run"


# ---------------------------------------------------------------------------------------------- resume
def test_checkpoint_contents_and_keep_last(reference):
    _, run = reference
    root = run / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [8, 7, 6]
    assert (root / "step_6" / ckpt.REF_MODEL).is_file()
    state = json.loads((root / "step_6" / ckpt.STATE).read_text())
    assert state["step"] == 6 and state["phase"] == "grpo" and state["data"]["pos"] == 12
    assert all(ckpt.verify(p) is None for _, p in ckpt.list_checkpoints(root))
    assert_same_weights(root / "step_8", run / "final")
    assert len(metric_rows(run)) == 8


def test_sigkill_at_random_moments_then_resume_is_exact(reference, tmp_path):
    """SIGKILL a training process at random moments (during startup, mid-step, during a checkpoint write);
    every visible checkpoint is complete, every resume starts from the newest one, and the run finished after
    the last kill has the same metrics and bit-identical final weights as the uninterrupted run."""
    cfg_path, ref = reference
    run = tmp_path / "run"
    root = run / "checkpoints"
    seed = int(os.environ.get("FASTPRERL_KILL_SEED", "20240601"))
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "fastprerl.cli", "train", str(cfg_path), f"run.output_dir={run}", *FAST, "--resume"]

    def writing(pid):
        return root.is_dir() and any(p.name.endswith(f".tmp-{pid}") for p in root.iterdir())

    kills, history, resumed = [], [], []
    for trial, mode in enumerate(["startup", "write", "step", "write", "step"]):
        newest = ckpt.list_checkpoints(root)
        expect = f"resuming from {newest[0][1]}" if newest else "no checkpoint"
        log_path = tmp_path / f"trial{trial}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=TESTS, env=env, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            if mode == "startup":
                time.sleep(rng.uniform(0.5, 6.0))
            else:
                def ready():
                    return writing(proc.pid) if mode == "write" else "wrote" in log_path.read_text()
                while proc.poll() is None and not ready():
                    assert time.monotonic() - t0 < 120, f"trial {trial} ({mode}): nothing happened in 120 s"
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.02 if mode == "write" else 0.6))
            assert proc.poll() is None, (f"trial {trial} ({mode}) ended by itself before the kill "
                                         f"(seed {seed}):\n{log_path.read_text()[-3000:]}")
            proc.kill()
            proc.wait()
            kills.append((mode, writing(proc.pid)))   # (mode, killed while a checkpoint was being written)
        finally:
            proc.kill()
            proc.wait()
        out = log_path.read_text()
        history.append(f"trial {trial} ({mode}): killed after {time.monotonic() - t0:.1f} s; newest checkpoint "
                       f"before: {newest[0][0] if newest else None}")
        if "resuming from" in out or "no checkpoint" in out:
            assert expect in out, f"trial {trial}: expected {expect!r} (seed {seed}):\n{out[-3000:]}"
        resumed.append("resuming from" in out)
        for _, path in ckpt.list_checkpoints(root):  # no torn checkpoint is ever visible under its name
            assert ckpt.verify(path) is None, f"trial {trial} ({mode}, seed {seed}): {path}: {ckpt.verify(path)}"
    # trials 3 and 4 start after trial 2 saw a checkpoint written: both must have resumed from one
    assert resumed[3:] == [True, True], f"a trial after the first checkpoint did not resume (seed {seed}): {history}"
    assert ckpt.list_checkpoints(root), f"no trial got as far as a checkpoint (seed {seed}): {history}"
    assert any(mid_write for _, mid_write in kills), f"no kill landed during a checkpoint write: {history}"

    t = run_in_process(cfg_path, run, "run.resume=true")
    assert t.status == "complete" and t.step == 8
    assert metric_rows(run) == metric_rows(ref)
    assert_same_weights(run / "final", ref / "final")


def test_resume_across_a_data_epoch_boundary_is_exact(tmp_path):
    """data.size = 5 with 2 prompts per step: step 2 (the third) takes the last problem of epoch 0 and the first
    of epoch 1 (reshuffled with the epoch's seed). A run resumed from checkpoint step_2 (2 steps done) crosses
    that boundary and gives the uninterrupted run's prompts, metrics and final weights."""
    cfg_path = phases_config(tmp_path, 2, 2)
    extra = ("data.size=5", "run.keep_checkpoints=5", "logging.samples_every=1")
    ref = run_in_process(cfg_path, tmp_path / "ref", *extra)
    assert ref.status == "complete"
    def state(n):
        return json.loads((tmp_path / "ref" / "checkpoints" / f"step_{n}" / ckpt.STATE).read_text())["data"]

    assert state(2) == {"epoch": 0, "pos": 4} and state(3) == {"epoch": 1, "pos": 1}
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", run)
    for name in ("final", "checkpoints/step_4", "checkpoints/step_3"):
        shutil.rmtree(run / name)
    t = run_in_process(cfg_path, run, *extra, "run.resume=true")
    assert t.status == "complete" and t.step == 4
    assert metric_rows(run) == metric_rows(tmp_path / "ref")
    def samples(r):
        return [(x["step"], x["prompt"], x["response"]) for x in map(json.loads, (r / "samples.jsonl").read_text()
                                                                              .splitlines())]

    assert samples(run) == samples(tmp_path / "ref")
    step2 = sorted({p for s, p, _ in samples(run) if s == 2})
    assert len(step2) == 2   # two different problems: the end of epoch 0 and the start of epoch 1
    assert_same_weights(run / "final", tmp_path / "ref" / "final")


def test_corrupted_newest_checkpoints_are_skipped_and_resume_is_exact(reference, tmp_path, caplog):
    cfg_path, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "final")
    root = run / "checkpoints"
    weights = root / "step_8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])          # truncated
    opt = root / "step_7" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[-100] ^= 0xFF                                          # one corrupted byte
    opt.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="fastprerl"):
        t = run_in_process(cfg_path, run, "run.resume=true")
    assert f"checkpoint {root / 'step_8'} is incomplete or corrupted" in caplog.text
    assert f"checkpoint {root / 'step_7'} is incomplete or corrupted" in caplog.text
    assert f"resuming from {root / 'step_6'}" in caplog.text
    assert (root / "step_8.corrupt").is_dir() and (root / "step_7.corrupt").is_dir()
    assert t.status == "complete"
    assert metric_rows(run) == metric_rows(ref)
    assert_same_weights(run / "final", ref / "final")
    assert all(ckpt.verify(p) is None for _, p in ckpt.list_checkpoints(root))


def test_resume_with_offloaded_optimizer_state_and_evaluation_turned_on_is_exact(reference, tmp_path):
    """Where the optimizer state lives and what is evaluated do not define the run: a resume that changes them
    is accepted (the optimizer state saved by AdamW loads into the offloaded one) and trains exactly as the
    uninterrupted run."""
    cfg_path, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for name in ("final", "checkpoints/step_8", "checkpoints/step_7"):
        shutil.rmtree(run / name)
    t = run_in_process(cfg_path, run, "run.resume=true", "optim.offload_optimizer_state=true", "eval.every=100",
                       "eval.n_problems=2", "eval.k=1", "eval.max_new_tokens=2")
    assert t.status == "complete" and isinstance(t.optimizer, CPUOffloadAdamW)
    rows = metric_rows(run)
    assert [r["step"] for r in rows if r["phase"] == "eval"] == [8]
    assert [r for r in rows if r["phase"] != "eval"] == metric_rows(ref)
    assert_same_weights(run / "final", ref / "final")


def test_resume_refuses_a_changed_config_and_a_fresh_start_refuses_old_checkpoints(reference, capsys):
    cfg_path, ref = reference
    before = sorted(p.name for p in (ref / "checkpoints").iterdir())
    with pytest.raises(ckpt.ResumeError, match=r"optim.lr: 0.0001 -> 0.0002.*schedule"):
        Trainer(load_config(cfg_path, [f"run.output_dir={ref}", *FAST, "run.resume=true", "optim.lr=2e-4"]))
    base = ["train", str(cfg_path), f"run.output_dir={ref}", *FAST]
    assert main(base + ["--resume", "model.path=builtin:tiny-qwen2"]) == 2
    assert "model.path: 'builtin:tiny-llama' -> 'builtin:tiny-qwen2'" in capsys.readouterr().err
    assert main(base) == 2
    assert "already holds checkpoints (newest: step_8); pass --resume" in capsys.readouterr().err
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == before


# ---------------------------------------------------------------------------------------------- signals
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(reference, tmp_path, monkeypatch):
    cfg_path, ref = reference
    run = tmp_path / "run"
    signal_at_step(monkeypatch, 2, [signal.SIGTERM])
    t = run_in_process(cfg_path, run, "run.checkpoint_every=0")   # only the signal writes a checkpoint
    assert t.status == "stopped" and t.step == 3
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [3]
    assert not (run / "final").exists()
    monkeypatch.undo()
    t = run_in_process(cfg_path, run, "run.resume=true")
    assert t.status == "complete"
    assert metric_rows(run) == metric_rows(ref)
    assert_same_weights(run / "final", ref / "final")


def test_second_sigint_abandons_the_step_at_once_and_exits_4(reference, tmp_path, monkeypatch, caplog):
    cfg_path, _ = reference
    run = tmp_path / "run"
    signal_at_step(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
    handler = signal.getsignal(signal.SIGINT)
    threads = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="fastprerl"):
            assert main(["train", str(cfg_path), f"run.output_dir={run}", *FAST]) == 4
    finally:
        torch.set_num_threads(threads)
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 1]
    assert [r["step"] for r in metric_rows(run)] == [0, 1]
    assert f"SIGINT again: abandoned step 2; newest checkpoint: {run / 'checkpoints' / 'step_2'}" in caplog.text
    assert signal.getsignal(signal.SIGINT) is handler
