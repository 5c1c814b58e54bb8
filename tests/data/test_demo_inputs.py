"""The inputs of ``make demo``: the real Cranium CT and one SYNTHETIC CT/T1 pseudo-subject."""

from __future__ import annotations

import io
import plistlib
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.data import demo_inputs
from lib.data.demo_inputs import CRANIUM_DESCRIPTION, DEMO_FILES, DEMO_SEED_OFFSET, main, make_demo_inputs
from lib.data.invesalius import CRANIUM_PATH, read_inv3
from lib.data.synthesis import HU

# Every 3rd voxel of the 1 mm MNI model: ~66x78x63 voxels, under a second once the model is
# loaded (the full 1 mm subject takes ~10 s, too slow for a unit test).
DOWNSAMPLE = 3


def write_small_inv3(path: Path) -> Path:
    """A tiny valid InVesalius project (HU-like values), standing in for Cranium when it is absent."""
    shape = (4, 6, 6)  # z, y, x as InVesalius stores it
    matrix = np.linspace(-1000, 1000, int(np.prod(shape))).astype(np.int16).reshape(shape)
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in (
            (
                "p/main.plist",
                plistlib.dumps(
                    {
                        "matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(shape)},
                        "spacing": [1.0, 1.0, 2.0],
                        "modality": "CT",
                    }
                ),
            ),
            ("p/matrix.dat", matrix.tobytes()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def cranium_source(tmp_path_factory) -> Path:
    """The real Cranium project when installed; otherwise a tiny stand-in so the pair tests still run."""
    if CRANIUM_PATH.is_file():
        return CRANIUM_PATH
    return write_small_inv3(tmp_path_factory.mktemp("inv3") / "small.inv3")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cranium_source) -> dict[str, Path]:
    return make_demo_inputs(
        tmp_path_factory.mktemp("demo") / "inputs", downsample=DOWNSAMPLE, cranium_path=cranium_source
    )


def description_of(image: nib.Nifti1Image) -> str:
    """The header's ``descrip`` text (numpy's bytes scalar drops the padding NULs)."""
    return image.header["descrip"].item().decode()


def staging_leftovers(folder: Path) -> list[str]:
    return [path.name for path in folder.rglob(".tmp-*")]


def test_pair_files_share_one_grid_and_say_synthetic(demo):
    assert set(demo) == {"cranium_ct", "pair_ct", "pair_t1"}
    ct, t1 = nib.load(demo["pair_ct"]), nib.load(demo["pair_t1"])
    assert ct.shape == t1.shape and len(ct.shape) == 3
    np.testing.assert_allclose(ct.affine, t1.affine)
    # Every DOWNSAMPLE-th voxel of the 1 mm template, axes RAS+.
    np.testing.assert_allclose(np.linalg.norm(ct.affine[:3, :3], axis=0), DOWNSAMPLE)
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    for image in (ct, t1):
        description = description_of(image)
        assert "SYNTHETIC" in description and f"seed {DEMO_SEED_OFFSET}" in description
        # Nothing else in the header could carry an identifier.
        assert image.header["db_name"].tobytes().strip(b"\0") == b""
        assert image.header["aux_file"].tobytes().strip(b"\0") == b""


def test_pair_ct_is_in_hounsfield_units(demo):
    ct = np.asarray(nib.load(demo["pair_ct"]).dataobj)
    t1 = np.asarray(nib.load(demo["pair_t1"]).dataobj)
    brain = ct != HU.air
    # synthesis: exactly HU.air outside the brain mask, which is where the T1 is 0.
    assert 0.05 < brain.mean() < 0.6
    assert np.all(t1[~brain] == 0)
    # Inside: CSF 8 / grey 40 / white 28 HU, +-3 HU per subject, partial volume, 5-10 HU noise.
    values = ct[brain]
    low, median, high = np.percentile(values, [1, 50, 99])
    assert HU.csf - 3 <= median <= HU.grey + 3
    assert -40 < low and high < 90


def test_pair_t1_is_finite_and_has_contrast(demo):
    ct = np.asarray(nib.load(demo["pair_ct"]).dataobj)
    t1 = np.asarray(nib.load(demo["pair_t1"]).dataobj)
    assert np.all(np.isfinite(t1))
    brain = t1[ct != HU.air]
    assert brain.std() > 0.05 * brain.mean() > 0
    # T1: white matter (28 HU on CT) is brighter than CSF (8 HU).
    csf_like = t1[(ct > -100) & (ct < 12)].mean()
    white_like = t1[(ct > 24) & (ct < 32)].mean()
    assert white_like > csf_like


def test_cranium_is_the_real_head_ct_when_installed(demo):
    if not CRANIUM_PATH.is_file():
        pytest.skip(
            f"{CRANIUM_PATH} missing (apt-get install invesalius-examples; make test installs it where apt works)"
        )
    image = nib.load(demo["cranium_ct"])
    assert image.shape == (256, 256, 108) and image.get_data_dtype() == np.int16
    assert description_of(image) == CRANIUM_DESCRIPTION
    volume = read_inv3(CRANIUM_PATH)
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume.array.astype(np.int16))
    np.testing.assert_allclose(image.affine, volume.voxel_affine())


