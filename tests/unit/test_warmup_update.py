"""The warm-up as the paper's code runs it: a weighted objective's momentum carried across the switch, and AdamW
stepping on an all-zero gradient (optim.step_on_zero_grad), against AdamW updates computed by hand."""
import math

import pytest
import torch

from fastprerl.config import OptimConfig, load_config
from fastprerl.optim import make_optimizer, optimizer_step
from fastprerl.trainer import Trainer

from runs import FAST, TINY

LR, WD, B1, B2, EPS = 1e-3, 0.01, 0.9, 0.999, 1e-8


def _adamw(p, m, v, g, t):
    """One AdamW update by its definition (Loshchilov & Hutter; torch's order: decay, then the Adam step), float64."""
    p = p * (1 - LR * WD)
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    p = p - LR * (m / (1 - B1 ** t)) / ((v / (1 - B2 ** t)).sqrt() + EPS)
    return p, m, v


@pytest.mark.parametrize("weight", [0.01, 1.0])
def test_weighted_warmup_then_a_zero_gradient_step_then_grpo_follow_adamw_by_hand(weight):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    opt, sched = make_optimizer(model, OptimConfig(lr=LR, weight_decay=WD, beta1=B1, beta2=B2, eps=EPS))
    p = model.weight.detach().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    g_warm, g_grpo = torch.randn_like(p), torch.randn_like(p)

    # warm-up step: the loss weight scales the gradient (no clipping here)
    model.weight.grad, model.bias.grad = weight * g_warm, torch.zeros_like(model.bias)
    assert optimizer_step(opt, sched, model, has_rows=True, step_on_zero_grad=True)
    p, m, v = _adamw(p, m, v, weight * g_warm, 1)
    torch.testing.assert_close(model.weight.detach(), p, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(opt.state[model.weight]["exp_avg"], m, rtol=1e-12, atol=0)

    # a warm-up step without negatives: no gradient at all; AdamW steps on zeros (momentum and decay act)
    opt.zero_grad(set_to_none=True)
    assert optimizer_step(opt, sched, model, has_rows=False, step_on_zero_grad=True)
    p, m, v = _adamw(p, m, v, torch.zeros_like(p), 2)
    torch.testing.assert_close(model.weight.detach(), p, rtol=1e-12, atol=1e-15)
    assert int(opt.state[model.weight]["step"]) == 2

    # the first GRPO step: what is left of the warm-up's momentum is B1^2 (1 - B1) * weight * g_warm
    opt.zero_grad(set_to_none=True)
    model.weight.grad, model.bias.grad = g_grpo.clone(), torch.zeros_like(model.bias)
    optimizer_step(opt, sched, model, has_rows=True, step_on_zero_grad=True)
    p, m, v = _adamw(p, m, v, g_grpo, 3)
    torch.testing.assert_close(model.weight.detach(), p, rtol=1e-12, atol=1e-15)
    carried = B1 ** 2 * (1 - B1) * weight * g_warm
    torch.testing.assert_close(opt.state[model.weight]["exp_avg"], carried + (1 - B1) * g_grpo, rtol=1e-12, atol=0)
    share = (carried.norm() / opt.state[model.weight]["exp_avg"].norm()).item()
    assert (share < 0.02) if weight == 0.01 else (share > 0.3)   # ~1% of the momentum at 0.01, most of it at 1.0


def test_without_the_setting_a_step_without_rows_leaves_weights_and_optimizer_alone():
    model = torch.nn.Linear(4, 3).double()
    opt, sched = make_optimizer(model, OptimConfig(lr=LR, weight_decay=WD))
    before = model.weight.detach().clone()
    assert not optimizer_step(opt, sched, model, has_rows=False, step_on_zero_grad=False)
    assert torch.equal(model.weight, before) and not opt.state


@pytest.mark.parametrize("step_on_zero_grad", [True, False])
def test_an_nsr_step_without_negatives_in_the_trainer(tmp_path, one_torch_thread, step_on_zero_grad):
    """Every answer wrong: no group is mixed, NSR-PreRL has no rows. From fresh moments a zero gradient moves
    the weights by the decay alone: p <- p (1 - lr wd)."""
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", *FAST, "reward.fn=fake_rewards:zero_reward",
                             "algo.kl_coef=0", f"optim.step_on_zero_grad={str(step_on_zero_grad).lower()}"])
    t = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    row = t.train_step(t.schedule.phase_at(0)[1])
    assert row["train/rows"] == 0 and row["samples/nsr_prerl"] == 0
    decay = 1 - cfg.optim.lr * cfg.optim.weight_decay
    for n, p in t.model.named_parameters():
        expected = before[n] * decay if step_on_zero_grad else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-7, atol=0)
    steps = {int(s["step"]) for s in t.optimizer.state.values()}
    assert steps == ({1} if step_on_zero_grad else set())
    assert math.isclose(decay, 1 - 1e-6)
