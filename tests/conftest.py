"""Shared fixtures: the real images in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BRATS_CASE = SHARED_DATA / "brats_dev" / "BraTS-GLI-00001-000"
HEAD_CT_STUDY = SHARED_DATA / "head_ct_study" / "DICOM"


def require(path: Path) -> Path:
    """Return ``path``, or skip the test with a reason when it is missing."""
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the tests need ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def brats_case() -> Path:
    """Folder of a real BraTS case (t1n, t2f, ...)."""
    return require(BRATS_CASE)


@pytest.fixture(scope="session")
def head_ct_folder() -> Path:
    """The real multi-series head CT DICOM study."""
    return require(HEAD_CT_STUDY)


@pytest.fixture(scope="session")
def real_ct_volume(head_ct_folder):
    """The real head CT (2.5 mm axial series), downsampled in-plane to 128x128 for speed, in HU."""
    from lib.io import read_volume
    from lib.io.volume import Volume

    volume = read_volume(head_ct_folder)
    factor = 4
    array = volume.array[::factor, ::factor, :]
    affine = volume.affine.copy()
    affine[:3, :2] *= factor
    return Volume(array=np.ascontiguousarray(array), affine=affine, positions=volume.positions.copy(), modality="CT")
