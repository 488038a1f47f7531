"""Memory plans: how much GPU memory a config's rollout and training step take, without a GPU or the weights.

`fastprerl plan CONFIG` (cli.py) builds the config's model from its architecture alone (arch.py) on fake
tensors, runs one training step of the config's largest shapes under torch's memory trackers (step.py,
tracker.py), adds the rollout engine by its own accounting (rollout.py) and prints a table by category and
phase with the verdict against --gpu-memory (report.py). measure.py measures a real CPU step of the same
shapes: the reference the plan is tested against (tests/unit/test_plan.py).
"""
from .arch import ArchitectureError, load_architecture
from .report import Plan, make_plan, parse_size

__all__ = ["ArchitectureError", "Plan", "load_architecture", "make_plan", "parse_size"]
