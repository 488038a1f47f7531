"""Trainer: metrics recomputed from the logged samples, one step at T = 0.7 against a float64 recomputation, the
same loss and gradients with 1 bin and with many, two objectives in one phase, the KL term, truncated importance
sampling, phase switching, periodic evaluation, earlier outputs moved aside, the final model's replacement,
start-up and in-training errors."""
import copy
import math

import pytest
import torch

import fastprerl.models as models
import fastprerl.trainer as trainer_mod
from fastprerl.cli import main
from fastprerl.config import load_config
from fastprerl.rollout import Rollout
from fastprerl.trainer import Trainer

from fake_rewards import parity_reward
from runs import ROOT, TINY, read_jsonl, tiny_cfg  # noqa: F401

G = 4   # configs/tiny.toml: samples_per_prompt




class _Recorded(Rollout):
    """The real HF backend, recording every batch it returns; `delta` (a number, or a function of the token's
    position) shifts the behaviour log-probs (a sampler that disagrees with the trainer by a known amount;
    0 = the sampler's own values)."""

    def __init__(self, inner, delta=0.0):
        self.inner, self.batches = inner, []
        self.delta = delta if callable(delta) else (lambda t: delta)

    def generate(self, prompts, n):
        out = self.inner.generate(prompts, n)
        out.behaviour_logp = [[v + self.delta(t) for t, v in enumerate(row)] for row in out.behaviour_logp]
        self.batches.append(copy.deepcopy(out))
        return out


def recorded_trainer(monkeypatch, cfg, delta=0.0):
    real = trainer_mod.make_backend
    monkeypatch.setattr(trainer_mod, "make_backend", lambda *a, **k: _Recorded(real(*a, **k), delta))
    t = Trainer(cfg)
    monkeypatch.undo()
    return t


def float64_logprobs(model64, roll, temperature):
    """Per sample: (logp (T,), entropy (T,)) of the response tokens from one unpadded float64 forward."""
    out = []
    for x, y in zip(roll.prompt_ids, roll.response_ids):
        logits = model64(torch.tensor([x + y])).logits[0, len(x) - 1:-1] / temperature
        lsm = torch.log_softmax(logits, -1)
        out.append((lsm.gather(1, torch.tensor(y).view(-1, 1)).view(-1), -(lsm.exp() * lsm).sum(-1)))
    return out


@pytest.mark.usefixtures("one_torch_thread")
def test_one_step_at_temperature_0_7_matches_a_float64_recomputation(tmp_path, monkeypatch):
    """W-REINFORCE (A = 0.1 right, -1 wrong) with old_logp = "rollout" and behaviour log-probs shifted by +0.1 at
    even and +0.3 at odd positions (rho = exp(logp - beh) about e^-0.1 or e^-0.3 < 0.8: clipped where A < 0): the
    loss, its clip fraction, the gradient norm, the mean log-prob and the entropy of the step equal a float64
    recomputation from full logits / 0.7 of the same rollouts (fp32 tolerances)."""
    phase = 'schedule.phases=[{name="w",steps=1,objectives=[{name="w_reinforce"}]}]'
    cfg = tiny_cfg(tmp_path, "rollout.temperature=0.7", "algo.old_logp=rollout", "logging.view_gap=false",
                   "optim.max_tokens_per_microbatch=40", phase)
    t = recorded_trainer(monkeypatch, cfg, delta=lambda pos: 0.1 if pos % 2 == 0 else 0.3)
    model64 = copy.deepcopy(t.model).double()
    m = t.train_step(cfg.schedule.phases[0])
    roll = t.rollout.batches[0]
    texts = t.tok.batch_decode(roll.response_ids, skip_special_tokens=True)
    r = torch.tensor(parity_reward(texts, None), dtype=torch.float64)
    adv = torch.where(r >= 0.5, 0.1, -1.0)
    lp = float64_logprobs(model64, roll, 0.7)
    n_tok = sum(len(y) for y in roll.response_ids)
    loss, clipped = 0.0, 0
    for i, (logp, _) in enumerate(lp):
        rho = torch.exp(logp - torch.tensor(roll.behaviour_logp[i], dtype=torch.float64))
        a = adv[i]
        per = torch.maximum(-a * rho, -a * rho.clamp(0.8, 1.2))
        if a < 0:
            per = torch.minimum(per, -a * 10.0)
        loss = loss + per.sum() / n_tok
        clipped += int(((rho < 0.8) & (a < 0)).sum() + ((rho > 1.2) & (a > 0)).sum())
    assert (r == 0).any() and (r == 1).any() and clipped > 0
    assert m["loss/policy"] == pytest.approx(loss.item(), rel=1e-5)
    assert m["loss/w_reinforce"] == pytest.approx(loss.item(), rel=1e-5)
    assert m["clip/w_reinforce"] == clipped / n_tok
    grads = torch.autograd.grad(loss, [p for p in model64.parameters()])
    assert m["train/grad_norm"] == pytest.approx(math.sqrt(sum((g * g).sum().item() for g in grads)), rel=1e-4)
    assert m["logp/cond_mean"] == pytest.approx(torch.cat([x[0] for x in lp]).mean().item(), abs=1e-5)
    assert m["train/entropy"] == pytest.approx(torch.cat([x[1] for x in lp]).mean().item(), abs=1e-5)
    assert m["rollout/logprob_gap"] == pytest.approx(
        sum(0.1 if j % 2 == 0 else 0.3 for y in roll.response_ids for j in range(len(y))) / n_tok, abs=1e-4)


