"""ReBrainLib without Slicer: geometry, overlays, and the HTTP client and job against the real server."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from ReBrainLib import (
    JobState,
    ReBrainClient,
    ReconstructionJob,
    ServerError,
    legend_text,
    provenance_rows,
    similarity_colour_table,
    slice_overlays,
    status_text,
)
from ReBrainLib.geometry import read_volume, write_volume

from lib.io import dense_grid
from lib.io import read_volume as read_lib_volume
from tests.test_consistency import TISSUE_RECORD


def _oblique() -> np.ndarray:
    """A tilted IJK-to-RAS: rotation about x and z, spacing 0.9 x 0.95 x 2.4 mm, an offset."""
    a, b = np.radians(12.0), np.radians(-7.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rz @ rx @ np.diag([0.9, 0.95, 2.4])
    matrix[:3, 3] = [12.0, -40.0, 7.5]
    return matrix


OBLIQUE = _oblique()


def test_geometry_round_trip_matches_nifti(tmp_path):
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)  # [k, j, i]
    path = write_volume(tmp_path / "v.nii.gz", array, OBLIQUE)
    back, matrix = read_volume(path)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(matrix, OBLIQUE, atol=1e-5)
    image = nib.load(path)
    np.testing.assert_allclose(image.affine, matrix, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj), array.transpose(2, 1, 0))


def _params(statuses, similarities, tau=0.9):
    slices = [
        {
            "index": k,
            "position_mm": float(k),
            "similarity": s,
            "reference": None if s is None else f"sub-x:{k}",
            "uncertainty_mean": 0.01 * k,
        }
        for k, s in enumerate(similarities)
    ]
    return {
        "slices": slices,
        "slice_status": statuses,
        "summary": {"tau": tau, "generated_retrieval_success_rate": 0.5},
    }


def test_slice_overlays_follow_the_provenance():
    params = _params(["acquired", "retrieved", "fallback", "acquired"], [None, 0.95, 0.4, 0.99])
    similarity, status = slice_overlays(params, (4, 3, 2))
    assert similarity.shape == status.shape == (4, 3, 2)
    assert (
        np.isnan(similarity[0]).all()
        and np.all(similarity[1] == np.float32(0.95))
        and np.all(similarity[3] == np.float32(0.99))
    )
    assert [int(status[k, 0, 0]) for k in range(4)] == [1, 2, 3, 1]
    with pytest.raises(ValueError, match="4 slices, the volume 5"):
        slice_overlays(params, (5, 3, 2))
    rows = provenance_rows(params)
    assert (
        [row["status"] for row in rows] == params["slice_status"]
        and rows[0]["similarity"] is None
        and rows[1]["reference"] == "sub-x:1"
    )
    text = legend_text(params)
    assert "tau = 0.9000" in text and "acquired slice (2)" in text and "SLERP fallback (1)" in text


STATUS_SUMMARY = {"slices": 166, "fallback_count": 10, "alignment": {"applied": True}}
BANDING = {"brightness_ratio": 2.257, "voxel_ratio": 1.636}


def test_the_status_line_shows_the_tissue_check_and_the_banding():
    text = status_text({**STATUS_SUMMARY, "tissue_check": TISSUE_RECORD, "banding": BANDING}, 42.4)
    assert text.startswith("Done in 42 s: 166 slices, 10 SLERP fallbacks, slice positions from the CT head template.")
    assert "white > grey > CSF holds (d 1.50 / 2.50), CSF Dice 0.70 (chance 0.10)." in text
    assert "jumps 2.26x the generated ones (1.64x voxelwise)" in text and text.endswith("SYNTHETIC image.")


def test_the_status_line_says_when_the_order_fails_with_the_means():
    failed = {**TISSUE_RECORD, "order_holds": False, "t1_mean": {"csf": 0.28, "white": 0.7, "grey": 0.78}}
    text = status_text({**STATUS_SUMMARY, "tissue_check": failed}, 5)
    assert "does NOT hold (T1 means white 0.70, grey 0.78, CSF 0.28), CSF Dice 0.70" in text and "holds (" not in text
    empty = {**TISSUE_RECORD, "order_holds": None, "csf_dice": None}
    assert "a tissue class is empty in the CT, order not measured." in status_text(
        {**STATUS_SUMMARY, "tissue_check": empty}, 5
    )


def test_the_status_line_shows_the_atlas_half_of_the_tissue_check():
    """Cranium-like: the HU classes fail the order, the atlas regions keep it."""
    atlas = {"order_holds": True, "cohen_d": {"white_grey": 0.649, "grey_csf": 2.3}, "ct_d_grey_white": 0.342}
    failed = {**TISSUE_RECORD, "order_holds": False, "t1_mean": {"csf": 0.28, "white": 0.7, "grey": 0.78}}
    text = status_text({**STATUS_SUMMARY, "tissue_check": {**failed, "atlas": atlas}}, 5)
    assert "does NOT hold (T1 means" in text
    assert "Atlas regions: white > grey > CSF holds (d white-grey 0.65; the CT's own grey/white contrast d 0.34)." in (
        text
    )
    wrong = {**atlas, "order_holds": False}
    assert "Atlas regions: white > grey > CSF does NOT hold (d" in status_text(
        {**STATUS_SUMMARY, "tissue_check": {**TISSUE_RECORD, "atlas": wrong}}, 5
    )
    small = {**TISSUE_RECORD, "atlas": {"error": "12 ml of brain is too little to register the atlas to"}}
    assert "Atlas regions: not measured (12 ml of brain" in status_text({**STATUS_SUMMARY, "tissue_check": small}, 5)
    assert "Atlas" not in status_text({**STATUS_SUMMARY, "tissue_check": TISSUE_RECORD}, 5)  # an older server


def test_the_status_line_of_a_result_without_the_checks_leaves_them_out():
    """An MRI preset (no tissue check), banding undefined (x2 sparsity), or an older server."""
    for summary in (
        {**STATUS_SUMMARY, "tissue_check": {}, "banding": {"brightness_ratio": None}},
        {**STATUS_SUMMARY, "alignment": {}},
    ):
        text = status_text(summary, 3)
        assert "Tissue" not in text and "Banding" not in text and text.endswith(". SYNTHETIC image.")
    assert "from the brain extent." in status_text({**STATUS_SUMMARY, "alignment": {}}, 3)


def test_similarity_colours_change_at_tau():
    table = similarity_colour_table(0.8, entries=101)
    below, above = table[79], table[80]
    assert below[2] > 0.8 and below[0] < 0.2  # blue below tau
    assert above[0] == 1.0 and above[2] < 0.2  # warm from tau on
    assert np.all(table[:, 3] > 0)


def test_client_reconstructs_and_downloads_the_uncertainty(server, server_studies, tmp_path):
    client = ReBrainClient(server + "/")
    assert set(client.presets()) == {"tinyct", "tinyflair"}
    result = client.reconstruct(
        server_studies / "head_ct.nii.gz", {"preset": "tinyct", "simulate_sparsity": 2, "samples": 2}, tmp_path / "out"
    )
    assert set(result.volumes) == {"mri", "uncertainty"} and len(result.result_id) == 32
    source = read_lib_volume(server_studies / "head_ct.nii.gz", modality="CT")
    grid = dense_grid(source.take_slices(list(range(0, source.shape[2], 2))), 1.0)
    mri, matrix = read_volume(result.volumes["mri"])
    uncertainty, matrix_u = read_volume(result.volumes["uncertainty"])
    assert mri.shape == tuple(reversed(grid.shape)) == uncertainty.shape
    np.testing.assert_allclose(matrix, grid.affine, atol=1e-4)
    np.testing.assert_allclose(matrix_u, grid.affine, atol=1e-4)
    assert uncertainty.max() > 0 and len(result.params["slices"]) == mri.shape[0]


def test_client_errors_are_readable(server, server_studies, tmp_path):
    with pytest.raises(ServerError, match="HTTP 422.*do not look like a CT"):
        ReBrainClient(server).reconstruct(server_studies / "brain_t1.nii.gz", {}, tmp_path)
    with pytest.raises(ServerError, match="cannot reach the ReBrain server"):
        ReBrainClient("http://127.0.0.1:9").info()
    with pytest.raises(ServerError, match="must start with http"):
        ReBrainClient("127.0.0.1:8000")


def test_job_runs_in_the_background_and_cancel_drops_the_result(server, server_studies, tmp_path):
    client = ReBrainClient(server)
    job = ReconstructionJob(client, server_studies / "head_ct.nii.gz", {"simulate_sparsity": 2}, tmp_path / "a").start()
    assert job.wait(timeout=300) is JobState.DONE and job.result is not None and job.error is None
    failing = ReconstructionJob(client, server_studies / "brain_t1.nii.gz", {}, tmp_path / "b").start()
    assert failing.wait(timeout=300) is JobState.FAILED and "Hounsfield" in failing.error
    cancelled = ReconstructionJob(
        client, server_studies / "head_ct.nii.gz", {"simulate_sparsity": 2}, tmp_path / "c"
    ).start()
    cancelled.cancel()
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.wait(timeout=300) is JobState.CANCELLED and cancelled.result is None