def test_second_call_overwrites_cleanly(demo, cranium_source):
    folder = demo["pair_ct"].parent
    before = {key: np.asarray(nib.load(path).dataobj) for key, path in demo.items()}
    again = make_demo_inputs(folder, downsample=DOWNSAMPLE, cranium_path=cranium_source)
    assert again == demo
    for key, path in again.items():
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), before[key])
    assert sorted(path.name for path in folder.iterdir()) == sorted(DEMO_FILES.values())


def test_missing_cranium_names_the_package_and_writes_nothing(tmp_path):
    out = tmp_path / "inputs"
    with pytest.raises(FileNotFoundError, match="sudo apt-get install invesalius-examples"):
        make_demo_inputs(out, cranium_path=tmp_path / "absent.inv3")
    assert not out.exists()


def test_failure_while_writing_leaves_previous_set_intact(demo, cranium_source, monkeypatch):
    folder = demo["pair_ct"].parent
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    real_write = demo_inputs.write_nifti
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(demo_inputs, "write_nifti", fail_on_second)
    with pytest.raises(OSError, match="simulated"):
        make_demo_inputs(folder, downsample=DOWNSAMPLE, cranium_path=cranium_source)
    # The first file had been fully written (to a temporary name) but was not renamed.
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert staging_leftovers(folder) == []


def test_invalid_destination_leaves_nothing(tmp_path, cranium_source):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(OSError):
        make_demo_inputs(blocker, downsample=DOWNSAMPLE, cranium_path=cranium_source)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["not_a_folder"]
    assert blocker.read_text() == "a file where the output folder should be"


@pytest.mark.parametrize("kwargs, message", [({"seed": -1}, "seed"), ({"downsample": 0}, "downsample")])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_demo_inputs(tmp_path / "inputs", **kwargs)
    assert not (tmp_path / "inputs").exists()


def test_command_line_reports_a_missing_cranium(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "inputs"), "--cranium", str(tmp_path / "absent.inv3")])
    assert exit_info.value.code == 2
    assert "apt-get install invesalius-examples" in capsys.readouterr().err


def test_command_line_prints_the_written_paths(tmp_path, cranium_source, capsys):
    argv = [str(tmp_path / "inputs"), "--downsample", str(DOWNSAMPLE), "--seed", "1", "--cranium", str(cranium_source)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{key}: {tmp_path / 'inputs' / name}" for key, name in DEMO_FILES.items()]
    assert all((tmp_path / "inputs" / name).is_file() for name in DEMO_FILES.values())
    description = description_of(nib.load(tmp_path / "inputs" / "pair_ct.nii.gz"))
    assert f"seed {DEMO_SEED_OFFSET + 1}" in description
