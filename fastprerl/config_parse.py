"""Reading raw TOML values into the config dataclasses (fastprerl/config.py): types, allowed values and
ranges per key, unknown keys with the closest valid one, and dotted `key=value` overrides. Every problem is a
`ConfigError` naming the key and what was expected."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import operator
import tomllib
import typing
from typing import Any, Union

from .rewards import EXTRACT_MODES

OBJECTIVES = ("grpo", "prerl", "nsr_prerl", "psr_prerl", "nsr_rl", "psr_rl", "w_reinforce")


class ConfigError(ValueError):
    pass


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
    "model.logprob_impl": ("auto", "torch", "triton", "naive"),
    "data.format": ("completion", "chat"),
    "rollout.backend": ("hf", "vllm"),
    "algo.adv_norm": ("std", "mean"),
    "algo.negative_rule": ("group_advantage", "reward_threshold"),
    "algo.old_logp": ("detached", "rollout"),
    "objective.name": OBJECTIVES,
    "reward.extract": EXTRACT_MODES,
    "data.bad_rows": ("error", "skip"),
    "data.long_prompts": ("error", "skip"),
}
POSITIVE = {"rollout.prompts_per_step", "rollout.samples_per_prompt", "rollout.max_new_tokens",
            "rollout.temperature", "rollout.generation_batch_size", "reward.timeout", "reward.workers",
            "optim.lr", "optim.max_tokens_per_microbatch", "data.size", "data.digits", "phase.steps",
            "eval.n_problems", "eval.k", "eval.temperature"}
NON_NEGATIVE = {"optim.weight_decay", "optim.grad_clip", "algo.clip_eps_low", "algo.clip_eps_high",
                "algo.kl_coef", "algo.w_reinforce_lambda", "run.threads", "logging.samples_every",
                "optim.eps", "reward.format_penalty", "algo.tis_cap", "rollout.vllm_max_model_len",
                "eval.every", "eval.max_new_tokens"}
RANGES = {"rollout.top_p": (0.0, "<", "<=", 1.0), "rollout.vllm_gpu_memory_utilization": (0.0, "<", "<=", 1.0),
          "optim.beta1": (0.0, "<=", "<", 1.0), "optim.beta2": (0.0, "<=", "<", 1.0)}   # lo op value op hi
_COMPARE = {"<": operator.lt, "<=": operator.le}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, tp, value):
    """Check/convert one scalar value against the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for alt in typing.get_args(tp):
            try:
                return _coerce(key, alt, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected one of types {[_type_name(a) for a in typing.get_args(tp)]}, "
                          f"got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond the float range
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _closest(name: str, options, prefix: str = "") -> str:
    m = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f" (did you mean {prefix + m[0]!r}?)" if m else ""


def _check_value(key: str, short: str, value):
    if short in CHOICES and value not in CHOICES[short]:
        raise ConfigError(f"{key}: expected one of {list(CHOICES[short])}, got {value!r}")
    if short in POSITIVE and not value > 0:
        raise ConfigError(f"{key}: expected a value > 0, got {value!r}")
    if short in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")
    if short in RANGES:
        lo, lo_op, hi_op, hi = RANGES[short]
        if not (_COMPARE[lo_op](lo, value) and _COMPARE[hi_op](value, hi)):
            raise ConfigError(f"{key}: expected {lo} {lo_op} value {hi_op} {hi}, got {value!r}")


def build(cls, data: dict[str, Any], prefix: str, short_prefix: str):
    """An instance of the dataclass `cls` from the table `data` (keys under `prefix`; `short_prefix` is the
    prefix of the rules in CHOICES / POSITIVE / ...: "phase." for every phase, "objective." for every objective)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in data:
        if k not in fields:
            raise ConfigError(f"unknown key {prefix + k!r}{_closest(k, fields, prefix)}; "
                              f"valid keys here: {sorted(fields)}")
    kwargs = {}
    for name, _f in fields.items():
        if name not in data:
            continue
        key, short = prefix + name, short_prefix + name
        tp, val = hints[name], data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, val, key + ".", name + ".")
        elif typing.get_origin(tp) in (tuple, tuple) and not dataclasses.is_dataclass(typing.get_args(tp)[0]):
            inner = typing.get_args(tp)[0]
            if not isinstance(val, list):
                raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {type(val).__name__}")
            kwargs[name] = tuple(_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(val))
            for i, v in enumerate(kwargs[name]):
                _check_value(f"{key}[{i}]", short, v)
        elif typing.get_origin(tp) in (tuple, tuple):
            inner = typing.get_args(tp)[0]
            if not isinstance(val, list):
                raise ConfigError(f"{key}: expected a list of tables, got {type(val).__name__}")
            sub = "phase." if inner.__name__ == "PhaseConfig" else "objective."
            kwargs[name] = tuple(build(inner, v, f"{key}[{i}].", sub) for i, v in enumerate(val))
        else:
            kwargs[name] = _coerce(key, tp, val)
            _check_value(key, short, kwargs[name])
    return cls(**kwargs)


def parse_override_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def apply_override(root, data: dict[str, Any], dotted: str, value):
    """Sets `dotted` (e.g. optim.lr) in the raw table `data` of the dataclass `root`, checking every part."""
    parts = dotted.split(".")
    node, cls, path = data, root, ""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
        if cls is not None and part not in fields:
            raise ConfigError(f"unknown key {path + part!r}{_closest(part, fields, path)}; "
                              f"valid keys here: {sorted(fields)}")
        path += part + "."
        if i == len(parts) - 1:
            node[part] = value
            return
        tp = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {dotted!r}: {path[:-1]!r} is not a table")
        node = node.setdefault(part, {})
        cls = tp


@contextlib.contextmanager
def naming(key: str, value: str):
    """An OSError (a missing folder or file, no network) or a ValueError (a folder that holds no model or
    tokenizer) is re-raised, as the same kind, naming the config key that gave the path; fastprerl's own
    errors, which already start with the key, pass unchanged."""
    try:
        yield
    except (OSError, ValueError) as e:
        if str(e).startswith(key):
            raise
        kind = OSError if isinstance(e, OSError) else ValueError
        raise kind(f"{key} = {value!r}: {e}") from e
