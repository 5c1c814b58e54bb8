"""PNG figures of an evaluation report: per-slice PSNR, retrieval similarities, montages, uncertainty.

Every function validates its inputs first (a :class:`ValueError` naming the problem, before
anything is written), draws one figure and writes it atomically as PNG with
:func:`lib.io.atomic.atomic_path`, so a report folder never holds a half-written image.

Volumes are RAS+ ``(X, Y, Z)`` arrays (:mod:`lib.io.volume`); views follow the display
convention of :mod:`lib.report.preview`: the first displayed axis increases to the right and
the second upwards, each image labelled with the anatomical directions at its edges and drawn
with the aspect ratio of its voxel spacing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lib.io.atomic import atomic_path
from lib.report.preview import draw_orientation_labels

__all__ = [
    "plot_montage",
    "plot_similarity_histogram",
    "plot_slice_psnr",
    "plot_uncertainty_and_error",
    "uncertainty_error_correlation",
]

# Colour of the shaded acquired slices and of the tau line; the same red as the preview's tau.
ACQUIRED_SHADE = (0.27, 0.45, 0.77)
TAU_COLOUR = (0.84, 0.15, 0.16)
# Percentile of the values inside the mask used as the top of the uncertainty / error colour
# scale: a few extreme voxels (an edge, a misregistered vessel) would otherwise make the rest
# of the map uniformly dark.
MAP_PERCENTILE = 99.5

# A view: its title, the cut of a volume to a 2-D (horizontal, vertical) array, the aspect
# (vertical / horizontal mm per voxel) and the edge labels left, right, top, bottom.
_View = tuple[str, Callable[[np.ndarray], np.ndarray], float, tuple[str, str, str, str]]


def _new_figure(width: float, height: float):
    """A figure with its own Agg canvas.

    Figure and canvas directly rather than pyplot, as :mod:`lib.report.preview` does: no global
    backend switch, no pyplot figure registry to leak or close, and safe from threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as PNG to ``path`` atomically and return the path."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return Path(path)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Three positive finite millimetre values, or a ValueError."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(
            f"spacing must be three positive finite millimetre values (sx, sy, sz), got {spacing!r}"
        ) from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive finite millimetre values (sx, sy, sz), got {spacing!r}")
    return values  # type: ignore[return-value]


def _check_volume(name: str, volume: np.ndarray) -> np.ndarray:
    """``volume`` as a non-empty 3-D float array, or a ValueError naming it."""
    array = np.asarray(volume, dtype=float)
    if array.ndim != 3:
        raise ValueError(f"{name} must be 3-D (X, Y, Z), got shape {array.shape}")
    if min(array.shape) < 1:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    return array


def _check_z(z: int | None, depth: int) -> int:
    """The axial slice to show: ``z`` if it is a slice index, the middle one by default."""
    if z is None:
        return depth // 2
    # Negative indices are refused rather than wrapped: a report saying "z=-1" would be unclear.
    if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not 0 <= int(z) < depth:
        raise ValueError(f"z must be a slice index in [0, {depth - 1}], got {z!r}")
    return int(z)


def _views(shape: tuple[int, int, int], spacing: tuple[float, float, float], z: int) -> list[_View]:
    """Axial at ``z``, coronal and sagittal through the centre, as in the preview."""
    nx, ny, _ = shape
    sx, sy, sz = spacing
    cx, cy = nx // 2, ny // 2
    return [
        (f"axial z={z}", lambda v: v[:, :, z], sy / sx, ("L", "R", "A", "P")),
        (f"coronal y={cy}", lambda v: v[:, cy, :], sz / sx, ("L", "R", "S", "I")),
        (f"sagittal x={cx}", lambda v: v[cx, :, :], sz / sy, ("P", "A", "S", "I")),
    ]


