"""Sources without Ray or a server: the Twemoji pack's names, and what `dir:` and `urls:` refuse before
anything is read (listing and fetching: tests/integration/test_sources.py)."""

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.sources import FetchConfig, open_source
from emoji_ldm.sources.base import FetchError, fetch_bytes
from emoji_ldm.sources.twemoji import describe, twemoji_items
from tests.conftest import png_bytes


def test_twemoji_pack_titles_and_tags():
    items = twemoji_items()
    assert len(items) == 4009
    assert describe("1f004") == ("mahjong red dragon", "Activities")
    assert describe("2764")[0] == "red heart"
    title, tag = describe("1f44d-1f3fd")
    assert title == "thumbs up medium skin tone" and tag == "People & Body"
    assert describe("1f1e6")[0] == "regional indicator symbol letter a"
    assert all(i.title for i in items)
    assert sum(1 for i in items if i.tag) > 3600


def test_dir_errors(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        open_source(f"dir:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="no files"):
        open_source(f"dir:{tmp_path}")
    (tmp_path / "x.png").write_bytes(png_bytes())
    (tmp_path / "metadata.csv").write_text("name,title\nx.png,x\n")
    with pytest.raises(UserError, match="no 'file_name' column"):
        open_source(f"dir:{tmp_path}")


def test_a_bad_url_past_the_checked_head_is_rejected_at_ingest_not_read_as_a_file():
    with pytest.raises(FetchError, match="not an http"):
        fetch_bytes("etc/passwd", FetchConfig())


def test_malformed_url_lists(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("http://ok/a.png\nnot a url\n")
    with pytest.raises(UserError, match=r"bad.txt:2: 'not a url' is not an http\(s\) URL"):
        open_source(f"urls:{bad}")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("link\nhttp://a/b.png\n")
    with pytest.raises(UserError, match="no 'url' or 'image_url' column"):
        open_source(f"urls:{nocol}")
    with pytest.raises(UserError, match="not a readable file"):
        open_source(f"urls:{tmp_path / 'missing.txt'}")
    with pytest.raises(UserError, match="unknown list format '.json'"):
        (tmp_path / "x.json").write_text("[]")
        open_source(f"urls:{tmp_path / 'x.json'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(UserError, match="lists no URLs"):
        open_source(f"urls:{empty}")
