"""The study's arms and the statistics of its report, against hand-computed values."""
import pytest

from fastprerl.study import arm_phases
from fastprerl.study.stats import bootstrap_diff, evals_to, sign_test


def _sched(arm, **kw):
    return [(p["name"], p["steps"], p["objectives"][0]["weight"]) for p in arm_phases(arm, 16, 4, **kw)]


def test_warmup_arms_weight_their_first_phase_as_the_paper_code_unless_told():
    assert _sched("dsrl") == [("nsr_prerl", 4, 0.01), ("grpo", 12, 1.0)]
    assert _sched("dsrl_w1") == [("nsr_prerl", 4, 1.0), ("grpo", 12, 1.0)]
    assert _sched("nsr_rl_grpo") == [("nsr_rl", 4, 0.01), ("grpo", 12, 1.0)]
    assert _sched("dsrl", warmup_weight=0.5) == [("nsr_prerl", 4, 0.5), ("grpo", 12, 1.0)]
    assert _sched("nsr_prerl") == [("nsr_prerl", 16, 1.0)]
    with pytest.raises(ValueError, match="--warmup"):
        arm_phases("nsr_rl_grpo", 4, 4)


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test([0.1, 0.2, 0.3]) == 0.25            # 2 * (1/2)^3
    assert sign_test([0.1, -0.2, 0.3]) == 1.0            # 2 * (1 + 3) / 8, capped
    assert sign_test([0.1] * 5) == 2 / 32
    assert sign_test([0.1, 0.1, 0.1, 0.1, -0.1]) == pytest.approx(2 * 6 / 32)
    assert sign_test([0.0, 0.0]) == 1.0                  # ties carry no sign


def test_bootstrap_of_a_paired_difference():
    a, b = [4, 2, 0, 3], [2, 2, 1, 1]                    # k = 4: Avg@4 0.5625 against 0.375
    point, lo, hi = bootstrap_diff([(a, b)], 4)
    assert point == pytest.approx(0.1875)
    assert lo <= point <= hi and -0.25 <= lo and hi <= 0.5   # per-problem differences lie in [-1/4, 1/2]
    assert bootstrap_diff([(a, a), (b, b)], 4) == (0.0, 0.0, 0.0)
    # two seeds: the point is the mean of the per-seed differences
    assert bootstrap_diff([(a, b), (b, a)], 4)[0] == pytest.approx(0.0)


def test_evals_to_threshold_reads_the_first_evaluated_step():
    s = {"eval_steps": [0, 8, 16], "eval_avg": [0.2, 0.31, 0.29]}
    assert evals_to(s, 0.3) == 8 and evals_to(s, 0.2) == 0 and evals_to(s, 0.5) is None
