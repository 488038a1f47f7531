"""Reading raw TOML values into the config dataclasses (fastprerl/config.py): types, allowed values and
ranges per key, unknown keys with the closest valid one, and dotted `key=value` overrides. Every problem is a
`ConfigError` naming the key and what was expected.

A field's constraints are in its type: `Literal[...]` for its allowed values (inside a tuple: of every item),
`Annotated[int | float, Range(...)]` for a numeric bound (POSITIVE: > 0, NON_NEGATIVE: >= 0)."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import operator
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union


class ConfigError(ValueError):
    pass


_COMPARE = {"<": operator.lt, "<=": operator.le}
_AT_LEAST = {"<": ">", "<=": ">="}


@dataclass(frozen=True)
class Range:
    """A numeric bound of a field, `Annotated[float, Range(...)]`: lo lo_op value (hi_op hi); ops "<" or "<=".
    Without hi_op / hi the bound is one-sided: value > lo ("<") or value >= lo ("<=")."""
    lo: float
    lo_op: str
    hi_op: str | None = None
    hi: float | None = None

    def holds(self, value) -> bool:
        return _COMPARE[self.lo_op](self.lo, value) and (self.hi_op is None or _COMPARE[self.hi_op](value, self.hi))

    def expected(self) -> str:
        if self.hi_op is None:
            return f"a value {_AT_LEAST[self.lo_op]} {self.lo}"
        return f"{self.lo} {self.lo_op} value {self.hi_op} {self.hi}"


POSITIVE = Range(0, "<")        # value > 0
NON_NEGATIVE = Range(0, "<=")   # value >= 0


def _constraints(tp) -> tuple[Any, tuple | None, list[Range]]:
    """A field type without its constraints, its allowed values (Literal; None: any) and its ranges (Annotated):
    Annotated[int, POSITIVE] -> (int, None, [POSITIVE]); Literal["a", "b"] -> (str, ("a", "b"), [])."""
    ranges = []
    if typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        ranges = [m for m in meta if isinstance(m, Range)]
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices, ranges
    return tp, None, ranges


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, tp, value):
    """Check/convert one scalar value against the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:   # Optional[int] and int | str alike
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


def _check_value(key: str, tp, value):
    """The constraints of the field type `tp` (Literal choices, Annotated ranges) on the coerced `value`."""
    _, choices, ranges = _constraints(tp)
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    for r in ranges:
        if not r.holds(value):
            raise ConfigError(f"{key}: expected {r.expected()}, got {value!r}")


def build(cls, data: dict[str, Any], prefix: str):
    """An instance of the dataclass `cls` from the table `data` (keys under `prefix`), each value checked against
    its field's type and the constraints in it (Literal, Annotated)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    for k in data:
        if k not in fields:
            raise ConfigError(f"unknown key {prefix + k!r}{_closest(k, fields, prefix)}; "
                              f"valid keys here: {sorted(fields)}")
    kwargs = {}
    for name, _f in fields.items():
        if name not in data:
            continue
        key = prefix + name
        tp, val = hints[name], data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, val, key + ".")
        elif typing.get_origin(tp) is tuple and not dataclasses.is_dataclass(typing.get_args(tp)[0]):
            inner = typing.get_args(tp)[0]
            plain = _constraints(inner)[0]
            if not isinstance(val, list):
                raise ConfigError(f"{key}: expected a list of {_type_name(plain)}, got {type(val).__name__}")
            kwargs[name] = tuple(_coerce(f"{key}[{i}]", plain, v) for i, v in enumerate(val))
            for i, v in enumerate(kwargs[name]):
                _check_value(f"{key}[{i}]", inner, v)
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            if not isinstance(val, list):
                raise ConfigError(f"{key}: expected a list of tables, got {type(val).__name__}")
            kwargs[name] = tuple(build(inner, v, f"{key}[{i}].") for i, v in enumerate(val))
        else:
            kwargs[name] = _coerce(key, _constraints(tp)[0], val)
            _check_value(key, tp, kwargs[name])
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
