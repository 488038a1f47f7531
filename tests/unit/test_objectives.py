"""Objectives with hand-computed values (the arithmetic is in the comments)."""
import math

import pytest
import torch

from fastprerl import objectives as obj


def test_grpo_std_advantages_hand_computed():
    # group [1,0,0,1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735 -> A = +-0.5 / (0.57735 + 1e-6)
    a = obj.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    want = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(a, torch.tensor([want, -want, -want, want]), atol=1e-6)


def test_grpo_mean_advantages_and_all_equal_groups():
    a = obj.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4, norm="mean")
    assert a.tolist() == [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    # an all-equal group gives exactly zero advantage under std normalisation (0 / (0 + eps))
    b = obj.grpo_advantages(torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 3)
    assert b[3:].tolist() == [0.0, 0.0, 0.0]


def test_group_of_one():
    r = torch.tensor([1.0, 0.0, 1.0])
    assert obj.grpo_advantages(r, 1).tolist() == [1.0, 0.0, 1.0]   # verl: mean 0, std 1
    assert obj.grpo_advantages(r, 1, norm="mean").tolist() == [0.0, 0.0, 0.0]
    assert obj.mean_centred_advantages(r, 1).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        obj.grpo_advantages(torch.tensor([1.0, 0.0]), 3)


def test_nsr_prerl_masks_reference_rule():
    # group 1 [1,0,0,0]: A_pre = [.75,-.25,-.25,-.25] -> negatives 1..3; group 2 all wrong -> no gradient
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    t = obj.sample_terms("nsr_prerl", r, 4)
    assert t.view == "free"
    assert t.mask.tolist() == [False, True, True, True, False, False, False, False]
    assert t.advantage.tolist() == [0.0, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    p = obj.sample_terms("psr_prerl", r, 4)
    assert p.mask.tolist() == [True] + [False] * 7 and p.advantage[0].item() == 0.75
    full = obj.sample_terms("prerl", r, 4)
    assert full.mask.all() and full.advantage.tolist()[:4] == [0.75, -0.25, -0.25, -0.25]


def test_nsr_threshold_rule_every_wrong_sample_minus_one():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    t = obj.sample_terms("nsr_prerl", r, 4, negative_rule="reward_threshold", threshold=0.5)
    assert t.mask.tolist() == [False] + [True] * 7
    assert t.advantage.tolist() == [0.0] + [-1.0] * 7


def test_nsr_rl_uses_grpo_advantage_on_negatives_and_cond_view():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    t = obj.sample_terms("nsr_rl", r, 4)
    want = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert t.view == "cond" and t.mask.tolist() == [False, True, True, False]
    assert torch.allclose(t.advantage, torch.tensor([0.0, -want, -want, 0.0]), atol=1e-6)


def test_w_reinforce():
    t = obj.sample_terms("w_reinforce", torch.tensor([1.0, 0.0, 1.0]), 3, w_lambda=0.1)
    assert torch.allclose(t.advantage, torch.tensor([0.1, -1.0, 0.1])) and t.mask.all()


def test_policy_loss_clip_and_dual_clip_hand_computed():
    old = torch.zeros(5)
    ratio = torch.tensor([1.5, 1.5, 20.0, 0.5, 0.5])
    adv = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0])
    loss = obj.policy_loss(torch.log(ratio), old, adv, eps_low=0.2, eps_high=0.2, dual_clip_c=10.0)
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2        A=-1, r=1.5: max(1.5, 1.2) = 1.5
    # A=-1, r=20: max(20, 1.2) = 20 -> dual-clip min(20, 10) = 10
    # A=-1, r=0.5: max(0.5, 0.8) = 0.8           A=+1, r=0.5: max(-0.5, -0.8) = -0.5
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, 10.0, 0.8, -0.5]), atol=1e-6)


def test_on_policy_gradient_is_minus_advantage():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([0.5, -2.0])
    obj.policy_loss(lp, lp.detach(), adv).sum().backward()
    assert torch.allclose(lp.grad, -adv)   # rho = 1, d(-A rho)/dlogp = -A


def test_k3_kl_hand_computed():
    # d = ref - logp = 1: e^1 - 1 - 1 = 0.71828
    assert abs(obj.k3_kl(torch.tensor([0.0]), torch.tensor([1.0])).item() - (math.e - 2)) < 1e-6
    assert obj.k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


