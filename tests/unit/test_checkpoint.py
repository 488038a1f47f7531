"""Checkpoints: atomic writes, verification and damage detection, what a checkpoint restores, which config
changes a resume allows, and the stops on non-finite values. Resuming whole runs (SIGKILL, SIGTERM, SIGINT, data
epochs): tests/integration/test_resume.py."""
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastprerl.objectives as objectives
import fastprerl.trainer as trainer_mod
from fastprerl.cli import main
from fastprerl.config import load_config
from fastprerl.models import tiny_config
from fastprerl.optim import CPUOffloadAdamW
from fastprerl.state import checkpoint as ckpt
from fastprerl.state import resume
from fastprerl.state.checkpointer import load_checkpoint
from fastprerl.trainer import Trainer

from runs import FAST, TINY, metric_rows


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
    state = load_checkpoint(path, model=fresh, optimizer=opt2, scheduler=sched2)
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
    load_checkpoint(path, model=model, optimizer=off,
                         scheduler=torch.optim.lr_scheduler.LambdaLR(off, lambda _: 1.0))
    assert torch.cuda.max_memory_allocated() - before < moments / 2
    assert {v.device.type for st in off.state.values() for v in st.values()} == {"cpu"}


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
