"""Score a reconstructed MRI against a ground-truth MRI of the same subject and frame.

Both are brought to [0, 1] the way the models see MRI: the ground truth by its robust brain
percentiles (lib/data/normalise.py), the reconstruction is already there. The metrics are
taken inside the ground truth's brain (voxels > 0 of a skull-stripped volume).
"""

from __future__ import annotations

import os

import numpy as np

from lib.data.normalise import mri_to_unit
from lib.io import read_volume
from lib.metrics import issim, volume_metrics


def score_volumes(reconstruction: str | os.PathLike[str], reference: str | os.PathLike[str]) -> dict[str, float]:
    """NRMSE, PSNR, SSIM (2-D and 3-D) and I-SSIM of a reconstruction against a reference.

    The reconstruction's dense grid starts at the reference's first slice and may stop short
    of its last one (a sparse scan ends at its last acquired slice), so the reference is cut
    to the reconstruction's slices; any other difference of grid is an error.

    Returns:
        The metrics, plus ``issim_reference`` (the ground truth's own I-SSIM) and ``slices``.

    Raises:
        ValueError: the two volumes do not share a grid.
    """
    pred = read_volume(reconstruction, modality="MR")
    gt = read_volume(reference, modality="MR")
    pred_affine, gt_affine = pred.voxel_affine(), gt.voxel_affine()
    depth = pred.shape[2]
    if pred.shape[:2] != gt.shape[:2] or depth > gt.shape[2] or not np.allclose(pred_affine, gt_affine, atol=1e-3):
        raise ValueError(
            f"{reconstruction}: grid {pred.shape} does not match the reference {reference} {gt.shape} (affines "
            "must agree)"
        )
    return score_arrays(pred.array, gt.array[:, :, :depth])


def reference_to_unit(truth: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A ground-truth MRI on [0, 1] by its brain percentiles, and the brain mask used
    (``truth > 0`` of a skull-stripped volume unless given)."""
    mask = truth > 0 if mask is None else mask
    return (mri_to_unit(truth, mask) + 1.0) / 2.0, mask


def score_arrays(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """The metrics of :func:`score_volumes` for arrays on one grid: ``prediction`` in [0, 1]
    (clipped), ``truth`` in scanner units (normalised here), ``mask`` the brain (default truth > 0)."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {truth.shape} differ in shape")
    truth_unit, mask = reference_to_unit(truth, mask)
    metrics = volume_metrics(np.clip(prediction, 0.0, 1.0), truth_unit, mask)
    return {**metrics, "issim_reference": issim(truth_unit, mask), "slices": truth.shape[2]}
