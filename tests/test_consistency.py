"""The checks without ground truth (lib/consistency.py) on volumes whose answer is known by
construction: CT tissue classes and a T1 that does or does not follow them, and outputs with
and without stripes at their acquired slices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lib.consistency import (
    ATLAS_CLASSES,
    CHECK_COLUMNS,
    TISSUE_LABELS,
    UNCLASSIFIED,
    TissueCheckConfig,
    TissueClass,
    acquired_ct,
    atlas_cores,
    atlas_tissue_check,
    check_columns,
    classify_tissue,
    inner_brain,
    measure_banding,
    smoothed_hu,
    tissue_check,
)

# Literature-like HU of each class and the T1 a real scan gives them (white brightest, CSF dark).
HU = {TissueClass.CSF: 8.0, TissueClass.WHITE: 25.0, TissueClass.GREY: 40.0}
T1 = {TissueClass.CSF: 0.15, TissueClass.WHITE: 0.8, TissueClass.GREY: 0.55}
SKULL_HU = 1200.0
PIXEL_MM = (1.0, 1.0)
# A tissue-check record as provenance.json holds it, for the tests of its readers (evaluation
# rows and report, Slicer status line).
TISSUE_RECORD = {
    "order_holds": True,
    "t1_mean": {"csf": 0.2, "white": 0.8, "grey": 0.6},
    "cohen_d": {"white_grey": 1.5, "grey_csf": 2.5},
    "csf_dice": 0.7,
    "csf_dice_chance": 0.1,
}


def phantom(slices: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT (HU), a T1 in the order a real T1 has, and the brain: a skull ring around grey matter
    holding a white-matter block holding a CSF "ventricle", in every slice; the T1 has noise."""
    shape = (72, 72, slices)
    brain = np.zeros(shape, dtype=bool)
    brain[8:64, 8:64] = True
    ct = np.full(shape, SKULL_HU)
    ct[brain] = HU[TissueClass.GREY]
    ct[20:52, 20:52] = HU[TissueClass.WHITE]
    ct[30:42, 30:42] = HU[TissueClass.CSF]
    t1 = np.zeros(shape)
    for tissue, value in HU.items():
        t1[ct == value] = T1[tissue]
    t1 = np.where(brain, t1 + np.random.default_rng(seed).normal(0.0, 0.03, shape), 0.0)
    return ct, t1, brain


EVERY_FOURTH = np.arange(9) % 4 == 0


def test_a_t1_in_the_real_order_holds_it_and_its_dark_voxels_are_the_csf():
    ct, t1, brain = phantom()
    check = tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM)
    assert check.slices == 3
    assert all(check.voxels[tissue] > 0 for tissue in TissueClass)
    for tissue in TissueClass:
        assert check.t1_mean[tissue] == pytest.approx(T1[tissue], abs=0.01)
    assert check.order_holds is True
    # Classes 0.25 apart with noise 0.03: effect sizes of about 8.
    assert check.cohen_d["white_grey"] > 5 and check.cohen_d["grey_csf"] > 5
    assert check.csf_dice == pytest.approx(1.0)
    assert check.csf_dice_chance == pytest.approx(
        check.voxels["csf"] / sum(check.voxels[tissue] for tissue in TissueClass)
    )
    assert check.brain_median_hu == pytest.approx(HU[TissueClass.GREY], abs=1.0)


def test_an_inverted_t1_breaks_the_order_and_misses_the_csf():
    ct, t1, brain = phantom()
    check = tissue_check(ct, np.where(brain, 1.0 - t1, 0.0), brain, EVERY_FOURTH, PIXEL_MM)
    assert check.order_holds is False
    assert check.cohen_d["white_grey"] < -5 and check.cohen_d["grey_csf"] < -5
    # The inverted T1's darkest voxels are white matter: no overlap with the CSF at all.
    assert check.csf_dice == pytest.approx(0.0) and check.csf_dice < check.csf_dice_chance


