"""Strict values for the Serve app's `args:` (serve/app.py `AppArgs`): `serve run module:build_app insecure=false`
and a Serve config's YAML can hand over strings where a boolean or a number is meant, and Python reads the
string "false" as true. Each field is parsed by its declared type, from the real value or one exact spelling;
anything else is refused at start, naming the field, the value and what it accepts.

    bool   True / False, or "true" / "false" (any case)        never "no", "0", "", "off", 1
    int    an int, or a string of decimal digits ("16", "-1")    never 16.5, "16.0", "1e3", True
    float  an int or a float, or a decimal string ("0.05")     never "nan", "inf", True
    str    a string                                           never a number (a YAML `model: 1`)
    tuple  a list or tuple of strings, or one comma-separated string
    dict   a mapping of strings to strings
"""

from __future__ import annotations

import dataclasses
import math
import re

from emoji_ldm.errors import UserError

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse(name: str, kind: type, value):
    """`value` as `kind`; UserError naming `args.<name>` otherwise."""
    parser = _PARSERS.get(kind)
    if parser is None:
        return value
    parsed = parser(value)
    if parsed is _BAD:
        raise UserError(f"args.{name} must be {_WORDS[kind]}, got {value!r} ({type(value).__name__})")
    return parsed


def parse_fields(config) -> None:
    """Every field of the frozen dataclass `config` replaced by its parsed value."""
    for f in dataclasses.fields(config):
        object.__setattr__(config, f.name, parse(f.name, f.type if isinstance(f.type, type) else _named(f.type),
                                                 getattr(config, f.name)))


def unknown(names, config_type) -> None:
    """UserError for names that are not fields of `config_type` (a typo must not be a silent default)."""
    known = {f.name for f in dataclasses.fields(config_type)}
    extra = sorted(set(names) - known)
    if extra:
        raise UserError(f"unknown args: {', '.join(extra)}; the app takes {', '.join(sorted(known))}")


_BAD = object()


def _named(annotation: str) -> type | None:
    return {"bool": bool, "int": int, "float": float, "str": str, "tuple": tuple, "dict": dict}.get(annotation)


def _bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return _BAD


def _int(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    return _BAD


def _float(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else _BAD
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    return _BAD


def _str(value):
    return value if isinstance(value, str) else _BAD


def _tuple(value):
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return _BAD


def _dict(value):
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    return _BAD


_PARSERS = {bool: _bool, int: _int, float: _float, str: _str, tuple: _tuple, dict: _dict}
_WORDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string",
          tuple: "a list of strings (or one comma-separated string)", dict: "a mapping of names to strings"}
