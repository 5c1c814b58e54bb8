"""Brain extraction for real head CT: the intracranial cavity found from Hounsfield units.

A head CT shows the skull as a shell of bone (hundreds to ~2000 HU) around soft tissue
(CSF ~8 HU, white matter ~28, grey matter ~40, fresh blood up to ~90). The intracranial mask
is the soft tissue that the skull encloses:

1. bone = voxels above :data:`BONE_HU`, without specks (calcifications, streak fragments);
   of that, the skull is the thick components: the table, the head holder and metal streaks
   are thin (1-2 mm) in the axial plane and are dropped (:func:`skull_shell`);
2. per axial slice, the skull is closed over sutures and small foramina, and a voxel counts
   as enclosed when rays in at least :data:`MIN_ENCLOSING_DIRECTIONS` of 8 in-plane
   directions meet it (:func:`enclosing_directions`). Unlike filling the holes of a closed
   ring, this keeps slices whose ring is open (orbits and foramina at the skull base, a burr
   hole or craniotomy) while the scalp, the eyes and the table region stay out. The
   soft-tissue voxels (:data:`SOFT_TISSUE_HU`) that are enclosed are the candidates;
3. in 3-D, holes are filled and a morphological opening (radius in millimetres, so it means
   the same on 0.5 mm and 2 mm pixels and 1-5 mm slices) cuts the thin bridges through the
   skull base (foramina, vessels, partial-volume seams) before the largest region is kept;
4. per slice, a region of the mask that comes near the air outside the head has leaked out
   through an open ring and is dropped, so a partial or cut volume cannot leak to the whole
   slice.

:func:`extract_brain` returns ``None`` for an input with essentially no bone (already
brain-only, e.g. a synthetic CT that is -1000 HU outside the brain) and raises
:class:`~lib.io.errors.VolumeReadError` for a volume that is not a usable head CT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from lib.data.model_frame import largest_component
from lib.io.errors import VolumeReadError
from lib.io.volume import Volume

# Bone threshold. Cancellous bone (diploe) is ~300-600 HU and compact bone 1000-2000 HU,
# while soft tissue, blood and enhancing vessels stay below ~150 HU and small calcifications
# are removed by size below; 300 HU keeps the diploe in the shell (so the ring is closed)
# without taking partial-volume soft tissue.
BONE_HU = 300.0
# Intracranial soft tissue: CSF (~0-15 HU) to fresh blood (~90 HU), with margin for noise.
# Fat (-100), air (-1000), partial-volume bone edges (>100) and metal streaks fall outside.
SOFT_TISSUE_HU = (-20.0, 100.0)
# Bone components smaller than this (ml) are not skull: calcifications (pineal, choroid
# plexus), metal-streak fragments, noise specks. A skull ring in one 2.5 mm slice holds
# several ml, so real skull pieces are far larger.
MIN_BONE_COMPONENT_ML = 0.2
# Below this much bone (ml) the volume has no skull at all: treat it as brain-only input.
# A real head CT holds hundreds of ml of bone; even a thin cut through the vertex holds tens.
MIN_SKULL_ML = 5.0
# Closing radius (mm) that bridges sutures, emissary foramina and beam-hardening gaps in the
# skull ring of an axial slice, so rays do not escape through them. Much larger would also
# close real openings (orbits, foramen magnum) and shut out brain next to them.
RING_CLOSING_MM = 2.0
# Skull components are thick: at least this fraction of their voxels lies deeper than
# SKULL_CORE_MM (and at least 1.5 pixels) inside the bone, in-plane. The table, head holder
# and metal streaks are 1-2 mm thin; the skull is 3-10 mm thick over most of the vault.
SKULL_CORE_MM = 1.5
SKULL_THICK_FRACTION = 0.05
# Of the 8 in-plane ray directions, this many must meet the skull for a voxel to count as
# enclosed: one may escape through a defect or an open foramen, while the scalp (at most
# ~5) and the eyes in the orbits (open in front, ~5-6) stay out.
MIN_ENCLOSING_DIRECTIONS = 7
# Less enclosed soft tissue than this (ml) means no skull encloses anything: not a head.
MIN_ENCLOSED_ML = 1.0
# Opening radius (mm) of the 3-D candidate region: cuts bridges thinner than ~2x this (optic
# nerves, vessels through foramina, partial-volume seams at the skull base) and the rim of
# isolated soft-tissue specks, while the brain (tens of mm thick) is restored by the dilation.
OPENING_MM = 3.5
# Air outside the head: below this HU and connected to the slice border.
AIR_HU = -300.0
# Default smallest acceptable brain (ml): a few centimetres of an adult brain (1000-1700 ml
# in full) still pass, a cut through the vertex or the skull base alone does not.
MIN_BRAIN_ML = 100.0


@dataclass
class BrainExtraction:
    """The intracranial mask of a head CT and what was measured on the way.

    Attributes:
        mask: bool ``(X, Y, Z)``, the intracranial cavity (brain, CSF, blood).
        skull: bool ``(X, Y, Z)``, the bone shell that was used to find it.
        brain_fraction: mask voxels / all voxels.
        brain_volume_ml: mask volume in ml (pixel area times the median slice step).
        stats: HU statistics inside the mask (``median_hu``, ``p1_hu``, ``p99_hu``,
            ``fraction_above_150_hu``) and ``skull_fraction_in_mask`` (0 by construction).
    """

    mask: np.ndarray
    skull: np.ndarray
    brain_fraction: float
    brain_volume_ml: float
    stats: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A small JSON-ready record for provenance (fraction, volume, median HU inside)."""
        return {
            "brain_fraction": round(float(self.brain_fraction), 4),
            "brain_volume_ml": round(float(self.brain_volume_ml), 1),
            "inside_median_hu": round(float(self.stats.get("median_hu", float("nan"))), 1),
        }