@pytest.mark.parametrize("rewards, verdicts, negatives, positives", [
    # format penalty 0.5: nothing is right in either group, so no sample is negative or positive (A_pre of the
    # formatted wrong answers is +0.25, of the unformatted ones -0.25: the old rule marked those negative)
    ([0.0, 0.0, -0.5, -0.5, -0.5, 0.0, -0.5, -0.5], [0.0] * 8, [], []),
    # partial credit below the threshold (0.5): nothing is right
    ([0.4, 0.2, 0.0, 0.0], [0.4, 0.2, 0.0, 0.0], [], []),
    # one right answer (0.6 >= 0.5): the three others are negatives, whatever their own scores
    ([0.6, 0.4, 0.0, -0.5], [0.6, 0.4, 0.0, 0.0], [1, 2, 3], [0]),
    # all right: no negatives; no wrong one, so no positives either
    ([1.0, 0.5, 1.0, 1.0], [1.0, 0.5, 1.0, 1.0], [], []),
])
def test_nsr_and_psr_masks_follow_the_rule_for_any_reward_values(rewards, verdicts, negatives, positives):
    """'a wrong answer in a group that has a right one' (right: verdict >= threshold); the advantage is A_pre
    clipped to the mask's sign, e.g. group 3: mean 0.125, A_pre = [0.475, 0.275, -0.125, -0.625] -> the wrong
    answer at 0.4 is a negative with advantage min(0.275, 0) = 0."""
    r, v = torch.tensor(rewards), torch.tensor(verdicts)
    for name, want in (("nsr_prerl", negatives), ("psr_prerl", positives), ("nsr_rl", negatives),
                       ("psr_rl", positives)):
        t = obj.sample_terms(name, r, 4, verdicts=v, threshold=0.5)
        assert torch.nonzero(t.mask).view(-1).tolist() == want, name
        a_pre = obj.mean_centred_advantages(r, 4)
        ref = a_pre if name.endswith("prerl") else obj.grpo_advantages(r, 4)
        ref = ref.clamp(max=0) if name.startswith("nsr") else ref.clamp(min=0)
        assert torch.equal(t.advantage, torch.where(t.mask, ref, torch.zeros(len(rewards)))), name
    if rewards == [0.6, 0.4, 0.0, -0.5]:
        t = obj.sample_terms("nsr_prerl", r, 4, verdicts=v)
        assert torch.allclose(t.advantage, torch.tensor([0.0, 0.0, -0.125, -0.625]))


def test_binary_rewards_keep_the_reference_rule_a_pre_below_zero():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (64,), generator=g).float()
    for name, sign in (("nsr_prerl", -1), ("psr_prerl", 1)):
        t = obj.sample_terms(name, r, 4)
        a_pre = obj.mean_centred_advantages(r, 4)
        assert torch.equal(t.mask, a_pre * sign > 0)
        assert torch.equal(t.advantage, torch.where(t.mask, a_pre, torch.zeros(64)))


class _Algo:
    clip_eps_low, clip_eps_high, dual_clip_c = 0.2, 0.2, 10.0
    kl_coef, old_logp, tis_cap = 0.3, "rollout", 0.0


