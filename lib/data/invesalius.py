"""Loader for InVesalius project files (.inv3), e.g. Debian's real head CT ``Cranium.inv3``.

Install the example with ``apt-get install invesalius-examples``; the file is then at
:data:`CRANIUM_PATH`. An .inv3 file is a gzip tar holding ``main.plist`` (shape, spacing,
dtype, modality) and ``matrix.dat`` (raw voxels in z, y, x order, values in HU for CT).

Orientation (checked by looking at the Cranium volume): z runs upward (inferior to superior)
and y (rows) runs towards anterior (the face is at high y). Left/right cannot be verified
from the image; we follow the DICOM column convention (x towards patient left) and record
that assumption in ``meta["orientation_note"]``.
"""

from __future__ import annotations

import os
import plistlib
import tarfile
from pathlib import Path

import numpy as np

from lib.io.errors import VolumeReadError
from lib.io.nifti import check_finite_3d
from lib.io.volume import Volume, volume_from_voxel_affine

CRANIUM_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def _member(archive: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    """Find a member by its base name (InVesalius nests files in a temporary folder)."""
    for member in archive.getmembers():
        if Path(member.name).name == name and member.isfile():
            return member
    raise KeyError(name)


def read_inv3(path: str | os.PathLike[str] = CRANIUM_PATH) -> Volume:
    """Read the image matrix of an InVesalius .inv3 project into a canonical :class:`Volume`.

    Args:
        path: the .inv3 file (default: Debian's Cranium example).

    Raises:
        VolumeReadError: missing or corrupt file, or a matrix that does not match its plist.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (apt-get install invesalius-examples)" if path == CRANIUM_PATH else ""
        raise VolumeReadError(path, f"no such file{hint}")
    try:
        with tarfile.open(path, "r:gz") as archive:
            info = plistlib.load(archive.extractfile(_member(archive, "main.plist")))
            matrix = info["matrix"]
            raw = archive.extractfile(_member(archive, matrix["filename"])).read()
    except (tarfile.TarError, OSError, KeyError, plistlib.InvalidFileException, EOFError) as error:
        raise VolumeReadError(path, f"not a readable InVesalius project ({type(error).__name__}: {error})") from error

    shape = tuple(int(n) for n in matrix["shape"])
    dtype = np.dtype(matrix["dtype"])
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise VolumeReadError(
            path, f"matrix holds {len(raw)} bytes, {shape} {dtype} needs {int(np.prod(shape)) * dtype.itemsize}"
        )
    zyx = np.frombuffer(raw, dtype=dtype).reshape(shape)
    xyz = np.transpose(zyx, (2, 1, 0)).astype(np.float32)
    check_finite_3d(xyz, path)
    spacing_x, spacing_y, spacing_z = (float(v) for v in info["spacing"])
    # x towards patient left (assumed), y towards anterior, z towards superior.
    affine = np.diag([-spacing_x, spacing_y, spacing_z, 1.0])
    return volume_from_voxel_affine(
        xyz,
        affine,
        source=str(path),
        modality=str(info.get("modality", "unknown")),
        meta={
            "format": "inv3",
            "orientation_note": "left/right assumed (DICOM column convention), not verified",
        },
    )