def voxel_size_mm(volume: Volume) -> tuple[float, float, float]:
    """``(sx, sy, sz)`` in mm; ``sz`` is the median slice step (irregular slices allowed).

    A single-slice volume has no step; its in-plane spacing's mean stands in for it.
    """
    sx, sy = volume.pixel_spacing
    steps = volume.slice_steps
    sz = float(np.median(steps)) if len(steps) else float(np.mean((sx, sy)))
    return float(sx), float(sy), sz


def ellipsoid(radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Boolean structuring element: the voxels within ``radius_mm`` of the centre.

    Axes whose voxel size exceeds the radius get extent 1, so a 2.5 mm radius on 5 mm
    slices works in-plane only.
    """
    half = [int(np.floor(radius_mm / s + 1e-6)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def _remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without its connected components smaller than ``min_voxels``."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def _per_slice(function: Callable[[np.ndarray], np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Apply a 2-D binary operation to every non-empty axial slice of ``mask``."""
    out = np.zeros_like(mask)
    for k in range(mask.shape[2]):
        if mask[:, :, k].any():
            out[:, :, k] = function(mask[:, :, k])
    return out


def _outside_air(hu: np.ndarray) -> np.ndarray:
    """Per slice: the air connected to the slice border (outside the head)."""
    air = hu < AIR_HU
    out = np.zeros_like(air)
    for k in range(hu.shape[2]):
        labels, count = ndimage.label(air[:, :, k])
        if count == 0:
            continue
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        out[:, :, k] = np.isin(labels, border[border > 0])
    return out


def _in_plane_thickness_core(bone: np.ndarray, in_plane: tuple[float, float], radius_mm: float) -> np.ndarray:
    """Bone voxels deeper than ``radius_mm`` inside the bone, measured within each slice."""
    core = np.zeros_like(bone)
    for k in range(bone.shape[2]):
        if bone[:, :, k].any():
            core[:, :, k] = ndimage.distance_transform_edt(bone[:, :, k], sampling=in_plane) > radius_mm
    return core


def skull_shell(bone: np.ndarray, in_plane: tuple[float, float]) -> np.ndarray:
    """The bone components that are skull, not table, head holder or streaks.

    The table, the head holder and metal streaks are thin in the axial plane (1-2 mm) while
    every skull component (cranium, face, mandible, vertebrae) is several millimetres thick
    over much of its extent. A component is kept when at least
    :data:`SKULL_THICK_FRACTION` of its voxels lie deeper than :data:`SKULL_CORE_MM` inside it.
    """
    labels, count = ndimage.label(bone)
    if count == 0:
        return bone
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    # On coarse pixels a 1 mm holder is a line of single pixels, each one pixel from the
    # background: the depth must exceed a pixel and a half to tell it from thick bone.
    core = _in_plane_thickness_core(bone, in_plane, max(SKULL_CORE_MM, 1.5 * max(in_plane)))
    thick = np.bincount(labels[core], minlength=count + 1)
    keep = thick >= SKULL_THICK_FRACTION * sizes
    keep[0] = False
    return keep[labels]


def enclosing_directions(shell: np.ndarray) -> np.ndarray:
    """For every voxel, in how many of 8 in-plane directions a ray meets ``shell`` (0-8).

    The directions are the two axes and the two diagonals of each axial slice, both ways. A
    voxel inside a skull ring meets bone in all 8; one under a skull defect (burr hole,
    craniotomy, an open ring at the skull base) still in most; the scalp outside the skull
    in at most about half. Counting directions, rather than filling holes, keeps a brain
    with a gap in its skull while the scalp over the gap stays out.
    """
    nx, ny, nz = shell.shape
    count = np.zeros(shell.shape, dtype=np.uint8)
    for axis in (0, 1):
        count += np.logical_or.accumulate(shell, axis=axis)
        count += np.flip(np.logical_or.accumulate(np.flip(shell, axis), axis=axis), axis)
    # Diagonals: shear each slice so that a diagonal becomes a column, run along it, shear back.
    x = np.broadcast_to(np.arange(nx)[:, None], (nx, ny))
    y = np.broadcast_to(np.arange(ny)[None, :], (nx, ny))
    for column in (x - y + ny - 1, x + y):
        sheared = np.zeros((nx, nx + ny - 1, nz), dtype=bool)
        sheared[x, column] = shell
        count += np.logical_or.accumulate(sheared, axis=0)[x, column]
        count += np.logical_or.accumulate(sheared[::-1], axis=0)[::-1][x, column]
    return count


def _bounding_box(mask: np.ndarray, margin: tuple[int, int], shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """In-plane bounding box of ``mask`` widened by ``margin`` voxels, all slices."""
    xs = np.nonzero(mask.any(axis=(1, 2)))[0]
    ys = np.nonzero(mask.any(axis=(0, 2)))[0]
    return (
        slice(max(0, xs[0] - margin[0]), min(shape[0], xs[-1] + margin[0] + 1)),
        slice(max(0, ys[0] - margin[1]), min(shape[1], ys[-1] + margin[1] + 1)),
        slice(None),
    )


def _cavity(
    hu: np.ndarray, skull: np.ndarray, spacing: tuple[float, float, float], disk: np.ndarray
) -> np.ndarray | None:
    """The intracranial mask within a box around the skull; None when no soft tissue is enclosed.

    Args:
        hu: CT values in the box.
        skull: the skull shell in the box.
        spacing: voxel size in mm.
        disk: in-plane structuring element of radius :data:`RING_CLOSING_MM`, shape (a, b, 1).
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # 2. Per axial slice: close the shell over sutures and small foramina (the flat structuring
    # element does every slice in one call; padding keeps the closing off the box border),
    # then keep the soft tissue that the shell encloses from (nearly) all directions.
    pad = ((disk.shape[0], disk.shape[0]), (disk.shape[1], disk.shape[1]), (0, 0))
    closed = ndimage.binary_closing(np.pad(skull, pad), structure=disk)
    closed = closed[pad[0][0] : -pad[0][1], pad[1][0] : -pad[1][1]]
    enclosed = (enclosing_directions(closed) >= MIN_ENCLOSING_DIRECTIONS) & ~closed
    candidate = enclosed & (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])
    if candidate.sum() * voxel_ml < MIN_ENCLOSED_ML:
        return None

    # 3. In 3-D: holes filled, thin bridges (foramina, vessels and nerves through the skull
    # base, partial-volume seams towards the face and neck) cut by an opening, then the
    # largest region.
    mask = ndimage.binary_fill_holes(candidate) & enclosed
    ball = ellipsoid(OPENING_MM, spacing)
    # Outside the array counts as brain during the erosion, so a volume cut through the
    # brain keeps its first and last slices instead of losing them to the border.
    mask = ndimage.binary_erosion(mask, structure=ball, border_value=1)
    if not mask.any():
        return mask  # something is enclosed, but too little of it to survive the opening
    mask = largest_component(mask)
    mask = ndimage.binary_dilation(mask, structure=ball) & candidate
    # Holes per slice as well: a cut volume's cavities open to its end slices are no 3-D
    # holes; calcifications and dark streak artefacts inside the brain are filled back.
    mask = _per_slice(ndimage.binary_fill_holes, mask) & enclosed

    # 4. Per-slice sanity: the cavity is separated from the air outside the head by bone, so
    # a region of a slice that comes within the closing radius of that air has leaked out
    # through an open ring (skull base, vertex, a defect) and is dropped.
    outside = ndimage.binary_dilation(_outside_air(hu), structure=disk)
    for k in range(mask.shape[2]):
        labels, count = ndimage.label(mask[:, :, k])
        if count:
            touching = np.unique(labels[outside[:, :, k] & (labels > 0)])
            if touching.size:
                mask[:, :, k] &= ~np.isin(labels, touching)
    return mask


def extract_brain(volume: Volume, min_brain_ml: float = MIN_BRAIN_ML) -> BrainExtraction | None:
    """Find the intracranial cavity of a head CT in HU.

    Args:
        volume: a CT volume in HU (axial slices along the last axis, as every reader gives).
        min_brain_ml: the smallest brain volume (ml) accepted; less means the scan covers too
            little of the brain to be used.

    Returns:
        The mask and measurements, or ``None`` when the volume holds essentially no bone
        (already brain-only input: nothing to extract).

    Raises:
        VolumeReadError: there is bone but no skull encloses soft tissue (not a head CT), or
            the enclosed region is smaller than ``min_brain_ml``.
    """
    hu = np.asarray(volume.array, dtype=np.float32)
    spacing = voxel_size_mm(volume)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    in_plane = spacing[:2]

    # 1. Bone without specks; no bone at all means the input is already brain-only.
    bone = hu > BONE_HU
    bone = _remove_small_components(bone, max(1, int(np.ceil(MIN_BONE_COMPONENT_ML / voxel_ml))))
    if bone.sum() * voxel_ml < MIN_SKULL_ML:
        return None
    skull = skull_shell(bone, in_plane)
    not_a_head = "not a head CT: no skull encloses soft tissue"
    if not skull.any():
        raise VolumeReadError(volume.source, not_a_head)

    # Everything after this works inside the skull's in-plane bounding box (a fraction of the
    # field of view), with a margin so that the closing and the outside air are well defined.
    disk = ellipsoid(RING_CLOSING_MM, in_plane)[:, :, None]
    box = _bounding_box(skull, margin=(disk.shape[0], disk.shape[1]), shape=hu.shape)
    mask_in_box = _cavity(hu[box], skull[box], spacing, disk)
    if mask_in_box is None:
        raise VolumeReadError(volume.source, not_a_head)
    mask = np.zeros(hu.shape, dtype=bool)
    mask[box] = mask_in_box

    volume_ml = float(mask.sum() * voxel_ml)
    if volume_ml < min_brain_ml:
        raise VolumeReadError(
            volume.source,
            f"the scan covers too little of the brain ({volume_ml:.0f} ml inside the skull, "
            f"at least {min_brain_ml:.0f} ml needed)",
        )
    inside = hu[mask]
    p1, median, p99 = np.percentile(inside, [1, 50, 99])
    stats = {
        "median_hu": float(median),
        "p1_hu": float(p1),
        "p99_hu": float(p99),
        "fraction_above_150_hu": float((inside > 150).mean()),
        "skull_fraction_in_mask": float((skull & mask).sum() / skull.sum()),
    }
    return BrainExtraction(
        mask=mask, skull=skull, brain_fraction=float(mask.mean()), brain_volume_ml=volume_ml, stats=stats
    )