def test_a_scanner_calibrated_off_the_literature_is_calibrated_back():
    """A scan whose every HU is 10 lower (water at -10, as Debian's Cranium nearly is): with
    fixed ranges its white matter falls to 15 HU (unclassified) and its grey to 30 HU
    (unclassified); calibrated, the check finds the same classes and verdict as unshifted."""
    ct, t1, brain = phantom()
    sharp = TissueCheckConfig(smoothing_mm=0.0)  # no blended edges: every voxel is its class's HU
    expected = tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM, sharp)
    assert expected.calibration_hu == pytest.approx(0.0, abs=0.5)
    shifted = np.where(brain, ct - 10.0, ct)
    uncalibrated = TissueCheckConfig(smoothing_mm=0.0, calibrate=False)
    fixed = tissue_check(shifted, t1, brain, EVERY_FOURTH, PIXEL_MM, uncalibrated)
    assert fixed.voxels["white"] == 0 and fixed.voxels["grey"] == 0 and fixed.order_holds is None
    calibrated = tissue_check(shifted, t1, brain, EVERY_FOURTH, PIXEL_MM, sharp)
    assert calibrated.calibration_hu == pytest.approx(-10.0, abs=0.5)
    assert calibrated.voxels == expected.voxels and calibrated.order_holds is True
    assert calibrated.to_dict()["thresholds_hu"]["white"] == pytest.approx([10.0, 20.0], abs=0.5)


def test_calibration_follows_the_white_grey_boundary_not_the_proportions():
    """Twice as much white matter moves a brain's median HU towards white, not its boundary."""
    ct, t1, brain = phantom()
    ct[14:58, 14:58] = np.where(ct[14:58, 14:58] == HU[TissueClass.GREY], HU[TissueClass.WHITE], ct[14:58, 14:58])
    noisy = np.where(brain, ct + np.random.default_rng(2).normal(0.0, 2.0, ct.shape), ct)
    check = tissue_check(noisy, t1, brain, EVERY_FOURTH, PIXEL_MM, TissueCheckConfig(smoothing_mm=0.0))
    assert check.brain_median_hu == pytest.approx(HU[TissueClass.WHITE], abs=2.0)
    assert abs(check.calibration_hu) < 1.5


def test_gap_slices_are_left_out():
    ct, t1, brain = phantom()
    expected = tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM).to_dict()
    # Interpolated CT of another class and an inverted T1 on every gap slice change nothing.
    gaps = ~EVERY_FOURTH
    ct[:, :, gaps] = np.where(brain[:, :, gaps], HU[TissueClass.CSF], SKULL_HU)
    t1[:, :, gaps] = np.where(brain[:, :, gaps], 1.0 - t1[:, :, gaps], 0.0)
    assert tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM).to_dict() == expected
    # Counted in, they would: more "CSF", and a part of it bright on the T1.
    counted = tissue_check(ct, t1, brain, np.ones(9, dtype=bool), PIXEL_MM)
    assert counted.voxels["csf"] > expected["voxels"]["csf"] and counted.csf_dice < expected["csf_dice"]


NO_SMOOTHING = TissueCheckConfig(smoothing_mm=0.0, erosion_mm=0.0, calibrate=False)


@pytest.mark.parametrize(
    ("hu", "label"),
    [
        (0.0, TISSUE_LABELS[TissueClass.CSF]),
        (14.9, TISSUE_LABELS[TissueClass.CSF]),
        (20.0, TISSUE_LABELS[TissueClass.WHITE]),
        (29.9, TISSUE_LABELS[TissueClass.WHITE]),
        (35.0, TISSUE_LABELS[TissueClass.GREY]),
        (44.9, TISSUE_LABELS[TissueClass.GREY]),
        # Between the classes, below CSF and above grey matter: nobody's.
        (15.0, UNCLASSIFIED),
        (17.5, UNCLASSIFIED),
        (32.5, UNCLASSIFIED),
        (34.9, UNCLASSIFIED),
        (-5.0, UNCLASSIFIED),
        (45.0, UNCLASSIFIED),
        (70.0, UNCLASSIFIED),
    ],
)
def test_hu_is_classified_by_the_documented_ranges(hu, label):
    brain = np.ones((4, 4, 2), dtype=bool)
    labels = classify_tissue(np.full(brain.shape, hu), brain, PIXEL_MM, NO_SMOOTHING)
    assert np.all(labels == label)


