"""Phases of a run (DSRL: NSR-PreRL for S steps, then GRPO), what happens at a switch, and the adaptive switch.

Fixed schedule: phase i runs schedule.phases[i].steps steps, one after the other.

Adaptive switch ([schedule.adaptive], signal != ""): the first phase ends when its signal says the pruning is
done; the run keeps its total budget T = sum of all phases' steps, so the steps the first phase does not use
go to the second phase. With signal = "logp/free_mean" (the mean prompt-free log-prob log P(y_t | e, y_<t)
of the rows the phase's prompt-free objectives score, measured in the step's loss pass before its update;
for NSR-PreRL: the tokens of the negatives), window w, patience p, min_delta d, min_steps m and
M = schedule.phases[0].steps, after every step n = 1, 2, ... of the first phase:

  1. If the step's metrics row has the signal (a step without rows to score, e.g. no mixed group, has none
     and changes nothing in 2-3), append it to the history s_1..s_k.
  2. If k >= w: a = mean(s_{k-w+1}, ..., s_k). If no best exists yet or a < best - d: best = a, stale = 0
     (the signal still falls); else stale += 1.
  3. The phase ends after step n if n >= m and stale >= p ("plateau"), or if n == M ("max_steps").

So with w = 3, p = 3 the phase runs until the 3-step mean of the signal has failed to reach a new minimum
three measured steps in a row. The metrics row of every step of the first phase carries schedule/signal_ma
(a, when k >= w) and schedule/stale; the row of its last step carries schedule/switch_at (the first step
of the second phase, 0-based) and schedule/switch_reason. The history, best, stale count and the switch
step are in the checkpoint (state_dict), so a resumed run switches at the same step.
"""
from __future__ import annotations


class Schedule:
    def __init__(self, cfg):
        """cfg: ScheduleConfig."""
        self.cfg = cfg
        self.total_steps = sum(ph.steps for ph in cfg.phases)
        self.adaptive = cfg.adaptive if cfg.adaptive.signal else None
        self.history: list[float] = []
        self.best: float | None = None
        self.stale = 0
        self.switch_at: int | None = None   # adaptive: first step of phase 1, once decided
        self.bounds: list[tuple[int, int, object]] = []
        self._set_bounds()

    def _set_bounds(self):
        """(first_step, end_step, phase) per phase. Adaptive: phase 0 ends at switch_at once decided (else at
        its maximum), and phase 1 absorbs the steps phase 0 did not use."""
        phases = self.cfg.phases
        lengths = [ph.steps for ph in phases]
        if self.adaptive is not None and self.switch_at is not None:
            lengths[1] += lengths[0] - self.switch_at
            lengths[0] = self.switch_at
        self.bounds, start = [], 0
        for ph, n in zip(phases, lengths):
            self.bounds.append((start, start + n, ph))
            start += n

    def phase_at(self, step: int) -> tuple[int, object]:
        """(phase index, PhaseConfig) of the 0-based step."""
        for i, (s, e, ph) in enumerate(self.bounds):
            if s <= step < e:
                return i, ph
        raise IndexError(f"step {step} is past the schedule ({self.total_steps} steps)")

    def is_switch(self, step: int) -> bool:
        """True at the first step of every phase but the first."""
        return step > 0 and any(s == step for s, _, _ in self.bounds)

    def observe(self, step: int, row: dict) -> dict:
        """After the 0-based `step` with metrics `row`: applies the adaptive rule (module docstring) while in
        the first phase and returns the schedule/* entries for that row ({} without an adaptive switch)."""
        if self.adaptive is None or self.switch_at is not None or self.phase_at(step)[0] != 0:
            return {}
        ad, n, out = self.adaptive, step + 1, {}
        value = row.get(ad.signal)
        if isinstance(value, (int, float)):
            self.history.append(float(value))
            if len(self.history) >= ad.window:
                avg = sum(self.history[-ad.window:]) / ad.window
                out["schedule/signal_ma"] = avg
                if self.best is None or avg < self.best - ad.min_delta:
                    self.best, self.stale = avg, 0
                else:
                    self.stale += 1
        out["schedule/stale"] = self.stale
        reason = None
        if n >= ad.min_steps and self.stale >= ad.patience:
            reason = (f"plateau: the {ad.window}-step mean of {ad.signal} made no new minimum (best {self.best:.4f}, "
                      f"min_delta {ad.min_delta}) for {self.stale} measured steps, after {n} steps "
                      f"(min_steps {ad.min_steps})")
        elif n == self.cfg.phases[0].steps:
            reason = f"max_steps: schedule.phases[0].steps = {n} reached"
        if reason is not None:
            self.switch_at = n
            self._set_bounds()
            out.update({"schedule/switch_at": n, "schedule/switch_reason": reason})
        return out

    def state_dict(self) -> dict:
        return {"history": list(self.history), "best": self.best, "stale": self.stale, "switch_at": self.switch_at}

    def load_state_dict(self, state: dict | None):
        """state: from state_dict; None (a checkpoint of a fixed schedule) leaves the initial state."""
        if not state:
            return
        self.history = [float(x) for x in state["history"]]
        self.best = None if state["best"] is None else float(state["best"])
        self.stale = int(state["stale"])
        self.switch_at = None if state["switch_at"] is None else int(state["switch_at"])
        self._set_bounds()