def _draw_view(axis, image: np.ndarray, aspect: float, labels: tuple[str, str, str, str], **display):
    """Show a 2-D (horizontal, vertical) cut with its orientation labels; return the image artist."""
    # Transposed with origin "lower": the first array axis runs right, the second up.
    artist = axis.imshow(image.T, origin="lower", aspect=aspect, interpolation="nearest", **display)
    draw_orientation_labels(axis, *labels)
    axis.set_xticks([])
    axis.set_yticks([])
    return artist


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """The ``(first, last)`` index of every run of consecutive true values."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(start), int(stop) - 1) for start, stop in zip(edges[::2], edges[1::2])]


def plot_slice_psnr(
    path: str | os.PathLike[str],
    psnr_by_method: dict[str, np.ndarray],
    acquired: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Plot per-slice PSNR along z, one line per method, and write it as PNG.

    Args:
        path: destination PNG (written to a temporary name beside it, then renamed).
        psnr_by_method: method name -> PSNR in dB of every slice, all of the same length Z.
            Non-finite values (NaN for slices without brain; an infinite PSNR of an exact
            slice has no place on the axis either) leave a gap in that method's line.
        acquired: optional bool per slice; acquired slices are shaded lightly so that the
            generated gaps between them stand out.
        title: figure title.

    Returns:
        The written path.

    Raises:
        ValueError: no method, a method's values not 1-D, lengths that differ (between
            methods or with ``acquired``), or ``acquired`` not boolean.
    """
    if not psnr_by_method:
        raise ValueError("psnr_by_method is empty: give at least one method's per-slice PSNR")
    curves: dict[str, np.ndarray] = {}
    for name, values in psnr_by_method.items():
        array = np.asarray(values, dtype=float)
        if array.ndim != 1 or array.size == 0:
            raise ValueError(
                f"psnr_by_method[{name!r}] must be a non-empty 1-D per-slice array, got shape {array.shape}"
            )
        curves[name] = array
    lengths = {name: array.size for name, array in curves.items()}
    depth = next(iter(lengths.values()))
    if len(set(lengths.values())) != 1:
        raise ValueError(f"psnr_by_method arrays must have the same number of slices, got lengths {lengths}")
    flags = None
    if acquired is not None:
        raw = np.asarray(acquired)
        if raw.shape != (depth,):
            raise ValueError(f"acquired must hold one flag per slice ({depth}), got shape {raw.shape}")
        if raw.dtype != bool and not np.isin(raw, (0, 1)).all():
            raise ValueError("acquired must be boolean (True for an acquired slice)")
        flags = raw.astype(bool)

    from matplotlib.patches import Patch

    figure = _new_figure(10, 4.5)
    axis = figure.add_subplot(1, 1, 1)
    z = np.arange(depth)
    handles = []
    if flags is not None:
        # One span per run of acquired slices, each slice covering [k - 0.5, k + 0.5]: with
        # every other slice acquired the shading alternates, and a long gap is a wide white band.
        for first, last in _runs(flags):
            axis.axvspan(first - 0.5, last + 0.5, color=ACQUIRED_SHADE, alpha=0.15, linewidth=0)
        handles.append(Patch(color=ACQUIRED_SHADE, alpha=0.15, label=f"acquired slice ({int(flags.sum())} of {depth})"))
    for name, values in curves.items():
        shown = np.where(np.isfinite(values), values, np.nan)
        finite = shown[np.isfinite(shown)]
        mean = f"mean {finite.mean():.2f} dB" if finite.size else "no finite value"
        # Markers keep a single finite slice between two gaps visible (a line needs two points).
        (line,) = axis.plot(z, shown, marker=".", markersize=4, linewidth=1.2, label=f"{name} ({mean})")
        handles.append(line)
    axis.set_xlim(-0.5, depth - 0.5)
    axis.set_xlabel("slice z (inferior -> superior)")
    axis.set_ylabel("PSNR (dB)")
    axis.grid(True, alpha=0.3)
    axis.legend(handles=handles, loc="best", fontsize=9)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_similarity_histogram(
    path: str | os.PathLike[str],
    similarities: np.ndarray,
    tau: float,
    title: str = "",
) -> Path:
    """Plot the histogram of retrieval similarities against the threshold tau and write it as PNG.

    Only finite similarities are counted (NaN marks a slice without retrieval, e.g. an
    acquired one). The legend gives how many reach tau (``similarity >= tau``, the success
    rule of the knowledge base). With no finite value the axis is left empty with the note
    "no retrieval" instead of failing.

    Args:
        path: destination PNG (written to a temporary name beside it, then renamed).
        similarities: retrieval similarities of any shape (flattened).
        tau: the retrieval success threshold, drawn as a vertical dashed line.
        title: figure title.

    Returns:
        The written path.

    Raises:
        ValueError: tau is not a finite number.
    """
    try:
        threshold = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a finite number, got {tau!r}") from None
    if not math.isfinite(threshold):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    values = np.asarray(similarities, dtype=float).ravel()
    finite = values[np.isfinite(values)]

    figure = _new_figure(8, 4.5)
    axis = figure.add_subplot(1, 1, 1)
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        if high - low < 1e-6:
            # All equal: numpy would widen the range to +-0.5, one bar as wide as the whole
            # cosine range; a narrow bar around the value is what the data says.
            low, high = low - 0.005, high + 0.005
        # sqrt(n) bins, bounded: enough to see the shape of a few hundred slices, never so many
        # that every bar holds one value.
        bins = int(np.clip(round(math.sqrt(finite.size)), 5, 60))
        axis.hist(
            finite,
            bins=bins,
            range=(low, high),
            color="grey",
            edgecolor="black",
            linewidth=0.5,
            label=f"similarity (n = {finite.size})",
        )
        above = int((finite >= threshold).sum())
        share = f"{above} of {finite.size} ({100.0 * above / finite.size:.1f} %) >= tau"
        # tau may lie outside the data: widen the axis so that its line is always drawn.
        left, right = min(low, threshold), max(high, threshold)
        margin = 0.05 * (right - left)
        axis.set_xlim(left - margin, right + margin)
    else:
        share = "no finite similarity"
        # Boxed and drawn above the tau line, which passes through the middle of the axis.
        note_box = {"facecolor": "white", "edgecolor": "grey", "pad": 4}
        axis.text(
            0.5,
            0.5,
            "no retrieval",
            transform=axis.transAxes,
            ha="center",
            va="center",
            fontsize=14,
            color="grey",
            bbox=note_box,
            zorder=3,
        )
        axis.set_xlim(threshold - 0.1, threshold + 0.1)
    axis.axvline(threshold, color=TAU_COLOUR, linestyle="--", linewidth=1.5, label=f"tau = {threshold:.3f}: {share}")
    axis.set_xlabel("retrieval similarity")
    axis.set_ylabel("slices")
    axis.legend(loc="best", fontsize=9)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_montage(
    path: str | os.PathLike[str],
    volumes: dict[str, np.ndarray],
    spacing: Sequence[float],
    z: int | None = None,
    title: str = "",
) -> Path:
    """Plot a montage of MRI volumes (one row each, three views) and write it as PNG.

    Every row shows the axial slice ``z`` and the coronal and sagittal planes through the
    centre, in grey with the fixed range [0, 1] (the MRI range), so that rows compare
    directly: no per-image contrast stretch hides a global intensity difference.

    Args:
        path: destination PNG (written to a temporary name beside it, then renamed).
        volumes: row name (e.g. ``"ground truth"``, ``"rebrain"``) -> ``(X, Y, Z)`` MRI in
            [0, 1], all of the same shape; rows are drawn in the dict's order.
        spacing: ``(sx, sy, sz)`` voxel size in mm (sets the aspect ratio of each view).
        z: axial slice to show; the middle one by default.
        title: figure title.

    Returns:
        The written path.

    Raises:
        ValueError: no volume, a volume not 3-D, shapes that differ, bad spacing, or ``z``
            out of range.
    """
    if not volumes:
        raise ValueError("volumes is empty: give at least one named volume")
    arrays = {name: _check_volume(f"volumes[{name!r}]", volume) for name, volume in volumes.items()}
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"volumes must share one shape, got shapes {shapes}")
    shape = next(iter(shapes.values()))
    views = _views(shape, _check_spacing(spacing), _check_z(z, shape[2]))

    figure = _new_figure(12, 3.6 * len(arrays) + 0.6)
    grid = figure.add_gridspec(len(arrays), 3, hspace=0.2, wspace=0.05)
    for row, (name, volume) in enumerate(arrays.items()):
        for column, (view_name, cut, aspect, labels) in enumerate(views):
            axis = figure.add_subplot(grid[row, column])
            _draw_view(axis, cut(volume), aspect, labels, cmap="gray", vmin=0.0, vmax=1.0)
            axis.set_title(view_name, fontsize=10)
            if column == 0:
                axis.set_ylabel(name, fontsize=12, fontweight="bold")
    if title:
        figure.suptitle(title, fontsize=12)
    return _save(figure, path)


