"""The attacks of issue 17 against the real server with its default settings (read-only, auth
off, on 127.0.0.1): each request here reproduces one that got through before the fix."""

from __future__ import annotations

import gzip
import json
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from bench.server import nifti_bomb, oversize_request
from lib.io import read_volume
from tests.app.test_server import infer, parts


def files_in(tmp: Path) -> set[str]:
    """The files in the server's TMPDIR (uploads and copies of results would land there)."""
    return {str(path.relative_to(tmp)) for path in tmp.rglob("*") if path.is_file()}


# Finding 1: anonymous write and delete.
@pytest.mark.parametrize(
    ("method", "path", "query", "with_file"),
    [
        ("PUT", "/datastore/image", {"image": "escape_noext"}, True),
        ("GET", "/datastore/image", {"image": "head_ct"}, False),
        ("DELETE", "/datastore/image", {"id": "head_ct"}, False),
        ("GET", "/datastore/", {"output": "all"}, False),
        ("DELETE", "/model/rebrain", {}, False),
        ("PUT", "/model/rebrain", {}, True),
        ("GET", "/logs/", {}, False),
        ("POST", "/train/rebrain", {}, False),
        ("POST", "/activelearning/random", {}, False),
        ("POST", "/scoring/dice", {}, False),
        ("PUT", "/session/", {}, True),
        ("POST", "/batch/infer/rebrain", {"images": "all"}, False),
        ("POST", "/reload", {}, False),
        ("GET", "/proxy/dicom/qido", {}, False),
    ],
)
def test_endpoints_beyond_info_and_infer_are_closed(
    server, server_studies, server_weights, method, path, query, with_file
):
    before = sorted(p.name for p in server_studies.iterdir())
    weights_before = sorted(str(p.relative_to(server_weights)) for p in server_weights.rglob("*"))
    files = {"file": ("escape_noext", b"payload")} if with_file else None
    response = requests.request(method, f"{server}{path}", params=query, files=files, timeout=30)
    assert response.status_code == 403, response.text
    assert "read-only" in response.json()["detail"] and "read_only false" in response.json()["detail"]
    assert sorted(p.name for p in server_studies.iterdir()) == before
    assert sorted(str(p.relative_to(server_weights)) for p in server_weights.rglob("*")) == weights_before


def test_a_path_as_a_datastore_id_is_404_before_the_file_system(server, server_studies):
    response = requests.put(
        f"{server}/datastore/image", params={"image": "../escape_noext"}, files={"file": ("x", b"payload")}, timeout=30
    )
    assert response.status_code == 404
    assert not (server_studies.parent / "escape_noext").exists()


# Finding 2: reading any scan on the host.
def test_infer_reads_only_studies_of_the_datastore(server, server_studies, tmp_path):
    outside = tmp_path / "secret_ct.nii.gz"
    (outside).write_bytes((server_studies / "head_ct.nii.gz").read_bytes())
    relative = Path("..") / Path(*[".."] * 8) / str(outside).lstrip("/")
    answers = {
        "absolute path": infer(server, str(outside)),
        "relative path": infer(server, str(relative)),
        "folder": infer(server, "/etc"),
        "missing path": infer(server, str(tmp_path / "missing.nii.gz")),
    }
    for name, response in answers.items():
        assert response.status_code == 404, (name, response.text)
        assert str(tmp_path) not in response.text and "passwd" not in response.text
    # A missing and an existing path get the same answer: no probing which files exist.
    assert answers["absolute path"].json() == answers["missing path"].json()


def test_params_cannot_replace_the_image_with_a_path(server, server_studies, tmp_path):
    outside = tmp_path / "secret_ct.nii.gz"
    outside.write_bytes((server_studies / "head_ct_upper.nii.gz").read_bytes())
    # No image in the query, a server path in params: refused, nothing read.
    response = requests.post(
        f"{server}/infer/rebrain", files={"params": (None, json.dumps({"image": str(outside)}))}, timeout=60
    )
    assert response.status_code == 422 and "no image" in response.json()["detail"]
    # With a study in the query, the study is what is reconstructed, and no label is saved.
    params, _ = parts(
        infer(
            server,
            "head_ct",
            {"image": str(outside), "simulate_sparsity": 2, "save_label": True, "label_tag": "../../x"},
        )
    )
    study = read_volume(server_studies / "head_ct.nii.gz", modality="CT")
    assert params["input"]["acquired_positions_mm"] == pytest.approx(list(study.positions[::2]), abs=1e-3)
    assert not (server_studies / "labels").exists() or not any((server_studies / "labels").rglob("*.nii.gz"))


