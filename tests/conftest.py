"""Shared fixtures: the real images in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
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


@pytest.fixture(scope="session")
def cranium():
    """Debian's real full-head CT (256x256x108, 0.957 x 0.957 x 1.5 mm, with a head holder)."""
    from lib.data.invesalius import CRANIUM_PATH, read_inv3

    if not CRANIUM_PATH.is_file():
        pytest.skip(
            f"{CRANIUM_PATH} missing (apt-get install invesalius-examples; make test installs it where apt works)"
        )
    return read_inv3(CRANIUM_PATH)


@pytest.fixture(scope="session")
def real_ct_alignment(real_ct_volume):
    """The whole real head CT registered to the CT head template (shared: ~5 s per registration)."""
    from lib.data.ct_alignment import align_to_template

    return align_to_template(real_ct_volume)


# Sampling steps of the test server (tiny untrained presets: quality is not the point).
SERVER_STEPS = 2


@pytest.fixture(scope="session")
def server_weights(tmp_path_factory):
    """Two tiny presets: ``tinyct`` (CT input) and ``tinyflair`` (FLAIR input)."""
    from tests.tiny_preset import make_tiny_preset

    folder = tmp_path_factory.mktemp("weights")
    make_tiny_preset(folder / "ct_build", "tinyct", layout="open", max_subjects=3).root.rename(folder / "tinyct")
    make_tiny_preset(folder / "flair_build", "tinyflair").root.rename(folder / "tinyflair")
    return folder


@pytest.fixture(scope="session")
def server_studies(real_ct_volume, brats_case, tmp_path_factory):
    """A studies folder: two real head CT cuts (8 slices, 128x128), the whole CT upside down and a real T1 cut."""
    import nibabel as nib

    from lib.io import write_nifti

    folder = tmp_path_factory.mktemp("studies")
    middle = real_ct_volume.shape[2] // 2
    for name, start in (("head_ct", middle - 8), ("head_ct_upper", middle)):
        cut = real_ct_volume.take_slices(list(range(start, start + 8)))
        write_nifti(
            folder / f"{name}.nii.gz", cut.array, cut.voxel_affine(), "real head CT cut for tests", dtype=np.int16
        )
    # The whole head upside down: brain found, registration to the template refused.
    flipped = real_ct_volume.array[:, :, ::-1]
    write_nifti(
        folder / "head_ct_upside_down.nii.gz",
        flipped,
        real_ct_volume.voxel_affine(),
        "real head CT flipped for tests",
        dtype=np.int16,
    )
    t1 = nib.load(brats_case / "t1n.nii.gz").slicer[:, :, 70:80]
    nib.save(t1, folder / "brain_t1.nii.gz")
    return folder


@dataclass
class ServerHandle:
    """The session's server: its URL, process, temporary folder (its TMPDIR) and log."""

    url: str
    process: subprocess.Popen
    tmp: Path
    log: Path


@pytest.fixture(scope="session")
def server_handle(server_weights, server_studies, tmp_path_factory):
    """The real MONAI Label server on 127.0.0.1 for the whole run (default settings: read-only)."""
    from tests.app.server_process import running_server

    results = tmp_path_factory.mktemp("results")
    tmp = tmp_path_factory.mktemp("server_tmp")
    log = tmp_path_factory.mktemp("log") / "server.log"
    conf = {
        "weights": server_weights,
        "preset": "tinyct",
        "device": "cpu",
        "preload": "true",
        "steps": SERVER_STEPS,
        "results": results,
        "keep_results": 4,
    }
    with running_server(str(server_studies), conf, log, env={"TMPDIR": str(tmp)}) as (process, url):
        yield ServerHandle(url=url, process=process, tmp=tmp, log=log)


@pytest.fixture(scope="session")
def server(server_handle):
    """The session server's URL."""
    return server_handle.url