def test_outside_the_brain_nothing_is_classified():
    brain = np.zeros((6, 6, 1), dtype=bool)
    brain[1:5, 1:5] = True
    labels = classify_tissue(np.full(brain.shape, HU[TissueClass.WHITE]), brain, PIXEL_MM, NO_SMOOTHING)
    assert np.all(labels[~brain] == UNCLASSIFIED) and np.all(labels[brain] == TISSUE_LABELS[TissueClass.WHITE])


def test_smoothing_keeps_the_skull_out_of_the_brain():
    ct, _, brain = phantom(slices=1)
    ct[brain] = HU[TissueClass.GREY]  # a uniform brain inside 1200 HU of bone
    smoothed = smoothed_hu(ct, brain, (0.5, 0.5), sigma_mm=1.0)
    np.testing.assert_allclose(smoothed[brain], HU[TissueClass.GREY])
    noisy = np.where(brain, HU[TissueClass.GREY] + np.random.default_rng(1).normal(0.0, 5.0, ct.shape), ct)
    # Noise of 5 HU, as large as the gap between classes, falls several times lower.
    assert smoothed_hu(noisy, brain, (0.5, 0.5), sigma_mm=1.0)[brain].std() < 1.5


def test_the_brain_is_eroded_in_plane_by_the_radius_in_millimetres():
    brain = np.zeros((60, 60, 3), dtype=bool)
    brain[10:50, 10:50] = True
    inner = inner_brain(brain, (0.5, 0.5), radius_mm=3.0)  # 6 pixels of 0.5 mm
    assert inner[:, 30, 1].sum() == 40 - 2 * 6 and inner[30, :, 1].sum() == 40 - 2 * 6
    # Every slice on its own: the first and last slices are not eroded away through z.
    assert all(inner[:, :, z].sum() == inner[:, :, 1].sum() for z in (0, 2))


@pytest.mark.parametrize(
    "ranges",
    [
        {"csf_hu": (15.0, 0.0)},
        {"white_hu": (10.0, 30.0)},  # overlaps CSF
        {"grey_hu": (5.0, 12.0)},  # below white
    ],
)
def test_thresholds_out_of_order_are_refused(ranges):
    with pytest.raises(ValueError, match="_hu|overlap"):
        TissueCheckConfig(**ranges)


def test_the_record_names_the_thresholds_used():
    ct, t1, brain = phantom()
    record = tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM).to_dict()
    assert record["smoothing_mm"] == 1.0 and record["erosion_mm"] == 3.0
    # The literature ranges, moved by the calibration the record states (a tenth of a HU here).
    shift = record["calibration_hu"]
    assert shift != 0.0 and abs(shift) < 1.0
    literature = {"csf": [0.0, 15.0], "white": [20.0, 30.0], "grey": [35.0, 45.0]}
    assert record["thresholds_hu"] == {name: [low + shift, high + shift] for name, (low, high) in literature.items()}
    fixed = tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM, TissueCheckConfig(calibrate=False)).to_dict()
    assert fixed["thresholds_hu"] == literature and fixed["calibration_hu"] == 0.0


