"""Tests of lib.data.synthesis: tissue models, lesions, CT painting, deformations, pseudo-subjects."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import norm

from lib.data.ct_texture import NoiseModel, RimModel, load_scan_textures
from lib.data.ct_texture_fit import measure_noise
from lib.data.lesions import LESION_HU, LesionLabel, LesionSource
from lib.data.synthesis import (
    HU,
    TISSUE_CLASSES,
    CtAppearance,
    TissueModel,
    bias_field,
    draw_appearance,
    make_pseudo_subject,
    random_smooth_deformation,
    synthesise_ct,
    tissue_model_from_mni,
    tissue_model_from_t1,
    warp,
    with_lesions,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BRATS_T1 = SHARED_DATA / "brats_dev" / "BraTS-GLI-00001-000" / "t1n.nii.gz"

CSF, GREY, WHITE = 0, 1, 2
# Deformation settings that switch the global affine off, leaving only the smooth part.
NO_AFFINE = {"max_rotation_deg": 0.0, "scale_range": (1.0, 1.0)}
STILL = {"max_displacement_mm": 0.0, **NO_AFFINE}


NO_NOISE = NoiseModel(0.0, 0.0, 0.0)


def appearance(noise: NoiseModel = NO_NOISE, class_hu=(8.0, 40.0, 28.0)) -> CtAppearance:
    """A fixed appearance: literature class HU, lesion HU drawn from seed 0, the given noise."""
    class_hu = np.asarray(class_hu, dtype=np.float32)
    return CtAppearance(class_hu, LESION_HU.draw(np.random.default_rng(0), class_hu), noise)


LITERATURE = appearance()


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


def test_ct_class_means_are_the_appearance_class_hu(mni: TissueModel, class_interiors) -> None:
    ct = synthesise_ct(mni, np.random.default_rng(0), LITERATURE)
    for c, expected in ((CSF, 8.0), (GREY, 40.0), (WHITE, 28.0)):
        assert class_interiors[c].sum() > 1000
        assert ct[class_interiors[c]].mean() == pytest.approx(expected, abs=1.5)


def test_drawn_appearances_span_the_real_scans() -> None:
    textures = load_scan_textures()
    low = np.min([t.class_hu for t in textures], axis=0) - 2.0
    high = np.max([t.class_hu for t in textures], axis=0) + 2.0
    sds = [t.noise.sd_hu for t in textures]
    drawn = [draw_appearance(np.random.default_rng(seed), textures) for seed in range(40)]
    for item in drawn:
        assert np.all(item.class_hu >= low - 1e-4) and np.all(item.class_hu <= high + 1e-4)
        assert min(sds) * 0.8 - 1e-6 <= item.noise.sd_hu <= max(sds) * 1.25 + 1e-6
        assert item.lesion_hu[LesionLabel.OEDEMA] < item.class_hu[WHITE]  # oedema darker than white matter
        assert " x " in item.description
    # Subjects differ: calibrations (white matter) over most of the measured range.
    whites = [item.class_hu[WHITE] for item in drawn]
    assert max(whites) - min(whites) > 0.6 * (high[WHITE] - low[WHITE] - 4.0)
    same = draw_appearance(np.random.default_rng(5), textures)
    np.testing.assert_array_equal(same.class_hu, drawn[5].class_hu)


def test_ct_is_air_outside_the_mask_and_never_air_like_inside(mni: TissueModel) -> None:
    ct = synthesise_ct(mni, np.random.default_rng(0))
    assert ct.dtype == np.float32 and ct.shape == mni.shape
    assert np.all(ct[~mni.mask] == HU.air)
    # The blur uses brain voxels only, so no dark rim of air leaks into the brain.
    assert ct[mni.mask].min() > -100.0


def test_ct_noise_matches_the_appearance_against_noise_free_ct(mni_small: TissueModel) -> None:
    mask = mni_small.mask
    for sd in (3.5, 6.0):
        noisy = appearance(NoiseModel(sd, 0.55, 2.5))
        difference = synthesise_ct(mni_small, np.random.default_rng(1), noisy) - synthesise_ct(
            mni_small, np.random.default_rng(1), noisy.without_noise()
        )
        assert np.std(difference[mask]) == pytest.approx(sd, rel=0.03)


def test_ct_noise_in_a_uniform_region_has_the_fitted_spectrum() -> None:
    # The synthetic CT's noise, measured like a real CT's (bench.ct_texture), gives back the
    # real scan's noise model: level, in-plane kernel and slice profile.
    texture = load_scan_textures()[0]
    model = cube_model(size=72)
    flat = replace(CtAppearance.of_texture(texture, np.random.default_rng(0)), rim=RimModel())  # noise only
    ct = synthesise_ct(model, np.random.default_rng(2), flat)
    brain = ndimage.binary_erosion(model.mask, iterations=3)
    measured = measure_noise(ct, brain, spacing_mm=1.0)
    assert measured.model.sd_hu == pytest.approx(texture.noise.sd_hu, rel=0.05)
    assert measured.model.kernel_mm == pytest.approx(texture.noise.kernel_mm, abs=0.05)
    assert measured.model.thickness_mm == pytest.approx(texture.noise.thickness_mm, rel=0.1)
    assert np.mean(ct[brain]) == pytest.approx(texture.class_hu[WHITE], abs=0.5)


def test_ct_blur_has_the_requested_width() -> None:
    model = cube_model(half=24)  # white matter for x < 24, grey matter from x = 24
    row = (slice(None), 24, 24)
    sharp = synthesise_ct(model, np.random.default_rng(0), LITERATURE, blur_mm=0.0)
    np.testing.assert_allclose(sharp[row][20:28], [28.0] * 4 + [40.0] * 4)
    blurred = synthesise_ct(model, np.random.default_rng(0), LITERATURE, blur_mm=1.0)
    # The edge sits at x = 23.5; a 1 mm Gaussian gives 28 + 12 * Phi(distance / 1 mm).
    expected = 28.0 + 12.0 * norm.cdf(np.arange(20, 28) - 23.5)
    np.testing.assert_allclose(blurred[row][20:28], expected, atol=0.1)


def test_slice_profile_blurs_only_through_the_slices() -> None:
    model = cube_model(size=48)
    probabilities = model.probabilities.copy()
    probabilities[:, :, :, 24:] = 0.0
    probabilities[GREY, :, :, 24:] = model.mask[:, :, 24:]  # grey matter above z = 23.5
    layered = TissueModel(model.t1, model.mask, probabilities, model.affine)
    thick = appearance(NoiseModel(0.0, 0.0, 5.0))
    ct = synthesise_ct(layered, np.random.default_rng(0), thick, blur_mm=0.0)
    sigma = 5.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    expected = 28.0 + 12.0 * norm.cdf((np.arange(20, 28) - 23.5) / sigma)
    np.testing.assert_allclose(ct[24, 24, 20:28], expected, atol=0.1)
    assert np.ptp(ct[10:38, 24, 22]) < 1e-3  # in-plane: untouched


def test_ct_rises_towards_the_brain_edge_by_the_rim() -> None:
    model = cube_model(size=48)
    rim = RimModel(hu=12.0, length_mm=5.0)
    ct = synthesise_ct(model, np.random.default_rng(0), replace(LITERATURE, rim=rim))
    np.testing.assert_allclose(ct[model.mask] - 28.0, rim.offset(model.mask, (1, 1, 1))[model.mask], atol=1e-4)
    assert ct[4, 24, 24] == pytest.approx(28.0 + 12.0 * np.exp(-1.0 / 5.0), abs=1e-4)


# --------------------------------------------------------------------------- lesions


def lesion_cube(size: int = 48) -> tuple[TissueModel, np.ndarray]:
    """White-matter cube with an oedema ball around an enhancing ball (a BraTS-like label map)."""
    model = cube_model(size=size)
    labels = np.zeros(model.shape, dtype=np.int16)
    grids = np.indices(model.shape)
    radius = np.sqrt(sum((g - size / 2) ** 2 for g in grids))
    labels[(radius < 12) & model.mask] = 2
    labels[(radius < 6) & model.mask] = 4
    return model, labels


def test_lesion_voxels_get_their_lesion_hu_and_oedema_is_darker_than_white_matter() -> None:
    model, labels = lesion_cube()
    with_labels = with_lesions(model, labels=labels)
    assert with_labels.lesion_source is LesionSource.LABELS
    assert set(np.unique(with_labels.lesions)) == {LesionLabel.NONE, LesionLabel.OEDEMA, LesionLabel.ENHANCING}
    ct = synthesise_ct(with_labels, np.random.default_rng(0), LITERATURE)
    for label, core in ((LesionLabel.OEDEMA, labels == 2), (LesionLabel.ENHANCING, labels == 4)):
        interior = ndimage.binary_erosion(core, iterations=3)
        assert ct[interior].mean() == pytest.approx(LITERATURE.lesion_hu[label], abs=0.1)
    oedema = ndimage.binary_erosion(labels == 2, iterations=3)
    around = ndimage.binary_dilation(labels > 0, iterations=6) & ~ndimage.binary_dilation(labels > 0, iterations=3)
    around &= ndimage.binary_erosion(model.mask, iterations=3)
    assert 15.0 <= ct[oedema].mean() <= 25.0
    assert ct[oedema].mean() < ct[around].mean() - 4.0  # hypodense against the white matter around it
    # Without lesions the same anatomy is plain white matter.
    assert np.ptp(synthesise_ct(model, np.random.default_rng(0), LITERATURE)[model.mask]) < 1e-3


def test_with_lesions_prefers_labels_uses_the_flair_otherwise_and_checks_the_grid() -> None:
    model, labels = lesion_cube()
    flair = np.where(model.mask, 100.0, 0.0) + np.random.default_rng(0).normal(0, 4, model.shape)
    flair[labels > 0] += 80.0
    flair = np.where(model.mask, flair, 0.0)
    from_flair = with_lesions(model, flair=flair)
    assert from_flair.lesion_source is LesionSource.FLAIR
    found = from_flair.lesions > 0
    assert 2 * (found & (labels > 0)).sum() / (found.sum() + (labels > 0).sum()) > 0.85
    assert with_lesions(model, labels=labels, flair=flair).lesion_source is LesionSource.LABELS
    assert with_lesions(model).lesion_source is LesionSource.NONE and not with_lesions(model).lesions.any()
    # Inputs in another orientation are reoriented onto the model's grid; another grid is refused.
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = model.shape[0] - 1
    np.testing.assert_array_equal(
        with_lesions(model, labels=labels[::-1], affine=flipped).lesions, with_lesions(model, labels=labels).lesions
    )
    with pytest.raises(ValueError, match="grid"):
        with_lesions(model, labels=labels, affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        with_lesions(model, labels=labels[1:])


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
    for name in ("ct", "t1", "mask", "lesions"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    np.testing.assert_array_equal(first.appearance.class_hu, again.appearance.class_hu)
    assert first.appearance.noise == again.appearance.noise
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
    # must still be pure white matter in the CT (28 HU), which holds only if the warped maps
    # are renormalised and the blur (in-plane and the slice profile) stays inside the brain.
    model = cube_model(size=40)
    subject = make_pseudo_subject(model, 5, appearance=appearance(NoiseModel(0.0, 0.0, 5.0)))
    assert dice(subject.mask, model.mask) < 0.99  # the cube did deform
    brain = subject.ct[subject.mask]
    np.testing.assert_allclose(brain, 28.0, atol=1e-3)


def test_lesions_move_with_the_pair_and_show_on_the_ct_only() -> None:
    model, labels = lesion_cube(size=56)
    model = with_lesions(model, labels=labels)
    subject = make_pseudo_subject(model, 3, appearance=LITERATURE, calcification_probability=1.0)
    still = make_pseudo_subject(model, 3, appearance=LITERATURE, calcification_probability=1.0, **STILL)
    assert subject.lesions.dtype == np.uint8 and subject.lesions.shape == model.shape
    assert not np.any(subject.lesions[~subject.mask])
    moved = subject.lesions == LesionLabel.OEDEMA
    assert dice(moved, still.lesions == LesionLabel.OEDEMA) < 0.98  # deformed with the pair ...
    assert 0.8 < moved.sum() / (still.lesions == LesionLabel.OEDEMA).sum() < 1.2  # ... keeping its size
    # Calcified foci (probability 1 here) in the tumour, dense on the CT; the T1 is untouched.
    calcified = subject.lesions == LesionLabel.CALCIFICATION
    assert calcified.any() and np.all(model.lesions[np.nonzero(still.lesions == LesionLabel.CALCIFICATION)] > 0)
    assert subject.ct[calcified].max() > 100.0
    # Beyond the 1 mm blur's reach of other labels (calcium is hundreds of HU), oedema is exact.
    oedema = ndimage.distance_transform_edt(moved) > 4
    np.testing.assert_allclose(subject.ct[oedema], LITERATURE.lesion_hu[LesionLabel.OEDEMA], atol=0.2)
    plain = make_pseudo_subject(with_lesions(model), 3, appearance=LITERATURE, calcification_probability=1.0)
    np.testing.assert_array_equal(plain.t1, subject.t1)  # the T1 is the real one, lesion or not


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
