"""read_volume: one entry for NIfTI files and DICOM folders, with one size limit for both."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lib.io import read_volume
from lib.io.dicom_writer import SeriesDescription, write_dicom_series
from lib.io.limits import VolumeTooLarge
from lib.io.volume import volume_from_voxel_affine

SHAPE = (16, 16, 4)
FLOAT32_BYTES = int(np.prod(SHAPE)) * 4


@pytest.fixture
def small_inputs(tmp_path):
    """The same 16 x 16 x 4 CT as a NIfTI file and as a DICOM series folder."""
    array = np.full(SHAPE, -1000, dtype=np.int16)
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(nifti))
    volume = volume_from_voxel_affine(array.astype(np.float32), np.eye(4), modality="CT")
    write_dicom_series(volume, tmp_path / "dicom", SeriesDescription())
    return {"nifti": nifti, "dicom": tmp_path / "dicom"}


@pytest.mark.parametrize("kind", ["nifti", "dicom"])
def test_max_bytes_reaches_both_readers(small_inputs, kind):
    path = small_inputs[kind]
    with pytest.raises(VolumeTooLarge, match="over the limit") as error:
        read_volume(path, max_bytes=FLOAT32_BYTES - 1)
    assert str(error.value).startswith(str(path))
    assert read_volume(path, max_bytes=FLOAT32_BYTES).shape == SHAPE
    assert read_volume(path, max_bytes=None).shape == SHAPE
