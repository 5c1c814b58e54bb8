"""A one-page PNG preview of a reconstruction: CT and SYNTHETIC MRI in three planes, with provenance.

The figure has two rows (the input CT and the synthetic MRI) of three views through the
middle of the volume (axial, coronal, sagittal), each labelled with the anatomical
directions at its edges, and under them a per-slice strip along z: one bar per slice
coloured by how that slice was obtained (:class:`SliceStatus`) and the retrieval similarity
of each slice against the threshold tau.

Display convention: arrays are RAS+ ``(X, Y, Z)`` (:mod:`lib.io.volume`); every view is drawn
with the first displayed axis increasing to the right and the second upwards, so axial and
coronal views show the patient's right on the right of the image (neurological convention,
stated by the "L"/"R" labels rather than assumed).
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lib.io.atomic import atomic_path

__all__ = ["STATUS_COLOURS", "SliceStatus", "status_colours", "write_preview"]


class SliceStatus(enum.StrEnum):
    """How a slice of the dense output was obtained.

    Attributes:
        ACQUIRED: the CT slice was acquired (the MRI slice was translated from it).
        RETRIEVED: the slice was generated and retrieval found a reference above tau.
        FALLBACK: the slice was generated with the SLERP fallback (retrieval below tau).
    """

    ACQUIRED = "acquired"
    RETRIEVED = "retrieved"
    FALLBACK = "fallback"


# RGB in [0, 1]; blue / green / orange stay distinguishable for the common colour-vision
# deficiencies and none of them is grey, so they never blend into the greyscale images.
STATUS_COLOURS: dict[SliceStatus, tuple[float, float, float]] = {
    SliceStatus.ACQUIRED: (0.27, 0.45, 0.77),
    SliceStatus.RETRIEVED: (0.20, 0.63, 0.17),
    SliceStatus.FALLBACK: (1.00, 0.50, 0.05),
}

# Below this minimum the CT is taken to be in Hounsfield units (air is -1000 HU).
HU_DETECTION_THRESHOLD = -200.0
BRAIN_WINDOW_HU = (0.0, 80.0)


def _parse_statuses(slice_status: Sequence[str]) -> list[SliceStatus]:
    """The statuses as :class:`SliceStatus`, refusing unknown values by index."""
    accepted = [status.value for status in SliceStatus]
    parsed = []
    for index, value in enumerate(slice_status):
        try:
            parsed.append(SliceStatus(value))
        except ValueError:
            raise ValueError(f"slice_status[{index}] is {value!r}; accepted values are {accepted}") from None
    return parsed


def status_colours(slice_status: Sequence[str]) -> np.ndarray:
    """The strip colour of every slice.

    Args:
        slice_status: one of ``"acquired"``, ``"retrieved"``, ``"fallback"`` per slice.

    Returns:
        float ``(Z, 3)`` RGB in [0, 1], from :data:`STATUS_COLOURS`.

    Raises:
        ValueError: an unknown status (the message names its index and the accepted values).
    """
    statuses = _parse_statuses(slice_status)
    return np.array([STATUS_COLOURS[status] for status in statuses], dtype=float).reshape(-1, 3)


def _check_arguments(
    ct: np.ndarray,
    mri: np.ndarray,
    spacing: Sequence[float],
    slice_status: Sequence[str],
    similarity: Sequence[float],
    tau: float,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], np.ndarray]:
    """Validate the inputs of :func:`write_preview`; return ct, mri, spacing, similarity as arrays."""
    ct, mri = np.asarray(ct, dtype=float), np.asarray(mri, dtype=float)
    if ct.ndim != 3 or mri.ndim != 3:
        raise ValueError(f"ct and mri must be 3-D (X, Y, Z), got shapes {ct.shape} and {mri.shape}")
    if ct.shape != mri.shape:
        raise ValueError(f"ct {ct.shape} and mri {mri.shape} must be on the same grid (same shape)")
    if min(ct.shape) < 1:
        raise ValueError(f"ct and mri are empty (shape {ct.shape})")
    spacing_values = tuple(float(s) for s in spacing)
    if len(spacing_values) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_values):
        raise ValueError(f"spacing must be three positive finite millimetre values (sx, sy, sz), got {spacing}")
    depth = ct.shape[2]
    if len(slice_status) != depth:
        raise ValueError(f"slice_status has {len(slice_status)} entries for {depth} slices (Z of ct/mri)")
    similarity_values = np.asarray(similarity, dtype=float)
    if similarity_values.shape != (depth,):
        raise ValueError(f"similarity must hold one value per slice ({depth}), got shape {similarity_values.shape}")
    if not math.isfinite(float(tau)):
        raise ValueError(f"tau must be a finite number, got {tau}")
    return ct, mri, spacing_values, similarity_values  # type: ignore[return-value]


def _ct_display_range(ct: np.ndarray) -> tuple[float, float]:
    """The brain window for HU data; otherwise the data's own (finite) range."""
    finite = ct[np.isfinite(ct)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if low < HU_DETECTION_THRESHOLD:
        return BRAIN_WINDOW_HU
    # A constant image still needs a non-empty range for imshow.
    return (low, high) if high > low else (low, low + 1.0)


def draw_orientation_labels(axis, left: str, right: str, top: str, bottom: str) -> None:
    """Write the anatomical direction at each edge of an image axis."""
    style = {
        "transform": axis.transAxes,
        "color": "yellow",
        "fontsize": 10,
        "fontweight": "bold",
        "bbox": {"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0},
    }
    axis.text(0.02, 0.5, left, ha="left", va="center", **style)
    axis.text(0.98, 0.5, right, ha="right", va="center", **style)
    axis.text(0.5, 0.98, top, ha="center", va="top", **style)
    axis.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def write_preview(
    path: str | os.PathLike[str],
    ct: np.ndarray,
    mri: np.ndarray,
    spacing: Sequence[float],
    slice_status: Sequence[str],
    similarity: Sequence[float],
    tau: float,
    title: str = "",
    source_label: str = "CT",
) -> Path:
    """Write the preview PNG of a reconstruction atomically (see the module docstring).

    Args:
        path: destination PNG (written to a temporary name beside it, then renamed).
        ct: ``(X, Y, Z)`` CT on the dense grid, RAS+; values below -200 mean HU and are
            shown through the brain window [0, 80] HU, otherwise min-max.
        mri: ``(X, Y, Z)`` synthetic MRI on the same grid, shown clipped to [0, 1].
        spacing: ``(sx, sy, sz)`` voxel size in mm (sets the aspect ratio of each view).
        slice_status: per slice, ``"acquired"``, ``"retrieved"`` or ``"fallback"``.
        similarity: per slice retrieval similarity (NaN where there is none).
        tau: the retrieval success threshold, drawn as a horizontal line.
        source_label: what the input is (``"CT"``, ``"FLAIR"``), for the row and heading.
        title: appended to the figure title, which always says the MRI is SYNTHETIC.

    Returns:
        The written path.

    Raises:
        ValueError: shapes differ or are not 3-D, bad spacing, a per-slice sequence of the
            wrong length, an unknown status, or a non-finite tau.
    """
    ct, mri, (sx, sy, sz), similarity_values = _check_arguments(ct, mri, spacing, slice_status, similarity, tau)
    colours = status_colours(slice_status)
    statuses = _parse_statuses(slice_status)
    # Figure and its Agg canvas directly, not pyplot: no global backend switch, no figure
    # registry to leak, safe from threads (a server may render previews concurrently).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    nx, ny, nz = ct.shape
    cx, cy, cz = nx // 2, ny // 2, nz // 2
    ct_range = _ct_display_range(ct)
    # (name, slicer of a volume -> 2-D (horizontal, vertical) array, aspect = vertical / horizontal
    # mm per voxel, edge labels left/right/top/bottom)
    views = [
        (f"axial z={cz}", lambda v: v[:, :, cz], sy / sx, ("L", "R", "A", "P")),
        (f"coronal y={cy}", lambda v: v[:, cy, :], sz / sx, ("L", "R", "S", "I")),
        (f"sagittal x={cx}", lambda v: v[cx, :, :], sz / sy, ("P", "A", "S", "I")),
    ]
    rows = [
        (source_label, ct, {"cmap": "gray", "vmin": ct_range[0], "vmax": ct_range[1]}),
        ("MRI (SYNTHETIC)", np.clip(mri, 0.0, 1.0), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}),
    ]

    figure = Figure(figsize=(12, 10), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(4, 3, height_ratios=[1, 1, 0.12, 0.45], hspace=0.25, wspace=0.05)
    for row, (row_name, volume, display) in enumerate(rows):
        for column, (view_name, cut, aspect, labels) in enumerate(views):
            axis = figure.add_subplot(grid[row, column])
            # Transposed with origin "lower": the first array axis runs right, the second up.
            axis.imshow(cut(volume).T, origin="lower", aspect=aspect, interpolation="nearest", **display)
            draw_orientation_labels(axis, *labels)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(
                f"{row_name}: {view_name}" + (f" ({statuses[cz].value})" if column == 0 else ""), fontsize=10
            )

    strip = figure.add_subplot(grid[2, :])
    strip.imshow(colours[None, :, :], aspect="auto", extent=(-0.5, nz - 0.5, 0.0, 1.0), interpolation="nearest")
    strip.set_yticks([])
    strip.tick_params(labelbottom=False)
    strip.set_title("per-slice provenance along z (I -> S)", fontsize=10)
    counts = {status: statuses.count(status) for status in SliceStatus}
    strip.legend(
        handles=[Patch(color=STATUS_COLOURS[s], label=f"{s.value} ({counts[s]})") for s in SliceStatus],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        ncol=3,
        fontsize=9,
        frameon=False,
    )

    curve = figure.add_subplot(grid[3, :], sharex=strip)
    z = np.arange(nz)
    curve.plot(z, similarity_values, color="black", marker=".", markersize=3, linewidth=1, label="retrieval similarity")
    curve.axhline(float(tau), color=(0.84, 0.15, 0.16), linestyle="--", linewidth=1, label=f"tau = {float(tau):.3f}")
    curve.axvline(cz, color="grey", linewidth=0.8, linestyle=":", label=f"axial view (z={cz})")
    curve.set_xlim(-0.5, nz - 0.5)
    curve.set_xlabel("slice z (inferior -> superior)")
    curve.set_ylabel("similarity")
    curve.legend(loc="lower right", fontsize=8)

    heading = f"ReBrain preview: MRI is SYNTHETIC (generated from {source_label}), not an acquired scan"
    figure.suptitle(f"{heading}\n{title}" if title else heading, fontsize=12)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return Path(path)
