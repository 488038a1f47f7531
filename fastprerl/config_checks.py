"""Cross-field checks of the config (fastprerl/config.py's `validate` calls them): objectives that cannot learn
from the configured batch. Every problem is a `ConfigError` naming the key and what was expected."""
from __future__ import annotations

from .config_parse import ConfigError
from .objectives import OBJECTIVES

# what an objective compares within a prompt's group of samples (its samples, else its advantage): with one
# sample per prompt (rollout.samples_per_prompt = 1) its advantages are 0 or its mask empty, so it trains nothing
_GROUP_SAMPLES = {"negatives": "negatives: a wrong answer in a group with a right one",
                  "positives": "positives: a right answer in a group with a wrong one"}
_GROUP_ADVANTAGES = {"mean_centred": "mean-centred advantages r_i - mean_g r"}


def _compares_group(obj, algo) -> str | None:
    """Why the objective `obj` (objectives.Objective) needs two or more samples per prompt, or None."""
    if obj.samples != "all":   # NSR / PSR masks compare a prompt's samples only under "group_advantage"
        return _GROUP_SAMPLES[obj.samples] if algo.negative_rule == "group_advantage" else None
    if obj.advantage == "grpo" and algo.adv_norm == "mean":
        return "advantages r_i - mean_g r (algo.adv_norm = \"mean\")"
    return _GROUP_ADVANTAGES.get(obj.advantage)


def check_objectives(cfg) -> None:
    """Objectives that cannot learn from the configured batch: a group objective with one sample per prompt
    (NSR / PSR only under algo.negative_rule "group_advantage"; GRPO only with algo.adv_norm "mean", as with
    "std" a group of one has A_i = r_i), a phase whose weights are all 0 or sum to 0, and a negative weight
    unless schedule.allow_negative_weights. cfg: Config."""
    G = cfg.rollout.samples_per_prompt
    for i, ph in enumerate(cfg.schedule.phases):
        key = f"schedule.phases[{i}].objectives"
        for j, o in enumerate(ph.objectives):
            if o.weight < 0 and not cfg.schedule.allow_negative_weights:
                raise ConfigError(f"{key}[{j}].weight: expected a weight >= 0, got {o.weight!r} (objective "
                                  f"{o.name!r} of phase {ph.name!r}); a negative weight pushes its term the other "
                                  f"way: set schedule.allow_negative_weights = true if that is meant")
        if sum(o.weight for o in ph.objectives) == 0:
            raise ConfigError(f"{key}: the weights of phase {ph.name!r} sum to 0 "
                              f"({[(o.name, o.weight) for o in ph.objectives]}), so it trains nothing; expected a "
                              f"non-zero sum")
        if G > 1:
            continue
        for j, o in enumerate(ph.objectives):
            obj = OBJECTIVES.get(o.name)
            why = _compares_group(obj, cfg.algo) if obj is not None else None
            if why and o.weight != 0:
                raise ConfigError(f"rollout.samples_per_prompt: {key}[{j}] is {o.name!r} (phase {ph.name!r}), "
                                  f"which compares the samples of a prompt ({why}); with 1 sample per prompt it "
                                  f"trains nothing. Expected rollout.samples_per_prompt >= 2"
                                  + (" (or algo.negative_rule = \"reward_threshold\")" if obj.samples != "all" else ""))
