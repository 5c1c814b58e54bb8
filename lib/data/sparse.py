"""Simulated sparse acquisitions: keep every k-th axial slice, or an explicit list."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lib.io.volume import Volume


def sparse_indices(
    slice_count: int, factor: int | None = None, offset: int = 0, indices: Sequence[int] | None = None
) -> np.ndarray:
    """The acquired slice indices of a sparse scan of ``slice_count`` dense slices.

    Args:
        slice_count: number of dense slices.
        factor: keep every ``factor``-th slice (2, 3, 4, ...), starting at ``offset``.
        offset: first kept slice, ``0 <= offset < factor``.
        indices: an explicit list instead of ``factor``.

    Raises:
        ValueError: for a factor below 1, an offset out of range, or bad explicit indices.
    """
    if (factor is None) == (indices is None):
        raise ValueError("give exactly one of factor or indices")
    if indices is not None:
        chosen = np.asarray(sorted(set(int(i) for i in indices)), dtype=int)
        if chosen.size < 2 or chosen[0] < 0 or chosen[-1] >= slice_count:
            raise ValueError(f"need at least 2 distinct indices within 0..{slice_count - 1}, got {list(indices)}")
        return chosen
    if factor < 1:
        raise ValueError(f"sparsity factor must be >= 1, got {factor}")
    if not 0 <= offset < factor:
        raise ValueError(f"offset must be in 0..{factor - 1}, got {offset}")
    chosen = np.arange(offset, slice_count, factor)
    if chosen.size < 2:
        raise ValueError(f"{slice_count} slices at x{factor} from offset {offset} leave fewer than 2 slices")
    return chosen


def simulate_sparsity(
    volume: np.ndarray, factor: int | None = None, offset: int = 0, indices: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep a subset of the axial slices (last axis) of a dense array.

    Returns:
        The sparse array ``(X, Y, K)`` and the kept indices ``(K,)``.
    """
    kept = sparse_indices(volume.shape[-1], factor, offset, indices)
    return volume[..., kept], kept


def simulate_sparse_volume(
    volume: Volume, factor: int | None = None, offset: int = 0, indices: Sequence[int] | None = None
) -> Volume:
    """A :class:`Volume` of the kept slices, at their true positions in the dense volume's frame."""
    return volume.take_slices(sparse_indices(volume.shape[2], factor, offset, indices))
