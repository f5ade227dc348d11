"""Parameter values as users type them: coercion to a setting's type, `key=value` parsing,
parameter files, and the closest valid name for a typo. Nothing here knows the settings
themselves."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar

import yaml

from physlm.errors import ConfigError

T = TypeVar("T")


def suggest(key: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Return `value` as the type `hint` asks for, or raise ConfigError.

    Ints are accepted where floats are expected, and numeric strings where
    numbers are expected (YAML reads `1e-3` as a string; the CLI passes text).
    """
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is list:  # one item may stand for a list of one
        (inner,) = typing.get_args(hint)
        items = value if isinstance(value, list | tuple) else [value]
        return [coerce(key, item, inner) for item in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of name: value, got "
                              f"{type(value).__name__} {value!r}")
        key_type, value_type = typing.get_args(hint)
        return {coerce(key, k, key_type): coerce(f"{key}.{k}", v, value_type)
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if value == "" and type(None) in options:
            return None  # papermill and CLI users write "empty" as ""
        (inner,) = [o for o in options if o is not type(None)]
        return coerce(key, value, inner)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}"
                              + (suggest(str(value), choices) if isinstance(value, str) else ""))
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a new field type without a coercion rule
        raise TypeError(f"no coercion rule for {key}: {hint}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def parse_options(cls: type[T], values: typing.Mapping[str, Any], what: str) -> T:
    """A `cls` dataclass from a flat mapping (a params file, papermill parameters, `--set`):
    each value coerced to its field's type, None meaning "not set" (the field's default);
    an unknown name is an error naming the closest valid one. `what` names the options."""
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown {what} {key!r}{suggest(str(key), names)}")
    return cls(**{key: coerce(key, str(value) if isinstance(value, PurePath) else value,
                              hints[key])
                  for key, value in values.items() if value is not None})


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse a command-line `key=value`; the value is read as YAML (`2`, `1e-3`, `true`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"expected key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{text}: {raw!r} is not a valid YAML value ({problem}); fix it, "
                          "or quote it to pass it as text") from error
    return key, value


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML parameter file (the format papermill's `-f` takes)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"parameter file {path} is a directory; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (undecodable byte at offset "
                          f"{error.start}); re-encode it to UTF-8") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of parameter: value")
    return values
