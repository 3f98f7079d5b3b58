"""Site profiles (the built-in discords profile, user YAML files, page ranges, proxied image URLs, settling),
and the crawler's pure parts: the tag-end filter and the end-of-crawl warnings."""

from __future__ import annotations

import pytest

from emoji_ldm.crawl.profiles import load_profile, parse_pages
from emoji_ldm.errors import UserError


def test_builtin_discords_profile_has_the_seed_selectors():
    p = load_profile("discords")
    assert p.page_url("Blobs", 3) == "https://discords.com/emoji-list/tag/Blobs?page=3"
    assert p.wait_for == "div.FS5UE28h.container"
    assert p.item == "div.LQY5mtmC div.aLnnpRah.text-center" and p.image == "div.Mw1EAtrx img"
    assert (p.image_url_attr, p.title_attr) == ("src", "title")
    assert parse_pages(p.pages) == range(1, 1001)
    assert p.settle_s >= 1.5 and 0 < p.items_settle_s < p.settle_s and p.empty_marker is None


def test_next_image_proxy_urls_are_unwrapped():
    p = load_profile("discords")
    page = "https://discords.com/emoji-list/tag/Blobs?page=1"
    src = "/_next/image?url=https%3A%2F%2Fcdn.discordapp.com%2Femojis%2F396521773144866826.webp%3Fsize%3D96&w=128&q=75"
    assert p.original_image_url(src, page) == "https://cdn.discordapp.com/emojis/396521773144866826.webp?size=96"
    assert p.original_image_url("/static/a.png", page) == "https://discords.com/static/a.png"
    assert p.original_image_url("/_next/image?w=128", page) == "https://discords.com/_next/image?w=128"


def test_user_profile_file(tmp_path):
    path = tmp_path / "mysite.yaml"
    path.write_text("name: mysite\nurl: 'http://127.0.0.1:9/{tag}/{page}.html'\nwait_for: '#list'\n"
                    "item: 'li.emoji'\nimage: img\npages: 2-5\n")
    p = load_profile(str(path))
    assert p.name == "mysite" and p.unwrap is None and parse_pages(p.pages) == range(2, 6)
    assert (p.settle_s, p.items_settle_s, p.empty_marker) == (1.5, 0.3, None)  # the defaults
    assert p.page_url("cats & dogs", 2) == "http://127.0.0.1:9/cats%20%26%20dogs/2.html"


@pytest.mark.parametrize("text,message", [
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\n", "missing image"),
    ("name: x\nurl: 'http://h/'\nwait_for: a\nitem: b\nimage: c\n", "must contain {page}"),
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\nimage: c\nselectr: d\n", "unknown settings selectr"),
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\nimage: c\nunwrap: {path: /p}\n", "unwrap needs"),
    ("- just\n- a list\n", "must be a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\nimage: c\nsettle_s: -1\n", "settle_s must be"),
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\nimage: c\nitems_settle_s: soon\n",
     "items_settle_s must be a number of seconds >= 0, got 'soon'"),
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\nimage: c\nempty_marker: ''\n",
     "empty_marker must be a CSS selector"),
])
def test_malformed_profiles_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_profile(str(path))


def test_unknown_profile_and_bad_page_ranges():
    with pytest.raises(UserError, match="unknown profile 'nope'.*discords"):
        load_profile("nope")
    with pytest.raises(UserError, match="runs backwards.*e.g. 1-5"):
        parse_pages("5-1")
    with pytest.raises(UserError, match="not N or N-M"):
        parse_pages("a-b")
    with pytest.raises(UserError, match="start at 1"):
        parse_pages("0-3")
    assert parse_pages("7") == range(7, 8)


def test_tag_end_filter_drops_pages_past_the_end_and_keeps_each_url_once():
    import pyarrow as pa

    from emoji_ldm.crawl.page_reader import ITEM_SCHEMA
    from emoji_ldm.crawl.shards import tag_end_filter

    def row(url, page):
        return {"locator": url, "source": "crawl:s/t", "source_url": None, "page_url": f"p{page}", "title": "",
                "tag": "t", "caption": None, "page": page}

    batch = pa.Table.from_pylist([row("b", 3), row("a", 2), row("b", 1), row("c", 6), row("a", 4), row("d", 5)],
                                 schema=ITEM_SCHEMA)
    out = tag_end_filter(batch, 5)
    assert "page" not in out.column_names
    assert sorted((r["locator"], r["page_url"]) for r in out.to_pylist()) == [("a", "p2"), ("b", "p1"), ("d", "p5")]
    assert tag_end_filter(batch, None).num_rows == 4  # no end found: every url once
    assert tag_end_filter(batch.slice(0, 0), 3).num_rows == 0


def test_warnings_for_no_items_few_pages_and_failed_pages():
    import time

    from emoji_ldm.crawl.shards import totals

    class Summary:
        images_in = 3

    def record(first, pages):
        return {"first": first, "last": first + 4, "seconds": 1.0, "resumed": False, "complete": True,
                "browser_restarts": 0, "finished_at": time.time(),
                "pages": [{"page": p, "url": f"u{p}", "status": s, "items": n, "error": e, "seconds": 0.5}
                          for p, s, n, e in pages]}

    few = totals([record(1, [(1, "ok", 3, ""), (2, "empty", 0, "no items")])], 2, range(1, 1001), Summary,
                  time.perf_counter())
    assert few["pages_ok"] == 1 and few["last_page"] == 2
    assert few["warnings"] == ["items on only 1 page(s) of 1-1000 (the tag ends at page 2): if the tag has more, its "
                               "pages may render slowly (raise settle_s in the profile) or the selectors may not "
                               "match them"]
    failed = totals([record(1, [(p, "ok", 2, "") for p in (1, 2, 3)] + [(4, "failed", 0, "timeout: x"),
                                                                        (5, "ok", 1, "")]),
                      record(6, [(6, "empty", 0, "")])], 6, range(1, 21), Summary, time.perf_counter())
    assert failed["pages_failed"] == 1 and failed["failed_pages"] == {"u4": "timeout: x"}
    assert len(failed["warnings"]) == 1 and failed["warnings"][0].startswith("1 of 6 page(s) failed, e.g. u4: timeout")
    nothing = totals([record(1, [(1, "failed", 0, "timeout: x")])], None, range(1, 5), Summary, time.perf_counter())
    assert nothing["warnings"][0].startswith("no items on any of the 1 page(s) read")
