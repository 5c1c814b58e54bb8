"""Which output folders a result may replace: new, empty, or ReBrain's own, never one holding other files."""

from __future__ import annotations

import json

import pytest

from lib.report.outputs import check_output_folder


def rebrain_output(folder):
    folder.mkdir(parents=True)
    (folder / "mri.nii.gz").write_bytes(b"an earlier result")
    (folder / "provenance.json").write_text(json.dumps({"synthetic": True}))
    return folder


@pytest.mark.parametrize("case", ["new", "new-parents", "empty", "earlier-result"])
def test_a_new_empty_or_earlier_result_folder_may_be_written(tmp_path, case):
    out = tmp_path / ("a/b/out" if case == "new-parents" else "out")
    if case == "empty":
        out.mkdir()
    elif case == "earlier-result":
        rebrain_output(out)
    assert check_output_folder(out, [tmp_path / "ct.nii.gz"]) == out
    assert out.parent.is_dir()
    assert sorted(p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name) == []


@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        ("user-file", FileExistsError, "not empty and not a ReBrain output"),
        ("earlier-result-plus-a-file", FileExistsError, "not empty and not a ReBrain output"),
        ("a-link", FileExistsError, "is not a folder"),
        ("input-inside", ValueError, "holds the input"),
        ("input-is-out", ValueError, "holds the input"),
    ],
)
def test_a_folder_holding_what_rebrain_did_not_write_is_refused(tmp_path, case, error, reason):
    out, source = tmp_path / "out", tmp_path / "ct.nii.gz"
    if case == "user-file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "earlier-result-plus-a-file":
        (rebrain_output(out) / "notes.txt").write_text("mine")
    elif case == "a-link":
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    elif case == "input-inside":
        source = rebrain_output(out) / "mri.nii.gz"
    else:
        source = out
        out.mkdir()
    with pytest.raises(error, match=reason) as refused:
        check_output_folder(out, [source])
    assert str(refused.value).startswith(f"{out}: ")