def smooth_output(slices: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """An output without stripes: an in-plane pattern growing steadily brighter along z."""
    x, y = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
    volume = np.stack([0.3 + 0.2 * x * y + 0.01 * z for z in range(slices)], axis=2)
    brain = np.zeros(volume.shape, dtype=bool)
    brain[4:28, 4:28] = True
    return np.where(brain, volume, 0.0), brain


ACQUIRED_EVERY_FIFTH = np.arange(21) % 5 == 0


def test_a_smooth_output_has_no_banding():
    volume, brain = smooth_output()
    banding = measure_banding(volume, brain, ACQUIRED_EVERY_FIFTH)
    # 4 gaps of 4 generated slices: 2 boundary pairs and 3 inner pairs each.
    assert banding.pairs == {"acquired_generated": 8, "generated_generated": 12}
    assert banding.brightness_ratio == pytest.approx(1.0) and banding.voxel_ratio == pytest.approx(1.0)
    assert banding.brightness_jump["generated_generated"] == pytest.approx(0.01)


def test_brightened_acquired_slices_are_stripes():
    volume, brain = smooth_output()
    volume[:, :, ACQUIRED_EVERY_FIFTH] += np.where(brain[:, :, ACQUIRED_EVERY_FIFTH], 0.05, 0.0)
    banding = measure_banding(volume, brain, ACQUIRED_EVERY_FIFTH)
    # A boundary steps by 0.01 +- 0.05, an inner pair by 0.01: (0.06 + 0.04) / 2 / 0.01 = 5.
    assert banding.brightness_ratio == pytest.approx(5.0) and banding.voxel_ratio == pytest.approx(5.0)


def test_textured_acquired_slices_are_stripes_voxelwise():
    volume, brain = smooth_output()
    noise = np.random.default_rng(2).normal(0.0, 0.05, volume.shape)
    volume[:, :, ACQUIRED_EVERY_FIFTH] += np.where(brain, noise, 0.0)[:, :, ACQUIRED_EVERY_FIFTH]
    banding = measure_banding(volume, brain, ACQUIRED_EVERY_FIFTH)
    # Zero-mean texture barely moves the slices' means, but every voxel steps.
    assert banding.voxel_ratio > 3 and banding.brightness_ratio < banding.voxel_ratio


def test_banding_is_undefined_without_two_generated_slices_in_a_row():
    volume, brain = smooth_output()
    banding = measure_banding(volume, brain, np.arange(21) % 2 == 0)
    assert banding.pairs["generated_generated"] == 0 and banding.brightness_ratio is None
    assert banding.voxel_ratio is None
    # Two acquired slices side by side are no boundary: all acquired means no pair at all.
    assert measure_banding(volume, brain, np.ones(21, dtype=bool)).pairs == {
        "acquired_generated": 0,
        "generated_generated": 0,
    }


def test_columns_flatten_the_records_and_are_empty_without_them():
    ct, t1, brain = phantom()
    check = tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM).to_dict()
    volume, output_brain = smooth_output()
    banding = measure_banding(volume, output_brain, ACQUIRED_EVERY_FIFTH).to_dict()
    columns = check_columns(check, banding)
    assert list(columns) == list(CHECK_COLUMNS)
    assert columns["tissue_order"] is True and columns["csf_dice"] == check["csf_dice"]
    assert columns["t1_white"] == check["t1_mean"]["white"] and columns["d_grey_csf"] == check["cohen_d"]["grey_csf"]
    assert columns["banding_brightness_ratio"] == banding["brightness_ratio"]
    # An MRI-input preset (no tissue check) or a result older than the checks.
    assert check_columns({}, {}) == dict.fromkeys(CHECK_COLUMNS)


def phantom_priors(ct: np.ndarray) -> np.ndarray:
    """The phantom's own tissue layout as atlas maps (CSF, grey, white order), probability 1 in
    each class's region: a perfectly registered atlas."""
    return np.stack([(ct == HU[tissue]).astype(np.float32) for tissue in ATLAS_CLASSES])


