"""The pipeline on a real head CT with a CT preset: brain extraction and alignment to the CT head
template on by default, off on request, skipped for a CT that is already brain-only; a CT that
cannot be registered is refused by name; the MRI lies in the CT's own frame."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from app.cli import main
from lib.consistency import tissue_check
from lib.data.ct_alignment import MAX_METRIC
from lib.data.ct_brain import extract_brain
from lib.io import dense_grid, read_volume
from lib.io.dicom_writer import SeriesDescription, write_dicom_series
from lib.io.nifti import write_nifti
from lib.io.volume import Volume
from lib.pipeline import ReBrainPipeline, ReconstructionOptions
from tests.tiny_preset import make_tiny_preset


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return ReBrainPipeline.from_preset(
        make_tiny_preset(tmp_path_factory.mktemp("preset"), "tinyct", layout="open", max_subjects=3)
    )


@pytest.fixture(scope="module")
def head_cut(real_ct_volume):
    middle = real_ct_volume.shape[2] // 2
    return real_ct_volume.take_slices(list(range(middle - 6, middle + 6, 2)))


def test_real_ct_gets_the_brain_only(pipeline, head_cut):
    result = pipeline.reconstruct(head_cut, ReconstructionOptions(steps=2))
    record = result.summary.brain_extraction
    assert record["applied"] is True and 0.05 < record["brain_fraction"] < 0.6 and record["brain_volume_ml"] > 100
    # 6 slices over 25 mm cannot pin down the head's pitch: positions from the brain extent, said so.
    alignment = result.summary.alignment
    assert (
        alignment["applied"] is False
        and "too few to register" in alignment["reason"]
        and alignment["positions"] == "brain extent"
    )
    brain = extract_brain(head_cut).mask
    for k in np.flatnonzero(result.grid.acquired):
        # The synthetic MRI exists only inside the intracranial mask (never on skull or scalp).
        assert not np.any((result.mri[:, :, k] > 0) & ~brain[:, :, result.grid.source_index[k]])
    assert result.mri.max() > 0
    # The display CT is the input's, skull included.
    assert result.ct.max() > 1000


def test_a_real_ct_gets_the_tissue_check_on_its_acquired_slices_and_the_banding_measure(pipeline, head_cut):
    result = pipeline.reconstruct(head_cut, ReconstructionOptions(steps=2))
    check = result.summary.tissue_check
    # The check sees the input's HU (skull included: the erosion and masked smoothing keep it
    # out), the output T1 and the brain, on the 6 acquired slices of the 26 on the grid.
    hu_classes = {key: value for key, value in check.items() if key != "atlas"}
    assert (
        hu_classes
        == tissue_check(result.ct, result.mri, result.mask, result.grid.acquired, head_cut.pixel_spacing).to_dict()
    )
    assert "atlas" in check  # its half: tests/test_pipeline_ct.py::test_the_atlas_regions_of_a_whole_real_ct...
    assert check["slices"] == result.summary.acquired_slices == 6 and result.summary.slices == 26
    assert check["voxels"]["white"] > 0 and check["voxels"]["grey"] > 0 and 20 < check["brain_median_hu"] < 45
    # 6 slices 5 mm apart on the 1 mm grid: 5 gaps of 4 generated slices, 2 boundaries and 3 inner pairs each.
    assert result.summary.banding["pairs"] == {"acquired_generated": 10, "generated_generated": 15}
    assert result.summary.banding["brightness_ratio"] > 0


def test_the_atlas_regions_of_a_whole_real_ct_show_its_grey_denser_than_its_white(pipeline, real_ct_volume):
    """The MNI152 tissue maps registered to the real CT: the CT's own HU in the grey-matter core
    are above those in the white-matter core (measured 40 / 32 HU, d 1.3, on the full-resolution
    study), as they would not be with the atlas misplaced; the tiny model's T1 is only recorded."""
    result = pipeline.reconstruct(real_ct_volume, ReconstructionOptions(steps=2))
    atlas = result.summary.tissue_check["atlas"]
    assert set(atlas) == {"voxels", "t1_mean", "order_holds", "cohen_d", "ct_median_hu", "ct_d_grey_white"}
    assert atlas["voxels"]["white"] > atlas["voxels"]["grey"] > atlas["voxels"]["csf"] > 0
    hu = atlas["ct_median_hu"]
    assert hu["grey"] > hu["white"] > hu["csf"] and atlas["ct_d_grey_white"] > 0.5
    assert atlas["order_holds"] in (True, False)


def test_a_cut_too_small_for_the_atlas_says_so_and_still_reconstructs(pipeline, real_ct_volume):
    middle = real_ct_volume.shape[2] // 2
    cut = real_ct_volume.take_slices(list(range(middle - 2, middle + 2)))
    result = pipeline.reconstruct(cut, ReconstructionOptions(steps=2))
    assert "too little to register the atlas" in result.summary.tissue_check["atlas"]["error"]
    assert result.summary.tissue_check["slices"] == result.summary.acquired_slices and result.mri.max() > 0


