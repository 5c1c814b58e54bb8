"""The real MONAI Label server (``monailabel start_server``) on 127.0.0.1 with tiny presets
(the ``server`` fixture of tests/conftest.py: a CT preset, the default, and a FLAIR preset;
studies: a real head CT cut, a second CT cut and a T1 the CT preset must refuse)."""

from __future__ import annotations

import gzip
import io
import json
import threading

import nibabel as nib
import numpy as np
import pytest
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

from app.server.results import STATUS_CODES
from lib.io import dense_grid, read_volume
from tests.conftest import SERVER_STEPS as STEPS


def infer(url: str, image: str = "", params: dict | None = None, file: tuple | None = None) -> requests.Response:
    files = {"params": (None, json.dumps(params or {}))}
    if file is not None:
        files["file"] = file
    return requests.post(f"{url}/infer/rebrain", params={"image": image or "upload"}, files=files, timeout=300)


def parts(response: requests.Response) -> tuple[dict, nib.Nifti1Image]:
    """The multipart answer: the JSON params and the NIfTI image."""
    assert response.status_code == 200, response.text
    decoded = {}
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        decoded["params" if 'name="params"' in disposition else "image"] = part.content
    image = nib.Nifti1Image.from_bytes(gzip.decompress(decoded["image"]))
    return json.loads(decoded["params"]), image


def test_info_describes_the_task_and_its_params(server):
    info = requests.get(f"{server}/info/", timeout=30).json()
    assert info["name"] == "ReBrain" and info["version"]
    model = info["models"]["rebrain"]
    assert model["type"] == "others" and model["dimension"] == 3 and model["synthetic"] is True
    assert set(model["presets"]) == {"tinyct", "tinyflair"}
    assert model["presets"]["tinyct"]["input"] == "CT" and model["presets"]["tinyflair"]["input"] == "MR"
    assert set(model["presets"]["tinyct"]["versions"]) == {"bbdm", "controlnet", "encoder", "kb"}
    for param in (
        "preset",
        "steps",
        "samples",
        "seed",
        "target_spacing",
        "simulate_sparsity",
        "brain_extraction",
        "alignment",
        "output",
        "result_id",
    ):
        assert param in model["params"]
    assert model["config"]["preset"] == "tinyct" and model["config"]["steps"] == STEPS


def test_infer_by_study_id_returns_the_mri_in_the_input_geometry(server, server_studies):
    params, mri = parts(infer(server, "head_ct", {"simulate_sparsity": 2}))
    source = read_volume(server_studies / "head_ct.nii.gz", modality="CT")
    sparse_positions = source.positions[::2]
    grid = dense_grid(source.take_slices(list(range(0, source.shape[2], 2))), 1.0)
    assert mri.shape == grid.shape
    np.testing.assert_allclose(mri.affine, grid.affine, atol=1e-4)
    assert b"SYNTHETIC" in mri.header["descrip"].tobytes()
    assert params["synthetic"] is True and "not for diagnosis" in params["notice"]
    summary = params["summary"]
    for key in ("retrieval_success_rate", "fallback_count", "mean_similarity", "uncertainty_mean", "versions"):
        assert key in summary
    assert summary["steps"] == STEPS and summary["preset"] == "tinyct"
    # The real CT cut was brain-extracted; 4 slices are too few to register, and the answer says so.
    assert summary["brain_extraction"]["applied"] is True
    assert summary["alignment"]["applied"] is False and "too few to register" in summary["alignment"]["reason"]
    assert len(params["slices"]) == mri.shape[2]
    assert params["input"]["acquired_positions_mm"] == pytest.approx(list(sparse_positions), abs=1e-3)
    data = np.asarray(mri.dataobj)
    assert 0.0 <= data.min() and data.max() <= 1.0 and data.max() > 0