def _one_step(monkeypatch, tmp_path, name, *extra):
    """One step of a phase mixing GRPO (weight 0.5) and NSR-PreRL (weight 1.0) with a KL term; returns the
    metrics, the gradients of that step (read when the optimizer steps) and the rollouts."""
    phases = ('schedule.phases=[{name="mix",steps=1,objectives=[{name="grpo",weight=0.5},'
              '{name="nsr_prerl",weight=1.0}]}]')
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / name}", "reward.fn=fake_rewards:parity_reward",
                             "logging.console=false", "logging.view_gap=false", "algo.kl_coef=0.05", phases, *extra])
    t = recorded_trainer(monkeypatch, cfg)
    grads = []
    t.optimizer.register_step_pre_hook(lambda *_: grads.append([p.grad.clone() for p in t.model.parameters()]))
    m = t.train_step(cfg.schedule.phases[0])
    return m, grads[0], t.rollout.batches[0], t


@pytest.mark.usefixtures("one_torch_thread")
def test_one_bin_and_many_give_the_same_loss_and_gradients_and_two_objectives_add_up(tmp_path, monkeypatch):
    one, g1, roll, t = _one_step(monkeypatch, tmp_path, "one", "optim.max_tokens_per_microbatch=100000")
    many, g2, roll2, _ = _one_step(monkeypatch, tmp_path, "many", "optim.max_tokens_per_microbatch=16")
    assert roll2.response_ids == roll.response_ids            # same seed, same rollouts
    assert one["train/microbatches"] == 1 and many["train/microbatches"] >= 8
    for key in ("loss/policy", "loss/grpo", "loss/nsr_prerl", "train/grad_norm"):
        assert many[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # the two terms by hand (on-policy, rho = 1: a token's loss is -A): weight / N_o * sum_i -A_i len_i
    texts = t.tok.batch_decode(roll.response_ids, skip_special_tokens=True)
    r = torch.tensor(parity_reward(texts, None), dtype=torch.float64).view(-1, G)
    lens = torch.tensor([len(y) for y in roll.response_ids], dtype=torch.float64)
    a_grpo = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
    neg = ((r == 0) & (r.max(1, keepdim=True).values == 1)).view(-1)
    a_nsr = (r - r.mean(1, keepdim=True)).view(-1)
    grpo = 0.5 * (-a_grpo * lens).sum() / lens.sum()
    nsr = 1.0 * (-a_nsr * lens)[neg].sum() / lens[neg].sum()
    assert neg.any() and one["samples/nsr_prerl"] == int(neg.sum())
    assert one["loss/grpo"] == pytest.approx(grpo.item(), rel=1e-5)
    assert one["loss/nsr_prerl"] == pytest.approx(nsr.item(), rel=1e-5)
    # the KL term is 0 at the first step (reference = policy): the policy loss is the two terms' sum
    assert one["loss/policy"] == pytest.approx(grpo.item() + nsr.item(), rel=1e-5)


@pytest.mark.usefixtures("one_torch_thread")
def test_kl_term_equals_a_float64_recomputation_against_a_different_reference(tmp_path, monkeypatch):
    """Every reward 0: every advantage is 0 and the step loss is the KL term alone,
    kl_coef / N * sum_t k3(logp_t, ref_t), k3 = exp(ref - logp) - (ref - logp) - 1, over every response token."""
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", "reward.fn=fake_rewards:zero_reward",
                             "logging.console=false", "logging.view_gap=false", "algo.kl_coef=0.5",
                             "optim.max_tokens_per_microbatch=32"])
    t = recorded_trainer(monkeypatch, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in t.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pol64, ref64 = copy.deepcopy(t.model).double(), copy.deepcopy(t.ref_model).double()
    m = t.train_step(cfg.schedule.phases[1])
    roll = t.rollout.batches[0]
    with torch.no_grad():
        lp, ref = float64_logprobs(pol64, roll, 1.0), float64_logprobs(ref64, roll, 1.0)
    d = torch.cat([b[0] for b in ref]) - torch.cat([a[0] for a in lp])
    want = 0.5 * (torch.exp(d) - d - 1).sum().item() / d.numel()
    assert m["loss/grpo"] == 0.0 and want > 1e-3
    assert m["loss/policy"] == pytest.approx(want, rel=1e-4)
    assert m["train/rows"] == d.numel()          # the KL term scores every sample's cond view


@pytest.mark.usefixtures("one_torch_thread")
def test_truncated_importance_sampling_scales_the_cond_loss_by_the_capped_ratio(tmp_path, monkeypatch):
    def grpo_step(name, delta, *extra):
        cfg = load_config(TINY, [f"run.output_dir={tmp_path / name}", "reward.fn=fake_rewards:parity_reward",
                                 "logging.console=false", "logging.view_gap=false", *extra])
        t = recorded_trainer(monkeypatch, cfg, delta)
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


def test_unknown_builtin_model_is_refused_before_any_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPRERL_CACHE", str(tmp_path / "cache"))   # where a conversion would write
    for load in (models.load_tokenizer, models.load_model):
        with pytest.raises(ValueError, match="model.path: unknown builtin 'builtin:tiny-lama'; choose one of "
                                             "builtin:smollm2-135m, builtin:tiny-llama, builtin:tiny-qwen2"):
            load("builtin:tiny-lama")
    assert not (tmp_path / "cache").exists()


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
