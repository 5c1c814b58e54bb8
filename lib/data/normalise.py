"""Intensity normalisation of CT and MRI volumes to the models' [-1, 1] range."""

from __future__ import annotations

import numpy as np

# Brain window for CT in HU. The models see a brain-extracted CT (-1 outside the brain), whose
# tissue lies in about -30..65 HU (1st-99th percentiles of the synthetic training brains; CSF
# ~8, white ~28, grey ~37). -30..90 HU spreads that over most of [-1, 1]: grey/white (8-12 HU
# apart) differ by 0.13-0.2, 2.5x more than in the first window below, so the one contrast the
# CT -> T1 mapping must invert is not a small ripple on the input. Calcification and bone
# residue at the brain edge saturate at +1.
CT_WINDOW_HU = (-30.0, 90.0)
# The window of the first ct2mri presets (the 64 x 64 weights): brain tissue used only a quarter
# of [-1, 1]. A preset stores its window (preset.json); this is only the fallback for a
# hand-written preset.json without one.
ORIGINAL_CT_WINDOW_HU = (-100.0, 200.0)
# Robust MRI range: percentiles of the brain voxels (raw scanner units have no fixed scale).
MRI_PERCENTILES = (0.5, 99.5)


def check_ct_window(window: tuple[float, float]) -> None:
    """Raise ValueError unless ``window`` is (LOW, HIGH) with HIGH > LOW."""
    low, high = window
    if not high > low:
        raise ValueError(f"the CT window must be LOW HIGH with HIGH > LOW, got {low:g} {high:g}")


def ct_to_unit(hu: np.ndarray, window: tuple[float, float] = CT_WINDOW_HU) -> np.ndarray:
    """Map CT values in HU to [-1, 1] through a fixed window (clipped).

    Raises:
        ValueError: a window whose HIGH is not above its LOW.
    """
    check_ct_window(window)
    low, high = window
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
