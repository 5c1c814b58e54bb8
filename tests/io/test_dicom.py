"""DICOM series reading: series choice, HU, slice order, geometry, irregular gaps, bad input."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from lib.io import VolumeReadError, dense_grid, read_volume
from lib.io.dicom_writer import SeriesDescription, write_dicom_series
from lib.io.nifti import read_nifti
from lib.io.volume import Volume
from tests.dicom_variants import VARIANTS_BY_NAME, make_bases, make_variant, names


def world(volume: Volume, i: int, j: int, k: int) -> np.ndarray:
    """RAS world position of voxel (i, j, k)."""
    return (volume.affine @ np.array([i, j, volume.positions[k], 1.0]))[:3]


def write_shuffled(volume: Volume, folder: Path, description: SeriesDescription, seed: int = 0) -> list[Path]:
    """Write a series whose file names carry no order (random numbers)."""
    names = [f"IM{n}" for n in random.Random(seed).sample(range(10_000), volume.shape[2])]
    return write_dicom_series(volume, folder, description, file_names=names)


def write_non_image(path: Path) -> None:
    """A DICOM object with no pixels (a basic text SR header)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    pydicom.dcmwrite(str(path), ds, write_like_original=False)


@pytest.fixture
def study_folder(tmp_path, real_ct_volume, brats_case) -> tuple[Path, Volume, SeriesDescription, SeriesDescription]:
    """A study folder: the real CT series, an MR distractor, a localizer, an SR, a corrupt file."""
    folder = tmp_path / "study"
    ct = SeriesDescription(modality="CT", series_description="head CT")
    write_shuffled(real_ct_volume, folder / "a", ct)
    t1 = read_nifti(brats_case / "t1n.nii.gz", modality="MR")
    mr_volume = t1.take_slices(np.arange(60, 66))
    mr = SeriesDescription(
        modality="MR",
        series_description="T1",
        study_uid=ct.study_uid,
        rescale_intercept=0.0,
        image_type=("ORIGINAL", "PRIMARY"),
    )
    write_shuffled(mr_volume, folder / "b", mr, seed=1)
    localizer = SeriesDescription(
        modality="CT", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), study_uid=ct.study_uid
    )
    write_dicom_series(real_ct_volume.take_slices([0, 1]), folder / "c", localizer)
    write_non_image(folder / "sr.dcm")
    good = sorted((folder / "a").iterdir())[0].read_bytes()
    (folder / "a" / "corrupt.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "a" / "truncated.dcm").write_bytes(good[:400])
    (folder / "notes.txt").write_text("not dicom")
    return folder, mr_volume, ct, mr


def test_reads_ct_series_among_distractors_in_hu_with_exact_geometry(study_folder, real_ct_volume):
    folder, _, ct, mr = study_folder
    volume = read_volume(folder)
    assert volume.meta["series_uid"] == ct.series_uid
    assert volume.modality == "CT"
    # Values are the real HU (stored as integers), slice order from positions, not names.
    np.testing.assert_allclose(volume.array, np.round(real_ct_volume.array), atol=0.5)
    np.testing.assert_allclose(volume.positions, real_ct_volume.positions, atol=1e-4)
    for index in [(0, 0, 0), (127, 5, 30), (64, 100, 66)]:
        np.testing.assert_allclose(world(volume, *index), world(real_ct_volume, *index), atol=1e-3)
    skipped = volume.meta["skipped_series"]
    assert "modality MR" in skipped[mr.series_uid]
    assert any("localizer" in reason for reason in skipped.values())
    skipped_files = {Path(path).name: reason for path, reason in volume.meta["skipped_files"].items()}
    assert "not a DICOM file" in skipped_files["corrupt.dcm"]
    assert "not a DICOM file" in skipped_files["notes.txt"]
    assert "not an image" in skipped_files["sr.dcm"]
    # A slice's header cut before its SeriesInstanceUID, named unlike the slices: tied to no series.
    assert "a truncated or damaged header" in skipped_files["truncated.dcm"]


def test_series_uid_selects_the_requested_series(study_folder):
    folder, mr_volume, _, mr = study_folder
    volume = read_volume(folder, series_uid=mr.series_uid)
    assert volume.modality == "MR"
    np.testing.assert_allclose(volume.array, np.round(mr_volume.array), atol=0.5)
    with pytest.raises(VolumeReadError, match="no series with SeriesInstanceUID 1.2.3"):
        read_volume(folder, series_uid="1.2.3")


def test_agrees_with_simpleitk_on_the_real_study(head_ct_folder):
    volume = read_volume(head_ct_folder)
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(head_ct_folder), volume.meta["series_uid"])
    reader.SetFileNames(files)
    image = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    reference = sitk.GetArrayFromImage(image)  # (z, y, x)
    rng = np.random.default_rng(0)
    for _ in range(20):
        i, j, k = (int(rng.integers(0, n)) for n in volume.shape)
        ras = world(volume, i, j, k)
        lps = [-ras[0], -ras[1], ras[2]]
        x, y, z = image.TransformPhysicalPointToIndex(lps)
        assert volume.array[i, j, k] == pytest.approx(reference[z, y, x])
    assert volume.shape[2] == 67
    np.testing.assert_allclose(volume.slice_steps, 2.5, atol=1e-3)
    assert len(volume.meta["skipped_series"]) == 4


