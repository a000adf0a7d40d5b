"""Building typed, frozen dataclasses from plain dicts (YAML, JSON), collecting *every* problem.

The generic half of the configuration (:mod:`qpruner.config` holds the schema): :func:`opt` declares a
field with its limits and help; :func:`_build` turns a mapping into the dataclass, converting YAML
values to the annotated types (``Optional``, ``tuple[...]``, ``dict[...]``, numbers written as
strings), checking limits and choices, suggesting the closest name for an unknown key, and calling
each class's ``_check()`` for rules that involve several fields. Problems are appended to a list, so
the caller raises one :class:`~qpruner.errors.ConfigError` that names them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import typing
from dataclasses import field
from typing import Any

import yaml

from .errors import ConfigError


def opt(default: Any, *, min: float | None = None, max: float | None = None,
        choices: tuple | None = None, help: str = "") -> Any:
    """A config field with its constraints stored as metadata (checked by :func:`_build`)."""
    meta = {"min": min, "max": max, "choices": choices, "help": help}
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata=meta)
    return field(default=default, metadata=meta)


MAX_DEPTH = 32           # nesting of a job file's values; deeper is refused before anything recurses into it
MAX_NODES = 100_000      # values in a job file, counting every use of a YAML alias (a "billion laughs" is refused)
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 3, 6, 6, 6, 80, 80


def show(value) -> str:
    """A value as error messages quote it: ``repr``, cut to a few elements and levels (never expanding a
    structure of aliases) and to 160 characters."""
    text = _SHOW.repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def check_size(data, where: str = "job") -> list[str]:
    """Problems when ``data`` nests deeper than ``MAX_DEPTH`` or holds more than ``MAX_NODES`` values (aliases
    counted at every use): checked without recursion, so a hostile file fails here, not in a traceback."""
    stack, nodes = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            return [f"{where}: values nested more than {MAX_DEPTH} levels deep; a job file is a few levels of "
                    "mappings and lists"]
        if nodes > MAX_NODES:
            return [f"{where}: more than {MAX_NODES:,} values (counting every use of a YAML alias); a job file "
                    "holds a few hundred"]
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in list(value.keys()) + list(value.values()))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
    return []


def safe_yaml(text: str):
    """``yaml.safe_load`` that turns a document too deep for the parser into a ``yaml.YAMLError``."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError(f"nested too deeply for the parser (more than {MAX_DEPTH} levels is never a job file)") from None


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp, where: str, problems: list[str]) -> Any:
    """Convert a YAML value to the annotated type, or record a problem and return None."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(value, inner, where, problems)
    if origin is dict:
        key_t, value_t = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {show(value)}")
            return None
        return {str(k): _coerce(v, value_t, f"{where}.{k}", problems) for k, v in value.items()}
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list of {_type_name(inner)} values, got {show(value)}")
            return None
        items = [_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(f"{where}: expected a finite number, got {show(value)}")
            return None
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {show(value)}")
    return None


def _check_limits(value: Any, meta: dict, where: str, problems: list[str]) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(value, tuple):
            where_i = f"{where}[{i}]"
        else:
            where_i = where
        if meta.get("choices") is not None and v not in meta["choices"]:
            problems.append(f"{where_i}: {show(v)} is not one of {list(meta['choices'])}"
                            + _did_you_mean(v, meta["choices"]))
        if meta.get("min") is not None and v < meta["min"]:
            problems.append(f"{where_i}: {show(v)} is below the minimum {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            problems.append(f"{where_i}: {show(v)} is above the maximum {meta['max']}")


def _build(cls, data: Any, prefix: str, problems: list[str]):
    """Instantiate dataclass ``cls`` from ``data`` (a dict), appending problems instead of raising."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'job'}: expected a mapping of keys, got {show(data)}")
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key" + _did_you_mean(key, fields)
                            + f"; valid keys: {', '.join(fields)}")
    kwargs = {}
    own_problems = False
    for name, f in fields.items():
        if name not in data:
            continue
        where = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{where}.", problems)
            continue
        before = len(problems)
        value = _coerce(data[name], tp, where, problems)
        if len(problems) == before:
            _check_limits(value, dict(f.metadata), where, problems)
            kwargs[name] = value
        own_problems = own_problems or len(problems) > before
    obj = cls(**kwargs)
    if hasattr(obj, "_check"):
        try:
            problems.extend(obj._check())
        except (ArithmeticError, TypeError, ValueError, AttributeError):
            if not own_problems:   # a rule across fields tripped on a field already reported (e.g. a 0 divisor)
                raise
    return obj


def build_section(cls, data: Any, source: str):
    """One section (e.g. :class:`FinetuneConfig`) from a mapping, validated like a job file: every problem
    at once in a :class:`ConfigError` naming ``source`` (e.g. an export's ``qpruner_plan.json``)."""
    problems: list[str] = []
    obj = _build(cls, data, f"{source}: ", problems)
    if problems:
        raise ConfigError(problems)
    return obj


def _apply_override(data: dict, override: str, problems: list[str]) -> None:
    if "=" not in override:
        problems.append(f"override {show(override)}: expected key=value, e.g. finetune.steps=5")
        return
    key, raw = override.split("=", 1)
    try:
        value = safe_yaml(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        problems.append(f"override {show(override)}: value is not valid YAML ({exc})")
        return
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else node[part]
        node = node[part]
        if not isinstance(node, dict):
            problems.append(f"override {show(override)}: {part} is not a section")
            return
    node[parts[-1]] = value
