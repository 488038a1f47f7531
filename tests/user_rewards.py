"""User reward functions for the tests of `reward.fn = "module:function"` (they run in the reward workers,
which import this module by name from the test directory on the import path)."""
import time

from fastprerl.rewards import RewardResult


def length_is_n(responses, samples):
    return [float(len(r) == s["n"]) for r, s in zip(responses, samples)]


def hangs_on_marker(responses, samples):
    """1.0 per response, except that it never returns for a response containing "HANG"."""
    for r in responses:
        while "HANG" in r:
            time.sleep(0.05)
    return [1.0] * len(responses)


def raises_on_marker(responses, samples):
    if any("BOOM" in r for r in responses):
        raise KeyError(f"no score for {samples[0]['id']}")
    return [RewardResult(0.5, 1.0, False) for _ in responses]


def returns_two_values(responses, samples):
    return [1.0, 1.0]


def always_raises(responses, samples):
    """A broken reward function: it raises on every response."""
    return [1 / 0 for _ in responses]


def raises_on_even_answers(responses, samples):
    """Raises for the samples whose gold answer is even; scores 1.0 elsewhere."""
    if int(samples[0]["answer"]) % 2 == 0:
        raise ValueError(f"even answer {samples[0]['answer']}")
    return [1.0 for _ in responses]
