"""Whole tiny runs through the trainer: the logged metrics agree with the logged samples, Adam state at a phase
switch, periodic evaluation, the output folder of an earlier run moved aside, the final model replaced by
renames, and the errors of the command line. Single steps against float64 recomputations:
tests/unit/test_trainer.py."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastprerl.trainer as trainer_mod
from fastprerl.cli import main
from fastprerl.metrics import behaviour_counts
from fastprerl.models import load_tokenizer, tiny_config
from fastprerl.state import checkpoint as ckpt
from fastprerl.state import resume
from fastprerl.trainer import Trainer

from fake_rewards import parity_reward
from runs import ROOT, TINY, read_jsonl, tiny_cfg  # noqa: F401

G = 4   # configs/tiny.toml: samples_per_prompt




# ---------------------------------------------------------------------------------------------- values
@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_run_metrics_agree_with_the_logged_samples(tmp_path):
    """Every step's samples are logged; rewards, accuracy, format, lengths, truncation, group counts, behaviour
    counts, advantages, packed rows (NSR-PreRL: only the negatives' tokens; GRPO: every sample of a group
    with mixed rewards) and the masked sample counts are recomputed from them."""
    Trainer(tiny_cfg(tmp_path, "logging.samples_every=1", "logging.view_gap=false")).train()
    rows, samples = read_jsonl(tmp_path / "run" / "metrics.jsonl"), read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["phase"] for r in rows] == ["nsr_prerl", "nsr_prerl", "grpo", "grpo"]
    checked_negatives = 0
    for r in rows:
        s = [x for x in samples if x["step"] == r["step"]]
        assert len(s) == 16
        rew = torch.tensor([x["reward"] for x in s])
        assert rew.tolist() == parity_reward([x["response"] for x in s], s)
        assert r["reward/mean"] == pytest.approx(rew.mean().item(), abs=1e-7)
        assert r["reward/accuracy"] == sum(x["correct"] for x in s) / 16
        assert r["reward/format"] == 1.0 and r["reward/timeouts"] == 0
        assert r["rollout/response_len_mean"] == pytest.approx(sum(x["tokens"] for x in s) / 16)
        assert r["rollout/truncated_frac"] == sum(x["truncated"] for x in s) / 16
        assert all(x["truncated"] == (x["tokens"] == 8) for x in s)   # tiny.toml: max_new_tokens 8
        groups = rew.view(-1, G)
        same = groups.min(1).values == groups.max(1).values
        assert r["groups/zero_adv_frac"] == same.float().mean().item()
        assert r["groups/all_solved"] == int((same & (groups[:, 0] > 0)).sum())
        assert r["groups/none_solved"] == int((same & (groups[:, 0] <= 0)).sum())
        for kind in ("transition", "reflection", "execution"):
            assert r[f"behaviour/{kind}"] == sum(behaviour_counts(x["response"])[kind] for x in s) / 16
        mean = groups.mean(1, keepdim=True)
        if r["phase"] == "nsr_prerl":   # negatives: wrong in a group with a right one; A = r - mean
            neg = ((groups == 0) & (groups.max(1, keepdim=True).values == 1)).view(-1)
            adv = torch.where(neg, (groups - mean).view(-1), torch.zeros(16))
            assert r["samples/nsr_prerl"] == int(neg.sum())
            assert r["train/rows"] == sum(x["tokens"] for x, n in zip(s, neg) if n)
            assert r["train/packed_tokens"] == sum(x["tokens"] + 1 for x, n in zip(s, neg) if n)   # [e; y]
            assert "logp/cond_mean" not in r
            checked_negatives += int(neg.sum())
        else:                           # GRPO: (r - mean) / (std + 1e-6), every sample
            adv = ((groups - mean) / (groups.std(1, keepdim=True) + 1e-6)).view(-1)
            assert r["samples/grpo"] == 16
            assert r["train/rows"] == sum(x["tokens"] for x, a in zip(s, adv) if a != 0)
        assert [x["advantage"] for x in s] == pytest.approx(adv.tolist(), abs=1e-6)
    assert checked_negatives > 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert again.config.hidden_size == 64


# ---------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("reset", [False, True])
def test_phase_switch_keeps_or_resets_adam_state(tmp_path, reset):
    cfg = tiny_cfg(tmp_path, f"schedule.reset_optimizer_at_switch={'true' if reset else 'false'}",
                   "logging.view_gap=false")
    t = Trainer(cfg)
    t.train()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    stepped = [r["train/rows"] > 0 for r in rows]
    state_steps = {int(s["step"]) for s in t.optimizer.state.values()}
    assert len(state_steps) == 1
    expected = sum(stepped[2:]) if reset else sum(stepped)
    assert state_steps == {expected}
    if not reset:
        assert sum(stepped[:2]) > 0, "the first phase must have taken a step for this check to mean anything"


def test_periodic_eval_logs_fixed_problem_metrics_and_leaves_the_rng_alone(tmp_path):
    """eval.every = 3 over 4 steps evaluates before step 0, after step 3 and after the last step; an
    evaluation leaves torch's RNG where it was, so training is the same with or without it (compared with a
    run without evaluation: same training metrics, same final weights)."""
    cfg = tiny_cfg(tmp_path, "eval.every=3", "eval.n_problems=3", "eval.k=2", "eval.max_new_tokens=4",
                   'eval.data=["builtin:addition", "reasoning_gym:chain_sum"]')
    t = Trainer(cfg)
    t.train()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    eval_rows = [r for r in rows if r["phase"] == "eval"]
    assert [r["step"] for r in rows if r["phase"] != "eval"] == [0, 1, 2, 3]
    assert [r["step"] for r in eval_rows] == [0, 3, 4]
    records = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert [r["step"] for r in records] == [0, 3, 4]
    for rec, row in zip(records, eval_rows):
        assert set(rec["datasets"]) == {"builtin:addition", "reasoning_gym:chain_sum"}
        for name, block in rec["datasets"].items():
            assert block["n_problems"] == 3 and block["k"] == 2 and block["timeouts"] == 0
            assert 0.0 <= block["avg@k"] <= block["pass@k"] <= 1.0
            assert 1.0 <= block["response_len"] <= 4.0
            assert row[f"eval/{name}/avg@k"] == block["avg@k"] and row[f"eval/{name}/timeouts"] == 0
            base = records[0]["datasets"][name]["behaviour"]
            for kind, ratio in block["behaviour_ratio"].items():  # against the step-0 evaluation
                assert ratio == (block["behaviour"][kind] / base[kind] if base[kind] > 0 else None)
    before = torch.get_rng_state()
    again = t.evaluator.run(t.model, 4)
    assert torch.equal(torch.get_rng_state(), before)
    assert again["eval/builtin:addition/avg@k"] == eval_rows[-1]["eval/builtin:addition/avg@k"]  # fixed seed

    plain = tiny_cfg(tmp_path / "no_eval")
    Trainer(plain).train()
    rows0 = read_jsonl(tmp_path / "no_eval" / "run" / "metrics.jsonl")
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(("perf/", "time"))}  # noqa: E731
    assert [drop(r) for r in rows if r["phase"] != "eval"] == [drop(r) for r in rows0]
    w_eval = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    w_plain = AutoModelForCausalLM.from_pretrained(tmp_path / "no_eval" / "run" / "final").state_dict()
    assert all(torch.equal(w_eval[k], w_plain[k]) for k in w_plain)


QUICK = ("rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "logging.view_gap=false")


def test_a_run_at_step_0_moves_an_earlier_runs_outputs_aside(tmp_path, caplog, monkeypatch):
    """Neither a fresh run nor a resume before any checkpoint overwrites or deletes what an earlier run left in
    run.output_dir: it is moved to previous/<UTC time>/ (a new folder each time) first."""
    run = tmp_path / "run"
    extra = (*QUICK, "eval.every=4", "eval.n_problems=2", "eval.k=1", "eval.max_new_tokens=2",
             "logging.samples_every=1")
    Trainer(tiny_cfg(tmp_path, *extra)).train()
    names = ("metrics.jsonl", "samples.jsonl", "eval.jsonl", "config.toml", "final/model.safetensors")
    first = {n: (run / n).read_bytes() for n in names}
    shutil.rmtree(run / "checkpoints")   # with checkpoints, a fresh run would be refused
    with caplog.at_level("WARNING", logger="fastprerl"):
        second = Trainer(tiny_cfg(tmp_path, *extra, "run.resume=true", "optim.lr=2e-4"))
    [previous] = (run / "previous").iterdir()
    assert f"moved them to {previous}" in caplog.text
    second.train()
    for n, data in first.items():
        assert (previous / n).read_bytes() == data, n
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 0, 1, 2, 3, 4]
    assert (run / "config.toml").read_bytes() != first["config.toml"]
    second_metrics = (run / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(resume.time, "strftime", lambda *a: previous.name)   # a second start in the same second
    again = resume.set_aside_earlier_outputs(run)
    monkeypatch.undo()
    assert again == previous.with_name(previous.name + "-1")
    assert (again / "metrics.jsonl").read_bytes() == second_metrics
    assert (previous / "metrics.jsonl").read_bytes() == first["metrics.jsonl"]


def test_final_model_is_replaced_by_renames_and_a_stale_temporary_folder_is_cleared(tmp_path, monkeypatch):
    tok = load_tokenizer("builtin:tiny-llama")

    def model(seed):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config("llama", 300))

    def saved(folder):
        return AutoModelForCausalLM.from_pretrained(folder).state_dict()

    m1, m2, m3 = model(1), model(2), model(3)
    final = tmp_path / "final"
    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "final.tmp" / "junk").write_text("left by an interrupted write")
    ckpt.save_model(m1, tok, final)
    assert not (final / "junk").exists() and (final / "tokenizer.json").is_file()
    assert all(torch.equal(v, m1.state_dict()[k]) for k, v in saved(final).items())
    real_replace = os.replace

    def interrupted(src, dst):   # stops before the new folder is renamed into place
        if Path(src).name == "final.tmp":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_model(m2, tok, final)
    monkeypatch.undo()
    assert all(torch.equal(v, m1.state_dict()[k]) for k, v in saved(tmp_path / "final.old").items())  # survives
    ckpt.save_model(m3, tok, final)
    assert all(torch.equal(v, m3.state_dict()[k]) for k, v in saved(final).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_cli_names_the_key_of_a_missing_path_and_reports_a_training_error_without_a_traceback(
        tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    base = ["train", str(TINY), f"run.output_dir={run}", "reward.fn=fake_rewards:parity_reward",
            "logging.console=false", *QUICK]
    missing = tmp_path / "no_such_model"
    assert main(base + [f"model.path={missing}"]) == 2   # refused when the config is read
    assert f"model.path: no folder at {str(missing)!r}" in capsys.readouterr().err
    (missing / "config.json").parent.mkdir()
    (missing / "config.json").write_text("{}")            # a folder that is no model: transformers' OSError
    assert main(base + [f"model.path={missing}"]) == 2
    assert f"fastprerl: model.path = {str(missing)!r}: " in capsys.readouterr().err

    def offline(*a, **k):
        raise ConnectionError("cannot reach the hub")

    monkeypatch.setattr(trainer_mod, "load_problems", offline)
    assert main(base + ["data.source=someone/some_dataset"]) == 2
    assert "fastprerl: data.source = 'someone/some_dataset': cannot reach the hub" in capsys.readouterr().err
    monkeypatch.undo()

    closed = []
    real_close, real_step = trainer_mod.MetricsLogger.close, Trainer.train_step

    def close(self):
        closed.append(True)
        real_close(self)

    def train_step(self, phase):
        if self.step == 1:
            raise KeyError("boom")
        return real_step(self, phase)

    monkeypatch.setattr(trainer_mod.MetricsLogger, "close", close)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main(base) == 1
    assert "fastprerl: error at step 1: KeyError: 'boom' (newest checkpoint: none)" in capsys.readouterr().err
    assert closed == [True]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0]