def test_irregular_gaps_are_placed_on_the_dense_grid(tmp_path, real_ct_volume):
    kept = [0, 2, 4, 10, 12, 17]  # 2.5 mm slices -> positions 0, 5, 10, 25, 30, 42.5 mm
    sparse = real_ct_volume.take_slices(kept)
    write_shuffled(sparse, tmp_path / "sparse", SeriesDescription())
    volume = read_volume(tmp_path / "sparse")
    np.testing.assert_allclose(volume.positions, 2.5 * np.array(kept), atol=1e-4)
    assert not volume.is_regular()
    grid = dense_grid(volume, spacing=1.0)
    assert grid.shape[2] == 43  # 0 .. 42 mm
    assert grid.acquired.sum() == 5  # 42.5 mm lies between grid slices 42 and 43
    np.testing.assert_array_equal(np.nonzero(grid.acquired)[0], [0, 5, 10, 25, 30])
    # Grid slice at 17 mm lies between acquired 10 mm (index 2) and 25 mm (index 3).
    assert (grid.lower[17], grid.upper[17]) == (2, 3)
    assert grid.alpha[17] == pytest.approx(7 / 15)
    np.testing.assert_allclose(grid.affine[:3, 2], volume.affine[:3, 2] * 1.0)
    np.testing.assert_allclose(grid.affine @ [3, 4, 17, 1], volume.affine @ [3, 4, 17, 1])


