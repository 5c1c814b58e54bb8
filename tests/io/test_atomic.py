"""The check that a folder can be written, made before the work that fills it."""

from __future__ import annotations

import pytest

from lib.io.atomic import check_writable_folder


def test_missing_parents_are_created_and_nothing_is_left_behind(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    assert check_writable_folder(target) == target
    assert (tmp_path / "a" / "b").is_dir() and not target.exists()
    assert list((tmp_path / "a" / "b").iterdir()) == []


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("file", "is a file, not a folder"),
        ("below-file", "is a file, not a folder"),
        ("proc", "no folder can be made in /proc "),
    ],
)
def test_an_unwritable_place_is_one_clear_oserror(tmp_path, where, reason):
    """Tests run as root, so permissions cannot make a folder unwritable: a path under a file
    and one under /proc (which nobody can create folders in) stand in for it."""
    (tmp_path / "notes.txt").write_text("a file")
    target = {
        "file": tmp_path / "notes.txt" / "out",
        "below-file": tmp_path / "notes.txt" / "a" / "out",
        "proc": "/proc/rebrain-no-such/out",
    }[where]
    with pytest.raises(OSError, match=reason) as error:
        check_writable_folder(target)
    assert str(error.value).startswith(f"{target}: cannot write the folder: ") and "\n" not in str(error.value)
    assert (tmp_path / "notes.txt").read_text() == "a file"
