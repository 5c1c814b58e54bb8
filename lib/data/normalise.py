"""Intensity normalisation of CT and MRI volumes to the models' [-1, 1] range."""

from __future__ import annotations

import numpy as np

# Brain window for CT in HU. Brain tissue lies in 0..80 HU (CSF ~8, WM ~28, GM ~40); a
# window from -100 (below fat) to 200 HU keeps grey/white contrast visible to the models
# (12 HU = 0.08 in [-1, 1]) while bone and air saturate at +1 and -1. A full-range window
# ([-1000, 2000]) would squeeze grey/white contrast to 0.008.
CT_WINDOW_HU = (-100.0, 200.0)
# Robust MRI range: percentiles of the brain voxels (raw scanner units have no fixed scale).
MRI_PERCENTILES = (0.5, 99.5)


def ct_to_unit(hu: np.ndarray, window: tuple[float, float] = CT_WINDOW_HU) -> np.ndarray:
    """Map CT values in HU to [-1, 1] through a fixed window (clipped)."""
    low, high = window
    if high <= low:
        raise ValueError(f"CT window must have high > low, got {window}")
    scaled = (np.asarray(hu, dtype=np.float32) - low) / (high - low) * 2.0 - 1.0
    return np.clip(scaled, -1.0, 1.0)


def mri_to_unit(
    volume: np.ndarray, mask: np.ndarray | None = None, percentiles: tuple[float, float] = MRI_PERCENTILES
) -> np.ndarray:
    """Map an MRI volume to [-1, 1] by robust percentiles of its brain voxels.

    Percentiles are taken inside ``mask`` (default: voxels > 0) because the zero background
    of a skull-stripped volume would otherwise pull the low percentile to 0. Voxels outside
    the mask are set to -1.

    Raises:
        ValueError: if the mask is empty or the brain intensities have no range.
    """
    volume = np.asarray(volume, dtype=np.float32)
    mask = volume > 0 if mask is None else mask.astype(bool)
    if not mask.any():
        raise ValueError("the brain mask is empty: cannot normalise the MRI")
    low, high = np.percentile(volume[mask], percentiles)
    if high <= low:
        raise ValueError(f"MRI brain intensities have no range (p{percentiles[0]}={low}, p{percentiles[1]}={high})")
    scaled = np.clip((volume - low) / (high - low), 0.0, 1.0) * 2.0 - 1.0
    return np.where(mask, scaled, -1.0).astype(np.float32)
