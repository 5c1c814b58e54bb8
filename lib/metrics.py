"""Image-quality metrics for comparing a reconstructed MRI volume with ground truth.

All metrics take numpy volumes of shape (X, Y, Z) with axial slices along the
last axis (``vol[:, :, z]``) and values in [0, 1] (bring raw intensities there
with :func:`to_unit_range` first). An optional boolean brain mask of the same
shape restricts every metric to the voxels inside it, so that the large, easy
background does not inflate the scores.

SSIM uses a Gaussian window (sigma 1.5, 11 voxels wide, K1=0.01, K2=0.03,
population covariance), the defaults of MONAI's ``SSIMMetric`` and of the
original SSIM paper. The SSIM map comes from scikit-image; like both
scikit-image and MONAI we average it only over voxels at least half a window
(5 voxels) from the volume edge, because near the edge the window would reach
into invented (reflected) padding. With a mask, the average is over masked
voxels in that same interior, so ``mask=None`` and an all-True mask agree.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

# Window settings shared by every SSIM variant below; with sigma 1.5 and
# scikit-image's truncation at 3.5 sigma the window is 11 voxels wide.
_SSIM_OPTIONS = {
    "data_range": 1.0,
    "gaussian_weights": True,
    "sigma": 1.5,
    "use_sample_covariance": False,
    "K1": 0.01,
    "K2": 0.03,
}
_SSIM_WINDOW = 11
_SSIM_BORDER = (_SSIM_WINDOW - 1) // 2


def to_unit_range(volume: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Rescale a volume linearly to [0, 1].

    Args:
        volume: array of intensities, any shape.
        low: intensity mapped to 0; defaults to the volume's minimum.
        high: intensity mapped to 1; defaults to the volume's maximum.

    Returns:
        A float64 copy with ``low`` -> 0 and ``high`` -> 1; values outside
        [low, high] are clipped, so given bounds (e.g. percentiles) can be used
        to discard outliers.

    Raises:
        ValueError: if the volume contains NaN or inf, or ``high <= low``
            (including a constant volume with default bounds).
    """
    volume = np.asarray(volume, dtype=np.float64)
    if not np.isfinite(volume).all():
        raise ValueError("volume contains NaN or inf values")
    low = float(volume.min()) if low is None else float(low)
    high = float(volume.max()) if high is None else float(high)
    if not high > low:
        raise ValueError(f"cannot rescale to [0, 1]: high ({high}) must be greater than low ({low})")
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def nrmse(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Root-mean-square error divided by the intensity range of the ground truth.

    Args:
        pred: predicted volume, shape (X, Y, Z).
        gt: ground-truth volume, same shape.
        mask: optional boolean brain mask, same shape; both the error and the
            ground-truth range are taken over the masked voxels only.

    Returns:
        ``RMSE / (max(gt) - min(gt))``; 0.0 for identical volumes.

    Raises:
        ValueError: on invalid input (see module docs) or if gt is constant
            (inside the mask), which leaves the normalisation undefined.
    """
    pred, gt, mask = _validated(pred, gt, mask)
    p, g = _select(pred, mask), _select(gt, mask)
    gt_range = float(g.max() - g.min())
    if gt_range == 0.0:
        raise ValueError("gt has zero intensity range (inside the mask); NRMSE is undefined")
    return float(np.sqrt(np.mean((p - g) ** 2)) / gt_range)


def psnr(
    pred: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 1.0,
) -> float:
    """Peak signal-to-noise ratio in dB.

    Args:
        pred: predicted volume, shape (X, Y, Z).
        gt: ground-truth volume, same shape.
        mask: optional boolean brain mask; the MSE is taken over masked voxels.
        data_range: the peak value; 1.0 for volumes in [0, 1].

    Returns:
        ``10 * log10(data_range**2 / MSE)``; ``inf`` for identical volumes.

    Raises:
        ValueError: on invalid input (see module docs) or ``data_range <= 0``.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    pred, gt, mask = _validated(pred, gt, mask)
    mse = float(np.mean((_select(pred, mask) - _select(gt, mask)) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim_2d(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean of the 2-D SSIM of each axial slice.

    Args:
        pred: predicted volume, shape (X, Y, Z).
        gt: ground-truth volume, same shape.
        mask: optional boolean brain mask; each slice's SSIM map is averaged
            over its masked voxels and slices without any are left out.

    Returns:
        The SSIM averaged over slices, 1.0 for identical volumes.

    Raises:
        ValueError: on invalid input (see module docs), X or Y below 11, or a
            mask with no voxels away from the in-plane border.
    """
    pred, gt, mask = _validated(pred, gt, mask)
    scores = []
    for z in range(pred.shape[2]):
        slice_mask = None if mask is None else mask[:, :, z]
        score = _mean_ssim(pred[:, :, z], gt[:, :, z], slice_mask)
        if score is not None:
            scores.append(score)
    if not scores:
        raise ValueError("mask has no voxels at least 5 voxels from the in-plane border")
    return float(np.mean(scores))


def ssim_3d(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM with a 3-D Gaussian window over the whole volume.

    Args:
        pred: predicted volume, shape (X, Y, Z).
        gt: ground-truth volume, same shape.
        mask: optional boolean brain mask; the 3-D SSIM map is averaged over it.

    Returns:
        The mean SSIM, 1.0 for identical volumes.

    Raises:
        ValueError: on invalid input (see module docs), any dimension below
            11, or a mask with no voxels away from the volume border.
    """
    pred, gt, mask = _validated(pred, gt, mask)
    score = _mean_ssim(pred, gt, mask)
    if score is None:
        raise ValueError("mask has no voxels at least 5 voxels from the volume border")
    return score


def issim(volume: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Inter-slice SSIM: mean 2-D SSIM between each pair of adjacent axial slices.

    A slice-by-slice generator can produce slices that look right on their own
    but do not fit together; I-SSIM measures that through-plane consistency
    (real anatomy changes slowly from one slice to the next, so it is high).

    Args:
        volume: volume to assess, shape (X, Y, Z) with Z >= 2.
        mask: optional boolean brain mask; the SSIM map of slices z and z+1
            is averaged over the union of their masks, and pairs whose union
            is empty are left out.

    Returns:
        The mean SSIM over adjacent pairs, 1.0 if all slices are identical.

    Raises:
        ValueError: on invalid input (see module docs), fewer than 2 slices,
            or no pair with masked voxels.
    """
    volume, _, mask = _validated(volume, volume, mask)
    if volume.shape[2] < 2:
        raise ValueError(f"I-SSIM needs at least 2 axial slices, got {volume.shape[2]}")
    scores = []
    for z in range(volume.shape[2] - 1):
        pair_mask = None if mask is None else mask[:, :, z] | mask[:, :, z + 1]
        score = _mean_ssim(volume[:, :, z], volume[:, :, z + 1], pair_mask)
        if score is not None:
            scores.append(score)
    if not scores:
        raise ValueError("no pair of adjacent slices has masked voxels away from the border")
    return float(np.mean(scores))


def volume_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """All metrics for one predicted volume.

    Args:
        pred: predicted volume, shape (X, Y, Z), values in [0, 1].
        gt: ground-truth volume, same shape.
        mask: optional boolean brain mask.

    Returns:
        A dict with keys ``nrmse``, ``psnr``, ``ssim`` (per-slice 2-D),
        ``ssim3d`` and ``issim`` (of ``pred``; compare with ``issim(gt)``).
    """
    return {
        "nrmse": nrmse(pred, gt, mask),
        "psnr": psnr(pred, gt, mask),
        "ssim": ssim_2d(pred, gt, mask),
        "ssim3d": ssim_3d(pred, gt, mask),
        "issim": issim(pred, mask),
    }


def _validated(
    pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check shapes, finiteness and mask, and return float64 arrays and a bool mask."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim != 3 or gt.ndim != 3:
        raise ValueError(f"expected 3-D volumes (X, Y, Z), got shapes {pred.shape} and {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs gt {gt.shape}")
    if not (np.isfinite(pred).all() and np.isfinite(gt).all()):
        raise ValueError("volumes contain NaN or inf values")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != pred.shape:
            raise ValueError(f"mask shape {mask.shape} does not match volume shape {pred.shape}")
        # Accept 0/1 label masks as loaded from NIfTI, but not soft masks,
        # whose silent thresholding would hide a mistake.
        if mask.dtype != bool:
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("mask must be boolean or contain only 0 and 1")
            mask = mask.astype(bool)
        if not mask.any():
            raise ValueError("mask is empty")
    return pred, gt, mask


def _select(volume: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The voxels a metric is taken over: all of them, or those inside the mask."""
    return volume.ravel() if mask is None else volume[mask]


def _mean_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> float | None:
    """Mean SSIM map of a and b over the interior (and the mask); None if that is empty."""
    if min(a.shape) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs every dimension to be at least {_SSIM_WINDOW}, got shape {a.shape}")
    _, ssim_map = structural_similarity(a, b, full=True, **_SSIM_OPTIONS)
    interior = tuple(slice(_SSIM_BORDER, n - _SSIM_BORDER) for n in a.shape)
    ssim_map = ssim_map[interior]
    if mask is None:
        return float(ssim_map.mean())
    inside = mask[interior]
    return float(ssim_map[inside].mean()) if inside.any() else None
