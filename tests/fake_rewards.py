"""Test-only reward: a random-init model cannot solve anything, so the trainer tests need a reward that
gives mixed groups. This stand-in is deterministic in the response text; it is not a verifier."""


def parity_reward(responses, samples):
    return [float(sum(map(ord, r)) % 2) for r in responses]


def nan_reward(responses, samples):
    return [float("nan")] * len(responses)


def zero_reward(responses, samples):
    """Every response scores 0: every advantage is 0, so a step's loss is its KL term alone."""
    return [0.0] * len(responses)
