"""``prepare`` on the three layouts, the prepared format, and the torch dataset over it."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from lib.data.dataset import PreparedDataset, PreparedSlices, select_slices
from lib.data.layouts import discover_subjects
from lib.data.normalise import ct_to_unit, mri_to_unit
from lib.data.prepare import PrepareConfig, anonymised_key, prepare_dataset, split_subjects
from lib.io import read_volume
from tests.conftest import SHARED_DATA, require

SMALL = PrepareConfig(size=32)


@pytest.fixture(scope="module")
def brats_root():
    return require(SHARED_DATA / "brats_dev")


@pytest.fixture(scope="module")
def prepared_brats(tmp_path_factory, brats_root):
    out = tmp_path_factory.mktemp("prep") / "brats"
    manifest = prepare_dataset("brats", brats_root, out, config=SMALL, max_subjects=4)
    return out, manifest


def test_brats_layout_prepares_normalised_cropped_slices(prepared_brats, brats_case):
    out, manifest = prepared_brats
    dataset = PreparedDataset(out)
    assert len(dataset.subjects()) == 4 and manifest["total_slices"] == 4 * 155
    for key in dataset.subjects():
        source, target, mask = (dataset.array(key, n) for n in ("source", "target", "mask"))
        assert source.shape == target.shape == mask.shape == (155, 32, 32)
        assert source.min() >= -1 and source.max() <= 1 and target.max() > 0.5  # 5x downsampling smooths peaks
        # Background is -1 and the brain lies inside the crop, touching no border but the margin.
        assert np.all(target[mask == 0] == -1.0) and np.all(source[mask == 0] == -1.0)
        assert mask[:, 0, :].sum() == 0 and mask[:, :, 0].sum() == 0
    table = dataset.slices
    assert list(table.columns) == ["subject", "split", "slice", "position", "brain_fraction", "input_coverage"]
    assert table.input_coverage.between(0, 1).all() and table.input_coverage.median() > 0.95
    first = table[table.subject == dataset.subjects()[0]]
    brain = first[first.brain_fraction > 0]
    assert brain.position.min() == pytest.approx(0.0, abs=0.02) and brain.position.max() == pytest.approx(1.0, abs=0.02)
    assert np.all(np.diff(first.position) > 0)


def test_subject_keys_are_anonymous_and_splits_are_by_subject(prepared_brats):
    out, manifest = prepared_brats
    text = (out / "manifest.json").read_text() + (out / "slices.csv").read_text()
    names = json.loads((out / "private_subject_map.json").read_text()).values()
    assert all(name not in text for name in names)
    table = pd.read_csv(out / "slices.csv")
    assert table.groupby("subject").split.nunique().max() == 1
    assert manifest["counts"] == {"train": 2, "val": 1, "test": 1}
    assert all(len(digest) == 64 for s in manifest["subjects"] for digest in s["inputs"].values())


def test_split_is_reproducible_and_covers_all():
    keys = [f"k{i}" for i in range(10)]
    first = split_subjects(keys, 0.2, 0.2, seed=3)
    assert first == split_subjects(list(reversed(keys)), 0.2, 0.2, seed=3)
    assert sorted(first.values()).count("val") == 2 and sorted(first.values()).count("test") == 2
    assert split_subjects(keys, 0.2, 0.2, seed=4) != first


def test_prepared_values_match_the_normalised_source(prepared_brats, brats_root):
    """The central slice of a prepared subject is the normalised real volume, cropped and resized."""
    out, _ = prepared_brats
    names = json.loads((out / "private_subject_map.json").read_text())
    key, name = next(iter(names.items()))
    t1 = read_volume(brats_root / name / "t1n.nii.gz").array
    flair = read_volume(brats_root / name / "t2f.nii.gz").array
    mask = (t1 > 0) | (flair > 0)
    expected = mri_to_unit(t1, mask)[:, :, 77]
    dataset = PreparedDataset(out)
    prepared = dataset.array(key, "target")[77][dataset.array(key, "mask")[77] > 0]
    # The median brain intensity survives cropping and anti-aliased resizing (the mean would
    # not: at 32 pixels, partial-volume border pixels are a large share of the brain).
    assert np.median(prepared) == pytest.approx(np.median(expected[mask[:, :, 77]]), abs=0.05)


def test_synthrad_layout_on_a_tree_written_from_real_volumes(tmp_path, brats_root):
    src = tmp_path / "synthrad"
    for index, case in enumerate(sorted(p for p in brats_root.iterdir() if p.is_dir())[:3]):
        t1 = nib.load(str(case / "t1n.nii.gz"))
        data = np.asarray(t1.dataobj, dtype=np.float32)[:, :, 50:90]
        mask = (data > 0).astype(np.uint8)
        # A CT-like image in HU from the real anatomy: brain 20..45 HU, air outside.
        ct = np.where(mask > 0, 20 + 25 * data / max(np.percentile(data[mask > 0], 99), 1), -1000).astype(np.int16)
        folder = src / f"1BA{index:03d}"
        folder.mkdir(parents=True)
        for name, array in (("ct", ct), ("mr", data), ("mask", mask)):
            nib.save(nib.Nifti1Image(array, t1.affine), str(folder / f"{name}.nii.gz"))
    out = tmp_path / "prepared"
    manifest = prepare_dataset("synthrad", src, out, config=SMALL)
    assert manifest["source"] == "ct" and len(manifest["subjects"]) == 3
    dataset = PreparedDataset(out)
    source = dataset.array(dataset.subjects()[0], "source")
    mask = dataset.array(dataset.subjects()[0], "mask")
    assert source.shape == (40, 32, 32)
    # -1000 HU air -> -1 through the CT window; brain 20..45 HU -> inside the window's range.
    assert np.all(source[mask == 0] == -1.0)
    inside = source[mask > 0]
    assert ct_to_unit(np.array(15.0)) < np.median(inside) < ct_to_unit(np.array(50.0))


def test_open_layout_synthesises_distinct_paired_subjects(tmp_path):
    out = tmp_path / "open"
    reports = []
    manifest = prepare_dataset(
        "open", None, out, config=SMALL, open_count=3, progress=lambda *report: reports.append(report)
    )
    assert reports == [(0, 3, ""), (1, 3, ""), (2, 3, ""), (3, 3, "")]
    dataset = PreparedDataset(out)
    keys = dataset.subjects()
    assert len(keys) == 3 and manifest["source"] == "ct"
    assert all("MNI152" in s["provenance"] for s in manifest["subjects"])
    first, second = (dataset.array(k, "target") for k in keys[:2])
    assert first.shape[1:] == (32, 32)
    # Different deformation seeds give different subjects.
    depth = min(first.shape[0], second.shape[0])
    assert np.abs(first[:depth] - second[:depth]).mean() > 0.02
    source, target, mask = (dataset.array(keys[0], n) for n in ("source", "target", "mask"))
    brain = mask > 0
    # Paired: CT and T1 agree on where the brain is, and WM (bright on T1) is darker on CT than GM.
    assert np.all(source[~brain] == -1.0) and source[brain].mean() > -0.9
    bright, dark = (
        target > np.percentile(target[brain], 80),
        (target < np.percentile(target[brain], 50)) & (target > np.percentile(target[brain], 25)),
    )
    assert source[bright & brain].mean() < source[dark & brain].mean()


def test_existing_output_is_kept_unless_overwrite(tmp_path, brats_root):
    out = tmp_path / "p"
    prepare_dataset("brats", brats_root, out, config=SMALL, max_subjects=1)
    stamp = (out / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_dataset("brats", brats_root, out, config=SMALL, max_subjects=1)
    assert (out / "manifest.json").read_text() == stamp
    # A subject that fails mid-way leaves the previous dataset intact and no staging folder.
    broken = tmp_path / "broken"
    shutil.copytree(brats_root / "BraTS-GLI-00001-000", broken / "case")
    (broken / "case" / "t1n.nii.gz").write_bytes(b"junk")
    with pytest.raises(Exception, match="t1n.nii.gz"):
        prepare_dataset("brats", broken, out, config=SMALL, overwrite=True)
    assert (out / "manifest.json").read_text() == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "p"]


def test_prepared_slices_dataset_gives_tensors_with_neighbours(prepared_brats):
    out, _ = prepared_brats
    slices = PreparedSlices(out, split="train", min_brain_fraction=0.05, neighbours=1)
    item = slices[10]
    assert item["source"].shape == (3, 32, 32) and item["target"].shape == (1, 32, 32)
    assert item["source"].dtype == torch.float32
    array = slices.dataset.array(item["subject"], "source")
    np.testing.assert_array_equal(item["source"][1].numpy(), array[item["slice"]])
    np.testing.assert_array_equal(item["source"][0].numpy(), array[item["slice"] - 1])
    assert all(slices.table.brain_fraction >= 0.05) and set(slices.table.split) == {"train"}
    with pytest.raises(ValueError, match="not a prepared dataset"):
        PreparedDataset(out.parent / "nowhere")


def test_several_source_folders_are_one_dataset(tmp_path, brats_root):
    """prepare --src A B: the subjects of both folders, A's first, one split over all of them."""
    more = require(SHARED_DATA / "brats_more")
    records = discover_subjects("brats", [brats_root, more])
    names_dev = [record.name for record in discover_subjects("brats", brats_root)]
    names_more = [record.name for record in discover_subjects("brats", more)]
    assert [record.name for record in records] == names_dev + names_more
    assert len(set(names_dev) & set(names_more)) == 0 and len(records) == len(names_dev) + len(names_more)

    # One subject from each folder, prepared together: both are in the manifest under their keys.
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / names_dev[0]).symlink_to(brats_root / names_dev[0])
    (second / names_more[0]).symlink_to(more / names_more[0])
    manifest = prepare_dataset("brats", [first, second], tmp_path / "out", config=SMALL)
    assert [s["key"] for s in manifest["subjects"]] == [
        anonymised_key("brats", names_dev[0]),
        anonymised_key("brats", names_more[0]),
    ]