def _check_maps(
    uncertainty: np.ndarray, abs_error: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays as float, float, bool on one grid, or a ValueError naming the problem."""
    uncertainty, abs_error, mask = (
        np.asarray(uncertainty, dtype=float),
        np.asarray(abs_error, dtype=float),
        np.asarray(mask),
    )
    if not uncertainty.shape == abs_error.shape == mask.shape:
        raise ValueError(
            f"uncertainty {uncertainty.shape}, abs_error {abs_error.shape} and mask {mask.shape} must have the "
            "same shape"
        )
    inside = mask.astype(bool)
    # A standard deviation and an absolute error are never negative: a negative value means a
    # signed error (or a variance offset) was passed, and its correlation would mean something else.
    for name, values in (("uncertainty", uncertainty), ("abs_error", abs_error)):
        if np.any(values[inside] < 0):
            raise ValueError(
                f"{name} has negative values inside the mask; pass a standard deviation and an absolute error"
            )
    return uncertainty, abs_error, inside


def uncertainty_error_correlation(uncertainty: np.ndarray, abs_error: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of the per-voxel uncertainty and absolute error inside ``mask``.

    A positive value says the uncertainty is informative: the model is less sure where it is
    more wrong. Voxels where either value is not finite are left out.

    Args:
        uncertainty: per-voxel standard deviation (e.g. over several samples), any shape.
        abs_error: per-voxel absolute error against the ground truth, same shape.
        mask: voxels to use (e.g. the brain), same shape; non-zero means inside.

    Returns:
        r in [-1, 1]; NaN when fewer than two voxels are usable or either value is constant
        over them (the correlation is undefined).

    Raises:
        ValueError: shapes that differ, or negative values inside the mask.
    """
    uncertainty, abs_error, inside = _check_maps(uncertainty, abs_error, mask)
    a, b = uncertainty[inside], abs_error[inside]
    usable = np.isfinite(a) & np.isfinite(b)
    a, b = a[usable], b[usable]
    # Constancy is tested on the raw values: after centring, a constant array keeps rounding
    # residue of its mean and would give a meaningless tiny r instead of "undefined".
    if a.size < 2 or a.min() == a.max() or b.min() == b.max():
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    r = float(np.dot(a, b) / math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b))))
    return min(1.0, max(-1.0, r))


