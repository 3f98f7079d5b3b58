"""The `emoji-ldm dataset versions|show|diff|tag|restore` commands: a config each, and a function that runs
the operation of `emoji_ldm.store.ops` and returns the text to print."""

from __future__ import annotations

from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.store.ops import diff, format_versions, restore, show, tag, versions
from emoji_ldm.store.uri import DatasetRef, normalize_uri


def _check_version(version: int | None) -> None:
    if version is not None and version < 0:
        raise UserError(f"version {version} must be 0 or more")


@dataclass(frozen=True)
class VersionsConfig:
    uri: str = opt(positional=True, help="dataset URI")
    limit: int = opt(20, help="print the newest N versions")

    def __post_init__(self):
        if self.limit < 1:
            raise UserError(f"--limit must be 1 or more, got {self.limit}")


def versions_text(config: VersionsConfig) -> str:
    rows = versions(config.uri, limit=config.limit)
    text = format_versions(rows)
    if rows and rows[0]["version"] > 0:
        text += f"\n(the newest {len(rows)}; --limit N shows more)"
    return text


@dataclass(frozen=True)
class ShowConfig:
    uri: str = opt(positional=True, help="URI, URI@VERSION or URI@TAG")
    version: int | None = opt(None, help="version number to show")
    tag: str | None = opt(None, help="tag name to show")
    sheet: str | None = opt(None, help="write a contact sheet of images with titles/captions to this PNG")
    sheet_count: int = opt(64, help="images on the sheet")

    def __post_init__(self):
        if self.version is not None and self.tag is not None:
            raise UserError("give --version or --tag, not both")
        _check_version(self.version)
        if self.sheet_count < 1:
            raise UserError(f"--sheet-count must be 1 or more, got {self.sheet_count}")


def show_command(config: ShowConfig) -> str:
    ref = DatasetRef.parse(config.uri)
    if config.version is not None or config.tag is not None:
        ref = DatasetRef(normalize_uri(ref.uri), version=config.version, tag=config.tag)
    text = show(ref, sheet=config.sheet, sheet_count=config.sheet_count).text()
    return text + (f"\ncontact sheet: {config.sheet}" if config.sheet else "")


@dataclass(frozen=True)
class DiffConfig:
    uri: str = opt(positional=True, help="dataset URI")
    a: str = opt(positional=True, help="version number or tag")
    b: str = opt(positional=True, help="version number or tag")
    show: int = opt(10, help="print up to N ids of each side")


def diff_command(config: DiffConfig) -> str:
    result = diff(config.uri, config.a, config.b, sample=config.show)
    lines = [result.text()]
    lines += [f"+ {id_}" for id_ in result.added_sample]
    lines += [f"- {id_}" for id_ in result.removed_sample]
    return "\n".join(lines)


@dataclass(frozen=True)
class TagConfig:
    uri: str = opt(positional=True, help="dataset URI")
    name: str = opt(positional=True, help="the tag: letters, digits, '_', '.' or '-'")
    version: int = opt(positional=True, help="the version it names")

    def __post_init__(self):
        _check_version(self.version)


def tag_command(config: TagConfig) -> str:
    tag(config.uri, config.name, config.version)
    return (f"tagged version {config.version} of {config.uri} as {config.name!r} "
            f"(read it as {config.uri}@{config.name})")


@dataclass(frozen=True)
class RestoreConfig:
    uri: str = opt(positional=True, help="dataset URI")
    version: int = opt(positional=True, help="the version to make current again")
    message: str = opt("", help="a note recorded with the new version")

    def __post_init__(self):
        _check_version(self.version)


def restore_command(config: RestoreConfig) -> str:
    new = restore(config.uri, config.version, message=config.message)
    return f"restored version {config.version} of {config.uri} as new version {new}"
