"""The command line as a user runs it: ``python main.py ...`` in a subprocess (in process for
argument checks, which stop before any work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from app.cli import main
from lib.data.invesalius import CRANIUM_PATH
from tests.conftest import SHARED_DATA, require

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_lists_the_subcommands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("prepare", "inspect", "export-cranium"):
        assert command in result.stdout


def test_inspect_reports_acquired_positions_and_skipped_series(head_ct_folder):
    result = run("inspect", str(head_ct_folder), "--target-spacing", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["modality"] == "CT" and report["shape"] == [512, 512, 67]
    assert report["acquired_positions_mm"][:3] == [0.0, 2.5, 5.0]
    assert report["dense_grid"]["slices"] == 166 and len(report["skipped_series"]) == 4


@pytest.mark.parametrize("command", ["reconstruct", "evaluate"])
def test_series_uid_picks_the_series_of_a_dicom_folder(head_ct_folder, tmp_path, capsys, command):
    """The study holds a 2.5 and a 5 mm axial series: --series-uid is what is read (a UID the
    folder lacks is refused naming the ones it has), for reconstruct and evaluate --input."""
    where = [str(head_ct_folder), str(tmp_path / "out")]
    if command == "evaluate":
        where = ["--input", str(head_ct_folder), "--out", str(tmp_path / "out")]
    assert main([command, *where, "--series-uid", "1.2.3.4"]) == 2
    err = capsys.readouterr().err
    assert "no series with SeriesInstanceUID 1.2.3.4" in err and ".2599.0" in err and "Traceback" not in err


def test_bad_input_gives_one_line_error_not_a_traceback(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"garbage")
    result = run("inspect", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad}: not a readable NIfTI") and "Traceback" not in result.stderr
    result = run("prepare", "--layout", "brats", "--src", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "no subject found for layout brats" in result.stderr


def test_prepare_command_writes_a_dataset(tmp_path):
    src = require(SHARED_DATA / "brats_dev")
    out = tmp_path / "prepared"
    result = run(
        "prepare",
        "--layout",
        "brats",
        "--src",
        str(src),
        "--out",
        str(out),
        "--size",
        "32",
        "--max-subjects",
        "2",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "prepared 2 subjects" in result.stdout
    assert json.loads((out / "manifest.json").read_text())["config"]["size"] == 32


def test_export_cranium_writes_hu_nifti(tmp_path):
    if not CRANIUM_PATH.is_file():
        pytest.skip(f"{CRANIUM_PATH} missing (apt-get install invesalius-examples)")
    out = tmp_path / "cranium.nii.gz"
    result = run("export-cranium", "--out", str(out))
    assert result.returncode == 0, result.stderr
    image = nib.load(str(out))
    assert image.shape == (256, 256, 108) and image.get_fdata().min() == -1024
    assert b"Real head CT" in image.header["descrip"].tobytes()


def test_train_bbdm_command_trains_resumes_and_plots(tmp_path):
    src = require(SHARED_DATA / "brats_dev")
    data = tmp_path / "prepared"
    assert (
        run(
            "prepare",
            "--layout",
            "brats",
            "--src",
            str(src),
            "--out",
            str(data),
            "--size",
            "32",
            "--max-subjects",
            "3",
            "--quiet",
        ).returncode
        == 0
    )
    common = [
        "train-bbdm",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--channels",
        "16",
        "32",
        "--batch-size",
        "2",
        "--val-every",
        "2",
        "--val-slices",
        "2",
        "--val-steps",
        "2",
        "--checkpoint-every",
        "2",
        "--bridge-start",
        "intensity-map",
        "--quiet",
    ]
    first = run(*common, "--iters", "2")
    assert first.returncode == 0, first.stderr
    again = run(*common, "--iters", "2")
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run(*common, "--iters", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "trained to iteration 4" in resumed.stdout
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert len(saved["scheduler"]["source_map"]) == 256  # the bridge starts from the mapped input
    plot = run("compare-runs", str(tmp_path / "run"), "--out", str(tmp_path / "cmp.png"))
    assert plot.returncode == 0 and (tmp_path / "cmp.png").stat().st_size > 1000


def test_retrieval_commands_train_evaluate_and_build_a_kb(tmp_path):
    src = require(SHARED_DATA / "brats_dev")
    data = tmp_path / "prepared"
    assert (
        run(
            "prepare",
            "--layout",
            "brats",
            "--src",
            str(src),
            "--out",
            str(data),
            "--size",
            "32",
            "--max-subjects",
            "5",
            "--quiet",
        ).returncode
        == 0
    )
    trained = run(
        "train-retrieval",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "enc"),
        "--patch-size",
        "8",
        "--width",
        "32",
        "--depth",
        "2",
        "--heads",
        "2",
        "--embedding-dim",
        "16",
        "--perceptual-blocks",
        "0",
        "1",
        "--iters",
        "2",
        "--subjects-per-batch",
        "2",
        "--run-length",
        "4",
        "--quiet",
    )
    assert trained.returncode == 0, trained.stderr
    evaluated = run(
        "eval-retrieval", "--data", str(data), "--encoder", str(tmp_path / "enc" / "encoder.pt"), "--split", "train"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert 0 <= json.loads(evaluated.stdout)["subject_accuracy"] <= 1
    built = run(
        "build-kb",
        "--data",
        str(data),
        "--encoder",
        str(tmp_path / "enc" / "encoder.pt"),
        "--out",
        str(tmp_path / "kb"),
    )
    assert built.returncode == 0, built.stderr
    assert "entries, tau" in built.stdout and (tmp_path / "kb" / "manifest.json").is_file()
    again = run(
        "build-kb", "--data", str(data), "--encoder", str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "kb2")
    )
    assert again.returncode == 2 and "no such checkpoint" in again.stderr


def test_a_singular_affine_is_one_line_not_a_traceback(tmp_path):
    """nibabel's OrientationError used to escape as a traceback."""
    path = tmp_path / "singular.nii.gz"
    header = nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.int16), np.eye(4)).header
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"], header["srow_y"], header["srow_z"] = np.zeros((3, 4))
    nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.int16), None, header).to_filename(str(path))
    result = run("inspect", str(path))
    assert result.returncode == 2
    assert (
        result.stderr.startswith(f"error: {path}: the header's voxel-to-world affine is singular")
        and result.stderr.count("\n") == 1
    )


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("reconstruct", "--steps", "0"),
        ("reconstruct", "--target-spacing", "0"),
        ("reconstruct", "--simulate-sparsity", "0"),
        ("reconstruct", "--samples", "0"),
        ("reconstruct", "--batch-size", "0"),
        ("reconstruct", "--eta", "nan"),
        ("batch", "--steps", "0"),
        ("batch", "--simulate-sparsity", "0"),
        ("batch", "--batch-size", "0"),
        ("evaluate", "--steps", "0"),
        ("evaluate", "--max-subjects", "0"),
        ("evaluate", "--sparsity", "0"),
        ("evaluate", "--open-count", "0"),
        ("evaluate", "--kb-fractions", "0"),
        ("inspect", "--target-spacing", "0"),
    ],
)
def test_zero_is_refused_naming_the_option_not_read_as_the_default(tmp_path, capsys, command, option, value):
    """``--steps 0`` and ``--target-spacing 0`` used to mean "the preset's" (``options.steps or preset.steps``)."""
    # A preset that does not exist: were the option accepted, the command would stop there, not run a model.
    arguments = {
        "reconstruct": ["ct.nii.gz", str(tmp_path / "out"), "--preset", str(tmp_path / "no-preset")],
        "batch": [str(tmp_path), str(tmp_path / "out"), "--preset", str(tmp_path / "no-preset")],
        "evaluate": ["--layout", "open", "--out", str(tmp_path / "report"), "--preset", str(tmp_path / "no-preset")],
        "inspect": [str(tmp_path / "ct.nii.gz")],
    }
    with pytest.raises(SystemExit) as exit_:
        main([command, *arguments[command], option, value])
    assert exit_.value.code == 2
    assert f"error: argument {option}: " in capsys.readouterr().err


def test_evaluate_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    """Issue 17, finding 4 (as for reconstruct): ``evaluate --out`` replaced a folder wholesale."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # Refused before the preset is even looked up (this one does not exist).
    code = main(
        [
            "evaluate",
            "--input",
            str(tmp_path / "scan.nii.gz"),
            "--preset",
            str(tmp_path / "no_preset"),
            "--out",
            str(out),
        ]
    )
    assert code == 2 and "not empty and not an earlier ReBrain report" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
