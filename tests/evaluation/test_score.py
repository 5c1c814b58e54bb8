"""score_volumes: a reconstruction with a known error gets the PSNR it must; grids must agree."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lib.data.normalise import mri_to_unit
from lib.evaluation.score import score_volumes
from lib.io.nifti import write_nifti


def test_known_noise_gives_the_expected_psnr(brats_case, tmp_path):
    reference = brats_case / "t1n.nii.gz"
    image = nib.load(reference)
    truth = np.asarray(image.dataobj, dtype=np.float32)[:, :, 60:90]
    cut = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(truth, image.affine), cut)
    mask = truth > 0
    unit = (mri_to_unit(truth, mask) + 1) / 2
    sigma = 0.02
    noisy = np.where(mask, unit + np.random.default_rng(0).normal(0, sigma, unit.shape), 0).astype(np.float32)
    # Drop the last slice: a sparse scan's dense grid may stop short of the reference.
    pred = tmp_path / "mri.nii.gz"
    write_nifti(pred, noisy[:, :, :-1], image.affine, "SYNTHETIC test")
    metrics = score_volumes(pred, cut)
    assert metrics["slices"] == 29
    # The reference is normalised over the slices compared (its percentiles move slightly).
    kept = mask[:, :, :-1]
    reference_unit = (mri_to_unit(truth[:, :, :-1], kept) + 1) / 2
    clipped = np.clip(noisy[:, :, :-1], 0, 1)[kept] - reference_unit[kept]
    assert metrics["psnr"] == pytest.approx(10 * np.log10(1 / np.mean(clipped**2)), abs=0.01)
    assert metrics["psnr"] == pytest.approx(10 * np.log10(1 / sigma**2), abs=0.5)
    assert 0 < metrics["ssim"] < 1 and 0 < metrics["issim_reference"] <= 1


def test_a_different_grid_is_refused(brats_case, tmp_path):
    reference = brats_case / "t1n.nii.gz"
    image = nib.load(reference)
    shifted = image.affine.copy()
    shifted[0, 3] += 5
    pred = tmp_path / "mri.nii.gz"
    write_nifti(pred, np.zeros(image.shape, dtype=np.float32), shifted, "SYNTHETIC test")
    with pytest.raises(ValueError, match="does not match the reference"):
        score_volumes(pred, reference)
