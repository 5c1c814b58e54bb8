"""``python main.py batch`` on a DICOM tree the test writes from real volumes: two CT series,
a broken CT series, an MR distractor, a localizer, a non-image object and unreadable files."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from app.batch import EARLIER_MANIFEST_FIELDS, MANIFEST_FIELDS, is_complete, is_own_manifest, resumed_outcome
from app.cli import main
from lib.consistency import CHECK_COLUMNS
from lib.io import dense_grid, read_volume
from lib.io.dicom_writer import SeriesDescription, write_dicom_series
from tests.app.server_process import REPO
from tests.dicom_variants import copy_position_of, corrupt_vr, remove
from tests.test_reconstruction import summary
from tests.tilted import make_tilted
from tests.tiny_preset import make_tiny_preset

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19600101"}
LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return make_tiny_preset(tmp_path_factory.mktemp("preset"), "tinyct", layout="open", max_subjects=3)


def _text_report(path) -> None:
    """A DICOM object without pixels (a Basic Text SR)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "SR"
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    pydicom.dcmwrite(str(path), ds, write_like_original=False)


@pytest.fixture(scope="module")
def tree(real_ct_volume, brats_case, tmp_path_factory):
    """The input tree and the series it holds."""
    root = tmp_path_factory.mktemp("archive")
    study = generate_uid()
    frame = generate_uid()
    middle = real_ct_volume.shape[2] // 2
    series = {}
    for name, start, count in (("ct_a", middle - 10, 10), ("ct_b", middle, 8)):
        description = SeriesDescription(
            modality="CT",
            series_description=f"head {name}",
            study_uid=study,
            frame_of_reference_uid=frame,
            patient=PATIENT,
            series_number=2,
        )
        write_dicom_series(
            real_ct_volume.take_slices(list(range(start, start + count))),
            root / "patient" / "study" / name,
            description,
        )
        series[name] = description.series_uid
    broken = SeriesDescription(modality="CT", series_description="broken", study_uid=study, patient=PATIENT)
    paths = write_dicom_series(
        real_ct_volume.take_slices([middle, middle + 1, middle + 2]), root / "patient" / "study" / "broken", broken
    )
    duplicate = pydicom.dcmread(str(paths[1]))
    duplicate.ImagePositionPatient = pydicom.dcmread(str(paths[0])).ImagePositionPatient
    duplicate.save_as(str(paths[1]))
    series["broken"] = broken.series_uid
    flair = read_volume(brats_case / "t2f.nii.gz", modality="MR").take_slices(list(range(70, 74)))
    mr = SeriesDescription(
        modality="MR",
        series_description="FLAIR",
        image_type=("ORIGINAL", "PRIMARY"),
        rescale_intercept=0.0,
        study_uid=study,
        patient=PATIENT,
    )
    write_dicom_series(flair, root / "patient" / "study" / "mr", mr)
    series["mr"] = mr.series_uid
    scout = SeriesDescription(
        modality="CT",
        series_description="scout",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        study_uid=study,
        patient=PATIENT,
    )
    write_dicom_series(real_ct_volume.take_slices([middle]), root / "patient" / "study" / "scout", scout)
    series["scout"] = scout.series_uid
    mpr = SeriesDescription(
        modality="CT",
        series_description="MPR",
        image_type=("DERIVED", "SECONDARY", "REFORMATTED"),
        study_uid=study,
        patient=PATIENT,
    )
    for path in write_dicom_series(
        real_ct_volume.take_slices(list(range(middle, middle + 4))), root / "patient" / "study" / "mpr", mpr
    )[2:]:
        coronal = pydicom.dcmread(str(path))
        coronal.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        coronal.save_as(str(path))
    series["mpr"] = mpr.series_uid
    (root / "junk").mkdir()
    (root / "junk" / "corrupt.dcm").write_bytes(b"DICM" + os.urandom(300))
    (root / "junk" / "README.txt").write_text("not DICOM")
    _text_report(root / "junk" / "report.dcm")
    return root, series


