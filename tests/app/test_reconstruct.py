"""`python main.py reconstruct` end to end with a tiny preset: the four outputs, honesty, bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from app.cli import main
from lib.io import read_nifti, read_volume
from lib.io.dicom_writer import SeriesDescription, write_dicom_series

from tests.conftest import HEAD_CT_STUDY, require
from tests.tiny_preset import make_tiny_preset


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return make_tiny_preset(tmp_path_factory.mktemp("preset"))


@pytest.fixture(scope="module")
def flair_input(brats_case, tmp_path_factory):
    """A real FLAIR cut to 21 slices, as a NIfTI input file."""
    source = nib.load(brats_case / "t2f.nii.gz")
    path = tmp_path_factory.mktemp("input") / "flair.nii.gz"
    nib.save(source.slicer[:, :, 60:81], path)
    return path


def test_reconstruct_writes_the_four_outputs(preset, flair_input, tmp_path, capsys):
    out = tmp_path / "result"
    code = main(["reconstruct", str(flair_input), str(out), "--preset", str(preset.root), "--simulate-sparsity", "2", "--steps", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["mri.nii.gz", "preview.png", "provenance.json", "uncertainty.nii.gz"]
    mri = nib.load(out / "mri.nii.gz")
    source = read_volume(flair_input)
    # Every other slice kept from 21: the dense 1 mm grid is the input's own grid (in the
    # canonical RAS+ axis order every volume is read into).
    assert mri.shape == source.shape
    np.testing.assert_allclose(mri.affine, source.voxel_affine(), atol=1e-4)
    assert b"SYNTHETIC" in mri.header["descrip"].tobytes()
    assert b"SYNTHETIC" in nib.load(out / "uncertainty.nii.gz").header["descrip"].tobytes()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["synthetic"] is True and provenance["summary"]["synthetic"] is True
    # The tiny preset translates FLAIR: the notice names the real input, not "CT".
    assert "generated from FLAIR" in provenance["notice"]
    assert len(provenance["slices"]) == 21 and provenance["input"]["simulated_sparsity"] == 2
    assert Image.open(out / "preview.png").size[0] > 300
    # No name of the input's or of a reference patient in any output.
    names = list(json.loads((preset.root.parent / "prepared" / "private_subject_map.json").read_text()).values()) + [flair_input.name, "BraTS"]
    for path in out.iterdir():
        content = path.read_bytes()
        for name in names:
            assert name.encode() not in content, (path.name, name)


def test_bad_input_is_a_clear_error_and_writes_nothing(preset, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    out = tmp_path / "result"
    code = main(["reconstruct", str(broken), str(out), "--preset", str(preset.root), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "broken.nii.gz" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_unknown_preset_is_a_clear_error(flair_input, tmp_path, capsys):
    code = main(["reconstruct", str(flair_input), str(tmp_path / "r"), "--preset", "no-such-preset", "--weights", str(tmp_path), "--quiet"])
    assert code == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


def test_an_existing_result_survives_a_failed_run(preset, flair_input, tmp_path, capsys):
    out = tmp_path / "result"
    out.mkdir()
    (out / "mri.nii.gz").write_bytes(b"previous result")
    # An empty image has no brain: refused before anything is written.
    empty_path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 5), dtype=np.int16), np.eye(4)), empty_path)
    code = main(["reconstruct", str(empty_path), str(out), "--preset", str(preset.root), "--quiet"])
    assert code == 2
    assert "no brain" in capsys.readouterr().err
    assert (out / "mri.nii.gz").read_bytes() == b"previous result"


def test_reconstruct_reads_a_dicom_folder_and_keeps_its_frame(preset, brats_case, tmp_path, capsys):
    """A DICOM MR series (a FLAIR for the FLAIR preset) with a patient name: the output lies on
    the series' own grid and carries none of its identifiers."""
    flair = read_nifti(brats_case / "t2f.nii.gz", modality="MR").take_slices(list(range(60, 75)))
    patient = {"PatientName": "Doe^Jane", "PatientID": "PID-4711"}
    series = SeriesDescription(modality="MR", series_description="FLAIR", image_type=("ORIGINAL", "PRIMARY"), rescale_intercept=0.0, patient=patient)
    write_dicom_series(flair, tmp_path / "dicom", series)
    out = tmp_path / "result"
    code = main(["reconstruct", str(tmp_path / "dicom"), str(out), "--preset", str(preset.root), "--simulate-sparsity", "2", "--steps", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    source = read_volume(tmp_path / "dicom", modality="MR")
    mri = nib.load(out / "mri.nii.gz")
    assert mri.shape == source.shape
    np.testing.assert_allclose(mri.affine, source.voxel_affine(), atol=1e-3)
    for path in out.iterdir():
        content = path.read_bytes()
        for identifier in ("Doe^Jane", "Doe", "PID-4711", series.study_uid, series.series_uid):
            assert identifier.encode() not in content, (path.name, identifier)


def test_a_ct_series_for_an_mri_preset_is_refused(preset, tmp_path, capsys):
    """The real head CT study against the FLAIR preset: a clear modality error, nothing written."""
    out = tmp_path / "result"
    code = main(["reconstruct", str(require(HEAD_CT_STUDY)), str(out), "--preset", str(preset.root), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no MR image series" in err and "modality CT, not MR" in err and "Traceback" not in err
    assert not out.exists()
