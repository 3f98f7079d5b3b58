"""Command-line flags generated from a stage's frozen config dataclass (fields declared with `emoji_ldm.config.opt`).

A config field is the one definition of an option: its type, default, help
text (`opt(help=...)`) and validation (the dataclass's `__post_init__`, which
raises `UserError`). `add_arguments` turns the fields into argparse flags and
`build_config` turns the parsed values back into the dataclass, so the CLI
never repeats a default or a limit.

Why not tyro or jsonargparse: both generate flags from dataclasses, but nested
configs become `--image.size` / `--fetch.timeout-s`, and presets are chosen at
run time and overridden by dotted path (`--set train.lr=2e-4`), which neither
expresses without a custom type. This adapter is short, keeps the flag
names users already type (`--image-size`, `--timeout`) and supports exactly
the field types the configs use:

- `str`, `int`, `float`, and `X | None` of those (None: not given);
- `bool`: a switch (`--resume`); `opt(invert=True)` names the switch that sets
  it False (`robots` <- `--ignore-robots`);
- `tuple[str, ...]`: a repeatable flag;
- `dict[str, str]`: a repeatable `NAME=VALUE` flag (`--set`, `--env`);
- a nested frozen dataclass (`image: ImageConfig`): its own fields become
  flags of this command; `opt(skip=..., rename=...)` adapts them.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from emoji_ldm.config import FIELD_KEY, parse_pairs


@dataclasses.dataclass(frozen=True)
class _Option:
    path: tuple[str, ...]  # field names from the top config down
    kind: type  # str | int | float | bool | tuple | dict | a dataclass is flattened before this
    optional: bool
    default: Any  # dataclasses.MISSING: required
    meta: dict

    @property
    def dest(self) -> str:
        return "cfg__" + "__".join(self.path)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`, (`X`, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def options(cls: type, path: tuple[str, ...] = (), skip: tuple[str, ...] = (),
            rename: dict[str, str] | None = None) -> list[_Option]:
    """The flattened options of a config class, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        meta = f.metadata.get(FIELD_KEY)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no opt(help=...): every config field needs one")
        if not meta["cli"]:
            continue
        meta = dict(meta)
        if rename and f.name in rename:
            meta["flag"] = rename[f.name]
        tp, optional = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out.extend(options(tp, (*path, f.name), meta["skip"], meta["rename"]))
            continue
        kind = typing.get_origin(tp) or tp
        if kind not in (str, int, float, bool, tuple, dict):
            raise TypeError(f"{cls.__name__}.{f.name}: the CLI cannot express type {tp!r}")
        out.append(_Option((*path, f.name), kind, optional, _default(f), meta))
    return out


def _flag(o: _Option) -> str:
    return "--" + (o.meta["flag"] or o.path[-1].replace("_", "-"))


def _help(o: _Option) -> str:
    text = o.meta["help"]
    d = o.default
    if d is dataclasses.MISSING or d is None or o.kind is bool or (isinstance(d, (str, tuple, dict)) and not d):
        return text
    return f"{text} (default {d})"


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argparse argument per option of `cls` (see the module docstring for the types)."""
    for o in options(cls):
        m = o.meta
        common = dict(dest=o.dest, help=_help(o))
        if o.kind is not bool:
            common["metavar"] = m["metavar"] or _flag(o).lstrip("-").replace("-", "_").upper()
        if o.kind is bool:
            parser.add_argument(_flag(o), action="store_false" if m["invert"] else "store_true",
                                default=o.default, **common)
            continue
        if o.kind is tuple:
            parser.add_argument(_flag(o), action="append", default=None, **common)
            continue
        if o.kind is dict:
            common["metavar"] = m["metavar"] or "NAME=VALUE"
            parser.add_argument(_flag(o), action="append", default=None, **common)
            continue
        kwargs = dict(type=o.kind, choices=m["choices"], **common)
        if m["positional"]:
            kwargs["metavar"] = m["metavar"] or o.path[-1]
            del kwargs["dest"]
            if o.default is not dataclasses.MISSING:
                kwargs["nargs"] = "?"
            parser.add_argument(o.dest, default=None if o.default is dataclasses.MISSING else o.default,
                                **kwargs)
        else:
            required = o.default is dataclasses.MISSING
            parser.add_argument(_flag(o), required=required, default=None if required else o.default, **kwargs)


def build_config(cls: type, args: argparse.Namespace, fixed: dict[str, Any] | None = None) -> Any:
    """The config dataclass from parsed arguments (and `fixed` top-level fields that are no flag);
    its `__post_init__` validates (UserError)."""
    values: dict[tuple[str, ...], Any] = {(k,): v for k, v in (fixed or {}).items()}
    for o in options(cls):
        value = getattr(args, o.dest)
        if o.kind is tuple:
            value = tuple(value) if value is not None else o.default
        elif o.kind is dict:
            value = parse_pairs(value, _flag(o)) if value is not None else o.default
        values[o.path] = value
    return _construct(cls, (), values)


def _construct(cls: type, path: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = (*path, f.name)
        tp, _ = _unwrap(hints[f.name])
        if key in values:
            kwargs[f.name] = values[key]
        elif dataclasses.is_dataclass(tp) and any(k[:len(key)] == key for k in values):
            kwargs[f.name] = _construct(tp, key, values)
    return cls(**kwargs)


def flag_set(cls: type) -> dict[str, str]:
    """{flag: 'type=default'}: what the flag-freeze test compares."""
    out = {}
    for o in options(cls):
        name = o.dest.removeprefix("cfg__") if o.meta["positional"] else _flag(o)
        default = "required" if o.default is dataclasses.MISSING else repr(o.default)
        out[name] = f"{o.kind.__name__}{'?' if o.optional else ''}={default}"
    return out
