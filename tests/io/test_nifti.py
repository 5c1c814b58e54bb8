"""NIfTI reading into the canonical frame, atomic writing, and bad NIfTI input."""

from __future__ import annotations

import gzip
import time
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from lib.io import VolumeReadError, read_nifti, read_volume, write_nifti
from lib.io.limits import VolumeTooLarge


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
    with pytest.raises(ValueError):  # the array cannot be converted to float32
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


def save_with_affine(path, affine):
    """A small CT-like image whose header carries ``affine`` as its only (s)form, unchecked."""
    data = np.full((8, 8, 8), -1000, dtype=np.int16)
    header = nib.Nifti1Image(data, np.eye(4)).header
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[:3]
    nib.Nifti1Image(data, None, header).to_filename(str(path))
    return path


@pytest.mark.parametrize(
    "affine",
    [
        np.zeros((4, 4)),  # nibabel: OrientationError "Cannot drop coordinates"
        np.diag([1.0, 1.0, 0.0, 1.0]),  # one flat axis: OrientationError
        np.where(np.eye(4) > 0, np.nan, 0.0),  # numpy: "SVD did not converge"
        np.vstack([np.ones((3, 4)), [0, 0, 0, 1]]),  # rank 1: "cannot convert float NaN to integer"
    ],
    ids=["zero", "flat", "nan", "rank-1"],
)
def test_a_singular_affine_is_one_error_naming_the_file(tmp_path, affine):
    path = save_with_affine(tmp_path / "singular.nii.gz", affine)
    with pytest.raises(VolumeReadError, match="voxel-to-world affine") as error:
        read_volume(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def write_header_only(path, shape, dtype=np.int16, data_bytes=0, chunk=1 << 20):
    """A NIfTI file whose header announces ``shape`` and whose data is ``data_bytes`` zeros.

    The zeros are streamed through gzip chunk by chunk, so a file announcing gigabytes costs
    the test a megabyte of memory.
    """
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as stream:
        header.write_to(stream)
        stream.write(bytes(int(header["vox_offset"]) - header.sizeof_hdr))
        for start in range(0, data_bytes, chunk):
            stream.write(bytes(min(chunk, data_bytes - start)))
    return path


def test_a_gzip_bomb_is_refused_from_its_header(tmp_path):
    """510 KB of gzip holding 512 MiB of zeros under a header announcing 8 GiB of int16: refused
    from the header alone, before the data is decompressed."""
    path = write_header_only(tmp_path / "bomb.nii.gz", (2048, 2048, 1024), data_bytes=512 * 1024**2)
    assert path.stat().st_size < 1024**2
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(VolumeTooLarge, match="over the limit of 2048 MiB") as error:
            read_volume(path)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value).startswith(f"{path}: the image would take 16384 MiB")
    assert seconds < 1 and peak < 16 * 1024**2, (seconds, peak)


def test_the_size_limit_is_a_parameter(tmp_path):
    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), dtype=np.int16), np.eye(4)), str(path))
    with pytest.raises(VolumeTooLarge, match="over the limit"):
        read_nifti(path, max_bytes=16 * 16 * 8 * 4 - 1)
    assert read_nifti(path, max_bytes=None).shape == (16, 16, 8)


@pytest.mark.parametrize("name", ["short.nii", "short.nii.gz"])
def test_a_header_announcing_more_data_than_the_file_holds_is_one_line(tmp_path, name):
    path = write_header_only(tmp_path / name, (64, 64, 64), data_bytes=8 * 8 * 8 * 2)
    with pytest.raises(VolumeReadError, match="not a readable NIfTI") as error:
        read_volume(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
