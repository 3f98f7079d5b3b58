"""Site profiles: how to crawl one emoji site, as data (YAML), not code.

A profile names the page URL template (`{tag}`, `{page}`), the default page
range, the CSS selectors (what to wait for, the items, the image inside an
item), the attributes holding the image URL and title, how the last page is
detected, and how to unwrap proxied image URLs to the original. `discords` is
built in (`profiles/discords.yaml`); any other YAML file works the same.

When a page is read (`Settling`, fed by the page reader): `wait_for` must appear
within `page_timeout_s` (else the page failed); then the page must settle. A
page has items once they stop arriving for `items_settle_s`; it is empty only
when the document is complete and no item has appeared for `settle_s`, or
at once when the optional `empty_marker` selector (the site's own "nothing
here" element) is present. A page that has not rendered yet is never empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

from emoji_ldm.errors import UserError

REQUIRED = ("name", "url", "wait_for", "item", "image")


@dataclass(frozen=True)
class Unwrap:
    path: str   # the proxy's path, e.g. /_next/image
    param: str  # the query parameter holding the original URL, e.g. url


@dataclass(frozen=True)
class SiteProfile:
    name: str
    url: str
    wait_for: str
    item: str
    image: str
    pages: str = "1-1"
    image_url_attr: str = "src"
    title_attr: str = "title"
    last_page: str = "empty"  # the tag ends at the first page without items
    unwrap: Unwrap | None = None
    page_timeout_s: float = 20.0
    settle_s: float = 1.5  # an empty page: document complete and no item for this long
    items_settle_s: float = 0.3  # items are read once their count has not grown for this long
    empty_marker: str | None = None  # a selector the site shows on a page without items: empty at once
    source: str = field(default="", compare=False)  # where the profile came from

    def __post_init__(self):
        if "{page}" not in self.url:
            raise UserError(f"profile {self.name!r}: url {self.url!r} must contain {{page}}")
        if self.last_page != "empty":
            raise UserError(f"profile {self.name!r}: last_page must be 'empty', got {self.last_page!r}")
        if self.page_timeout_s <= 0:
            raise UserError(f"profile {self.name!r}: page_timeout_s must be > 0, got {self.page_timeout_s}")
        for name in ("settle_s", "items_settle_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"profile {self.name!r}: {name} must be a number of seconds >= 0, got {value!r}")
        if self.empty_marker is not None and (not isinstance(self.empty_marker, str) or not self.empty_marker.strip()):
            raise UserError(f"profile {self.name!r}: empty_marker must be a CSS selector, got {self.empty_marker!r}; "
                            "leave it out when the site shows nothing special on an empty page")
        parse_pages(self.pages)

    def page_url(self, tag: str, page: int) -> str:
        from urllib.parse import quote

        return self.url.format(tag=quote(tag, safe=""), page=page)

    def original_image_url(self, src: str, page_url: str) -> str:
        """The image's own URL: `src` made absolute, and taken out of the site's image proxy."""
        url = urljoin(page_url, src)
        if self.unwrap:
            parsed = urlparse(url)
            if parsed.path.rstrip("/") == self.unwrap.path.rstrip("/"):
                inner = parse_qs(parsed.query).get(self.unwrap.param)
                if inner:
                    return urljoin(page_url, inner[0])  # parse_qs has already percent-decoded it
        return url


def builtin_profiles() -> dict[str, Path]:
    folder = resources.files("emoji_ldm.crawl").joinpath("profiles")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_profile(name_or_path: str) -> SiteProfile:
    """A built-in profile by name, or a YAML file."""
    import yaml

    builtin = builtin_profiles()
    if name_or_path in builtin:
        path = builtin[name_or_path]
    elif Path(name_or_path).is_file():
        path = Path(name_or_path)
    else:
        raise UserError(f"unknown profile {name_or_path!r}: use one of {', '.join(sorted(builtin))} or a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"profile {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"profile {str(path)!r} must be a mapping of settings")
    missing = [k for k in REQUIRED if not raw.get(k)]
    if missing:
        raise UserError(f"profile {str(path)!r} is missing {', '.join(missing)} (needed: {', '.join(REQUIRED)})")
    known = set(SiteProfile.__dataclass_fields__) - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"profile {str(path)!r} has unknown settings {', '.join(unknown)}")
    unwrap = raw.pop("unwrap", None)
    if unwrap is not None:
        if not isinstance(unwrap, dict) or not unwrap.get("path") or not unwrap.get("param"):
            raise UserError(f"profile {str(path)!r}: unwrap needs `path` and `param`")
        unwrap = Unwrap(path=str(unwrap["path"]), param=str(unwrap["param"]))
    return SiteProfile(**{k: str(v) if k in ("pages",) else v for k, v in raw.items()}, unwrap=unwrap,
                       source=str(path))


def parse_pages(text: str) -> range:
    """'1-1000' -> range(1, 1001); '7' -> range(7, 8)."""
    text = str(text).strip()
    try:
        first, _, last = text.partition("-")
        start, end = int(first), int(last or first)
    except ValueError:
        raise UserError(f"page range {text!r} is not N or N-M (e.g. 1-1000)") from None
    if start < 1:
        raise UserError(f"page range {text!r} must start at 1 or more")
    if end < start:
        raise UserError(f"page range {text!r} runs backwards: write the first page first, e.g. {end}-{start}")
    return range(start, end + 1)


# How often a page that is settling is read (its items counted)
POLL_S = 0.1


class Settling:
    """The settle rule of one page (the module docstring), fed one `page_reader.PAGE_STATE_JS` reading at a time
    from `wait_for`'s appearance on: `step` answers None while the page settles, then (ok|empty|failed, why)."""

    def __init__(self, profile: SiteProfile, now: float):
        self.p = profile
        self.deadline = now + profile.page_timeout_s + profile.settle_s
        self.count, self.changed, self.complete_since = -1, now, None

    def step(self, state: str, n: int, marker: bool, now: float) -> tuple[str, str] | None:
        p = self.p
        if n != self.count:
            self.count, self.changed = n, now
        if state == "complete" and self.complete_since is None:
            self.complete_since = now
        if n == 0 and marker:
            return "empty", f"empty marker {p.empty_marker!r}"
        quiet = now - max(self.changed, self.complete_since or now)
        if self.complete_since is not None and n > 0 and quiet >= p.items_settle_s:
            return "ok", ""
        if self.complete_since is not None and n == 0 and quiet >= p.settle_s:
            return "empty", f"no items {p.settle_s:g} s after the page completed"
        if now > self.deadline:
            if n > 0:
                return "ok", ""  # still growing: take what is there
            return "failed", (f"timeout: the page did not settle within {p.page_timeout_s + p.settle_s:g} s "
                              f"(document {state}, no {p.item!r} yet)")
        return None

    def next_reading(self, now: float) -> float:
        """When to read the page next: every POLL_S until it is complete and shows items, then not before their
        quiet time is up (an item seen later only restarts the quiet time)."""
        if self.complete_since is None or self.count <= 0:
            return now + POLL_S
        settled = max(self.changed, self.complete_since) + self.p.items_settle_s
        return min(max(now + POLL_S / 2, settled), self.deadline + POLL_S)
