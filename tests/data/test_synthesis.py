"""Tests of lib.data.synthesis: tissue models, CT painting, deformations, pseudo-subjects."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import norm

from lib.data.synthesis import (
    HU,
    TISSUE_CLASSES,
    TissueModel,
    bias_field,
    make_pseudo_subject,
    random_smooth_deformation,
    synthesise_ct,
    tissue_model_from_mni,
    tissue_model_from_t1,
    warp,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BRATS_T1 = SHARED_DATA / "brats_dev" / "BraTS-GLI-00001-000" / "t1n.nii.gz"

CSF, GREY, WHITE = 0, 1, 2
# Deformation settings that switch the global affine off, leaving only the smooth part.
NO_AFFINE = {"max_rotation_deg": 0.0, "scale_range": (1.0, 1.0)}


@pytest.fixture(scope="module")
def mni() -> TissueModel:
    return tissue_model_from_mni()


@pytest.fixture(scope="module")
def mni_small(mni: TissueModel) -> TissueModel:
    """Every 2nd voxel of the MNI model: 8x fewer voxels for tests that need no full size."""
    return TissueModel(
        t1=mni.t1[::2, ::2, ::2],
        mask=mni.mask[::2, ::2, ::2],
        probabilities=mni.probabilities[:, ::2, ::2, ::2],
        affine=mni.affine @ np.diag([2.0, 2.0, 2.0, 1.0]),
    )


@pytest.fixture(scope="module")
def class_interiors(mni: TissueModel) -> dict[int, np.ndarray]:
    """Voxels dominated (p > 0.9) by one class, eroded by 2 voxels so blur cannot reach them."""
    return {c: ndimage.binary_erosion(mni.probabilities[c] > 0.9, iterations=2) for c in (CSF, GREY, WHITE)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def cube_model(size: int = 48, half: int | None = None) -> TissueModel:
    """A brain-mask cube of pure white matter (or WM/GM halves split at x = ``half``)."""
    shape = (size, size, size)
    mask = np.zeros(shape, dtype=bool)
    mask[4:-4, 4:-4, 4:-4] = True
    probabilities = np.zeros((3, *shape), dtype=np.float32)
    probabilities[WHITE][mask] = 1.0
    if half is not None:
        grey = mask.copy()
        grey[:half] = False
        probabilities[WHITE][grey] = 0.0
        probabilities[GREY][grey] = 1.0
    return TissueModel(t1=mask * 1.0, mask=mask, probabilities=probabilities, affine=np.eye(4))


# --------------------------------------------------------------------------- tissue models


def test_hu_table_holds_the_literature_values_in_class_order() -> None:
    assert TISSUE_CLASSES == ("csf", "grey", "white")
    np.testing.assert_array_equal(HU.brain, [8.0, 40.0, 28.0])
    assert HU.air == -1000.0 and HU.fat == -100.0 and HU.muscle == 45.0
    assert HU.diploe == 400.0 and 1000.0 <= HU.cortical_bone <= 1500.0


def test_mni_model_is_canonical_and_probabilities_sum_to_one_in_mask(mni: TissueModel) -> None:
    assert nib.aff2axcodes(mni.affine) == ("R", "A", "S")
    np.testing.assert_allclose(mni.voxel_size, 1.0)
    assert mni.t1.dtype == np.float32 and mni.probabilities.dtype == np.float32
    assert mni.mask.dtype == bool and 1.4e6 < mni.mask.sum() < 2.2e6  # ~1.5-2 litres of brain
    total = mni.probabilities.sum(axis=0)
    np.testing.assert_allclose(total[mni.mask], 1.0, atol=1e-5)
    assert np.all(mni.probabilities[:, ~mni.mask] == 0.0)
    assert mni.probabilities.min() >= 0.0
    assert np.all(mni.t1[~mni.mask] == 0.0)


def test_mni_t1_is_brightest_in_white_then_grey_then_csf(mni: TissueModel) -> None:
    medians = [np.median(mni.t1[mni.probabilities[c] > 0.9]) for c in (CSF, GREY, WHITE)]
    assert medians[CSF] < medians[GREY] < medians[WHITE], medians
    # Each class is a real region, not a handful of voxels.
    assert all((mni.probabilities[c] > 0.9).sum() > 5000 for c in (CSF, GREY, WHITE))


def test_t1_segmentation_recovers_a_phantom_and_reorients_it() -> None:
    rng = np.random.default_rng(3)
    shape = (40, 36, 30)
    labels = np.zeros(shape, dtype=int)
    labels[5:35, 5:31, 5:25] = 3  # white matter core ...
    labels[5:35, 5:31, 5:10] = 2  # ... grey matter slab ...
    labels[5:35, 5:12, 10:25] = 1  # ... and CSF
    means = np.array([0.0, 300.0, 600.0, 900.0])
    t1 = (means[labels] + rng.normal(0.0, 40.0, shape)) * (labels > 0)
    # LPS storage, as in BraTS: x and y flipped relative to RAS.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [shape[0] - 1, shape[1] - 1, 0]

    model = tissue_model_from_t1(t1, labels > 0, lps, seed=0)

    assert nib.aff2axcodes(model.affine) == ("R", "A", "S")
    ras_labels = labels[::-1, ::-1, :]
    np.testing.assert_array_equal(model.mask, ras_labels > 0)
    np.testing.assert_allclose(model.t1, (t1 * (labels > 0))[::-1, ::-1, :], rtol=1e-6)
    # World position of voxel 0 is unchanged by the reorientation.
    np.testing.assert_allclose(model.affine @ [0, 0, 0, 1], lps @ [shape[0] - 1, shape[1] - 1, 0, 1])
    predicted = np.argmax(model.probabilities, axis=0) + 1
    assert np.mean(predicted[model.mask] == ras_labels[model.mask]) > 0.99
    np.testing.assert_allclose(model.probabilities.sum(axis=0)[model.mask], 1.0, atol=1e-5)
    assert np.all(model.probabilities[:, ~model.mask] == 0.0)


def test_brats_t1_segmentation_orders_classes_by_t1_intensity() -> None:
    if not BRATS_T1.is_file():
        pytest.skip(f"BraTS development data not present at {BRATS_T1}")
    image = nib.load(BRATS_T1)
    t1 = image.get_fdata(dtype=np.float32)

    model = tissue_model_from_t1(t1, t1 > 0, image.affine, seed=0)

    assert nib.aff2axcodes(model.affine) == ("R", "A", "S")
    canonical = nib.as_closest_canonical(image)
    np.testing.assert_allclose(model.affine, canonical.affine)
    np.testing.assert_array_equal(model.mask, canonical.get_fdata(dtype=np.float32) > 0)
    np.testing.assert_allclose(model.probabilities.sum(axis=0)[model.mask], 1.0, atol=1e-5)
    weights = model.probabilities[:, model.mask]
    values = model.t1[model.mask]
    class_means = (weights @ values) / weights.sum(axis=1)
    assert class_means[CSF] < class_means[GREY] < class_means[WHITE], class_means
    # No class is degenerate: each holds at least 5 % of the brain.
    assert np.all(weights.mean(axis=1) > 0.05), weights.mean(axis=1)


# --------------------------------------------------------------------------- CT synthesis


def test_ct_class_means_match_literature_hu(mni: TissueModel, class_interiors) -> None:
    ct = synthesise_ct(mni, np.random.default_rng(0), class_offset_hu=0.0)
    for c, expected in ((CSF, 8.0), (GREY, 40.0), (WHITE, 28.0)):
        assert class_interiors[c].sum() > 1000
        assert ct[class_interiors[c]].mean() == pytest.approx(expected, abs=1.5)


def test_ct_class_offsets_vary_per_subject_within_a_few_hu(mni: TissueModel, class_interiors) -> None:
    white = class_interiors[WHITE]
    means = [synthesise_ct(mni, np.random.default_rng(seed))[white].mean() for seed in (1, 2, 3)]
    assert all(abs(m - 28.0) < 3.0 + 1.5 for m in means), means
    assert max(means) - min(means) > 0.3, means  # the offsets are really drawn per subject


def test_ct_is_air_outside_the_mask_and_never_air_like_inside(mni: TissueModel) -> None:
    ct = synthesise_ct(mni, np.random.default_rng(0))
    assert ct.dtype == np.float32 and ct.shape == mni.shape
    assert np.all(ct[~mni.mask] == HU.air)
    # The blur uses brain voxels only, so no dark rim of air leaks into the brain.
    assert ct[mni.mask].min() > -100.0


def test_ct_noise_matches_requested_level_against_noise_free_ct(mni_small: TissueModel) -> None:
    mask = mni_small.mask
    sigmas = []
    for seed in range(6):
        noisy = synthesise_ct(mni_small, np.random.default_rng(seed), noise_hu=(5.0, 10.0))
        clean = synthesise_ct(mni_small, np.random.default_rng(seed), noise_hu=(0.0, 0.0))
        sigmas.append(float(np.std(noisy[mask] - clean[mask])))
    assert all(5.0 * 0.98 <= s <= 10.0 * 1.02 for s in sigmas), sigmas
    assert max(sigmas) - min(sigmas) > 1.0, sigmas  # the level is drawn, not fixed


def test_ct_noise_std_in_a_uniform_region() -> None:
    model = cube_model()
    interior = ndimage.binary_erosion(model.mask, iterations=3)
    ct = synthesise_ct(model, np.random.default_rng(0), noise_hu=(7.0, 7.0), class_offset_hu=0.0)
    assert np.std(ct[interior]) == pytest.approx(7.0, rel=0.03)
    assert np.mean(ct[interior]) == pytest.approx(28.0, abs=0.2)


def test_ct_blur_has_the_requested_width() -> None:
    model = cube_model(half=24)  # white matter for x < 24, grey matter from x = 24
    row = (slice(None), 24, 24)
    sharp = synthesise_ct(model, np.random.default_rng(0), noise_hu=(0, 0), blur_mm=0.0, class_offset_hu=0)
    np.testing.assert_allclose(sharp[row][20:28], [28.0] * 4 + [40.0] * 4)
    blurred = synthesise_ct(model, np.random.default_rng(0), noise_hu=(0, 0), blur_mm=1.0, class_offset_hu=0)
    # The edge sits at x = 23.5; a 1 mm Gaussian gives 28 + 12 * Phi(distance / 1 mm).
    expected = 28.0 + 12.0 * norm.cdf(np.arange(20, 28) - 23.5)
    np.testing.assert_allclose(blurred[row][20:28], expected, atol=0.1)


# --------------------------------------------------------------------------- deformations


def test_zero_amplitude_deformation_is_identity(mni_small: TissueModel) -> None:
    displacement = random_smooth_deformation(mni_small.shape, np.random.default_rng(0), 0.0, **NO_AFFINE)
    assert displacement.shape == (3, *mni_small.shape) and displacement.dtype == np.float32
    assert np.all(displacement == 0.0)
    np.testing.assert_array_equal(warp(mni_small.t1, displacement), mni_small.t1)
    np.testing.assert_array_equal(warp(mni_small.mask, displacement, order=0), mni_small.mask)
    np.testing.assert_array_equal(warp(mni_small.probabilities, displacement), mni_small.probabilities)


def test_warp_samples_at_position_plus_displacement() -> None:
    volume = np.random.default_rng(0).random((20, 16, 12)).astype(np.float32)
    displacement = np.zeros((3, 20, 16, 12), dtype=np.float32)
    displacement[0] = 3.0
    displacement[2] = -0.5
    out = warp(volume, displacement, order=1, cval=-7.0)
    expected = 0.5 * (volume[3:, :, :-1] + volume[3:, :, 1:])  # out[x, y, z] = v[x + 3, y, z - 0.5]
    np.testing.assert_allclose(out[:-3, :, 1:], expected, rtol=1e-6)
    assert np.all(out[-3:] == -7.0)  # sampled beyond the input


@pytest.mark.parametrize("amplitude", [4.0, 2.5])
def test_deformation_max_displacement_is_the_requested_value(amplitude: float) -> None:
    shape = (90, 100, 80)
    displacement = random_smooth_deformation(shape, np.random.default_rng(1), amplitude, **NO_AFFINE)
    longest = np.sqrt((displacement.astype(np.float64) ** 2).sum(axis=0)).max()
    assert longest == pytest.approx(amplitude, rel=1e-3)


def test_deformation_is_smooth_and_does_not_fold() -> None:
    displacement = random_smooth_deformation((90, 100, 80), np.random.default_rng(2))
    jacobian = np.eye(3)[:, :, None, None, None] + np.stack(
        [np.stack(np.gradient(displacement[i]), axis=0) for i in range(3)]
    )
    determinant = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
    assert determinant.min() > 0.5 and determinant.max() < 1.5
    # Neighbouring displacements differ by far less than a voxel.
    assert max(np.abs(np.diff(displacement, axis=a)).max() for a in (1, 2, 3)) < 0.5


def test_global_affine_is_a_small_rotation_and_scaling_about_the_centre() -> None:
    shape = (41, 51, 31)
    for seed in range(5):
        displacement = random_smooth_deformation(shape, np.random.default_rng(seed), 0.0)
        grid = np.indices(shape).reshape(3, -1).T.astype(np.float64)
        target = grid + displacement.reshape(3, -1).T
        design = np.c_[grid, np.ones(len(grid))]
        solution, residual, *_ = np.linalg.lstsq(design, target, rcond=None)
        assert np.sqrt(residual.max() / len(grid)) < 1e-3  # purely affine
        matrix = solution[:3].T
        centre = (np.array(shape) - 1) / 2.0
        np.testing.assert_allclose(matrix @ centre + solution[3], centre, atol=1e-3)
        u, singular, vt = np.linalg.svd(matrix)
        rotation = u @ vt
        assert np.all((singular > 0.95 - 1e-4) & (singular < 1.05 + 1e-4)), singular
        # Rotation angle of three <= 5 degree rotations: <= 15 degrees, and not zero.
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)))
        assert 0.1 < angle < 15.0, angle


def test_deformed_mask_keeps_its_volume(mni: TissueModel) -> None:
    original = mni.mask.sum()
    for seed in (0, 1, 2):
        displacement = random_smooth_deformation(mni.shape, np.random.default_rng(seed))
        deformed = warp(mni.mask, displacement, order=0)
        assert deformed.dtype == bool
        assert 0.8 < deformed.sum() / original < 1.2
        assert dice(deformed, mni.mask) < 0.995  # it did move


# --------------------------------------------------------------------------- MRI variation


def test_bias_field_is_bounded_and_smooth() -> None:
    shape = (197, 233, 189)
    fields = [bias_field(shape, np.random.default_rng(seed), strength=0.2) for seed in (0, 1)]
    for field in fields:
        assert field.shape == shape and field.dtype == np.float32
        assert field.min() >= 0.8 - 1e-5 and field.max() <= 1.2 + 1e-5
        assert field.max() - field.min() == pytest.approx(0.4, abs=1e-4)  # uses its full range
        assert max(np.abs(np.diff(field, axis=a)).max() for a in range(3)) < 1e-2
    assert np.abs(fields[0] - fields[1]).max() > 0.05
    np.testing.assert_array_equal(bias_field((8, 9, 10), np.random.default_rng(0), strength=0.0), 1.0)


# --------------------------------------------------------------------------- pseudo-subjects


def test_pseudo_subject_is_deterministic_per_seed(mni_small: TissueModel) -> None:
    first = make_pseudo_subject(mni_small, 7)
    again = make_pseudo_subject(mni_small, 7)
    other = make_pseudo_subject(mni_small, 8)
    for name in ("ct", "t1", "mask"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.seed == 7
    assert dice(first.mask, other.mask) < 0.99
    both = first.mask & other.mask
    assert np.abs(first.ct[both] - other.ct[both]).mean() > 3.0
    assert np.abs(first.t1[both] - other.t1[both]).mean() > 0.02


def test_pseudo_subject_ct_and_t1_are_paired(mni: TissueModel) -> None:
    subject = make_pseudo_subject(mni, 1)
    assert subject.ct.dtype == np.float32 and subject.t1.dtype == np.float32
    assert subject.ct.shape == subject.t1.shape == subject.mask.shape == mni.shape
    ct_brain = subject.ct > -500.0
    assert dice(ct_brain, subject.mask) > 0.99
    assert dice(ct_brain, subject.t1 > 0) > 0.99
    # Voxel-wise pairing of the anatomy: the darkest T1 voxels (CSF) are low in the CT,
    # the brightest (white matter) near 28 HU. Mismatched CT and T1 show no such contrast.
    values = subject.t1[subject.mask]
    dark = subject.mask & (subject.t1 < np.percentile(values, 5))
    bright = subject.mask & (subject.t1 > np.percentile(values, 80))
    assert subject.ct[bright].mean() - subject.ct[dark].mean() > 5.0


def test_deformed_uniform_tissue_stays_uniform_up_to_the_mask_edge() -> None:
    # A pure white-matter model: after deformation every brain voxel, edge voxels included,
    # must still be pure white matter in the CT (28 HU +- the 3 HU class offset), which
    # holds only if the warped maps are renormalised and the blur stays inside the brain.
    model = cube_model(size=40)
    subject = make_pseudo_subject(model, 5, noise_hu=(0.0, 0.0))
    assert dice(subject.mask, model.mask) < 0.99  # the cube did deform
    brain = subject.ct[subject.mask]
    assert brain.min() >= 25.0 - 1e-3 and brain.max() <= 31.0 + 1e-3
    assert np.ptp(brain) < 1e-3


def test_pseudo_subject_without_variation_reproduces_the_model(mni_small: TissueModel) -> None:
    still = {
        "max_displacement_mm": 0.0,
        "max_rotation_deg": 0.0,
        "scale_range": (1.0, 1.0),
        "bias_strength": 0.0,
        "gamma_range": (1.0, 1.0),
        "intensity_scale_range": (1.0, 1.0),
    }
    subject = make_pseudo_subject(mni_small, 4, **still)
    np.testing.assert_array_equal(subject.mask, mni_small.mask)
    np.testing.assert_allclose(subject.t1, mni_small.t1, rtol=1e-5)
    np.testing.assert_array_equal(subject.affine, mni_small.affine)

    # The T1 side alone: gamma 1 leaves only scale x bias, a smooth factor in [0.72, 1.32].
    t1_only = {**still, "bias_strength": 0.2, "intensity_scale_range": (0.9, 1.1)}
    varied = make_pseudo_subject(mni_small, 4, **t1_only)
    ratio = varied.t1[mni_small.mask] / mni_small.t1[mni_small.mask]
    assert ratio.min() >= 0.9 * 0.8 - 1e-4 and ratio.max() <= 1.1 * 1.2 + 1e-4
    assert ratio.std() > 0.01