# Finding 6: denial of service.
def test_a_gzip_bomb_is_refused_from_its_header_with_little_memory(server, server_handle):
    before = files_in(server_handle.tmp)
    bomb = nifti_bomb((2048, 2048, 512))  # claims 4 GiB as float32; about 0.5 MB on the wire
    assert len(bomb) < 2 * 1024**2
    server_process = psutil.Process(server_handle.process.pid)
    rss_before = server_process.memory_info().rss
    started = time.perf_counter()
    response = infer(server, file=("bomb.nii.gz", bomb, "application/gzip"))
    seconds = time.perf_counter() - started
    assert response.status_code == 413, response.text
    assert "over the limit" in response.json()["detail"] and "upload" in response.json()["detail"]
    assert seconds < 10
    assert server_process.memory_info().rss - rss_before < 300 * 1024**2
    assert files_in(server_handle.tmp) == before


def test_an_oversize_upload_is_refused_before_it_is_read(server, server_handle):
    before = files_in(server_handle.tmp)
    # A Content-Length of 300 MiB (over the default 256 MiB), and only 1 KB sent: answered at once.
    status, body = oversize_request(server, 300 * 1024**2)
    assert status == 413 and "upload limit of 256 MiB" in json.loads(body)["detail"]

    def chunked_body():  # no Content-Length: counted while it streams
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="ct.nii.gz"\r\n\r\n'
        yield part
        for _ in range(300):
            yield b"\0" * 1024**2

    response = requests.post(
        f"{server}/infer/rebrain",
        params={"image": "upload"},
        data=chunked_body(),
        timeout=120,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 413, response.text
    assert requests.get(f"{server}/info/", timeout=30).status_code == 200
    assert files_in(server_handle.tmp) == before


def test_failed_uploads_leave_no_file_behind(server, server_handle):
    before = files_in(server_handle.tmp)
    for content in (b"not a nifti", gzip.compress(b"\0" * 400)):
        response = infer(server, file=("scan.nii.gz", content, "application/gzip"))
        assert response.status_code == 422
    response = infer(server, file=("scan.zip", b"PK...", "application/zip"))
    assert response.status_code == 422 and "NIfTI" in response.json()["detail"]
    assert files_in(server_handle.tmp) == before


@pytest.mark.parametrize(
    ("params", "named"),
    [({"steps": 1000, "samples": 64}, "slice-steps"), ({"steps": 1000, "samples": 4}, "--conf max_work")],
)
def test_requests_over_the_work_budget_are_refused(server, params, named):
    started = time.perf_counter()
    response = infer(server, "head_ct", params)
    assert response.status_code == 422 and named in response.json()["detail"]
    assert time.perf_counter() - started < 10


def test_info_answers_within_a_second_during_an_inference(server):
    answer: dict = {}
    worker = threading.Thread(
        target=lambda: answer.update(response=infer(server, "head_ct", {"steps": 400, "simulate_sparsity": 2}))
    )
    worker.start()
    latencies = []
    time.sleep(1.0)
    while worker.is_alive() and len(latencies) < 20:
        started = time.perf_counter()
        assert requests.get(f"{server}/info/", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.2)
    worker.join(timeout=600)
    assert answer["response"].status_code == 200
    assert len(latencies) >= 3, "the inference ended before /info/ could be timed during it"
    assert max(latencies) < 1.0, latencies


# Findings 8 and 9: one-line errors without server paths.
def test_errors_are_422_without_server_paths(server, server_studies, server_handle):
    malformed = requests.post(
        f"{server}/infer/rebrain", params={"image": "head_ct"}, files={"params": (None, "{not json")}, timeout=30
    )
    assert malformed.status_code == 422 and "'params' is not valid JSON" in malformed.json()["detail"]
    wrong_modality = infer(server, "brain_t1")
    assert wrong_modality.status_code == 422 and wrong_modality.json()["detail"].count("brain_t1") >= 1
    unreadable = infer(server, file=("scan.nii.gz", b"garbage", "application/gzip"))
    for response in (wrong_modality, unreadable):
        text = response.text
        assert str(server_studies) not in text and str(server_handle.tmp) not in text and "/tmp" not in text