def test_extra_outputs_are_fetched_by_result_id_without_recomputing(server):
    params, mri = parts(infer(server, "head_ct", {"simulate_sparsity": 2, "samples": 2}))
    result_id = params["result_id"]
    fetched = {}
    for output in ("uncertainty", "similarity", "status", "mri"):
        again, volume = parts(infer(server, result_id, {"result_id": result_id, "output": output}))
        assert again["result_id"] == result_id and again["output"] == output
        assert "infer" not in again.get("latencies", {}) or again["latencies"]["infer"] < 5.0
        assert volume.shape == mri.shape
        np.testing.assert_allclose(volume.affine, mri.affine, atol=1e-5)
        fetched[output] = np.asarray(volume.dataobj)
    np.testing.assert_array_equal(fetched["mri"], np.asarray(mri.dataobj))
    # Two samples: a real spread inside the brain, none outside it.
    assert fetched["uncertainty"].max() > 0 and fetched["uncertainty"][np.asarray(mri.dataobj) == 0].max() == 0
    assert len(params["slice_status"]) == len(params["slices"])
    for index, record in enumerate(params["slices"]):
        status = "acquired" if record["acquired"] else ("retrieved" if record["success"] else "fallback")
        assert params["slice_status"][index] == status
        assert np.all(fetched["status"][:, :, index] == STATUS_CODES[status])
        expected = 0.0 if record["similarity"] is None else record["similarity"]
        assert fetched["similarity"][:, :, index] == pytest.approx(expected, abs=1e-5)


def test_uploaded_file_with_another_preset(server, brats_case):
    flair = nib.load(brats_case / "t2f.nii.gz").slicer[:, :, 70:78]
    buffer = io.BytesIO(gzip.compress(flair.to_bytes()))
    params, mri = parts(
        infer(
            server,
            params={"preset": "tinyflair", "simulate_sparsity": 2},
            file=("flair.nii.gz", buffer, "application/gzip"),
        )
    )
    assert params["summary"]["preset"] == "tinyflair" and "generated from FLAIR" in params["notice"]
    assert mri.shape[:2] == flair.shape[:2]


@pytest.mark.parametrize(
    ("image", "params", "file", "status", "message"),
    [
        ("brain_t1", {}, None, 422, "do not look like a CT in Hounsfield units"),
        ("head_ct_upside_down", {}, None, 422, "registration to the head CT template failed"),
        ("", {}, ("scan.nii.gz", b"this is not a NIfTI file", "application/gzip"), 422, "not a readable NIfTI image"),
        ("head_ct", {"steps": "many"}, None, 422, "parameter 'steps'"),
        ("head_ct", {"preset": "nope"}, None, 422, "parameter 'preset': 'nope' is not available"),
        ("head_ct", {"output": "segmentation"}, None, 422, "parameter 'output'"),
        ("no_such_study", {}, None, 404, "'no_such_study' is not a study in this server's datastore"),
        ("x", {"result_id": "0" * 32}, None, 422, "is not kept on this server"),
    ],
)
def test_bad_requests_get_a_clear_http_error_and_the_server_keeps_serving(server, image, params, file, status, message):
    response = infer(server, image, params, file)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert requests.get(f"{server}/info/", timeout=30).status_code == 200


def test_two_concurrent_requests_both_complete_correctly(server):
    answers: dict[int, requests.Response] = {}

    def run(seed: int) -> None:
        answers[seed] = infer(server, "head_ct", {"simulate_sparsity": 2, "seed": seed, "samples": 2})

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    results = {seed: parts(answers[seed]) for seed in (1, 2)}
    assert results[1][0]["result_id"] != results[2][0]["result_id"]
    # Each answer is its own request's: rerunning seed 1 alone gives the same volume.
    alone_params, alone = parts(infer(server, "head_ct", {"simulate_sparsity": 2, "seed": 1, "samples": 2}))
    np.testing.assert_allclose(np.asarray(results[1][1].dataobj), np.asarray(alone.dataobj), atol=1e-5)
    assert alone_params["summary"]["seed"] == 1 and results[2][0]["summary"]["seed"] == 2
    assert not np.allclose(np.asarray(results[1][1].dataobj), np.asarray(results[2][1].dataobj))
