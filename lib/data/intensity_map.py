"""A voxelwise lookup table from an input contrast to the target, in the models' [-1, 1] units.

Fitted on the brain voxels of (input, target) slice pairs, it is the evaluation's
``intensity-map`` baseline (:mod:`lib.reconstruction_methods`) and, when a BBDM is trained with
the bridge starting from the mapped input, part of that BBDM's bridge settings
(:class:`lib.diffusion.scheduler.BridgeSchedulerConfig`). Kept free of heavy imports (numpy only)
so that the command line can list methods without loading torch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Intensity bins of the lookup table over the models' [-1, 1] range.
INTENSITY_BINS = 256
# A voxel whose normalised input is at or below this is background (prepared and model-frame
# slices set the outside of the brain to -1).
BACKGROUND_LEVEL = -1.0 + 1e-3


def fit_intensity_map(pairs: Iterator[tuple[np.ndarray, np.ndarray]], bins: int = INTENSITY_BINS) -> np.ndarray:
    """The mean target value of each input intensity bin over the brain voxels of slice pairs.

    Args:
        pairs: (input, target) slice stacks in [-1, 1] units, (N, S, S) each.
        bins: bins over [-1, 1].

    Returns:
        (bins,) the table; a bin no voxel fell in takes the value of its nearest filled bins
        (linear interpolation), so that every input intensity maps somewhere.

    Raises:
        ValueError: no brain voxel in the pairs.
    """
    sums = np.zeros(bins)
    counts = np.zeros(bins)
    for source, target in pairs:
        brain = source > BACKGROUND_LEVEL
        index = _bin_index(source[brain], bins)
        sums += np.bincount(index, weights=target[brain].astype(np.float64), minlength=bins)
        counts += np.bincount(index, minlength=bins)
    filled = counts > 0
    if not filled.any():
        raise ValueError("no brain voxel to fit the intensity map on")
    centres = bin_centres(bins)
    return np.interp(centres, centres[filled], sums[filled] / counts[filled])


def apply_intensity_map(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` in [-1, 1] mapped through the table (linear between bin centres; the end
    bins' values beyond the first and last centre)."""
    return np.interp(values, bin_centres(len(table)), table).astype(np.float32)


def _bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    return np.clip(((values + 1.0) / 2.0 * bins).astype(np.int64), 0, bins - 1)


def bin_centres(bins: int) -> np.ndarray:
    """The centres of ``bins`` equal bins over [-1, 1]."""
    return -1.0 + (np.arange(bins) + 0.5) * 2.0 / bins