def test_brain_extraction_can_be_turned_off(pipeline, head_cut):
    result = pipeline.reconstruct(head_cut, ReconstructionOptions(steps=2, brain_extraction=False))
    assert result.summary.brain_extraction == {"applied": False, "reason": "turned off (input already brain-only)"}
    brain = extract_brain(head_cut).mask
    k = int(np.flatnonzero(result.grid.acquired)[0])
    # Without it the head (skull, scalp) is the foreground and gets synthetic MRI values too.
    assert np.any((result.mri[:, :, k] > 0) & ~brain[:, :, result.grid.source_index[k]])


def test_a_brain_only_ct_is_used_as_it_is(pipeline):
    array = np.full((48, 56, 6), -1000.0, dtype=np.float32)
    array[10:38, 12:44, :] = 32.0
    volume = Volume(array=array, affine=np.diag([2.0, 2.0, 1.0, 1.0]), positions=np.arange(6) * 4.0, modality="CT")
    result = pipeline.reconstruct(volume, ReconstructionOptions(steps=2))
    assert (
        result.summary.brain_extraction["applied"] is False and "no skull" in result.summary.brain_extraction["reason"]
    )


@pytest.fixture(scope="module")
def whole_head_positions(real_ct_volume, real_ct_alignment):
    """Normalised positions of every slice of the whole real CT, from its own registration."""
    return real_ct_alignment.normalised_positions(real_ct_volume)


@pytest.fixture(scope="module")
def upper_part(real_ct_volume):
    """The upper 40 % of the real head CT, every other slice (5 mm apart): 14 slices over 65 mm."""
    count = real_ct_volume.shape[2]
    indices = list(range(int(count * 0.6), count, 2))
    return real_ct_volume.take_slices(indices), indices


def test_partial_real_ct_takes_its_positions_from_the_template(pipeline, upper_part, whole_head_positions):
    volume, indices = upper_part
    aligned = pipeline.reconstruct(volume, ReconstructionOptions(steps=2))
    record = aligned.summary.alignment
    assert record["applied"] is True and record["positions"] == "CT head template" and record["metric"] <= MAX_METRIC
    assert len(record["rotation_deg"]) == 3 and len(record["translation_mm"]) == 3 and "LPS" in record["transform"]
    positions = np.array([r.normalised_position for r in aligned.slices])
    acquired = aligned.grid.acquired
    # Each acquired slice keeps the position it has in the whole head.
    assert np.abs(positions[acquired] - whole_head_positions[indices]).max() < 0.03
    assert positions[0] > 0.6 and positions[-1] > 1.0  # high in the brain, the top above it

    # Without the alignment the brain's own extent maps this cut onto the whole 0..1 range.
    unaligned = pipeline.reconstruct(volume, ReconstructionOptions(steps=2, alignment=False))
    assert unaligned.summary.alignment["applied"] is False and "turned off" in unaligned.summary.alignment["reason"]
    brain_extent = np.array([r.normalised_position for r in unaligned.slices])
    assert brain_extent.min() < 0.05


def test_real_ct_dicom_reconstructs_in_the_ct_frame(pipeline, upper_part, tmp_path, capsys):
    """CLI on a real CT DICOM series: the MRI's affine is the CT's, on the dense grid along z."""
    volume, _ = upper_part
    write_dicom_series(volume, tmp_path / "ct", SeriesDescription(modality="CT", series_description="head"))
    assert (
        main(
            [
                "reconstruct",
                str(tmp_path / "ct"),
                str(tmp_path / "out"),
                "--preset",
                str(pipeline.preset.root),
                "--steps",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    source = read_volume(tmp_path / "ct", modality="CT")
    grid = dense_grid(source, pipeline.preset.slice_spacing_mm)
    image = nib.load(tmp_path / "out" / "mri.nii.gz")
    assert image.shape == grid.shape
    np.testing.assert_allclose(image.affine, grid.affine, atol=1e-3)
    # In-plane axes, first and last slice are the CT's own.
    voxel = source.voxel_affine()
    np.testing.assert_allclose(image.affine[:3, :2], voxel[:3, :2], atol=1e-4)
    np.testing.assert_allclose(image.affine[:3, 3], voxel[:3, 3], atol=1e-3)
    last = image.affine @ np.array([0, 0, image.shape[2] - 1, 1.0])
    np.testing.assert_allclose(last[:3], (source.affine @ np.array([0, 0, source.positions[-1], 1.0]))[:3], atol=1e-3)


def test_a_ct_that_fails_registration_is_refused_by_name(pipeline, real_ct_volume, tmp_path, capsys):
    """The real head turned upside down: brain found, registration rejected, nothing written."""
    flipped = real_ct_volume.array[:, :, ::-1].copy()
    write_nifti(
        tmp_path / "upside_down.nii.gz", flipped, real_ct_volume.voxel_affine(), "real head CT, flipped for a test"
    )
    code = main(
        [
            "reconstruct",
            str(tmp_path / "upside_down.nii.gz"),
            str(tmp_path / "out"),
            "--preset",
            str(pipeline.preset.root),
            "--steps",
            "2",
            "--quiet",
        ]
    )
    error = capsys.readouterr().err
    assert code == 2 and "upside_down.nii.gz" in error and "registration to the head CT template failed" in error
    assert "Traceback" not in error and not (tmp_path / "out").exists()
