"""The schedule: fixed phases, and the adaptive switch rule (fastprerl/phases.py) on hand-made signal
sequences, in a real tiny run, and across a resume."""
import json

import pytest

from fastprerl.config import (
    AdaptiveSwitchConfig,
    ConfigError,
    ObjectiveConfig,
    PhaseConfig,
    ScheduleConfig,
    load_config,
)
from fastprerl.phases import Schedule

SIG = "logp/free_mean"


def schedule(first=10, second=5, **adaptive):
    phases = (PhaseConfig("nsr_prerl", first, (ObjectiveConfig("nsr_prerl", 1.0),)),
              PhaseConfig("grpo", second, (ObjectiveConfig("grpo", 1.0),)))
    return Schedule(ScheduleConfig(phases=phases, adaptive=AdaptiveSwitchConfig(signal=SIG, **adaptive)))


def feed(sch, values):
    """Rows with the signal (None: a step without it) until the switch; returns the rows' schedule entries."""
    out = []
    for step, v in enumerate(values):
        out.append(sch.observe(step, {} if v is None else {SIG: v}))
        if sch.switch_at is not None:
            break
    return out


def test_plateau_switch_on_a_hand_made_sequence():
    # window 2, patience 2, min_delta 0, min_steps 3. 2-step means from step n = 2 on:
    # n2 -1.5 (best), n3 -2.5 (best), n4 -3.25 (best), n5 -3.375 (best), n6 -3.5 (best),
    # n7 (-3.75 - 3.0) / 2 = -3.375 >= -3.5: stale 1, n8 (-3.0 - 2.75) / 2 = -2.875: stale 2 -> ends after n = 8
    sch = schedule(min_steps=3, window=2, patience=2)
    rows = feed(sch, [-1.0, -2.0, -3.0, -3.5, -3.25, -3.75, -3.0, -2.75, -2.0])
    assert len(rows) == 8 and sch.switch_at == 8
    assert [r.get("schedule/signal_ma") for r in rows] == [None, -1.5, -2.5, -3.25, -3.375, -3.5, -3.375, -2.875]
    assert [r["schedule/stale"] for r in rows] == [0, 0, 0, 0, 0, 0, 1, 2]
    assert rows[-1]["schedule/switch_at"] == 8 and rows[-1]["schedule/switch_reason"].startswith("plateau")
    assert "schedule/switch_at" not in rows[-2]
    # the budget stays 15 steps: GRPO gets the 2 steps NSR-PreRL did not use
    assert [(s, e, ph.name) for s, e, ph in sch.bounds] == [(0, 8, "nsr_prerl"), (8, 15, "grpo")]
    assert sch.phase_at(7)[1].name == "nsr_prerl" and sch.phase_at(8)[1].name == "grpo"
    assert sch.is_switch(8) and not sch.is_switch(10) and sch.total_steps == 15
    assert sch.observe(8, {SIG: -9.0}) == {}   # nothing after the switch


def test_min_delta_min_steps_missing_signal_and_max_steps():
    # min_delta 0.5, window 1, patience 1: -1 (best), -1.25 (not below -1.5: stale 1) -> would end at n = 2,
    # but min_steps 4; n3 has no signal (stale stays 1); n4 -1.4: stale 2 -> ends after n = 4
    sch = schedule(min_steps=4, window=1, patience=1, min_delta=0.5)
    rows = feed(sch, [-1.0, -1.25, None, -1.4, -5.0])
    assert sch.switch_at == 4 and [r["schedule/stale"] for r in rows] == [0, 1, 1, 2]
    assert "schedule/signal_ma" not in rows[2]
    # a signal falling by more than min_delta every step runs to the phase's maximum (phases[0].steps = 5)
    sch = schedule(first=5, second=5, min_steps=2, window=1, patience=1, min_delta=0.5)
    rows = feed(sch, [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    assert sch.switch_at == 5 and rows[-1]["schedule/switch_reason"].startswith("max_steps")
    assert [(s, e) for s, e, _ in sch.bounds] == [(0, 5), (5, 10)]


def test_state_dict_round_trip_continues_the_same_decision():
    values = [-1.0, -2.0, -3.0, -3.5, -3.25, -3.75, -3.0, -2.75]
    a = schedule(min_steps=3, window=2, patience=2)
    feed(a, values[:5])
    b = schedule(min_steps=3, window=2, patience=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))   # as a checkpoint stores it
    rest = [b.observe(step, {SIG: v}) for step, v in enumerate(values[5:], start=5)]
    assert b.switch_at == 8 and rest[-1]["schedule/switch_at"] == 8


@pytest.mark.parametrize("override, message", [
    ("schedule.adaptive.signal=entropy", "schedule.adaptive.signal: expected"),
    ("schedule.adaptive.window=0", "schedule.adaptive.window: expected a value >= 1"),
    ("schedule.adaptive.min_delta=-1.0", "schedule.adaptive.min_delta: expected a value >= 0"),
    ("schedule.adaptive.min_steps=3", "schedule.adaptive.min_steps: expected at most schedule.phases[0].steps (2"),
])
def test_bad_adaptive_settings_name_the_key(override, message):
    args = [override] if "signal" in override else ["schedule.adaptive.signal=logp/free_mean", override]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(FAST_TINY, args)


def test_adaptive_switch_needs_a_prompt_free_first_phase(tmp_path):
    text = FAST_TINY.read_text().replace('name = "nsr_prerl"', 'name = "grpo"', 1)
    text = text.replace('{ name = "nsr_prerl", weight = 1.0 }', '{ name = "grpo", weight = 1.0 }', 1)
    path = tmp_path / "grpo_first.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="schedule.adaptive.signal: 'logp/free_mean' is measured on prompt-free"):
        load_config(path, ["schedule.adaptive.signal=logp/free_mean", "schedule.adaptive.min_steps=1"])


# ---------------------------------------------------------------------------------------------- real runs
from runs import TINY as FAST_TINY  # noqa: E402