def test_step_loss_hand_computed_with_two_objectives_old_logp_and_kl():
    """Group of 2, rewards [1, 0], adv_norm mean: A = [0.5, -0.5]; lengths [2, 1] (N_grpo = 3); nsr_prerl
    keeps sample 1 (N = 1, A_pre = -0.5). Rows: sample 0 cond x2, sample 1 cond, sample 1 free.
      row 0: rho = e^(-0.8+1.0) = 1.2214, A = .5: max(-.61070, -.5 * 1.2) = -0.6 (clipped)
      row 1: rho = 1, A = .5: -0.5
      row 2: rho = e^(-1 - (-1 + ln 2)) = 0.5, A = -.5: max(0.25, 0.4) = 0.4 (clipped; dual-clip 5 not hit)
      grpo = (-0.6 - 0.5 + 0.4) / 3 = -0.233333 (weight 1)
      row 3 (free, on-policy): -A = 0.5, weight 2 / N 1 -> 1.0
      KL: 0.3 / 3 per cond row; k3(d = -0.2) = e^-.2 + .2 - 1 = 0.0187308, k3(-0.5) = 0.1065307, k3(0) = 0
          -> 0.1 * 0.1252615 = 0.01252615
      total = -0.233333 + 1.0 + 0.0125262 = 0.7791928
    d loss / d logp: row 0: 0 (clipped) + 0.1 (1 - e^-.2) = 0.0181269; row 1: -0.5 / 3 + 0.1 (1 - e^-.5) =
    -0.1273198; row 2: 0 (clipped, k3' = 0); row 3: 0.5 * 2 = 1.0."""
    r = torch.tensor([1.0, 0.0])
    terms = {"grpo": obj.sample_terms("grpo", r, 2, adv_norm="mean"), "nsr_prerl": obj.sample_terms("nsr_prerl", r, 2)}
    loss_fn = obj.StepLoss.build(terms, {"grpo": 1.0, "nsr_prerl": 2.0}, torch.tensor([2, 1]),
                                 row_sample=torch.tensor([0, 0, 1, 1]), cond=torch.tensor([True, True, True, False]),
                                 behaviour=torch.tensor([-1.0, -2.0, -1.0 + math.log(2.0), -0.7]), algo=_Algo(),
                                 ref=torch.tensor([-1.0, -2.5, -1.0, 0.0]))
    lp = torch.tensor([-0.8, -2.0, -1.0, -0.7], dtype=torch.float64, requires_grad=True)
    loss, d = loss_fn(lp, torch.arange(4))
    assert loss.sum().item() == pytest.approx(0.7791928, abs=1e-6)
    assert d.term_sums["grpo"].item() == pytest.approx(-0.7 / 3, abs=1e-6)
    assert d.term_sums["nsr_prerl"].item() == pytest.approx(1.0, abs=1e-6)
    assert (d.clipped, d.tokens) == ({"grpo": 2, "nsr_prerl": 0}, {"grpo": 3, "nsr_prerl": 1})
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([0.0181269, -0.1273198, 0.0, 1.0], dtype=torch.float64), atol=1e-6)
    # the same rows in two calls (two micro-batches): the merged diagnostics and the summed loss agree
    a, da = loss_fn(lp.detach()[[2, 0]], torch.tensor([2, 0]))
    b, db = loss_fn(lp.detach()[[3, 1]], torch.tensor([3, 1]))
    merged = obj.LossDiagnostics.merge([da, db], loss_fn.names)
    assert (a.sum() + b.sum()).item() == pytest.approx(0.7791928, abs=1e-6)
    assert merged.term_sums["grpo"].item() == pytest.approx(-0.7 / 3, abs=1e-6)
    assert merged.clip_fraction("grpo") == 2 / 3
    assert merged.logp_by_row(4).tolist() == pytest.approx([-0.8, -2.0, -1.0, -0.7])


def test_normalisers_count_only_kept_tokens():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    lens = torch.tensor([3, 5, 7, 11])
    terms = {"grpo": obj.sample_terms("grpo", r, 4), "nsr_prerl": obj.sample_terms("nsr_prerl", r, 4)}
    assert obj.token_normalisers(terms, lens) == {"grpo": 26, "nsr_prerl": 23}


def test_tis_weight_hand_computed_and_detached():
    # logp - beh = [0.5, 1.0, -0.7, 0.0], cap 2: min(e^0.5, 2) = 1.64872, min(e^1, 2) = 2, e^-0.7 = 0.49659, 1
    logp = torch.tensor([-1.0, -1.0, -2.0, -0.3], requires_grad=True)
    beh = torch.tensor([-1.5, -2.0, -1.3, -0.3])
    w = obj.tis_weight(logp, beh, 2.0)
    assert torch.allclose(w, torch.tensor([1.6487213, 2.0, 0.4965853, 1.0]), atol=1e-6)
    assert not w.requires_grad                     # a constant factor: gradient flows only through the loss
    # weighted GRPO token loss with A = 1, on-policy (ratio 1): l = -w * A * rho, d l / d logp = -w
    loss = (w * obj.policy_loss(logp, logp.detach(), torch.ones(4))).sum()
    loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([1.6487213, 2.0, 0.4965853, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="cap must be > 0"):
        obj.tis_weight(logp, beh, 0.0)
