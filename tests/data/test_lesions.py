"""Tests of lib.data.lesions: lesion classes from BraTS labels and FLAIR, lesion HU, calcification."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lib.data.lesions import (
    FLAIR_RULE,
    LESION_HU,
    FlairRule,
    LesionLabel,
    add_calcifications,
    flair_hyperintensity,
    flair_reference,
    lesions_from_brats_labels,
    lesions_from_flair,
)

CSF, GREY, WHITE = 0, 1, 2
SHAPE = (64, 64, 40)


def ball(centre: tuple[float, float, float], radius: float, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    grids = np.indices(shape, dtype=np.float32)
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


def white_brain(shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A brain mask (a large ball) of pure white matter: mask and (3, ...) probabilities."""
    mask = ball((shape[0] / 2, shape[1] / 2, shape[2] / 2), min(shape) / 2 - 2, shape)
    probabilities = np.zeros((3, *shape), dtype=np.float32)
    probabilities[WHITE][mask] = 1.0
    return mask, probabilities


def noisy_flair(mask: np.ndarray, seed: int = 0, level: float = 100.0, sd: float = 5.0) -> np.ndarray:
    """A FLAIR of normal white matter: ``level`` with Gaussian noise, 0 outside the brain."""
    flair = level + np.random.default_rng(seed).normal(0.0, sd, mask.shape)
    return np.where(mask, flair, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- lesion HU


def test_lesion_hu_follow_the_subject_tissue_values() -> None:
    class_hu = np.array([8.0, 40.0, 28.0])
    for seed in range(20):
        hu = LESION_HU.draw(np.random.default_rng(seed), class_hu)
        assert np.isnan(hu[LesionLabel.NONE]) and hu.dtype == np.float32
        assert 16.0 <= hu[LesionLabel.OEDEMA] <= 23.0  # "about 15-25 HU", below the white matter
        assert 22.0 <= hu[LesionLabel.NON_ENHANCING] <= 32.0
        assert 36.0 <= hu[LesionLabel.ENHANCING] <= 46.0  # near grey matter
        assert 12.0 <= hu[LesionLabel.NECROSIS] <= 20.0 and 8.0 <= hu[LesionLabel.CYST] <= 14.0  # near CSF
        assert 150.0 <= hu[LesionLabel.CALCIFICATION] <= 600.0
    # A scanner reading 12 HU lower moves every soft-tissue lesion with it, calcification not.
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    shifted = LESION_HU.draw(rng_a, class_hu - 12.0) - LESION_HU.draw(rng_b, class_hu)
    np.testing.assert_allclose(shifted[1:6], -12.0, atol=1e-4)
    assert shifted[LesionLabel.CALCIFICATION] == 0.0


# --------------------------------------------------------------------------- BraTS labels


def test_brats_labels_map_to_lesion_classes_and_split_the_core_by_t1_and_flair() -> None:
    mask, probabilities = white_brain()
    centre = (32, 32, 20)
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[ball(centre, 12)] = 2  # oedema
    labels[ball(centre, 8)] = 4  # enhancing rim
    labels[ball(centre, 5)] = 1  # core
    # The core's left half is fluid on T1 (CSF-like); of that, the lower half has a
    # suppressed FLAIR (free water: cyst), the upper half a bright one (necrosis).
    core = labels == 1
    fluid = core.copy()
    fluid[32:] = False
    probabilities[:, fluid] = 0.0
    probabilities[CSF, fluid] = 0.9
    probabilities[GREY, fluid] = 0.1
    flair = noisy_flair(mask)
    flair[labels == 2] = 180.0
    cyst = fluid.copy()
    cyst[:, :, 20:] = False
    flair[cyst] = 40.0
    flair[fluid & ~cyst] = 200.0
    labels[0, 0, 0] = 2  # outside the brain: dropped

    lesions = lesions_from_brats_labels(labels, mask, probabilities, flair)

    assert lesions.dtype == np.uint8 and lesions[0, 0, 0] == LesionLabel.NONE
    assert np.all(lesions[labels == 2][1:] == LesionLabel.OEDEMA)
    assert np.all(lesions[labels == 4] == LesionLabel.ENHANCING)
    assert np.all(lesions[core & ~fluid] == LesionLabel.NON_ENHANCING)
    assert np.all(lesions[cyst] == LesionLabel.CYST)
    assert np.all(lesions[fluid & ~cyst] == LesionLabel.NECROSIS)
    assert np.all(lesions[mask & (labels == 0)] == LesionLabel.NONE)
    # Without a FLAIR no fluid voxel is called a cyst.
    assert not np.any(lesions_from_brats_labels(labels, mask, probabilities) == LesionLabel.CYST)


def test_brats_labels_refuse_unknown_values_and_other_grids() -> None:
    mask, probabilities = white_brain()
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[30:34, 30:34, 18:22] = 5
    with pytest.raises(ValueError, match="not BraTS tumour labels"):
        lesions_from_brats_labels(labels, mask, probabilities)
    with pytest.raises(ValueError, match="differ"):
        lesions_from_brats_labels(labels[:-1], mask, probabilities)


# --------------------------------------------------------------------------- FLAIR rule


def test_flair_reference_is_the_white_matter_median_and_robust_sd() -> None:
    mask, probabilities = white_brain()
    flair = noisy_flair(mask, level=300.0, sd=20.0)
    flair[ball((32, 32, 20), 3)] = 5000.0  # a few outliers (like a BraTS T1 at 32767) barely move it
    median, spread = flair_reference(flair, mask & (probabilities[WHITE] > 0.5))
    assert median == pytest.approx(300.0, abs=2.0) and spread == pytest.approx(20.0, rel=0.05)
    with pytest.raises(ValueError, match="no reference"):
        flair_reference(flair, np.zeros(SHAPE, dtype=bool))


def test_flair_rule_finds_a_planted_bright_blob_and_ignores_noise() -> None:
    mask, probabilities = white_brain()
    blob = ball((32, 30, 20), 10)  # ~4 ml, 6 mm from the mask edge
    flair = noisy_flair(mask, seed=1)
    assert not flair_hyperintensity(flair, mask, probabilities[WHITE]).any()  # noise alone: nothing

    flair[blob] += 60.0  # 1.6 x the white matter, 12 SDs of its noise
    found = flair_hyperintensity(flair, mask, probabilities[WHITE])
    dice = 2 * (found & blob).sum() / (found.sum() + blob.sum())
    assert dice > 0.9, dice
    labels, count = ndimage.label(found)
    assert count == 1


def test_flair_rule_drops_small_spots_and_the_brain_rim() -> None:
    mask, probabilities = white_brain()
    flair = noisy_flair(mask, seed=2)
    small = ball((32, 32, 20), 4)  # ~0.27 ml: below the 3 ml size filter
    rim = mask & ~ndimage.binary_erosion(mask, iterations=2)  # bright cortex/CSF at the edge
    flair[small | rim] += 80.0
    assert FLAIR_RULE.min_component_ml > small.sum() / 1000.0
    assert not flair_hyperintensity(flair, mask, probabilities[WHITE]).any()
    # With the size filter off, the spot is found, and the rim still is not.
    found = flair_hyperintensity(flair, mask, probabilities[WHITE], rule=FlairRule(min_component_ml=0.1))
    assert found[small].mean() > 0.5 and not (found & rim).any()


def test_flair_lesion_is_oedema_around_a_core_it_encloses() -> None:
    mask, probabilities = white_brain()
    centre = (32, 32, 20)
    shell = ball(centre, 11) & ~ball(centre, 6)
    core = ball(centre, 6)
    fluid = core & ball(centre, 3)  # the centre of the core is fluid on T1
    probabilities[:, fluid] = 0.0
    probabilities[CSF, fluid] = 1.0
    flair = noisy_flair(mask, seed=3)
    flair[shell] += 70.0
    flair[fluid] = 40.0  # free water: FLAIR-suppressed
    lesions = lesions_from_flair(flair, mask, probabilities)
    interior = ndimage.binary_erosion(shell, iterations=2)
    assert np.all(lesions[interior] == LesionLabel.OEDEMA)
    # In the slice through the middle the core is enclosed: solid tumour, and fluid in its centre
    # (FLAIR not above the white matter: a cyst).
    middle = (slice(None), slice(None), centre[2])
    assert np.all(
        lesions[middle][(core & ~ndimage.binary_dilation(fluid, iterations=1))[middle]] == LesionLabel.NON_ENHANCING
    )
    assert np.all(lesions[middle][fluid[middle]] == LesionLabel.CYST)
    assert np.all(lesions[mask & ~ball(centre, 12)] == LesionLabel.NONE)


# --------------------------------------------------------------------------- calcification


def test_calcified_foci_lie_in_the_solid_tumour_and_are_reproducible() -> None:
    lesions = np.zeros(SHAPE, dtype=np.uint8)
    lesions[ball((32, 32, 20), 12)] = LesionLabel.OEDEMA
    lesions[ball((32, 32, 20), 5)] = LesionLabel.NON_ENHANCING
    none = add_calcifications(lesions, np.random.default_rng(0), probability=0.0)
    np.testing.assert_array_equal(none, lesions)

    placed = add_calcifications(lesions, np.random.default_rng(4), probability=1.0)
    again = add_calcifications(lesions, np.random.default_rng(4), probability=1.0)
    np.testing.assert_array_equal(placed, again)
    calcified = placed == LesionLabel.CALCIFICATION
    assert 0 < calcified.sum() <= 3 * (4 / 3 * np.pi * 2.5**3) + 10
    # Each focus is centred in the solid core (radius <= 2.5 mm from a core voxel).
    near_core = ndimage.binary_dilation(lesions == LesionLabel.NON_ENHANCING, iterations=3)
    assert np.all(near_core[calcified]) and np.all(lesions[calcified] != LesionLabel.NONE)
    assert lesions.max() == LesionLabel.NON_ENHANCING  # the input is not modified
    # No lesion, no calcification.
    empty = np.zeros(SHAPE, dtype=np.uint8)
    assert not add_calcifications(empty, np.random.default_rng(4), probability=1.0).any()
