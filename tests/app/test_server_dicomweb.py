"""The server over a DICOMweb datastore: a real Orthanc (the ``orthanc`` fixture of
tests/app/conftest.py). Orthanc, the MONAI Label server and the client
(``dicomweb_roundtrip.py``) all run inside the test's own network namespace."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lib.io import dense_grid, read_volume
from lib.io.dicom_writer import SeriesDescription, write_dicom_series
from tests.app.server_process import REPO, running_server
from tests.tiny_preset import make_tiny_preset

PATIENT = {"PatientName": "Doe^John", "PatientID": "PID-0815"}


@pytest.fixture(scope="module")
def series(real_ct_volume, brats_case, tmp_path_factory):
    """A real CT cut and a real FLAIR cut as DICOM series with a patient name."""
    folder = tmp_path_factory.mktemp("dicom")
    middle = real_ct_volume.shape[2] // 2
    ct = real_ct_volume.take_slices(list(range(middle - 4, middle + 4)))
    ct_series = SeriesDescription(modality="CT", series_description="head CT", patient=PATIENT)
    write_dicom_series(ct, folder / "ct", ct_series)
    flair = read_volume(brats_case / "t2f.nii.gz", modality="MR").take_slices(list(range(70, 76)))
    mr_series = SeriesDescription(
        modality="MR",
        series_description="FLAIR",
        image_type=("ORIGINAL", "PRIMARY"),
        rescale_intercept=0.0,
        patient=PATIENT,
    )
    write_dicom_series(flair, folder / "mr", mr_series)
    return {"ct": (folder / "ct", ct_series.series_uid), "mr": (folder / "mr", mr_series.series_uid)}


def test_infer_by_series_uid_from_orthanc(namespace, orthanc, series, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    make_tiny_preset(tmp_path / "build", "tinyct", layout="open", max_subjects=3).root.rename(weights / "tinyct")
    conf = {"weights": weights, "preset": "tinyct", "device": "cpu", "steps": 2, "results": tmp_path / "results"}
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")}
    prefix = ["ip", "netns", "exec", namespace]
    out = tmp_path / "answers"
    ct_dir, ct_uid = series["ct"]
    mr_dir, mr_uid = series["mr"]
    missing_uid = "1.2.826.0.1.3680043.8.498.1"
    # The client waits for the server: it can reach it, this process cannot.
    with running_server(f"{orthanc}/dicom-web", conf, tmp_path / "server.log", prefix=prefix, wait=False, env=env) as (
        _,
        url,
    ):
        client = prefix + [sys.executable, "-m", "tests.app.dicomweb_roundtrip", orthanc, url, str(out)]
        done = subprocess.run(
            client
            + [
                "--upload",
                str(ct_dir),
                str(mr_dir),
                "--infer",
                ct_uid,
                mr_uid,
                missing_uid,
                "--params",
                json.dumps({"simulate_sparsity": 2}),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr + (tmp_path / "server.log").read_text()[-3000:]

    assert (out / ct_uid / "status").read_text() == "200", (
        (out / ct_uid / "detail.json").read_text() if (out / ct_uid / "detail.json").exists() else ""
    )
    source = read_volume(ct_dir, modality="CT")
    grid = dense_grid(source.take_slices(list(range(0, source.shape[2], 2))), 1.0)
    mri = nib.load(out / ct_uid / "mri.nii.gz")
    assert mri.shape == grid.shape
    np.testing.assert_allclose(mri.affine, grid.affine, atol=1e-3)
    params = json.loads((out / ct_uid / "params.json").read_text())
    assert params["synthetic"] is True and params["input"]["modality"] == "CT"
    for path in (out / ct_uid).iterdir():
        for identifier in (*PATIENT.values(), ct_uid):
            assert identifier.encode() not in path.read_bytes(), (path.name, identifier)

    assert (out / mr_uid / "status").read_text() == "422"
    assert "CT" in json.loads((out / mr_uid / "detail.json").read_text())["detail"]
    assert (out / missing_uid / "status").read_text() == "404"
