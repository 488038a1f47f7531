"""The arms of `fastprerl study`: their names, the phases each one trains, and the folder it trains into."""
from __future__ import annotations

from pathlib import Path

ARMS = ("grpo", "nsr_prerl", "psr_prerl", "dsrl", "dsrl_adaptive")
OPTIONAL_ARMS = ("prerl", "dsrl_w1", "nsr_rl_grpo")
DSRL_ARMS = ("dsrl", "dsrl_adaptive", "dsrl_w1")
DEFAULT_SIGNAL = "logp/free_mean"
WARMUP_WEIGHT = 0.01   # the paper's code: the warm-up loss is 0 * RL + 0.01 * L_pre


def _phase(name: str, steps: int, weight: float = 1.0) -> dict:
    return {"name": name, "steps": steps, "objectives": [{"name": name, "weight": weight}]}


def arm_phases(arm: str, steps: int, warmup: int, adaptive_max: int = 0,
               warmup_weight: float = WARMUP_WEIGHT) -> list[dict]:
    """The schedule of an arm. dsrl, dsrl_adaptive and nsr_rl_grpo weight their warm-up objective by
    `warmup_weight`; dsrl_w1 is dsrl with the warm-up weighted 1.0; single-objective arms weight theirs 1.0."""
    if arm in ("dsrl", "dsrl_w1", "nsr_rl_grpo"):
        if not 0 < warmup < steps:
            raise ValueError(f"--warmup: expected 0 < warmup < steps ({steps}), got {warmup}")
        first = "nsr_rl" if arm == "nsr_rl_grpo" else "nsr_prerl"
        return [_phase(first, warmup, 1.0 if arm == "dsrl_w1" else warmup_weight), _phase("grpo", steps - warmup)]
    if arm == "dsrl_adaptive":
        if not 0 < adaptive_max < steps:
            raise ValueError(f"--adaptive-max: expected 0 < adaptive_max < steps ({steps}), got {adaptive_max}")
        return [_phase("nsr_prerl", adaptive_max, warmup_weight), _phase("grpo", steps - adaptive_max)]
    if arm not in ARMS + OPTIONAL_ARMS:
        raise ValueError(f"--arms: unknown arm {arm!r}; choose from {list(ARMS + OPTIONAL_ARMS)}")
    return [_phase(arm, steps)]


def arm_dir(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / arm / f"seed{seed}"