def _display_top(values: np.ndarray) -> float:
    """Top of a colour scale: a high percentile of the finite values, never an empty range."""
    finite = values[np.isfinite(values)]
    top = float(np.percentile(finite, MAP_PERCENTILE)) if finite.size else 0.0
    return top if top > 0 else 1.0


def plot_uncertainty_and_error(
    path: str | os.PathLike[str],
    uncertainty: np.ndarray,
    abs_error: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    z: int | None = None,
    title: str = "",
) -> Path:
    """Plot the uncertainty map and the absolute error map (three views each) and write it as PNG.

    Two rows, uncertainty (per-voxel standard deviation) then absolute error, of the same
    three views as :func:`plot_montage`; outside ``mask`` both are shown as 0. Each row has
    one colour bar shared by its three views (one scale per quantity, from 0 to the 99.5th
    percentile inside the mask), and the heading gives the Pearson correlation of the two
    inside the mask (:func:`uncertainty_error_correlation`).

    Args:
        path: destination PNG (written to a temporary name beside it, then renamed).
        uncertainty: ``(X, Y, Z)`` per-voxel standard deviation.
        abs_error: ``(X, Y, Z)`` absolute error against the ground truth.
        mask: ``(X, Y, Z)`` voxels that count (e.g. the brain); non-zero means inside.
        spacing: ``(sx, sy, sz)`` voxel size in mm.
        z: axial slice to show; the middle one by default.
        title: first line of the heading.

    Returns:
        The written path.

    Raises:
        ValueError: arrays not 3-D or of different shapes, negative values inside the mask,
            bad spacing, or ``z`` out of range.
    """
    uncertainty = _check_volume("uncertainty", uncertainty)
    abs_error = _check_volume("abs_error", abs_error)
    uncertainty, abs_error, inside = _check_maps(uncertainty, abs_error, mask)
    views = _views(uncertainty.shape, _check_spacing(spacing), _check_z(z, uncertainty.shape[2]))
    r = uncertainty_error_correlation(uncertainty, abs_error, inside)

    rows = []
    for name, values in (("uncertainty (std)", uncertainty), ("absolute error", abs_error)):
        shown = np.where(inside, values, 0.0)
        rows.append((name, shown, _display_top(shown[inside])))

    figure = _new_figure(12.5, 8)
    grid = figure.add_gridspec(2, 3, hspace=0.2, wspace=0.05)
    for row, (name, shown, top) in enumerate(rows):
        axes = []
        for column, (view_name, cut, aspect, labels) in enumerate(views):
            axis = figure.add_subplot(grid[row, column])
            artist = _draw_view(axis, cut(shown), aspect, labels, cmap="magma", vmin=0.0, vmax=top)
            axis.set_title(view_name, fontsize=10)
            if column == 0:
                axis.set_ylabel(name, fontsize=12, fontweight="bold")
            axes.append(axis)
        figure.colorbar(artist, ax=axes, fraction=0.025, pad=0.01, label=name)
    usable = int((inside & np.isfinite(uncertainty) & np.isfinite(abs_error)).sum())
    correlation = f"r = {r:.3f}" if math.isfinite(r) else "r undefined (a constant map or too few voxels)"
    heading = (
        f"Pearson correlation of uncertainty and absolute error inside the mask: {correlation} (n = {usable} voxels)"
    )
    figure.suptitle(f"{title}\n{heading}" if title else heading, fontsize=11)
    return _save(figure, path)
