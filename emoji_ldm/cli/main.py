"""The `emoji-ldm` command line: the top-level wiring and the one error boundary.

Every command is an entry of `emoji_ldm.cli.commands.COMMANDS`: its flags come
from its config dataclass (`emoji_ldm.cli.options`), it runs one typed function,
and its result is printed here. A `UserError` raised anywhere, inside a Ray
worker too, prints as one line `emoji-ldm: error: ...` with exit code 2 (after
the traceback of where it was raised, with `-v`);
Ctrl-C prints what the interrupted command leaves behind; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from emoji_ldm import __version__
from emoji_ldm.cli.commands import COMMANDS, GROUPS, Command, Parser, UsageError, load
from emoji_ldm.cli.options import add_arguments, build_config
from emoji_ldm.errors import find_user_error


def _selected(argv: list[str]) -> Command | None:
    """The command the words of `argv` name (before any flag value could be mistaken for one)."""
    words = [a for a in argv if not a.startswith("-")]
    for n in (2, 1):
        for command in COMMANDS:
            if tuple(words[:n]) == command.words:
                return command
    return None


def build_parser(selected: Command | None = None) -> argparse.ArgumentParser:
    """The full command tree; only `selected` gets its flags (importing only its config's module)."""
    parser = Parser(
        prog="emoji-ldm", description="Versioned emoji datasets, latent diffusion training and bulk generation on Ray.")
    parser.add_argument("--version", action="version", version=f"emoji-ldm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; an error also prints the traceback of where it was raised")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        parent = sub
        if len(command.words) == 2:
            group = command.words[0]
            if group not in groups:
                groups[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest=f"{group}_command", required=True)
            parent = groups[group]
        p = parent.add_parser(command.words[-1], help=command.help, description=command.help)
        if command is selected:
            add_arguments(p, command.config_class())
    return parser


def token_mode_from_token() -> None:
    """RAY_AUTH_MODE=token when a token is given (RAY_AUTH_TOKEN or _PATH, as a cluster with KubeRay's
    `authOptions` hands it out) and no mode is: Ray's SDK sends a token only in token mode, which it reads once,
    when Ray loads, so this runs before any command imports Ray."""
    given = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if given and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    token_mode_from_token()
    command = _selected(argv)
    parser = build_parser(command)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not (command and command.words == ("submit",)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        print(f"{e.usage}emoji-ldm: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(command, args, extra)
    except KeyboardInterrupt:
        print(f"\nemoji-ldm {command.name}: {command.interrupted}", file=sys.stderr)
        return 130
    except Exception as e:
        user = find_user_error(e)
        if user is None:
            raise
        if args.verbose:  # where it was raised: the whole chain, Ray's wrappers (and their remote frames) too
            traceback.print_exception(e, file=sys.stderr)
        # one line: Ray Data appends its retry advice to the message of an exception it passes on
        print(f"emoji-ldm: error: {str(user).splitlines()[0]}", file=sys.stderr)
        return 2


def run(command: Command, args: argparse.Namespace, extra: list[str]) -> int:
    """Build the command's config, run it, print its report; the exit code."""
    # submit: the flags it does not know are the stage's own
    config = build_config(command.config_class(), args, {"args": tuple(extra)} if extra else None)
    result = load(command.run)(config)
    text = load(command.report)(result) if command.report else (None if isinstance(result, int) else result)
    if text is not None:
        print(text)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
