"""`python main.py reconstruct` end to end with a tiny preset: the four outputs, honesty, bad input."""

from __future__ import annotations

import json
from pathlib import Path

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


def previous_result(folder, flair_input):
    """A folder as ReBrain writes it (what :func:`lib.report.outputs.is_rebrain_output` accepts)."""
    folder.mkdir()
    (folder / "mri.nii.gz").write_bytes(flair_input.read_bytes())
    (folder / "provenance.json").write_text(json.dumps({"synthetic": True}))
    return folder


def snapshot(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_reconstruct_writes_the_four_outputs(preset, flair_input, tmp_path, capsys):
    out = tmp_path / "result"
    code = main(
        [
            "reconstruct",
            str(flair_input),
            str(out),
            "--preset",
            str(preset.root),
            "--simulate-sparsity",
            "2",
            "--steps",
            "2",
            "--precision",
            "fp32",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "mri.nii.gz",
        "preview.png",
        "provenance.json",
        "uncertainty.nii.gz",
    ]
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
    assert provenance["summary"]["precision"] == "fp32"  # --precision fp32 forces float32 on any CPU
    # The tiny preset translates FLAIR: the notice names the real input, not "CT".
    assert "generated from FLAIR" in provenance["notice"]
    assert len(provenance["slices"]) == 21 and provenance["input"]["simulated_sparsity"] == 2
    assert Image.open(out / "preview.png").size[0] > 300
    # No name of the input's or of a reference patient in any output.
    names = list(json.loads((preset.root.parent / "prepared" / "private_subject_map.json").read_text()).values()) + [
        flair_input.name,
        "BraTS",
    ]
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
    code = main(
        [
            "reconstruct",
            str(flair_input),
            str(tmp_path / "r"),
            "--preset",
            "no-such-preset",
            "--weights",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


def test_an_existing_result_survives_a_failed_run(preset, flair_input, tmp_path, capsys):
    out = previous_result(tmp_path / "result", flair_input)
    before = snapshot(out)
    # An empty image has no brain: refused before anything is written.
    empty_path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 5), dtype=np.int16), np.eye(4)), empty_path)
    code = main(["reconstruct", str(empty_path), str(out), "--preset", str(preset.root), "--quiet"])
    assert code == 2
    assert "no brain" in capsys.readouterr().err
    assert snapshot(out) == before


def test_reconstruct_reads_a_dicom_folder_and_keeps_its_frame(preset, brats_case, tmp_path, capsys):
    """A DICOM MR series (a FLAIR for the FLAIR preset) with a patient name: the output lies on
    the series' own grid and carries none of its identifiers."""
    flair = read_nifti(brats_case / "t2f.nii.gz", modality="MR").take_slices(list(range(60, 75)))
    patient = {"PatientName": "Doe^Jane", "PatientID": "PID-4711"}
    series = SeriesDescription(
        modality="MR",
        series_description="FLAIR",
        image_type=("ORIGINAL", "PRIMARY"),
        rescale_intercept=0.0,
        patient=patient,
    )
    write_dicom_series(flair, tmp_path / "dicom", series)
    out = tmp_path / "result"
    code = main(
        [
            "reconstruct",
            str(tmp_path / "dicom"),
            str(out),
            "--preset",
            str(preset.root),
            "--simulate-sparsity",
            "2",
            "--steps",
            "2",
            "--quiet",
        ]
    )
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


@pytest.fixture
def no_pipeline(monkeypatch):
    """Fail the test if the command gets as far as loading the models: refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was constructed before the output folder was checked")

    monkeypatch.setattr("lib.pipeline.ReBrainPipeline", refuse)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("user-folder", "is not empty and not a ReBrain output"),
        ("input-inside", "holds the input"),
        ("input-is-a-previous-result", "holds the input"),
        ("out-is-a-file", "is not a folder"),
        ("parent-is-a-file", "is a file, not a folder"),
        ("under-proc", "no folder can be made in /proc "),
        ("under-sys", "no folder can be made in /sys "),
    ],
)
def test_an_output_folder_that_may_not_be_replaced_is_refused_first(
    preset, flair_input, tmp_path, capsys, no_pipeline, case, reason
):
    """reconstruct used to replace OUT_DIR wholesale, after the computation: a user's files and
    an input lying in it were deleted, and an unwritable place failed last, with a traceback."""
    out, source = tmp_path / "out", flair_input
    if case == "user-folder":
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    elif case == "input-inside":
        out.mkdir()
        source = out / "flair.nii.gz"
        source.write_bytes(flair_input.read_bytes())
    elif case == "input-is-a-previous-result":
        source = previous_result(out, flair_input) / "mri.nii.gz"
    elif case == "out-is-a-file":
        out.write_text("a file")
    elif case == "parent-is-a-file":
        (tmp_path / "notes.txt").write_text("a file")
        out = tmp_path / "notes.txt" / "out"
    else:
        out = Path(f"/{case.removeprefix('under-')}/rebrain-test-{tmp_path.name}/out")
    before = snapshot(tmp_path)
    code = main(["reconstruct", str(source), str(out), "--preset", str(preset.root), "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and reason in err, err
    assert err.startswith(f"error: {out}") and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_a_previous_result_is_replaced_and_missing_parents_are_created(preset, flair_input, tmp_path, capsys):
    out = tmp_path / "new" / "parents" / "result"
    command = [
        "reconstruct",
        str(flair_input),
        str(out),
        "--preset",
        str(preset.root),
        "--simulate-sparsity",
        "2",
        "--steps",
        "2",
        "--quiet",
    ]
    assert main(command) == 0, capsys.readouterr().err
    (out / "preview.png").write_bytes(b"an older preview")
    assert main([*command, "--seed", "1"]) == 0, capsys.readouterr().err
    assert json.loads((out / "provenance.json").read_text())["summary"]["seed"] == 1
    assert (out / "preview.png").read_bytes() != b"an older preview"
    assert sorted(p.name for p in out.parent.iterdir()) == ["result"]


def test_errors_without_a_file_name_name_the_input(preset, flair_input, tmp_path, capsys, monkeypatch):
    """Errors about the input that name no file: too few slices left by a sparsity, and a MemoryError."""
    # 12 slices at the largest sparsity (x16) leave one acquired slice: nothing to fill between.
    short = tmp_path / "short.nii.gz"
    nib.save(nib.load(flair_input).slicer[:, :, :12], short)
    code = main(
        [
            "reconstruct",
            str(short),
            str(tmp_path / "a"),
            "--preset",
            str(preset.root),
            "--simulate-sparsity",
            "16",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {short}: 12 slices at x16") and err.count("\n") == 1, err

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 8.00 GiB for an array with shape (2048, 2048, 512)")

    monkeypatch.setattr("lib.io.read_volume", exhausted)
    code = main(["reconstruct", str(flair_input), str(tmp_path / "b"), "--preset", str(preset.root), "--quiet"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith(f"error: {flair_input}: not enough memory")
        and "8.00 GiB" in err
        and err.count("\n") == 1
    ), err