def test_gantry_tilt_keeps_world_positions(tmp_path, real_ct_volume):
    tilted = replace(real_ct_volume, affine=real_ct_volume.affine.copy())
    # Slice origins slide 0.2 mm anterior per mm of height: a 11.3 degree gantry tilt.
    tilted.affine[:3, 2] = [0.0, 0.2, 1.0]
    write_dicom_series(tilted, tmp_path / "tilt", SeriesDescription())
    volume = read_volume(tmp_path / "tilt")
    assert volume.meta["gantry_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.2)), abs=0.01)
    for index in [(0, 0, 0), (120, 3, 60), (10, 100, 20)]:
        np.testing.assert_allclose(world(volume, *index), world(tilted, *index), atol=1e-3)


def test_mixed_orientations_are_refused(tmp_path, real_ct_volume):
    paths = write_dicom_series(real_ct_volume.take_slices(np.arange(6)), tmp_path / "mixed", SeriesDescription())
    ds = pydicom.dcmread(str(paths[3]))
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(str(paths[3]))
    with pytest.raises(VolumeReadError, match="mixed orientations"):
        read_volume(tmp_path / "mixed")


def test_truncated_pixel_data_names_the_file(tmp_path, real_ct_volume):
    paths = write_dicom_series(real_ct_volume.take_slices(np.arange(4)), tmp_path / "trunc", SeriesDescription())
    ds = pydicom.dcmread(str(paths[2]))
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(str(paths[2]))
    with pytest.raises(VolumeReadError, match=paths[2].name):
        read_volume(tmp_path / "trunc")


def test_duplicate_positions_are_refused(tmp_path, real_ct_volume):
    paths = write_dicom_series(real_ct_volume.take_slices(np.arange(4)), tmp_path / "dup", SeriesDescription())
    shutil.copy(paths[1], tmp_path / "dup" / "copy.dcm")
    ds = pydicom.dcmread(str(tmp_path / "dup" / "copy.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(str(tmp_path / "dup" / "copy.dcm"))
    with pytest.raises(VolumeReadError, match="same position"):
        read_volume(tmp_path / "dup")


def test_bad_folders_and_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeReadError, match="empty folder"):
        read_volume(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(b"\0" * 50)
    with pytest.raises(VolumeReadError, match="no readable DICOM image"):
        read_volume(junk)
    # pydicom's own CT test file: a real single-slice CT, a 2-D image.
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), single / "ct.dcm")
    with pytest.raises(VolumeReadError, match="single image|2-D"):
        read_volume(single)
    with pytest.raises(VolumeReadError, match="not a NIfTI file"):
        read_volume(get_testdata_file("CT_small.dcm"))
    sr_only = tmp_path / "sr"
    sr_only.mkdir()
    write_non_image(sr_only / "sr.dcm")
    with pytest.raises(VolumeReadError, match="not an image"):
        read_volume(sr_only)


def test_pydicom_ct_test_file_values_are_hu(tmp_path):
    """Two copies of pydicom's real CT slice, moved apart, read as a 2-slice volume in HU."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    folder = tmp_path / "pair"
    folder.mkdir()
    for index in range(2):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1], position[2] + 5.0 * index]
        ds.save_as(str(folder / f"s{index}.dcm"))
    volume = read_volume(folder)
    assert volume.modality == "CT"
    np.testing.assert_allclose(volume.positions, [0.0, 5.0], atol=1e-4)
    # Canonical orientation of a standard axial slice: pixel (r, c) -> voxel (X-1-c, Y-1-r).
    np.testing.assert_allclose(volume.array[:, :, 0], expected[::-1, ::-1].T)


@pytest.fixture(scope="module")
def variant_bases(real_ct_volume, head_ct_folder, tmp_path_factory) -> dict[str, list[Path]]:
    return make_bases(real_ct_volume, head_ct_folder, tmp_path_factory.mktemp("bases"))


def refusal(name: str, bases: dict[str, list[Path]], folder: Path) -> tuple[VolumeReadError, Path]:
    """Read variant ``name``; returns the VolumeReadError it must raise and the file it must name."""
    variant = VARIANTS_BY_NAME[name]
    files = make_variant(variant, bases[variant.base], folder / name)
    with pytest.raises(VolumeReadError) as refused:
        read_volume(folder / name)
    return refused.value, variant.named_file(files)


@pytest.mark.parametrize(
    "name",
    [
        "jpeg-pixel-flips-0",  # 20 flipped bytes decode without error, to values no scanner makes
        "whole-orientation-scaled-6x",  # non-unit direction vectors scaled the positions 6x
        "whole-pixel-spacing-negative",
        "whole-bits-allocated-8",
        "modality-mr",  # one MR file under the CT series' UID
        "position-5-m-away",
        "whole-positions-5-m-apart",  # a 15,001-slice grid
        "truncated-in-header",  # dropped, and its gap generated
        "rescale-slope-absurd",
    ],
)
def test_corrupt_or_implausible_input_is_refused_naming_the_file(name, variant_bases, tmp_path):
    """Issue 17, finding 7: corrupt or physically impossible input was accepted silently."""
    error, damaged = refusal(name, variant_bases, tmp_path)
    assert names(error, damaged), error


@pytest.mark.parametrize(
    "name",
    [
        "whole-pixel-spacing-zero",
        "whole-pixel-spacing-missing",
        "whole-orientation-zero",
        "orientation-five-values",
        "position-two-values",
    ],
)
def test_unusable_header_values_raise_a_volume_read_error_naming_the_file(name, variant_bases, tmp_path):
    """Issue 17, finding 8: these raised AttributeError, nibabel's OrientationError or numpy's
    "could not broadcast" (a traceback from the command line, no file named), or blamed a
    "repeated acquisition" on the wrong file."""
    error, damaged = refusal(name, variant_bases, tmp_path)
    assert names(error, damaged), error