def test_one_subject_in_two_folders_is_refused(brats_root, tmp_path):
    with pytest.raises(ValueError, match="is in both"):
        discover_subjects("brats", [brats_root, brats_root])
    with pytest.raises(ValueError, match="is in both"):
        discover_subjects("open", [brats_root, brats_root])
    with pytest.raises(ValueError, match="no subject found"):
        discover_subjects("brats", [brats_root, tmp_path])


def test_an_input_that_misses_part_of_the_brain_is_measured_and_left_out_of_training(tmp_path, brats_root):
    from lib.train.bbdm import MIN_INPUT_COVERAGE

    src = tmp_path / "brats"
    for case in sorted(p for p in brats_root.iterdir() if p.is_dir())[:2]:
        shutil.copytree(case, src / case.name)
    # Like Brats18_2013_20_1: the FLAIR of the second case is background over the brain's right part.
    broken = sorted(src.iterdir())[1]
    flair = nib.load(str(broken / "t2f.nii.gz"))
    data = np.asarray(flair.dataobj).copy()
    data[: data.shape[0] // 2 + 10] = 0
    nib.save(nib.Nifti1Image(data, flair.affine, flair.header), str(broken / "t2f.nii.gz"))
    manifest = prepare_dataset(
        "brats", src, tmp_path / "out", config=PrepareConfig(size=32, val_fraction=0, test_fraction=0)
    )
    coverage = {s["key"]: s["input_coverage"] for s in manifest["subjects"]}
    good, bad = (anonymised_key("brats", case.name) for case in sorted(src.iterdir()))
    assert coverage[good] > 0.97 and coverage[bad] < 0.7
    table = PreparedDataset(tmp_path / "out").slices
    brain = table[table.brain_fraction > 0.05]
    assert (brain[brain.subject == bad].input_coverage < MIN_INPUT_COVERAGE).mean() > 0.9
    kept = PreparedSlices(tmp_path / "out", "train", 0.05, 0, MIN_INPUT_COVERAGE).table
    assert (kept.subject == good).sum() == (brain.subject == good).sum()
    assert (kept.subject == bad).sum() < 0.1 * (brain.subject == bad).sum()


def test_a_dataset_prepared_before_input_coverage_reads_as_fully_covered(prepared_brats, tmp_path):
    out, _ = prepared_brats
    old = tmp_path / "old"
    shutil.copytree(out, old)
    table = pd.read_csv(old / "slices.csv").drop(columns="input_coverage")
    table.to_csv(old / "slices.csv", index=False)
    assert (PreparedDataset(old).slices.input_coverage == 1.0).all()
    assert len(PreparedSlices(old, None, 0.0, 0, 0.8)) == len(table)


def test_select_slices_keeps_the_split_and_the_slices_with_enough_brain_and_input():
    table = pd.DataFrame(
        {
            "subject": ["a", "a", "a", "b", "b"],
            "split": ["train", "train", "train", "val", "val"],
            "slice": [0, 1, 2, 0, 1],
            "brain_fraction": [0.0, 0.1, 0.3, 0.2, 0.02],
            "input_coverage": [0.0, 0.9, 0.5, 1.0, 1.0],
        }
    )
    assert len(select_slices(table, None)) == 5  # no limits: every row
    assert list(select_slices(table, "train", 0.05)["slice"]) == [1, 2]
    assert list(select_slices(table, "train", 0.05, 0.8)["slice"]) == [1]
    assert list(select_slices(table, "val", 0.05)["subject"]) == ["b"]
    assert select_slices(table, "test").empty