def tree_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_batch_writes_every_ct_series_and_reports_the_rest(tree, preset, tmp_path, capsys):
    root, series = tree
    before = tree_digest(root)
    out = tmp_path / "out"
    code = main(["batch", str(root), str(out), "--preset", str(preset.root), "--steps", "2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # the broken series failed
    assert tree_digest(root) == before  # the input tree is never modified
    manifest = {
        row["series_uid"] or row["message"].split(":")[0]: row
        for row in json.loads((out / "manifest.json").read_text())["series"]
    }
    assert manifest[series["ct_a"]]["status"] == manifest[series["ct_b"]]["status"] == "done"
    # 10 and 8 slices are too short to register: the manifest says where positions came from.
    assert manifest[series["ct_b"]]["positions"].startswith(
        "brain extent (8 slices spanning 17.5 mm are too few to register"
    )
    assert manifest[series["broken"]]["status"] == "failed" and "same position" in manifest[series["broken"]]["message"]
    assert f"failed: series {series['broken']}" in captured.err
    assert manifest[series["mr"]]["status"] == "skipped" and "modality MR" in manifest[series["mr"]]["message"]
    assert manifest[series["scout"]]["status"] == "skipped" and "localizer" in manifest[series["scout"]]["message"]
    assert (
        manifest[series["mpr"]]["status"] == "skipped"
        and "not one stack of parallel slices" in manifest[series["mpr"]]["message"]
    )
    for name in ("junk/corrupt.dcm", "junk/README.txt", "junk/report.dcm"):
        assert manifest[name]["status"] == "skipped"
    assert "not an image" in manifest["junk/report.dcm"]["message"]
    assert (out / "manifest.csv").read_text().count("\n") == len(manifest) + 1
    # The checks without ground truth: columns of every row, the provenance's values for a
    # reconstructed series, empty for the others.
    with open(out / "manifest.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert set(CHECK_COLUMNS) <= set(csv_rows[0])
    for name in ("ct_a", "ct_b"):
        summary = json.loads((out / series[name] / "provenance.json").read_text())["summary"]
        row = manifest[series[name]]
        assert row["csf_dice"] == summary["tissue_check"]["csf_dice"] is not None
        assert row["tissue_order"] == summary["tissue_check"]["order_holds"]
        assert row["t1_grey"] == summary["tissue_check"]["t1_mean"]["grey"]
        assert row["banding_brightness_ratio"] == summary["banding"]["brightness_ratio"] is not None
    assert all(manifest[series["mr"]][column] is None for column in CHECK_COLUMNS)
    assert not list(out.glob(".tmp-*"))

    private = list(json.loads((preset.root.parent / "prepared" / "private_subject_map.json").read_text()).values())
    for name in ("ct_a", "ct_b"):
        folder = out / series[name]
        assert is_complete(folder) and manifest[series[name]]["slices"] > 0
        source = read_volume(root / "patient" / "study" / name, modality="CT")
        grid = dense_grid(source, 1.0)
        headers = [pydicom.dcmread(str(p)) for p in sorted((folder / "dicom").glob("*.dcm"))]
        assert len(headers) == grid.shape[2]
        reference = pydicom.dcmread(str(next((root / "patient" / "study" / name).glob("*.dcm"))))
        for ds in headers:
            assert ds.Modality == "MR" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
            assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.ImageComments
            assert (
                ds.StudyInstanceUID == reference.StudyInstanceUID
                and ds.FrameOfReferenceUID == reference.FrameOfReferenceUID
            )
            assert ds.SeriesInstanceUID not in series.values() and ds.SOPInstanceUID != reference.SOPInstanceUID
            assert str(ds.PatientName) == PATIENT["PatientName"] and ds.PatientID == PATIENT["PatientID"]
            assert float(ds.WindowWidth) > 0 and 0 < float(ds.WindowCenter) < 1000
        # SimpleITK reads the series back onto the dense grid, in the input's patient frame.
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "dicom")))
        image = reader.Execute()
        size_x, size_y, size_z = grid.shape
        assert image.GetSize() == (size_x, size_y, size_z)
        for c, r, k in ((0, 0, 0), (size_x - 1, 3, size_z - 1), (5, size_y - 1, size_z // 2)):
            expected = LPS @ (grid.affine @ np.array([size_x - 1 - c, size_y - 1 - r, k, 1.0]))[:3]
            np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((c, r, k)), expected, atol=1e-3)
        for path in folder.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                for identifier in private:
                    assert identifier.encode() not in content, (path, identifier)


def test_a_killed_run_resumes_to_complete_outputs(tree, preset, tmp_path):
    root, series = tree
    out = tmp_path / "out"
    command = [
        sys.executable,
        "main.py",
        "batch",
        str(root),
        str(out),
        "--preset",
        str(preset.root),
        "--steps",
        "30",
        "--quiet",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    outputs = [out / series["ct_a"], out / series["ct_b"]]
    deadline = time.monotonic() + 600
    while not any(o.exists() for o in outputs) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    done = [o for o in outputs if o.exists()]
    assert len(done) == 1, "the run was not killed between the two CT series"
    first, second = done[0], next(o for o in outputs if o not in done)
    assert is_complete(first)
    first_mtime = (first / "mri.nii.gz").stat().st_mtime_ns
    # What a kill during writing leaves: a staging folder with part of the outputs.
    half_written = out / f".tmp-0123abcd-{second.name}"
    half_written.mkdir()
    (half_written / "mri.nii.gz").write_bytes(b"partial")

    code = main(["batch", str(root), str(out), "--preset", str(preset.root), "--steps", "30", "--resume", "--quiet"])
    assert code == 1  # the broken series fails again
    assert is_complete(first) and is_complete(second)
    assert (first / "mri.nii.gz").stat().st_mtime_ns == first_mtime  # not redone
    rows = {row["series_uid"]: row for row in json.loads((out / "manifest.json").read_text())["series"]}
    assert rows[first.name]["status"] == "complete" and rows[second.name]["status"] == "done"
    assert not list(out.glob(".tmp-*"))


def test_output_inside_the_input_tree_is_refused(tree, preset, capsys):
    root, _ = tree
    code = main(["batch", str(root), str(root / "results"), "--preset", str(preset.root), "--quiet"])
    assert code == 2 and "must not lie inside the input tree" in capsys.readouterr().err
    assert not (root / "results").exists()


def test_push_dicomweb_stores_each_series_in_orthanc(namespace, orthanc, tree, preset, tmp_path):
    """STOW-RS into a real Orthanc; the batch runs inside Orthanc's network namespace."""
    root, series = tree
    out = tmp_path / "out"
    prefix = ["ip", "netns", "exec", namespace]
    batch = [
        sys.executable,
        "main.py",
        "batch",
        str(root),
        str(out),
        "--preset",
        str(preset.root),
        "--steps",
        "2",
        "--quiet",
        "--push-dicomweb",
        f"{orthanc}/dicom-web",
    ]
    done = subprocess.run(
        prefix + batch,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1, done.stderr  # the broken series
    rows = {row["series_uid"]: row for row in json.loads((out / "manifest.json").read_text())["series"]}
    query = (
        "import json, requests, sys; print(json.dumps(requests.get(sys.argv[1], params={'Modality': 'MR'}, "
        "timeout=30).json()))"
    )
    listed = subprocess.run(
        prefix + [sys.executable, "-c", query, f"{orthanc}/dicom-web/series"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    stored = {entry["0020000E"]["Value"][0]: entry for entry in json.loads(listed.stdout)}
    for name in ("ct_a", "ct_b"):
        assert rows[series[name]]["pushed"] is True
        written = sorted((out / series[name] / "dicom").glob("*.dcm"))
        new_uid = pydicom.dcmread(str(written[0])).SeriesInstanceUID
        assert new_uid in stored
        assert stored[new_uid]["00201209"]["Value"][0] == len(written)  # NumberOfSeriesRelatedInstances


def test_a_tilted_partial_series_is_aligned_and_written_in_its_own_geometry(
    real_ct_volume, real_ct_alignment, preset, tmp_path
):
    """Gantry tilt 15 degrees, upper 40 % of the head, 5 mm slices: registered to the template,
    and every synthetic slice lies on the tilted stack's own planes, in its own in-plane grid."""
    count = real_ct_volume.shape[2]
    indices = list(range(int(count * 0.6), count, 2))
    tilted = make_tilted(real_ct_volume, 15.0).take_slices(indices)
    description = SeriesDescription(modality="CT", series_description="tilted head", patient=PATIENT)
    inputs = write_dicom_series(tilted, tmp_path / "in" / "tilted", description)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), str(out), "--preset", str(preset.root), "--steps", "2", "--quiet"]) == 0
    folder = out / description.series_uid
    assert is_complete(folder)

    source = read_volume(tmp_path / "in" / "tilted", modality="CT")
    assert source.meta["gantry_tilt_deg"] == pytest.approx(15.0, abs=0.01)
    provenance = json.loads((folder / "provenance.json").read_text())
    alignment = provenance["summary"]["alignment"]
    assert alignment["applied"] is True and alignment["positions"] == "CT head template"
    manifest = json.loads((out / "manifest.json").read_text())["series"]
    assert manifest[0]["positions"].startswith("CT head template (MI -")
    acquired = [record for record in provenance["slices"] if record["acquired"]]
    positions = np.array([record["normalised_position"] for record in acquired])
    # The same slices as in the untilted whole head, within 0.05 of the brain's height.
    whole = real_ct_alignment.normalised_positions(real_ct_volume)[indices]
    assert np.abs(positions - whole).max() < 0.05 and positions[0] > 0.6

    grid = dense_grid(source, 1.0)
    headers = sorted(
        (pydicom.dcmread(str(p)) for p in (folder / "dicom").glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber)
    )
    assert len(headers) == grid.shape[2]
    size_x, size_y, _ = grid.shape
    for k, ds in enumerate(headers):
        # DICOM's first pixel is the grid's (X-1, Y-1) corner (RAS -> LPS flips both in-plane axes).
        expected = LPS @ (grid.affine @ np.array([size_x - 1, size_y - 1, k, 1.0]))[:3]
        np.testing.assert_allclose(np.asarray(ds.ImagePositionPatient, dtype=float), expected, atol=1e-3)
    # The first and last synthetic slices sit exactly on the first and last acquired CT slices.
    first_last = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in (inputs[0], inputs[-1])]
    ends = sorted(first_last, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for ds, synthetic in zip(ends, (headers[0], headers[-1])):
        np.testing.assert_allclose(
            np.asarray(synthetic.ImagePositionPatient, dtype=float),
            np.asarray(ds.ImagePositionPatient, dtype=float),
            atol=1e-3,
        )
        assert np.allclose(
            np.asarray(synthetic.ImageOrientationPatient, dtype=float),
            np.asarray(ds.ImageOrientationPatient, dtype=float),
            atol=1e-5,
        )


def four_slices(real_ct_volume):
    """Four 2.5 mm slices of the real head CT (128 x 128): the smallest series batch reconstructs."""
    middle = real_ct_volume.shape[2] // 2
    return real_ct_volume.take_slices(list(range(middle, middle + 4)))


def manifest_rows(out) -> dict[str, dict]:
    return {row["series_uid"]: row for row in json.loads((out / "manifest.json").read_text())["series"]}


def test_output_folders_stay_inside_the_output_root_and_replace_only_rebrain_outputs(real_ct_volume, preset, tmp_path):
    """Issue 17, finding 3: a SeriesInstanceUID of ``../victim`` or an absolute path made batch
    replace that folder, deleting what was in it."""
    victims = [tmp_path / "victim", tmp_path / "absolute_victim"]
    for victim in victims:
        victim.mkdir()
        (victim / "keep.txt").write_text("not ReBrain's")
    uids = {"relative": "../victim", "absolute": str(victims[1]), "taken": generate_uid()}
    for name, uid in uids.items():
        write_dicom_series(
            four_slices(real_ct_volume),
            tmp_path / "in" / name,
            SeriesDescription(modality="CT", series_uid=uid, patient=PATIENT),
        )
    out = tmp_path / "out"
    (out / uids["taken"]).mkdir(parents=True)
    (out / uids["taken"] / "mri.nii.gz").write_text("a user's file under an output's name")
    command = ["batch", str(tmp_path / "in"), str(out), "--preset", str(preset.root), "--steps", "2", "--quiet"]

    for _ in range(2):  # the second run replaces its own outputs, and still nothing else
        assert main(command) == 1
        for victim in victims:
            assert [path.name for path in victim.iterdir()] == ["keep.txt"]
        assert (out / uids["taken"] / "mri.nii.gz").read_text() == "a user's file under an output's name"
        rows = manifest_rows(out)
        assert rows[uids["taken"]]["status"] == "failed" and "not written by ReBrain" in rows[uids["taken"]]["message"]
        for key in ("relative", "absolute"):
            assert rows[uids[key]]["status"] == "done" and re.fullmatch(
                r"series-[0-9a-f]{16}", rows[uids[key]]["output"]
            )
            assert is_complete(out / rows[uids[key]]["output"])
        assert sorted(path.name for path in out.iterdir()) == sorted(
            [
                uids["taken"],
                "manifest.csv",
                "manifest.json",
                *(rows[uids[key]]["output"] for key in ("relative", "absolute")),
            ]
        )


def test_a_damaged_file_or_series_fails_only_its_own_series(real_ct_volume, preset, tmp_path):
    """Issue 17, finding 5: a file with a corrupt VR in its meta header (pydicom's
    NotImplementedError) or a series without PixelSpacing ended the whole run with a traceback."""
    root = tmp_path / "in"
    good = SeriesDescription(modality="CT", patient=PATIENT)
    write_dicom_series(four_slices(real_ct_volume), root / "good", good)
    corrupt, no_spacing = (
        SeriesDescription(modality="CT", patient=PATIENT),
        SeriesDescription(modality="CT", patient=PATIENT),
    )
    corrupt_vr((0x0002, 0x0010))(write_dicom_series(four_slices(real_ct_volume), root / "corrupt_vr", corrupt), 1)
    files = write_dicom_series(four_slices(real_ct_volume), root / "no_spacing", no_spacing)
    for index in range(len(files)):
        remove("PixelSpacing")(files, index)
    out = tmp_path / "out"
    assert main(["batch", str(root), str(out), "--preset", str(preset.root), "--steps", "2", "--quiet"]) == 1
    rows = manifest_rows(out)
    assert rows[good.series_uid]["status"] == "done" and is_complete(out / good.series_uid)
    assert rows[corrupt.series_uid]["status"] == "failed"
    assert rows[corrupt.series_uid]["message"].startswith(
        "corrupt_vr/slice_0001.dcm: a damaged DICOM file (NotImplementedError: Unknown Value Representation"
    )
    assert rows[no_spacing.series_uid]["status"] == "failed" and rows[no_spacing.series_uid]["message"].startswith(
        "no_spacing/slice_0000.dcm: no PixelSpacing"
    )


def test_outputs_name_inputs_only_by_id_or_relative_path(real_ct_volume, brats_case, preset, tmp_path):
    """Issue 17, finding 9: manifest messages carried absolute input paths (here a folder named
    after the patient) and series descriptions (free text), and the synthetic series copied the
    CT's SeriesDescription."""
    root = tmp_path / "Doe_Jane_1960-01-01"
    ct = SeriesDescription(modality="CT", series_description="Doe Jane head trauma", patient=PATIENT)
    write_dicom_series(four_slices(real_ct_volume), root / "ct", ct)
    broken = write_dicom_series(
        four_slices(real_ct_volume),
        root / "broken",
        SeriesDescription(modality="CT", series_description="Doe Jane follow-up", patient=PATIENT),
    )
    copy_position_of(0)(broken, 1)
    mr = SeriesDescription(modality="MR", series_description="Doe Jane FLAIR", rescale_intercept=0.0, patient=PATIENT)
    write_dicom_series(read_volume(brats_case / "t2f.nii.gz", modality="MR").take_slices([70, 71]), root / "mr", mr)
    (root / "junk").mkdir()
    (root / "junk" / "notes.dcm").write_bytes(b"Doe Jane, seen " + bytes(range(256)))
    out = tmp_path / "out"
    assert main(["batch", str(root), str(out), "--preset", str(preset.root), "--steps", "2", "--quiet"]) == 1
    for manifest in ("manifest.csv", "manifest.json"):
        text = (out / manifest).read_text()
        assert "Doe" not in text and str(tmp_path) not in text, text
    rows = manifest_rows(out)
    assert rows[ct.series_uid]["status"] == "done"
    assert next(row for row in rows.values() if row["status"] == "failed")["message"].startswith(
        "broken/slice_0001.dcm: two slices"
    )
    assert rows[mr.series_uid]["status"] == "skipped"
    for path in (out / ct.series_uid / "dicom").glob("*.dcm"):
        assert pydicom.dcmread(str(path), stop_before_pixels=True).SeriesDescription == "SYNTHETIC ReBrain MRI from CT"


def test_a_user_manifest_in_the_output_root_is_never_replaced(real_ct_volume, preset, tmp_path, capsys):
    """Issue 17, finding 3: batch overwrote a manifest.csv or manifest.json it did not write."""
    write_dicom_series(
        four_slices(real_ct_volume), tmp_path / "in" / "ct", SeriesDescription(modality="CT", patient=PATIENT)
    )
    for name in ("manifest.csv", "manifest.json"):
        out = tmp_path / f"out_{name}"
        out.mkdir()
        (out / name).write_text("the hospital's own list")
        assert (
            main(["batch", str(tmp_path / "in"), str(out), "--preset", str(preset.root), "--steps", "2", "--quiet"])
            == 2
        )
        assert f"{name}: exists and was not written by ReBrain batch" in capsys.readouterr().err
        assert (out / name).read_text() == "the hospital's own list" and sorted(p.name for p in out.iterdir()) == [name]


def test_an_output_root_from_before_the_check_columns_is_still_resumable(tmp_path):
    """A manifest and a provenance.json written before the checks were recorded: batch still
    knows the manifest as its own, and a resumed series has empty check columns."""
    old_header = ",".join(EARLIER_MANIFEST_FIELDS)
    assert not set(CHECK_COLUMNS) & set(EARLIER_MANIFEST_FIELDS) and len(MANIFEST_FIELDS) > len(EARLIER_MANIFEST_FIELDS)
    (tmp_path / "manifest.csv").write_text(old_header + "\n1.2.3,done,1.0,10,0.5,2,brain extent,1.2.3,,\n")
    (tmp_path / "other.csv").write_text("series_uid,status\n")
    assert is_own_manifest(tmp_path / "manifest.csv") and not is_own_manifest(tmp_path / "other.csv")
    folder = tmp_path / "1.2.3"
    folder.mkdir()
    older = {key: value for key, value in summary().to_dict().items() if key not in ("tissue_check", "banding")}
    (folder / "provenance.json").write_text(json.dumps({"summary": older, "slices": []}))
    row = resumed_outcome(SimpleNamespace(uid="1.2.3"), folder).row()
    assert list(row) == list(MANIFEST_FIELDS) and row["slices"] == 9 and row["status"] == "complete"
    assert all(row[column] is None for column in CHECK_COLUMNS)
