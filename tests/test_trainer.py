"""Trainer: micro-batch invariance, phase switching, NSR row selection, the tiny end-to-end run, earlier
outputs moved aside, the final model's replacement, start-up and in-training errors."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastprerl.models as models
import fastprerl.trainer as trainer_mod
from fastprerl.cli import main
from fastprerl.config import load_config
from fastprerl.models import tiny_config
from fastprerl.kernels import naive_token_logprobs
from fastprerl.models import lm_head_weight
from fastprerl.packing import bin_hidden, pack
from fastprerl.trainer import Trainer, backward_packed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


def test_token_budget_does_not_change_the_loss_or_grads_fp64():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300)).double()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 9, 2, 6)]
    responses = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 1, 12, 7)]
    adv = torch.tensor([0.5, -1.0, 2.0, -0.3], dtype=torch.float64)

    def run(max_tokens):
        model.zero_grad(set_to_none=True)
        b = pack(prompts, responses, cond=[True] * 4, free=[True, False, True, True], empty_token=1,
                 max_tokens=max_tokens)
        n_tok = b.rows.numel()

        def loss_rows(lp, ridx):  # token-mean over the whole step, whatever the bins are
            return -adv[b.row_sample[ridx]] * lp / n_tok

        loss, ent = backward_packed(model, b, loss_rows, temperature=0.7, impl="torch", with_entropy=True)
        grads = [p.grad.clone() for p in model.parameters()]
        return loss, grads, len(b.bins), ent, b

    l1, g1, nb1, e1, b1 = run(10_000)
    l2, g2, nb2, e2, _ = run(12)
    assert nb1 == 1 and nb2 >= 4
    assert abs(l1 - l2) < 1e-12
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    # the entropy logged from the loss's sweep: the full-logits entropy of the same packed rows
    with torch.no_grad():
        hid = bin_hidden(model, b1, 0)[b1.rows]
        want = naive_token_logprobs(hid, lm_head_weight(model), b1.targets, 0.7, with_entropy=True)[1]
    assert torch.allclose(e1.double(), want, atol=1e-5) and torch.allclose(e2, e1, atol=1e-5)


def tiny_cfg(tmp_path, *extra):
    return load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", "reward.fn=fake_rewards:parity_reward",
                              "logging.console=false", *extra])


def test_tiny_end_to_end_run_and_metrics(tmp_path):
    cfg = tiny_cfg(tmp_path)
    t = Trainer(cfg)
    t.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["phase"] for r in rows] == ["nsr_prerl", "nsr_prerl", "grpo", "grpo"]
    for r in rows:
        for k in ("reward/mean", "loss/policy", "rollout/response_len_mean", "perf/step_s"):
            assert k in r
    assert any(r["train/rows"] > 0 for r in rows)
    assert (tmp_path / "run" / "config.toml").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert again.config.hidden_size == 64


def test_nsr_prerl_step_packs_only_negative_free_rows(tmp_path, monkeypatch):
    seen = []
    real_pack = trainer_mod.pack

    def spy(prompts, responses, **kw):
        b = real_pack(prompts, responses, **kw)
        seen.append((kw, b))
        return b

    scores_seen = []
    real_score = trainer_mod._score

    def score_spy(fn, texts, samples):
        out = real_score(fn, texts, samples)
        scores_seen.append(out[0])
        return out

    monkeypatch.setattr(trainer_mod, "pack", spy)
    monkeypatch.setattr(trainer_mod, "_score", score_spy)
    cfg = tiny_cfg(tmp_path, "logging.view_gap=false")
    t = Trainer(cfg)
    t.train()
    checked = 0
    for step, ((kw, b), scores) in enumerate(zip(seen, scores_seen)):
        if step >= 2:
            break  # the NSR-PreRL phase
        r = torch.tensor(scores).view(-1, 4)
        negative = (r < r.mean(1, keepdim=True)).view(-1)
        assert b.view_rows["cond"].numel() == 0          # no prompt-conditioned rows at all
        packed = set(b.row_sample.tolist())
        assert packed == set(torch.nonzero(negative).view(-1).tolist())
        checked += len(packed)
    assert checked > 0


@pytest.mark.parametrize("reset", [False, True])
def test_phase_switch_keeps_or_resets_adam_state(tmp_path, reset):
    cfg = tiny_cfg(tmp_path, f"schedule.reset_optimizer_at_switch={'true' if reset else 'false'}",
                   "logging.view_gap=false")
    t = Trainer(cfg)
    t.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stepped = [r["train/rows"] > 0 for r in rows]
    state_steps = {int(s["step"]) for s in t.optimizer.state.values()}
    assert len(state_steps) == 1
    expected = sum(stepped[2:]) if reset else sum(stepped)
    assert state_steps == {expected}
    if not reset:
        assert sum(stepped[:2]) > 0, "the first phase must have taken a step for this check to mean anything"


class _ShiftedBehaviour:
    """The HF backend with every behaviour log-prob shifted by `delta` (a sampler that disagrees with the
    trainer by a known amount)."""

    def __init__(self, inner, delta):
        self.inner, self.delta = inner, delta

    def generate(self, prompts, n):
        out = self.inner.generate(prompts, n)
        out.behaviour_logp = [[v + self.delta for v in row] for row in out.behaviour_logp]
        return out


@pytest.mark.usefixtures("one_torch_thread")
def test_truncated_importance_sampling_scales_the_cond_loss_by_the_capped_ratio(tmp_path, monkeypatch):
    import math

    def grpo_step(name, delta, *extra):
        real = trainer_mod.make_backend
        monkeypatch.setattr(trainer_mod, "make_backend",
                            lambda *a, **k: _ShiftedBehaviour(real(*a, **k), delta))
        cfg = load_config(TINY, [f"run.output_dir={tmp_path / name}", "reward.fn=fake_rewards:parity_reward",
                                 "logging.console=false", "logging.view_gap=false", *extra])
        t = Trainer(cfg)
        return t.train_step(cfg.schedule.phases[1])   # the GRPO phase: every row is prompt-conditioned

    plain = grpo_step("plain", 0.0)
    assert plain["train/rows"] > 0 and plain["train/grad_norm"] > 0
    # beh = trainer logp + log 2 -> w = min(exp(-log 2), 2) = 0.5 on every token: the gradient halves
    half = grpo_step("half", math.log(2.0), "algo.tis_cap=2.0")
    # beh = trainer logp - log 4 -> w = min(4, 2) = 2 (the cap): the gradient doubles
    capped = grpo_step("capped", -math.log(4.0), "algo.tis_cap=2.0")
    # no TIS: the shift changes nothing but the logged gap
    ignored = grpo_step("ignored", -math.log(4.0))
    assert abs(half["rollout/logprob_gap"] - math.log(2.0)) < 1e-4
    assert abs(half["rollout/tis_weight_mean"] - 0.5) < 1e-4
    assert capped["rollout/tis_weight_mean"] == pytest.approx(2.0, abs=1e-5)   # float32 mean of 2s
    assert half["train/grad_norm"] == pytest.approx(0.5 * plain["train/grad_norm"], rel=1e-4)
    assert capped["train/grad_norm"] == pytest.approx(2.0 * plain["train/grad_norm"], rel=1e-6)
    assert ignored["train/grad_norm"] == plain["train/grad_norm"]


def test_periodic_eval_logs_fixed_problem_metrics_and_leaves_the_rng_alone(tmp_path):
    """eval.every = 3 over 4 steps evaluates before step 0, after step 3 and after the last step; an
    evaluation leaves torch's RNG where it was, so training is the same with or without it (compared with a
    run without evaluation: same training metrics, same final weights)."""
    cfg = tiny_cfg(tmp_path, "eval.every=3", "eval.n_problems=3", "eval.k=2", "eval.max_new_tokens=4",
                   'eval.data=["builtin:addition", "reasoning_gym:chain_sum"]')
    t = Trainer(cfg)
    t.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eval_rows = [r for r in rows if r["phase"] == "eval"]
    assert [r["step"] for r in rows if r["phase"] != "eval"] == [0, 1, 2, 3]
    assert [r["step"] for r in eval_rows] == [0, 3, 4]
    records = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 4]
    for rec, row in zip(records, eval_rows):
        assert set(rec["datasets"]) == {"builtin:addition", "reasoning_gym:chain_sum"}
        for name, block in rec["datasets"].items():
            assert block["n_problems"] == 3 and block["k"] == 2
            assert 0.0 <= block["avg@k"] <= block["pass@k"] <= 1.0
            assert 1.0 <= block["response_len"] <= 4.0
            assert row[f"eval/{name}/avg@k"] == block["avg@k"]
            base = records[0]["datasets"][name]["behaviour"]
            for kind, ratio in block["behaviour_ratio"].items():  # against the step-0 evaluation
                assert ratio == (block["behaviour"][kind] / base[kind] if base[kind] > 0 else None)
    before = torch.get_rng_state()
    again = t.evaluator.run(t.model, 4)
    assert torch.equal(torch.get_rng_state(), before)
    assert again["eval/builtin:addition/avg@k"] == eval_rows[-1]["eval/builtin:addition/avg@k"]  # fixed seed

    plain = tiny_cfg(tmp_path / "no_eval")
    Trainer(plain).train()
    rows0 = [json.loads(x) for x in (tmp_path / "no_eval" / "run" / "metrics.jsonl").read_text().splitlines()]
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
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 0, 1, 2, 3, 4]
    assert (run / "config.toml").read_bytes() != first["config.toml"]
    second_metrics = (run / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(trainer_mod.time, "strftime", lambda *a: previous.name)   # a second start in the same second
    again = trainer_mod._set_aside_earlier_outputs(run)
    monkeypatch.undo()
    assert again == previous.with_name(previous.name + "-1")
    assert (again / "metrics.jsonl").read_bytes() == second_metrics
    assert (previous / "metrics.jsonl").read_bytes() == first["metrics.jsonl"]


class _Tok:
    def __init__(self, tag):
        self.tag = tag

    def save_pretrained(self, folder):
        (Path(folder) / "tok.txt").write_text(self.tag)


def test_final_model_is_replaced_by_renames_and_a_stale_temporary_folder_is_cleared(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300))
    final = tmp_path / "final"
    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "final.tmp" / "junk").write_text("left by an interrupted write")
    Trainer.save_model(SimpleNamespace(model=model, tok=_Tok("1")), final)
    assert (final / "tok.txt").read_text() == "1" and not (final / "junk").exists()
    real_replace = os.replace

    def interrupted(src, dst):   # stops before the new folder is renamed into place
        if Path(src).name == "final.tmp":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer.save_model(SimpleNamespace(model=model, tok=_Tok("2")), final)
    monkeypatch.undo()
    assert (tmp_path / "final.old" / "tok.txt").read_text() == "1"   # the earlier model survives
    Trainer.save_model(SimpleNamespace(model=model, tok=_Tok("3")), final)
    assert (final / "tok.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert AutoModelForCausalLM.from_pretrained(final).config.hidden_size == 64


def test_unknown_builtin_model_is_refused_before_any_conversion(monkeypatch):
    monkeypatch.setattr(models, "_smollm2_cached", lambda: pytest.fail("converted SmolLM2 for an unknown builtin"))
    for load in (models.load_tokenizer, models.load_model):
        with pytest.raises(ValueError, match="model.path: unknown builtin 'builtin:tiny-lama'; choose one of "
                                             "builtin:smollm2-135m, builtin:tiny-llama, builtin:tiny-qwen2"):
            load("builtin:tiny-lama")


def test_triton_logprobs_without_cuda_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(trainer_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    overrides = [f"run.output_dir={tmp_path / 'run'}", "run.device=cpu", "model.logprob_impl=triton"]
    with pytest.raises(RuntimeError, match=r"model.logprob_impl = 'triton' needs a CUDA device.* on cpu\. "
                                           r"Choose 'auto' .*'torch' or 'naive'"):
        Trainer(load_config(TINY, overrides))
    assert main(["train", str(TINY), *overrides]) == 2
    assert "model.logprob_impl = 'triton'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


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
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0]
