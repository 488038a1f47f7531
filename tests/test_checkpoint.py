"""Checkpoints: atomic writes, verification, exact resume (also after SIGKILL at random moments), refusal of a
changed config, SIGINT/SIGTERM stops, non-finite stops."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fastprerl.objectives as objectives
import fastprerl.trainer as trainer_mod
from fastprerl.state import checkpoint as ckpt
from fastprerl.state import resume
from fastprerl.cli import main
from fastprerl.config import load_config
from fastprerl.models import tiny_config
from fastprerl.optim import CPUOffloadAdamW
from fastprerl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY = ROOT / "configs" / "tiny.toml"
# small rollouts so that a step takes well under a second; one checkpoint per step, the newest 3 kept; a KL
# reference model, so that its state (re-synced at the phase switch) is part of every exactness check
FAST = ["reward.fn=fake_rewards:parity_reward", "run.threads=1", "run.checkpoint_every=1", "run.keep_checkpoints=3",
        "algo.kl_coef=0.05",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6",
        "logging.console=false", "logging.view_gap=false"]


def phases_config(tmp_path, first: int, second: int) -> Path:
    """configs/tiny.toml with phases of `first` and `second` steps (dotted overrides cannot reach phases)."""
    text = TINY.read_text()
    assert text.count("steps = 2") == 2, "tiny.toml changed: update phases_config"
    text = text.replace("steps = 2", f"steps = {first}", 1).replace("steps = 2", f"steps = {second}", 1)
    path = tmp_path / f"tiny_{first}_{second}.toml"
    path.write_text(text)
    return path


def metric_rows(run_dir: Path):
    """metrics.jsonl rows without the timing fields (perf/*), which differ from run to run."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def assert_same_weights(dir_a: Path, dir_b: Path):
    a, b = load_file(str(Path(dir_a) / "model.safetensors")), load_file(str(Path(dir_b) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weight {k} differs between {dir_a} and {dir_b}"


def run_in_process(cfg_path: Path, run_dir: Path, *extra, fast=FAST) -> Trainer:
    threads = torch.get_num_threads()
    try:
        t = Trainer(load_config(cfg_path, [f"run.output_dir={run_dir}", *fast, *extra]))
        t.status = t.train()
    finally:
        torch.set_num_threads(threads)
    return t


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4+4-step run with a checkpoint after every step (the newest 3 kept)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg_path = phases_config(tmp, 4, 4)
    t = run_in_process(cfg_path, tmp / "run")
    assert t.status == "complete"
    return cfg_path, tmp / "run"


# ---------------------------------------------------------------------------------------------- unit level
def tiny_model_and_optimizer():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    model(input_ids=torch.randint(3, 300, (2, 7))).logits.sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def save(root, step, model, opt, sched, keep=2):
    return ckpt.save_checkpoint(root, step, model=model, optimizer=opt, scheduler=sched, keep=keep,
                                state={"step": step, "data": {"epoch": 0, "pos": step}}, config={"a": {"b": 1}},
                                config_toml="[a]\nb = 1\n")


def test_save_is_atomic_verified_pruned_and_loadable_by_transformers(tmp_path):
    model, opt, sched = tiny_model_and_optimizer()
    root = tmp_path / "checkpoints"
    root.mkdir()
    stale = root / ".step_9.tmp-12345"  # a write that a killed process never finished
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    for step in (1, 2, 3):
        path = save(root, step, model, opt, sched, keep=2)
        assert path == root / f"step_{step}" and ckpt.verify(path) is None
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 2]
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]  # stale temp folder removed
    manifest = json.loads((root / "step_3" / ckpt.MANIFEST).read_text())
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"} <= set(manifest["files"])
    assert ckpt.REF_MODEL not in manifest["files"]
    again = AutoModelForCausalLM.from_pretrained(root / "step_3")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest", "missing_file"])
def test_damaged_checkpoint_is_detected_and_skipped(tmp_path, damage, caplog):
    model, opt, sched = tiny_model_and_optimizer()
    root = tmp_path / "checkpoints"
    save(root, 1, model, opt, sched)
    bad = save(root, 2, model, opt, sched)
    target = bad / ("optimizer.pt" if damage == "flip_byte" else "model.safetensors")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (bad / ckpt.MANIFEST).unlink()
    else:
        target.unlink()
    expected = {"truncate": "truncated", "flip_byte": "corrupted", "no_manifest": "did not finish",
                "missing_file": "missing"}[damage]
    assert expected in ckpt.verify(bad)
    with caplog.at_level("WARNING", logger="fastprerl"):
        good, skipped = ckpt.find_latest_valid(root)
    assert good == root / "step_1" and [p for p, _ in skipped] == [bad]
    assert str(bad) in caplog.text


def test_load_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = tiny_model_and_optimizer()
    random.seed(5)
    torch.manual_seed(5)
    path = save(tmp_path, 1, model, opt, sched)
    expected_draws = (random.random(), torch.rand(3))
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()

    fresh, opt2, sched2 = tiny_model_and_optimizer()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    random.seed(99)
    torch.manual_seed(99)
    state = resume.load_checkpoint(path, model=fresh, optimizer=opt2, scheduler=sched2)
    ckpt.restore_rng(state["rng"])
    assert state["step"] == 1 and state["data"] == {"epoch": 0, "pos": 1}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved_weights[k]), k
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied
    for pid, st in opt2.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, saved_opt["state"][pid][k])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 1
    draws = (random.random(), torch.rand(3))
    assert draws[0] == expected_draws[0] and torch.equal(draws[1], expected_draws[1])


def test_config_changes_allow_logging_and_refuse_model_or_schedule():
    base = load_config(TINY).to_dict()
    harmless = load_config(TINY, ["logging.tensorboard=true", "run.output_dir=elsewhere", "run.threads=3",
                                  "run.checkpoint_every=5", "optim.max_tokens_per_microbatch=64",
                                  "optim.offload_optimizer_state=true", "eval.every=5", "eval.k=2",
                                  "rollout.vllm_gpu_memory_utilization=0.5", "rollout.vllm_enforce_eager=true",
                                  "rollout.vllm_sleep=false"]).to_dict()
    assert resume.config_changes(base, harmless) == []
    # vllm_max_model_len can cut responses short, so it is part of what the run samples
    changed = load_config(TINY, ["model.path=builtin:tiny-qwen2", "optim.lr=0.5", "run.seed=1",
                                 "rollout.vllm_max_model_len=64"]).to_dict()
    assert [k for k, _, _ in resume.config_changes(base, changed)] == ["model.path", "optim.lr",
                                                                       "rollout.vllm_max_model_len", "run.seed"]
    schedule = json.loads(json.dumps(base))
    schedule["schedule"]["phases"][0]["steps"] = 7
    assert [k for k, _, _ in resume.config_changes(base, schedule)] == ["schedule.phases"]


def test_a_key_added_to_the_schema_after_a_checkpoint_counts_as_its_default():
    """A checkpoint written before `model.lora` existed resumes with the default (LoRA off), and is refused
    when the resumed config turns LoRA on."""
    from fastprerl.config import Config

    current = load_config(TINY).to_dict()
    old = json.loads(json.dumps(current))
    del old["model"]["lora"]
    defaults = Config().to_dict()
    assert resume.config_changes(old, current, defaults=defaults) == []
    lora_on = load_config(TINY, ["model.lora.r=8"]).to_dict()
    assert resume.config_changes(old, lora_on, defaults=defaults) == [("model.lora.r", 0, 8)]


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_optimizer_state_is_loaded_without_a_copy_on_the_gpu(tmp_path):
    model, opt, sched = tiny_model_and_optimizer()
    path = save(tmp_path, 1, model, opt, sched)
    moments = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items() if k != "step")
    model = model.cuda()
    off = CPUOffloadAdamW(model.parameters(), lr=1e-3)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    resume.load_checkpoint(path, model=model, optimizer=off,
                           scheduler=torch.optim.lr_scheduler.LambdaLR(off, lambda _: 1.0))
    assert torch.cuda.max_memory_allocated() - before < moments / 2
    assert {v.device.type for st in off.state.values() for v in st.values()} == {"cpu"}


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
def _signal_at_step(monkeypatch, at_step: int, signals):
    """Deliver `signals` to this process at the start of step `at_step` (inside train_step)."""
    real = Trainer.train_step

    def train_step(self, phase):
        if self.step == at_step:
            for s in signals:
                os.kill(os.getpid(), s)
        return real(self, phase)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(reference, tmp_path, monkeypatch):
    cfg_path, ref = reference
    run = tmp_path / "run"
    _signal_at_step(monkeypatch, 2, [signal.SIGTERM])
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
    _signal_at_step(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
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


# ---------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_loss_stops_with_batch_statistics_and_keeps_checkpoints(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    step = {"now": 0}
    real_step, real_loss = Trainer.train_step, objectives.policy_loss

    def train_step(self, phase):
        step["now"] = self.step
        return real_step(self, phase)

    def policy_loss(lp, *a, **kw):  # the loss turns NaN from step 2 on
        out = real_loss(lp, *a, **kw)
        return out * float("nan") if step["now"] >= 2 else out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(objectives, "policy_loss", policy_loss)
    threads = torch.get_num_threads()
    try:
        code = main(["train", str(TINY), f"run.output_dir={run}", *FAST])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 3
    assert "step 2 (phase 'grpo'): non-finite loss; the step was not applied" in err
    assert "rewards: mean" in err and "advantages mean" in err and "packed rows" in err
    assert f"newest checkpoint: {run / 'checkpoints' / 'step_2'}" in err
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 1]
    assert all(ckpt.verify(p) is None for _, p in ckpt.list_checkpoints(run / "checkpoints"))
    assert [r["step"] for r in metric_rows(run)] == [0, 1]


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_nonfinite_gradient_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    real_loss = objectives.policy_loss
    monkeypatch.setattr(objectives, "policy_loss", lambda lp, *a, **kw: real_loss(_InfGrad.apply(lp), *a, **kw))
    threads = torch.get_num_threads()
    try:
        t = Trainer(load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", *FAST]))
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        with pytest.raises(trainer_mod.NonFiniteError, match=r"step 0 \(phase 'nsr_prerl'\): non-finite gradient"):
            t.train()
    finally:
        torch.set_num_threads(threads)
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_nan_reward_stops_at_once_naming_the_samples(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["train", str(TINY), f"run.output_dir={tmp_path / 'run'}", *FAST,
                     "reward.fn=fake_rewards:nan_reward"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 3
    assert "step 0 (phase 'nsr_prerl'): non-finite rewards" in err
    assert "non-finite 8 of 8" in err and "sample 0: reward nan for response" in err
