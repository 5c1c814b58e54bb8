"""Fuzzing the DICOM reader, ``inspect`` and ``batch`` with damaged variants of a small real series.

The variants (:mod:`tests.dicom_variants`) damage four 5 mm slices of the real head CT study:
absent, absurd and inconsistent tags, truncation, flipped bytes in headers and in the
scanner's JPEG Lossless pixel streams, corrupt VRs. Each must be refused with a
:class:`VolumeReadError` naming the damaged file, or, when the damage is harmless, read as
exactly the undamaged series: never another exception, and never a silently different volume.
"""

from __future__ import annotations

import csv
import time

import numpy as np
import pydicom
import pytest

from app.cli import main
from lib.io import VolumeReadError, read_volume
from tests.dicom_variants import EITHER, REFUSED, SAME, VARIANTS, copy_as_new_series, make_bases, make_variant, names
from tests.tiny_preset import make_tiny_preset

# The budget for one variant (read, then ``inspect`` on the command line).
SECONDS_PER_VARIANT = 30


@pytest.fixture(scope="module")
def fuzz_tree(real_ct_volume, head_ct_folder, tmp_path_factory):
    """A tree of every variant in its own folder and an undamaged copy of the plain base
    (``good``); returns the tree, ``{name: files}``, the good files and the undamaged volumes."""
    root = tmp_path_factory.mktemp("fuzz")
    bases = make_bases(real_ct_volume, head_ct_folder, root / "bases")
    tree = root / "tree"
    made = {variant.name: make_variant(variant, bases[variant.base], tree / variant.name) for variant in VARIANTS}
    good = copy_as_new_series(bases["plain"], tree / "good")
    undamaged = {
        name: read_volume(copy_as_new_series(files, root / f"undamaged-{name}")[0].parent)
        for name, files in bases.items()
    }
    return tree, made, good, undamaged


def test_there_are_enough_variants():
    assert len(VARIANTS) >= 50 and len({variant.name for variant in VARIANTS}) == len(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda variant: variant.name)
def test_variant_is_refused_naming_the_file_or_read_unchanged(variant, fuzz_tree, capsys):
    _, made, _, undamaged = fuzz_tree
    files = made[variant.name]
    folder, named = files[0].parent, variant.named_file(files)
    started = time.perf_counter()
    try:
        volume = read_volume(folder)
    except VolumeReadError as error:
        assert variant.outcome in (REFUSED, EITHER), f"{variant.name} must be read: {error}"
        assert names(error, named), f"{variant.name}: {error}"
        code = main(["inspect", str(folder)])
        err = capsys.readouterr().err  # pydicom's warnings about odd values may come first
        assert code == 2 and err.splitlines()[-1] == f"error: {error}" and "Traceback" not in err, err
    else:
        assert variant.outcome in (SAME, EITHER), f"{variant.name} must be refused, was read as {volume.shape}"
        reference = undamaged[variant.base]
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_array_equal(volume.positions, reference.positions)
        np.testing.assert_array_equal(volume.affine, reference.affine)
        assert main(["inspect", str(folder)]) == 0
        capsys.readouterr()
    assert time.perf_counter() - started < SECONDS_PER_VARIANT


def test_one_batch_run_fails_each_damaged_series_and_completes_the_rest(fuzz_tree, tmp_path_factory):
    tree, made, good, _ = fuzz_tree
    preset = make_tiny_preset(tmp_path_factory.mktemp("preset"), "tinyct", layout="open", max_subjects=3)
    out = tmp_path_factory.mktemp("out")
    assert (
        main(["batch", str(tree), str(out), "--preset", str(preset.root), "--steps", "2", "--no-alignment", "--quiet"])
        == 1
    )
    with open(out / "manifest.csv", newline="") as manifest:
        rows = {row["series_uid"]: row for row in csv.DictReader(manifest)}
    series_uid = lambda path: str(pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID)  # noqa: E731
    assert rows[series_uid(good[0])]["status"] == "done"
    for variant in VARIANTS:
        files = made[variant.name]
        row = rows[series_uid(files[0])]
        if row["status"] == "done":
            assert variant.outcome in (SAME, EITHER), f"{variant.name} must fail: {row}"
        else:
            assert variant.outcome in (REFUSED, EITHER) and row["status"] in ("failed", "skipped"), (
                f"{variant.name}: {row}"
            )
            named = variant.named_file(files)
            assert f"{variant.name}/{named.name}" in row["message"] or f"{named.name}," in row["message"], (
                f"{variant.name}: {row}"
            )
            assert str(tree) not in row["message"]
