"""NIfTI reading into the canonical frame, atomic writing, and bad NIfTI input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from lib.io import VolumeReadError, read_volume, write_nifti


def test_canonical_frame_keeps_every_voxel_in_place(brats_case):
    path = brats_case / "t1n.nii.gz"
    original = nib.load(str(path))
    data = np.asarray(original.dataobj, dtype=np.float32)
    volume = read_volume(path, modality="MR")
    assert nib.orientations.aff2axcodes(volume.voxel_affine()) == ("R", "A", "S")
    assert volume.meta["input_orientation"] == nib.orientations.aff2axcodes(original.affine)
    inverse = np.linalg.inv(volume.voxel_affine())
    rng = np.random.default_rng(1)
    for _ in range(50):
        index = [int(rng.integers(0, n)) for n in data.shape]
        world = original.affine @ [*index, 1]
        i, j, k = np.round(inverse @ world)[:3].astype(int)
        assert volume.array[i, j, k] == data[tuple(index)]
    np.testing.assert_allclose(volume.positions, np.arange(data.shape[2]), atol=1e-6)


def test_write_then_read_round_trip_with_description(tmp_path, brats_case):
    volume = read_volume(brats_case / "t2f.nii.gz")
    out = tmp_path / "copy.nii.gz"
    write_nifti(out, volume.array, volume.voxel_affine(), description="SYNTHETIC test image")
    assert nib.load(str(out)).header["descrip"].tobytes().rstrip(b"\0") == b"SYNTHETIC test image"
    again = read_volume(out)
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_allclose(again.voxel_affine(), volume.voxel_affine(), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.nii.gz"]  # no temporary left behind


def test_failed_write_leaves_the_existing_file_untouched(tmp_path):
    out = tmp_path / "result.nii.gz"
    write_nifti(out, np.ones((4, 4, 4)), np.eye(4))
    before = out.read_bytes()
    with pytest.raises(ValueError, match="80 characters"):
        write_nifti(out, np.zeros((4, 4, 4)), np.eye(4), description="x" * 81)
    with pytest.raises(Exception):
        write_nifti(out, np.array([[["a"]]], dtype=object), np.eye(4))
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.nii.gz"]


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((16, 16), dtype=np.float32), "2-D image"),
        (np.zeros((16, 16, 1), dtype=np.float32), "2-D image"),
        (np.zeros((8, 8, 8, 3), dtype=np.float32), "4-D image"),
        (np.where(np.eye(8)[:, :, None] > 0, np.nan, 0).repeat(4, axis=2).astype(np.float32), "NaN"),
    ],
)
def test_bad_images_raise_one_clear_error(tmp_path, array, reason):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    with pytest.raises(VolumeReadError, match=reason) as error:
        read_volume(path)
    assert str(path) in str(error.value)


def test_truncated_and_fake_nifti(tmp_path, brats_case):
    data = (brats_case / "t1n.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(VolumeReadError, match="truncated.nii.gz: not a readable NIfTI"):
        read_volume(truncated)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(VolumeReadError, match="not a readable NIfTI"):
        read_volume(fake)
    with pytest.raises(VolumeReadError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")
