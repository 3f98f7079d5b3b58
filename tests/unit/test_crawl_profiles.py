"""Site profiles: the built-in discords profile, user YAML files, page ranges, proxied image URLs."""

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
    assert p.page_url("cats & dogs", 2) == "http://127.0.0.1:9/cats%20%26%20dogs/2.html"


@pytest.mark.parametrize("text,message", [
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\n", "missing image"),
    ("name: x\nurl: 'http://h/'\nwait_for: a\nitem: b\nimage: c\n", "must contain {page}"),
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\nimage: c\nselectr: d\n", "unknown settings selectr"),
    ("name: x\nurl: 'http://h/{page}'\nwait_for: a\nitem: b\nimage: c\nunwrap: {path: /p}\n", "unwrap needs"),
    ("- just\n- a list\n", "must be a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
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
