"""reward.fn = "module:function": a user's reward function runs in the reward workers, per response, under
reward.timeout (the functions are in tests/user_rewards.py, imported by the workers by name)."""
import logging
import time

import pytest

from fastprerl.rewards import RewardResult, get_reward_fn, shutdown

TIMEOUT = 1.0


@pytest.fixture(scope="module", autouse=True)
def stop_shared_pool():
    yield
    shutdown()


def test_user_function_scores_in_the_workers():
    fn = get_reward_fn("user_rewards:length_is_n", timeout=5.0)
    assert fn(["abc", "ab"], [{"n": 3}, {"n": 3}]) == [RewardResult(1.0, 1.0, True), RewardResult(0.0, 0.0, True)]
    # RewardResults pass through as they are
    out = get_reward_fn("user_rewards:raises_on_marker")(["fine"], [{"id": 1}])
    assert out == [RewardResult(0.5, 1.0, False)]


def test_a_hanging_call_costs_one_timeout_and_the_rest_is_scored():
    fn = get_reward_fn("user_rewards:hangs_on_marker", timeout=TIMEOUT)
    fn(["warm"], [{}])  # the server is up and the module imported: not this test's cost
    responses = ["ok 1", "HANG", "ok 2", "ok 3", "ok 4"]
    start = time.monotonic()
    out = fn(responses, [{}] * len(responses))
    elapsed = time.monotonic() - start
    assert out == [RewardResult(1.0, 1.0, True), RewardResult(0.0, 0.0, True, timed_out=True)] + \
        [RewardResult(1.0, 1.0, True)] * 3
    assert elapsed <= TIMEOUT + 1.0, f"took {elapsed:.2f} s"
    # the run goes on: the next step is scored normally
    assert fn(["next"], [{}]) == [RewardResult(1.0, 1.0, True)]


def test_a_raising_function_is_reported_once_with_its_sample(caplog):
    fn = get_reward_fn("user_rewards:raises_on_marker", timeout=5.0)
    with caplog.at_level(logging.WARNING, logger="fastprerl.rewards"):
        for step in range(3):
            out = fn(["BOOM here", "fine"], [{"id": 10 + step}, {"id": 99}])
            assert out == [RewardResult(0.0, 0.0, False), RewardResult(0.5, 1.0, False)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "fastprerl.rewards"]
    assert len(warnings) == 1, warnings
    assert "user_rewards:raises_on_marker" in warnings[0] and "KeyError" in warnings[0]
    assert "'BOOM here'" in warnings[0] and "'id': 10" in warnings[0]
    assert fn.failures == 3


def test_a_wrong_number_of_values_is_a_failure_not_a_crash(caplog):
    fn = get_reward_fn("user_rewards:returns_two_values")
    with caplog.at_level(logging.WARNING, logger="fastprerl.rewards"):
        assert fn(["a"], [{}]) == [RewardResult(0.0, 0.0, False)]
    assert "returned 2 values for 1 response" in caplog.text


def test_bad_names_and_unpicklable_samples():
    with pytest.raises(ValueError, match="cannot load reward function"):
        get_reward_fn("user_rewards:no_such_function")
    fn = get_reward_fn("user_rewards:length_is_n")
    with pytest.raises(ValueError, match="samples must be picklable"):
        fn(["a"], [{"n": 1, "f": lambda: 0}])
