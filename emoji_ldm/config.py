"""Config fields: a stage's frozen dataclass is the one definition of its options.

`opt(help=...)` declares a field with its help text and CLI details (stored in the field's metadata, read by
`emoji_ldm.cli.options`, which turns the fields into argparse flags); `__post_init__` validates and raises
`UserError`. This module imports nothing above `errors`, so every stage can use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from emoji_ldm.errors import UserError

FIELD_KEY = "emoji_ldm_cli"  # the metadata key of a field's CLI details


def opt(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, positional: bool = False,
        metavar: str | None = None, choices: tuple | None = None, invert: bool = False,
        skip: tuple[str, ...] = (), rename: dict[str, str] | None = None, cli: bool = True,
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a command-line option.

    flag: the option's name without dashes (default: the field name with `-`);
    positional: an argument, not a flag; invert: a bool field the switch sets
    to False; skip/rename: for a nested config, its fields to leave out or to
    name differently here; cli=False: settable from Python only.
    """
    meta = {FIELD_KEY: dict(help=help, flag=flag, positional=positional, metavar=metavar, choices=choices,
                       invert=invert, skip=skip, rename=rename or {}, cli=cli)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """`["a.b=1", "C=x"]` -> {"a.b": "1", "C": "x"}; a UserError names the item without `=`."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r} is not NAME=VALUE")
        out[key.strip()] = value.strip()
    return out



def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
