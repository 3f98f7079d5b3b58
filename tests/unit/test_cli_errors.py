"""The error boundary of `emoji-ldm`: a user error is one line; with `-v` it also shows where it was raised."""

from __future__ import annotations

from emoji_ldm.cli import main as cli


def test_a_user_error_is_one_line_without_verbose(tmp_path, capsys):
    assert cli.main(["dataset", "versions", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emoji-ldm: error: no dataset at") and len(err.splitlines()) == 1


def test_verbose_shows_where_a_user_error_was_raised(tmp_path, capsys):
    assert cli.main(["-v", "dataset", "versions", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "emoji_ldm/store/delta.py" in err and "in open_table" in err  # the frame that raised it
    assert err.splitlines()[-1].startswith("emoji-ldm: error: no dataset at")
