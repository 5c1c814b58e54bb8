"""Slicer volume geometry <-> NIfTI files, with SimpleITK (bundled with Slicer).

Slicer describes a volume by its voxel array, indexed ``[k, j, i]`` (``slicer.util.arrayFromVolume``),
and its IJK-to-RAS matrix; ITK and NIfTI files use LPS physical coordinates. The two
conversions here are each other's inverse, so a volume sent to the server and the MRI that
comes back overlay exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def write_volume(path: str | Path, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write a ``[k, j, i]`` array with its 4x4 IJK-to-RAS matrix as a NIfTI file."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"IJK-to-RAS matrix has a zero column: {matrix.tolist()}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((RAS_TO_LPS @ matrix[:3, 3]).tolist())
    image.SetDirection((RAS_TO_LPS @ (matrix[:3, :3] / spacing)).ravel().tolist())
    sitk.WriteImage(image, str(path), useCompression=True)
    return Path(path)


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as a ``[k, j, i]`` array and its 4x4 IJK-to-RAS matrix."""
    image = sitk.ReadImage(str(path))
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = RAS_TO_LPS @ direction * spacing
    matrix[:3, 3] = RAS_TO_LPS @ np.array(image.GetOrigin())
    return sitk.GetArrayFromImage(image), matrix
