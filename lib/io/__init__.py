"""Volume input and output: NIfTI files and DICOM series folders in one canonical frame."""

from __future__ import annotations

import os
from pathlib import Path

from lib.io.dicom import read_dicom_series, scan_dicom_folder
from lib.io.errors import VolumeReadError
from lib.io.limits import MAX_VOLUME_BYTES
from lib.io.nifti import is_nifti_path, read_nifti, write_nifti
from lib.io.volume import DenseGrid, Volume, dense_grid

__all__ = [
    "DenseGrid",
    "Volume",
    "VolumeReadError",
    "dense_grid",
    "read_dicom_series",
    "read_nifti",
    "read_volume",
    "scan_dicom_folder",
    "write_nifti",
]


def read_volume(
    path: str | os.PathLike[str],
    series_uid: str | None = None,
    modality: str = "unknown",
    max_bytes: int | None = MAX_VOLUME_BYTES,
) -> Volume:
    """Read a NIfTI file or a DICOM series folder into a canonical :class:`Volume`.

    Args:
        path: a ``.nii``/``.nii.gz`` file, or a folder of DICOM files.
        series_uid: for a DICOM folder, the series to read (default: the best series of
            ``modality``, CT when it is ``"unknown"``).
        modality: for NIfTI, what the values are (``"CT"`` for HU); for a DICOM folder, the
            Modality of the series to pick (``"CT"`` or ``"MR"``); DICOM says its values itself.
        max_bytes: refuse a volume whose header(s) announce more than this as float32, before
            its pixel data are read (None: no limit).

    Raises:
        VolumeReadError: for anything that is not a readable 3-D volume, naming the file;
            :class:`~lib.io.limits.VolumeTooLarge` for one over ``max_bytes``.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid, "CT" if modality == "unknown" else modality, max_bytes=max_bytes)
    if not path.exists():
        raise VolumeReadError(path, "no such file or folder")
    if is_nifti_path(path):
        return read_nifti(path, modality, max_bytes)
    raise VolumeReadError(
        path,
        "not a NIfTI file (.nii, .nii.gz) or a DICOM folder; for DICOM, pass the folder holding the series",
    )