def test_the_atlas_cores_order_a_real_t1_and_report_the_ct_contrast_there():
    ct, t1, brain = phantom()
    check = atlas_tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM, phantom_priors(ct))
    assert check.order_holds is True
    assert check.cohen_d["white_grey"] > 3 and check.cohen_d["grey_csf"] > 3  # 0.25 apart, noise 0.03
    assert check.t1_mean["white"] == pytest.approx(T1[TissueClass.WHITE], abs=0.01)
    # The CT's HU in the cores: the classes' own (smoothing reaches 2 mm, the cores start inside).
    assert check.ct_median_hu == pytest.approx({tissue.value: HU[tissue] for tissue in ATLAS_CLASSES}, abs=0.5)
    assert check.ct_d_grey_white > 3
    # A T1 with white and grey swapped fails the order in the cores.
    swapped = np.where(ct == HU[TissueClass.WHITE], t1 - 0.25, np.where(ct == HU[TissueClass.GREY], t1 + 0.25, t1))
    failed = atlas_tissue_check(ct, swapped, brain, EVERY_FOURTH, PIXEL_MM, phantom_priors(ct))
    assert failed.order_holds is False and failed.cohen_d["white_grey"] < 0
    json.dumps(failed.to_dict())


def test_the_atlas_cores_leave_a_voxel_margin_and_the_eroded_edge_out():
    ct, _, brain = phantom()
    priors = phantom_priors(ct)
    cores = atlas_cores(priors, inner_brain(brain, PIXEL_MM, 3.0))
    # The CSF block is 12 x 12 voxels: its core is the 10 x 10 inside a one-voxel margin.
    assert cores[TissueClass.CSF][:, :, 0].sum() == 100
    white = cores[TissueClass.WHITE][:, :, 0]
    assert white.sum() == 30 * 30 - 14 * 14 and not white[20, 20] and white[21, 21]
    # Grey surrounds white up to the brain's edge, which the 3 mm erosion removes.
    grey = cores[TissueClass.GREY][:, :, 0]
    assert not grey[8:11].any() and grey[12, 30] and not grey[19, 30]
    # Below the core probability nothing is a core.
    assert not any(core.any() for core in atlas_cores(priors * 0.85, brain).values())


def test_the_atlas_check_refuses_maps_of_another_grid():
    ct, t1, brain = phantom()
    with pytest.raises(ValueError, match="atlas maps"):
        atlas_tissue_check(ct, t1, brain, EVERY_FOURTH, PIXEL_MM, phantom_priors(ct)[:, :-1])
    with pytest.raises(ValueError, match="acquired has 3"):
        atlas_tissue_check(ct, t1, brain, np.ones(3, dtype=bool), PIXEL_MM, phantom_priors(ct))


def test_both_checks_give_the_same_record_from_the_ct_smoothed_once():
    ct, t1, brain = phantom()
    noisy = ct + np.random.default_rng(1).normal(0.0, 5.0, ct.shape)
    priors = phantom_priors(ct)
    prepared = acquired_ct(noisy, brain, EVERY_FOURTH, PIXEL_MM)
    assert prepared.hu.shape == (72, 72, 3) and prepared.inner.shape == (72, 72, 3)
    assert tissue_check(noisy, t1, brain, EVERY_FOURTH, PIXEL_MM, prepared=prepared).to_dict() == (
        tissue_check(noisy, t1, brain, EVERY_FOURTH, PIXEL_MM).to_dict()
    )
    assert atlas_tissue_check(noisy, t1, brain, EVERY_FOURTH, PIXEL_MM, priors, prepared=prepared).to_dict() == (
        atlas_tissue_check(noisy, t1, brain, EVERY_FOURTH, PIXEL_MM, priors).to_dict()
    )
    # Made for other slices or another smoothing: refused, not silently used.
    with pytest.raises(ValueError, match="prepared"):
        tissue_check(noisy, t1, brain, np.arange(9) % 2 == 0, PIXEL_MM, prepared=prepared)
    with pytest.raises(ValueError, match="prepared"):
        atlas_tissue_check(
            noisy, t1, brain, EVERY_FOURTH, PIXEL_MM, priors, TissueCheckConfig(smoothing_mm=0.0), prepared=prepared
        )
