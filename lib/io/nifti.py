"""NIfTI reading into the canonical frame, and atomic NIfTI writing with a description."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.io.atomic import atomic_path
from lib.io.errors import VolumeReadError
from lib.io.limits import MAX_VOLUME_BYTES, check_volume_bytes
from lib.io.volume import Volume, volume_from_voxel_affine

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends like a NIfTI file."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def check_finite_3d(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Refuse 2-D images and images with NaN or infinite values.

    Raises:
        VolumeReadError: naming ``path`` and the problem.
    """
    if array.ndim != 3 or min(array.shape) < 2:
        raise VolumeReadError(path, f"a 2-D image (shape {array.shape}); a 3-D volume with at least 2 slices is needed")
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise VolumeReadError(path, f"{bad} voxels are NaN or infinite")


def read_nifti(
    path: str | os.PathLike[str], modality: str = "unknown", max_bytes: int | None = MAX_VOLUME_BYTES
) -> Volume:
    """Read a NIfTI file into a canonical :class:`Volume`.

    The header is checked before any image data is read: a small ``.nii.gz`` can decompress to
    gigabytes, and only the header says how much (the gzip trailer's size is the sender's word
    too, and is not used). nibabel then reads exactly the announced number of bytes.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        modality: what the values are (``"CT"`` means Hounsfield units).
        max_bytes: refuse an image that would take more memory than this as float32
            (None: no limit).

    Raises:
        VolumeReadError: unreadable or truncated file, 2-D or 4-D image, NaN/inf values, a
            singular or non-finite affine; :class:`~lib.io.limits.VolumeTooLarge` for an image
            over ``max_bytes``.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(path, "no such file")
    try:
        image = nib.load(str(path))  # the header only: nibabel reads the data on demand
    except Exception as error:  # nibabel raises many types for corrupt/truncated files
        raise VolumeReadError(path, f"not a readable NIfTI image ({one_line(error)})") from error
    check_volume_bytes(path, image.shape, max_bytes)
    affine = image.affine
    check_affine(affine, path)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        announced = int(np.prod(image.shape)) * image.get_data_dtype().itemsize
        raise VolumeReadError(
            path,
            f"not a readable NIfTI image: its data are corrupt or shorter than the {announced} bytes its "
            f"header announces ({one_line(error)})",
        ) from error
    # Trailing singleton dimensions (a 4-D file holding one volume) carry no information.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise VolumeReadError(path, f"a {data.ndim}-D image of shape {data.shape}; one 3-D volume is needed")
    check_finite_3d(data, path)
    try:
        return volume_from_voxel_affine(
            data,
            affine,
            source=str(path),
            modality=modality,
            meta={"format": "nifti", "input_affine": affine.tolist()},
        )
    except ValueError as error:  # e.g. slice positions that collapse in float precision
        raise VolumeReadError(path, f"unusable geometry in the header ({one_line(error)})") from error


def check_affine(affine: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Refuse a voxel-to-world affine that gives no 3-D geometry: non-finite, or singular.

    nibabel and numpy fail on such affines deep inside the reorientation, with messages
    that do not say which file is at fault ("SVD did not converge", "Cannot drop coordinates").

    Raises:
        VolumeReadError: naming ``path`` and the affine's 3 x 3 part.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    finite = bool(np.all(np.isfinite(linear)))
    if not finite or np.linalg.matrix_rank(linear) < 3:
        raise VolumeReadError(
            path,
            f"the header's voxel-to-world affine is {'singular or degenerate' if finite else 'not finite'} (3 "
            f"x 3 part {np.round(linear, 4).tolist()}); "
            "the image has no usable 3-D geometry",
        )


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line (nibabel's messages span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def write_nifti(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray,
    description: str = "",
    dtype: type = np.float32,
) -> Path:
    """Write a NIfTI file atomically (temporary name, then rename).

    Args:
        path: destination (``.nii`` or ``.nii.gz``).
        array: 3-D array.
        affine: voxel-to-RAS affine.
        description: stored in the header's ``descrip`` field (at most 80 characters); use it
            to say that an image is synthetic.
        dtype: on-disk data type.

    Returns:
        The written path.
    """
    if len(description) > 80:
        raise ValueError(f"a NIfTI description holds at most 80 characters, got {len(description)}")
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.header["descrip"] = description.encode("ascii")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return Path(path)
