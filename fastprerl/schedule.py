"""Phases of a run (DSRL: NSR-PreRL for S steps, then GRPO) and what happens at a switch."""
from __future__ import annotations

from typing import Tuple


class Schedule:
    def __init__(self, cfg):
        """cfg: ScheduleConfig."""
        self.cfg = cfg
        self.bounds = []  # (first_step, end_step, phase)
        start = 0
        for ph in cfg.phases:
            self.bounds.append((start, start + ph.steps, ph))
            start += ph.steps
        self.total_steps = start

    def phase_at(self, step: int) -> Tuple[int, object]:
        """(phase index, PhaseConfig) of the 0-based step."""
        for i, (s, e, ph) in enumerate(self.bounds):
            if s <= step < e:
                return i, ph
        raise IndexError(f"step {step} is past the schedule ({self.total_steps} steps)")

    def is_switch(self, step: int) -> bool:
        """True at the first step of every phase but the first."""
        return step > 0 and any(s == step for s, _, _ in self.bounds)
