"""Volumes in one canonical frame, with the slice positions a sparse scan really acquired.

Every reader returns a :class:`Volume`: a stack of parallel slices, reoriented so that the
voxel axes run towards patient Right, Anterior and Superior (nibabel's RAS+ "closest
canonical"), with the axial slices along the last axis.

Real sparse CT has thick or skipped slices, sometimes with irregular gaps, so the slice
axis is not described by a single spacing. A :class:`Volume` therefore keeps

* ``affine``: maps ``(i, j, p)`` to RAS world millimetres, where ``i, j`` are in-plane voxel
  indices and ``p`` is the slice position in millimetres along the slice normal;
* ``positions``: ``p`` of every stored slice (increasing, the first one at 0).

World coordinates of voxel ``(i, j, k)`` are ``affine @ (i, j, positions[k], 1)``. The
third column of ``affine`` is the direction in which the slice origins move per millimetre
of normal distance, so a gantry tilt (slice origins sliding along the column direction)
is represented exactly. :func:`dense_grid` builds the regular target grid from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import nibabel as nib
import numpy as np

from lib.io.errors import VolumeReadError
from lib.io.limits import MAX_GRID_SLICES

# Two slice positions closer than this (mm) are the same position.
POSITION_TOLERANCE_MM = 1e-3


def slice_normal(affine: np.ndarray) -> np.ndarray:
    """Unit normal of the slice plane spanned by the first two voxel axes of ``affine``."""
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    return normal / np.linalg.norm(normal)


@dataclass
class Volume:
    """A stack of parallel slices in the canonical RAS+ frame.

    Attributes:
        array: float32 ``(X, Y, Z)``; axes run towards R, A, S; ``array[:, :, k]`` is slice k.
        affine: 4x4, maps ``(i, j, p_mm)`` to RAS world millimetres (see the module docstring).
        positions: ``(Z,)`` slice positions in mm along the slice normal, increasing, from 0.
        source: the file or folder it was read from.
        modality: ``"CT"`` (values in HU), ``"MR"`` or ``"unknown"``.
        meta: reader details (series chosen and skipped, input orientation, tilt, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    positions: np.ndarray
    source: str = ""
    modality: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a Volume array must be 3-D, got shape {self.array.shape}")
        if len(self.positions) != self.array.shape[2]:
            raise ValueError(f"{len(self.positions)} slice positions for {self.array.shape[2]} slices")
        if len(self.positions) > 1 and np.any(np.diff(self.positions) <= POSITION_TOLERANCE_MM):
            raise ValueError("slice positions must be strictly increasing")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The array shape ``(X, Y, Z)``."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """In-plane voxel size in mm along the first two axes."""
        return float(np.linalg.norm(self.affine[:3, 0])), float(np.linalg.norm(self.affine[:3, 1]))

    @property
    def slice_steps(self) -> np.ndarray:
        """Distances in mm between consecutive stored slices."""
        return np.diff(self.positions)

    def is_regular(self, tolerance_mm: float = 0.01) -> bool:
        """True when the stored slices are equally spaced (within ``tolerance_mm``)."""
        steps = self.slice_steps
        return len(steps) == 0 or float(np.ptp(steps)) <= tolerance_mm

    def voxel_affine(self) -> np.ndarray:
        """The ordinary 4x4 voxel-to-RAS affine of a regularly spaced volume.

        Raises:
            ValueError: if the slices are not equally spaced (use :func:`dense_grid`).
        """
        if not self.is_regular():
            raise ValueError(
                f"{self.source}: slices are irregularly spaced (steps {np.unique(np.round(self.slice_steps, 3))} mm); "
                "build a dense grid instead"
            )
        step = float(self.slice_steps.mean()) if len(self.positions) > 1 else 1.0
        affine = self.affine.copy()
        affine[:3, 2] = self.affine[:3, 2] * step
        affine[:3, 3] = (self.affine @ np.array([0.0, 0.0, self.positions[0], 1.0]))[:3]
        return affine

    def take_slices(self, indices: np.ndarray | list[int]) -> Volume:
        """A new Volume holding only the given slices (in increasing order), same frame.

        Positions keep their values, so the result still lies exactly where the slices were.
        """
        indices = np.asarray(indices, dtype=int)
        if indices.size == 0 or np.any(np.diff(indices) <= 0):
            raise ValueError("slice indices must be non-empty and strictly increasing")
        if indices[0] < 0 or indices[-1] >= self.shape[2]:
            raise ValueError(f"slice indices out of range 0..{self.shape[2] - 1}")
        return replace(
            self,
            array=self.array[:, :, indices],
            positions=self.positions[indices],
            meta={**self.meta, "taken_indices": indices.tolist()},
        )


def volume_from_voxel_affine(array: np.ndarray, affine: np.ndarray, **fields: Any) -> Volume:
    """Make a canonical :class:`Volume` from a regular array and its voxel-to-RAS affine.

    The array is reoriented to the closest RAS+ axes (no resampling: only axis flips and
    permutations), so the physical position of every voxel is unchanged.

    Args:
        array: a 3-D array in any orientation.
        affine: its 4x4 voxel-to-RAS affine.
        **fields: further :class:`Volume` fields (source, modality, meta).
    """
    orientation = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(array, orientation)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(orientation, array.shape)
    meta = dict(fields.pop("meta", {}))
    meta.setdefault("input_orientation", nib.orientations.ornt2axcodes(orientation))
    meta.setdefault("input_shape", tuple(int(n) for n in array.shape))
    return _from_regular_canonical(np.asarray(canonical), canonical_affine, meta=meta, **fields)


def _from_regular_canonical(array: np.ndarray, voxel_affine: np.ndarray, **fields: Any) -> Volume:
    """Express a canonical regular volume by (i, j, p) affine and slice positions."""
    # Slice spacing is the normal distance between slices; with a sheared (tilted) affine
    # it is shorter than the length of the third column.
    step = float(voxel_affine[:3, 2] @ slice_normal(voxel_affine))
    affine = voxel_affine.copy()
    affine[:3, 2] = voxel_affine[:3, 2] / step
    positions = np.arange(array.shape[2], dtype=np.float64) * step
    return Volume(array=np.ascontiguousarray(array, dtype=np.float32), affine=affine, positions=positions, **fields)


def volume_from_slices(array: np.ndarray, affine: np.ndarray, positions: np.ndarray, **fields: Any) -> Volume:
    """Make a canonical :class:`Volume` from a slice stack with possibly irregular positions.

    Args:
        array: ``(rows, cols, slices)`` in the acquisition's own axes.
        affine: maps ``(i, j, p_mm)`` to RAS world mm (third column: origin motion per mm of
            normal distance).
        positions: increasing slice positions in mm along the normal.
        **fields: further :class:`Volume` fields.

    Raises:
        ValueError: the slices are not axial and not equally spaced (no exact canonical
            form exists without resampling).
    """
    positions = np.asarray(positions, dtype=np.float64)
    orientation = nib.orientations.io_orientation(affine)
    steps = np.diff(positions)
    regular = len(steps) == 0 or float(np.ptp(steps)) <= 0.01
    if orientation[2, 0] != 2:
        if not regular:
            raise ValueError("irregularly spaced slices that are not axial cannot be canonicalised")
        voxel_affine = affine.copy()
        voxel_affine[:3, 2] = affine[:3, 2] * (steps.mean() if len(steps) else 1.0)
        voxel_affine[:3, 3] = (affine @ np.array([0.0, 0.0, positions[0], 1.0]))[:3]
        return volume_from_voxel_affine(array, voxel_affine, **fields)

    meta = dict(fields.pop("meta", {}))
    meta.setdefault("input_orientation", nib.orientations.ornt2axcodes(orientation))
    meta.setdefault("input_shape", tuple(int(n) for n in array.shape))
    # In-plane axes: permute/flip like a regular volume; the p axis is handled below because
    # flipping p negates positions rather than mapping index n to N-1-n.
    in_plane = orientation.copy()
    in_plane[2] = (2, 1)
    array = nib.orientations.apply_orientation(array, in_plane)
    affine = affine @ nib.orientations.inv_ornt_aff(in_plane, array.shape)
    if orientation[2, 1] < 0:
        array = array[:, :, ::-1]
        positions = -positions[::-1]
        affine = affine.copy()
        affine[:3, 2] = -affine[:3, 2]
    # Put the first slice at p = 0 so positions read as distances from the first slice.
    affine = affine.copy()
    affine[:3, 3] = (affine @ np.array([0.0, 0.0, positions[0], 1.0]))[:3]
    positions = positions - positions[0]
    return Volume(
        array=np.ascontiguousarray(array, dtype=np.float32),
        affine=affine,
        positions=positions,
        meta=meta,
        **fields,
    )


# An acquired slice within this fraction of the grid spacing of a grid slice is written on it
# (a quarter: real positions drift by a few tenths of a mm; below a half, so that no acquired
# slice can land on two grid slices).
SNAP_FRACTION = 0.25


@dataclass(frozen=True)
class DenseGrid:
    """The regular target grid of a (sparse) volume, and where the acquired slices fall on it.

    For grid slice ``z``, ``lower[z]`` and ``upper[z]`` are the indices of the acquired slices
    at or just below and just above it, and ``alpha[z]`` the fraction of the way from lower to
    upper (0 at lower, 1 at upper): the weights for interpolating a missing slice.

    Attributes:
        affine: 4x4 voxel-to-RAS affine of the grid.
        shape: ``(X, Y, Z)`` of the grid.
        spacing: slice spacing in mm.
        positions: ``(Z,)`` positions in mm, in the volume's ``p`` coordinate.
        acquired: ``(Z,)`` bool, true where an acquired slice lies on the grid slice.
        source_index: ``(Z,)`` index of that acquired slice, -1 elsewhere.
        lower: ``(Z,)`` acquired index at or below.
        upper: ``(Z,)`` acquired index at or above.
        alpha: ``(Z,)`` interpolation fraction in [0, 1].
        snap_mm: ``(Z,)`` how far the grid slice lies from its acquired slice (grid minus
            acquired position, mm; 0 for gaps): the acquired slice is written on the grid slice.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: float
    positions: np.ndarray
    acquired: np.ndarray
    source_index: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    alpha: np.ndarray
    snap_mm: np.ndarray

    @property
    def gap_count(self) -> int:
        """How many grid slices have no acquired slice."""
        return int((~self.acquired).sum())

    @property
    def voxel_spacing(self) -> tuple[float, float, float]:
        """``(sx, sy, sz)`` in mm: the in-plane pixel size from the affine, then the slice spacing."""
        return (*np.linalg.norm(self.affine[:3, :2], axis=0).tolist(), self.spacing)

    def interpolate(self, values: np.ndarray, axis: int = 0) -> np.ndarray:
        """Per-acquired-slice ``values`` (stacked along ``axis``) linearly interpolated onto the
        grid with ``lower``/``upper``/``alpha``; acquired slices come through unchanged. float32."""
        stack = np.moveaxis(values, axis, 0)
        alpha = self.alpha.reshape(-1, *([1] * (stack.ndim - 1)))
        return np.moveaxis((1.0 - alpha) * stack[self.lower] + alpha * stack[self.upper], 0, axis).astype(np.float32)


def dense_grid(volume: Volume, spacing: float = 1.0, tolerance: float | None = None) -> DenseGrid:
    """Build the dense target grid (``spacing`` mm along z) spanning the acquired slices.

    The grid starts at the first acquired slice and keeps the exact requested spacing. An
    acquired slice counts as lying on the grid slice nearest to it when it is within
    ``tolerance`` (default: :data:`SNAP_FRACTION` of the spacing) and is then written there
    unchanged: real scanners' positions drift (a tilted CT with 4, 1.1 and 7 mm steps lands
    0.1-0.2 mm off a 1 mm grid), and an acquired slice taken for a gap would be replaced by
    interpolated input. The grid reaches one slice past the last acquired position when that
    slice is within the tolerance, so a last slice drifting upwards is kept too. Acquired
    slices between grid positions (e.g. 2.5 mm slices on a 1 mm grid) are still used as
    interpolation neighbours.

    Args:
        volume: the acquired slices.
        spacing: target slice spacing in mm.
        tolerance: mm; how close an acquired slice must be to a grid slice to be "on" it;
            below half the spacing, so that no acquired slice lands on two grid slices.

    Raises:
        ValueError: for a non-positive spacing or a tolerance outside [0, spacing / 2).
        VolumeReadError: naming the volume's source, when the grid would have more than
            :data:`~lib.io.limits.MAX_GRID_SLICES` slices (slices metres apart, a corrupt header).
    """
    if spacing <= 0:
        raise ValueError(f"target spacing must be positive, got {spacing}")
    tolerance = spacing * SNAP_FRACTION if tolerance is None else tolerance
    if not 0 <= tolerance < spacing / 2:
        raise ValueError(f"snapping tolerance must lie in [0, {spacing / 2:g}) mm (half the spacing), got {tolerance}")
    acquired_positions = volume.positions
    # A relative epsilon: positions read from DICOM carry float noise of ~1e-6 mm.
    epsilon = 1e-6 * spacing
    count = int(np.floor((acquired_positions[-1] - acquired_positions[0] + tolerance + epsilon) / spacing)) + 1
    if count > MAX_GRID_SLICES:
        raise VolumeReadError(
            volume.source,
            f"slices spanning {acquired_positions[-1] - acquired_positions[0]:.0f} mm would make a grid of "
            f"{count} slices at {spacing:g} mm, over the limit of {MAX_GRID_SLICES}",
        )
    positions = acquired_positions[0] + spacing * np.arange(count)

    # The acquired slice nearest to each grid slice (ties: the lower one).
    above = np.clip(np.searchsorted(acquired_positions, positions, side="left"), 0, len(acquired_positions) - 1)
    below = np.clip(above - 1, 0, None)
    take_below = np.abs(acquired_positions[below] - positions) <= np.abs(acquired_positions[above] - positions)
    nearest = np.where(take_below, below, above)
    acquired = np.abs(acquired_positions[nearest] - positions) <= tolerance + epsilon
    # Interpolation neighbours of the other grid slices: the acquired slices just below and above.
    lower = np.clip(np.searchsorted(acquired_positions, positions, side="right") - 1, 0, None)
    lower = np.where(acquired, nearest, lower)
    upper = np.where(acquired, nearest, above)
    span = acquired_positions[upper] - acquired_positions[lower]
    alpha = np.where(span > 0, (positions - acquired_positions[lower]) / np.where(span > 0, span, 1), 0.0)
    alpha = np.clip(alpha, 0.0, 1.0)

    affine = volume.affine.copy()
    affine[:3, 2] = volume.affine[:3, 2] * spacing
    affine[:3, 3] = (volume.affine @ np.array([0.0, 0.0, positions[0], 1.0]))[:3]
    return DenseGrid(
        affine=affine,
        shape=(volume.shape[0], volume.shape[1], count),
        spacing=float(spacing),
        positions=positions,
        acquired=acquired,
        source_index=np.where(acquired, nearest, -1),
        snap_mm=np.where(acquired, positions - acquired_positions[nearest], 0.0),
        lower=lower,
        upper=upper,
        alpha=alpha,
    )
