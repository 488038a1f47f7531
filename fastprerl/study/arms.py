"""The arms of `fastprerl study`: their names, the phases each one trains, and the folder it trains into."""
from __future__ import annotations

from pathlib import Path

ARMS = ("grpo", "nsr_prerl", "psr_prerl", "dsrl", "dsrl_adaptive")
OPTIONAL_ARMS = ("prerl",)
DSRL_ARMS = ("dsrl", "dsrl_adaptive")
DEFAULT_SIGNAL = "logp/free_mean"


def _phase(name: str, steps: int) -> dict:
    return {"name": name, "steps": steps, "objectives": [{"name": name, "weight": 1.0}]}


def arm_phases(arm: str, steps: int, warmup: int, adaptive_max: int = 0) -> list[dict]:
    if arm == "dsrl":
        if not 0 < warmup < steps:
            raise ValueError(f"--warmup: expected 0 < warmup < steps ({steps}), got {warmup}")
        return [_phase("nsr_prerl", warmup), _phase("grpo", steps - warmup)]
    if arm == "dsrl_adaptive":
        if not 0 < adaptive_max < steps:
            raise ValueError(f"--adaptive-max: expected 0 < adaptive_max < steps ({steps}), got {adaptive_max}")
        return [_phase("nsr_prerl", adaptive_max), _phase("grpo", steps - adaptive_max)]
    if arm not in ARMS + OPTIONAL_ARMS:
        raise ValueError(f"--arms: unknown arm {arm!r}; choose from {list(ARMS + OPTIONAL_ARMS)}")
    return [_phase(arm, steps)]


def arm_dir(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / arm / f"seed{seed}"
