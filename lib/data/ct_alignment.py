"""Rigid alignment of a real head CT to a CT head template in MNI space, and the way back.

The knowledge base tags every training slice with its normalised axial position across the
brain (lib/data/prepare.py, lib/data/model_frame.py): ``(p - low) / (high - low)``, 0 at the
lowest slice with brain (inferior), 1 at the highest (superior), below 0 / above 1 outside the
brain. The training subjects (BraTS, SRI24 atlas space) are already atlas aligned, so that
position is measured along an atlas z axis. A real head CT is not: the head is pitched
(orbito-meatal slices), shifted and cut at arbitrary heights, so the position of a CT slice
from its own brain mask alone is only comparable when the brain mask is complete and the head
is not tilted. :func:`align_to_template` registers the CT rigidly to the CT head template of
the Clinical Toolbox for SPM (``scct.nii``, MNI space, 2 mm) and
:meth:`RigidAlignment.normalised_positions` gives the same convention as the model frame, but
measured along the template's z axis and scaled by the template brain's inferior/superior
extent (from ``scct_stripped.nii``).

Registration (CT fixed, template moving, Mattes mutual information, Euler3D) runs in three
stages: the usual multi-resolution pyramid with random sampling, a deterministic Powell
refinement, and a mid-sagittal symmetry correction for the roll and yaw that a smooth
symmetric template cannot pin down (see :func:`align_to_template`).

Transform convention: :attr:`RigidAlignment.transform` is the ITK registration transform with
the CT as the *fixed* image, so it maps **CT physical points to template physical points**
(both in ITK's LPS millimetres). The public point methods take and return RAS millimetres.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from lib.data.model_frame import CT_FOREGROUND_HU
from lib.io.dicom_writer import RAS_TO_LPS  # ITK works in LPS, the Volume in RAS
from lib.io.errors import VolumeReadError
from lib.io.volume import Volume, slice_normal, volume_from_voxel_affine

# Shipped with the weights (BSD-2, Chris Rorden's Clinical Toolbox for SPM; see MODEL_CARD.md),
# so a clinical host needs nothing beside the repository.
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "model_weights" / "ct_template"
TEMPLATE_FILE = "scct.nii.gz"
TEMPLATE_BRAIN_FILE = "scct_stripped.nii.gz"

# Head = tissue above this (skin, fat at -100, brain, bone); air is -1000, the foam of a head
# rest -900..-700. Also used for the template, which is smooth enough for a clean edge.
HEAD_HU = -300.0
# Intensities are clamped to this window before the metric: the CT's -3024 outside the field
# of view and metal/dense bone above the template's smoothed bone maximum (~1000 HU) would only
# waste histogram bins.
CLAMP_HU = (-1000.0, 1000.0)
# The template is 2 mm isotropic; the CT is binned in-plane to about this pixel size first.
REGISTRATION_PIXEL_MM = 2.0
# The template is an average of many heads and heavily smoothed; smoothing the CT by this
# sigma (mm) makes the two alike (measured on the real CT, MI on the undilated head mask:
# -0.16 unsmoothed, -0.25 smoothed).
FIXED_SMOOTHING_MM = 3.0
HISTOGRAM_BINS = 32
# Stored values below this were never measured (DICOM padding -2000/-3024; air is -1000).
MEASURED_HU = -1500.0
UNMEASURED_HU = -3024.0
# A head holds several litres above HEAD_HU; less means no head (or a tiny cut).
MIN_HEAD_ML = 300.0
# The mirror registration of the symmetry stage moves by twice the residual roll/yaw; more
# than this means it failed, and the template-only result is kept.
MAX_SYMMETRY_DEG = 20.0
# The metric samples the head mask dilated by this much, so the skin/air edge is included.
MASK_DILATION_MM = 6.0

# Mattes mutual information (ITK reports it negated: more negative is better), evaluated
# deterministically on every voxel of the dilated head mask at ~2 mm (:func:`_final_metric`).
# It drives the registration and decides whether the coarse stage needs the end-aligned
# restarts; it no longer decides acceptance (see MIN_CRANIAL_CORRELATION), because its value
# depends on how much of the head a scan covers more than on whether it is a head. Measured
# (session 5, current code): the 2.5 mm study -0.44, its lower half -0.43, upper 40 % -1.10,
# a 12 degree tilted copy -0.43; Debian's Cranium CT -0.31, its upper half -0.74; the study's
# 5 mm series cropped to the skull at 1.46 mm pixels, 29 slices -0.39. But the same head
# re-acquired with a tight field of view (15 mm inside the skull's bounding box) and the chin
# lifted by 20/25/30 degrees, 29 x 5 mm slices up from the skull base, well aligned: -0.28,
# -0.25, -0.22 (the slab holds more face and skull base, which the smooth template does not
# explain, and less of the head's outline against air); non-heads: a box of soft tissue -0.13,
# elliptic cylinders with a bone shell -0.15..-0.17, noise ~0.00. A threshold between -0.22 and
# -0.17 would leave 0.02-0.03 either side; the correlation below leaves far more.
MAX_METRIC = -0.25
# Acceptance: Pearson correlation of the smoothed CT and the moved template over the voxels of
# the metric mask that the fitted transform puts inside the template's cranium (its brain
# dilated by CRANIAL_MARGIN_MM: brain, skull, scalp). Restricting to the cranium drops what the
# template cannot model or does not hold (face, jaw, neck, a table or head holder) and keeps
# the part every head CT shares: soft tissue in a bone ring. Measured on the same inputs as
# MAX_METRIC: real heads 0.64 (2.5 mm study), 0.65 (lower half), 0.90 (upper 40 %), 0.52
# (Cranium), 0.62 (5 mm, cropped to the skull; 0.62 with a couch touching the head), 0.56 /
# 0.48 / 0.41 (tight field of view, chin up 20/25/30 degrees); non-heads -0.05 (box of soft
# tissue), -0.16 / 0.04 (elliptic cylinders with a 1 mm 600 HU / 3 mm 1000 HU shell), 0.19
# (a head-sized cylinder with a 1 cm 1200 HU shell, the closest), 0.01 (noise). 0.30 sits in
# the gap: 0.11 above the phantom, 0.11 below the worst real head. The study upside down now
# registers the right way up (MI -0.45, correlation 0.63) and is refused by MAX_ROTATION_DEG
# (115 degrees); every 2nd slice of it fits the right way up (0.37) and is refused by the
# upside-down check (UPSIDE_DOWN_MARGIN). Limit: a pitched, tight, partial slab can be accepted
# ~16 mm too low (NOTES).
MIN_CRANIAL_CORRELATION = 0.30
# The template brain dilated by this much (mm) covers the skull (~7 mm) and the scalp (~5 mm).
# Worst real head / best non-head at 10, 15, 20, 30 mm: 0.35/0.21, 0.41/0.19, 0.47/0.20, 0.48/0.24.
CRANIAL_MARGIN_MM = 15.0
# After the coarse stage the real CT is already at -0.43: a metric above this fraction of
# MAX_METRIC there is rejected at once instead of refined.
EARLY_REJECT_FRACTION = 0.5
# Registration needs a head-sized stack: at least this many slices spanning this much, and no
# gap wider than MAX_GAP_MM (a wider gap leaves too little of the head to constrain pitch).
MIN_SLICES = 8
MIN_EXTENT_MM = 40.0
MAX_GAP_MM = 20.0
# Powell refinement rounds after the first, while a round ends on its iteration cap (measured:
# the upper half of Cranium needed a second round; whole heads stop within the first).
REFINE_RESTARTS = 2
# Upside-down check: the fit is repeated from the head turned 180 degrees about its
# anterior-posterior axis (from each of TURNED_STARTS; the best correlation counts); a file whose
# head is upside down (superior and inferior swapped in its geometry) fits better that way.
# Refused when the turned fit's cranial correlation beats the found fit's by more than this and
# its mutual information by more than UPSIDE_DOWN_MI_MARGIN. Measured (found / best turned
# correlation, MI): the 2.5 mm study 0.640 / 0.634 (MI -0.436 / -0.450: the smooth template
# fits a turned head almost as well), its upper 40 % 0.90 / 0.01, Cranium 0.52 / 0.49, its
# upper half 0.78 / 0.10, the tight 5 mm slab 0.60 / 0.58, pitched 20 degrees 0.48 / 0.35;
# refused: every 2nd slice of the study upside down 0.37 / 0.64 (MI -0.23 / -0.43) and the
# tight slab upside down 0.47 / 0.60 (MI -0.24 / -0.35).
UPSIDE_DOWN_MARGIN = 0.05
# ... and the turned fit's mutual information must be better by this much: turned over, the
# upright study reached correlation 0.636 (found 0.640) from some starts, with MI -0.448
# against the found -0.436; the upside-down x2 study's turned fits that pass the correlation
# margin are 0.17-0.20 better in MI.
UPSIDE_DOWN_MI_MARGIN = 0.1
# Starts of the turned fit: small rotations (degrees, rotation vector in LPS) of the turned pose.
TURNED_STARTS = ((0.0, 0.0, 0.0), (3.0, 0.0, 0.0), (0.0, 0.0, 3.0))
# After the first start, the others are tried only when it ended within this much (correlation)
# of the found fit. Measured first starts: upright study 0.38 / 0.64, upper 40 % 0.01 / 0.90,
# Cranium's upper half 0.04 / 0.78, pitched slab 0.10 / 0.48 (stop); Cranium 0.49 / 0.52, tight
# slab 0.58 / 0.60, tight slab upside down 0.43 / 0.47 (go on); upside down x2 0.64 / 0.37
# (refused at once).
TURNED_SKIP_MARGIN = 0.2
# Plausible head rotations relative to MNI (pitch of orbito-meatal scanning, patient roll/yaw):
# a larger fitted angle means the optimiser went astray.
MAX_ROTATION_DEG = 45.0


@dataclass(frozen=True)
class CtTemplate:
    """The CT head template: image in HU, masks, and the template brain's z extent.

    Attributes:
        image: float32 HU, LPS, 2 mm, MNI space.
        head_mask: uint8 head (HU > :data:`HEAD_HU`, largest component, holes filled).
        brain_mask: uint8 brain (``scct_stripped`` above -500 HU, the model frame's CT
            foreground threshold, so the template brain edge is where the pipeline's is).
        brain_inferior_mm, brain_superior_mm: template z (mm; LPS and RAS agree on z) of the
            lowest and highest template slices with brain.
        path: the template file.
        cranium_mask: uint8 ``brain_mask`` dilated by :data:`CRANIAL_MARGIN_MM`, where the
            cranial correlation is taken (made once here: every registration evaluates it
            for the found fit and each turned fit).
    """

    image: sitk.Image
    head_mask: sitk.Image
    brain_mask: sitk.Image
    brain_inferior_mm: float
    brain_superior_mm: float
    path: str
    cranium_mask: sitk.Image


def cormack_to_hu(values: np.ndarray) -> np.ndarray:
    """Clinical Toolbox "Cormack" units to Hounsfield units."""
    values = np.asarray(values, dtype=np.float64)
    return values - 1000.0 - 0.9 * np.clip(values - 900.0, 0.0, 2000.0)


def _largest_component_filled(mask: sitk.Image) -> sitk.Image:
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.BinaryFillhole(sitk.Equal(labels, 1))


@functools.lru_cache(maxsize=4)
def load_ct_template(folder: str | Path | None = None) -> CtTemplate:
    """Load (once) the CT head template in HU with its head and brain masks.

    Args:
        folder: the folder with ``scct.nii.gz`` and ``scct_stripped.nii.gz`` (default: the
            copy shipped in ``model_weights/ct_template``).

    Raises:
        FileNotFoundError: naming the missing template file.
    """
    folder = Path(folder) if folder is not None else TEMPLATE_DIR
    paths = [folder / TEMPLATE_FILE, folder / TEMPLATE_BRAIN_FILE]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"CT head template not found: {path} (shipped in model_weights/ct_template; restore it from "
                "the repository)"
            )
    raw = sitk.ReadImage(str(paths[0]), sitk.sitkFloat64)
    image = sitk.GetImageFromArray(cormack_to_hu(sitk.GetArrayFromImage(raw)).astype(np.float32))
    image.CopyInformation(raw)
    stripped_raw = sitk.ReadImage(str(paths[1]), sitk.sitkFloat64)
    stripped = cormack_to_hu(sitk.GetArrayFromImage(stripped_raw))  # (z, y, x)
    brain = stripped > CT_FOREGROUND_HU
    if not brain.any():
        raise FileNotFoundError(f"CT head template brain is empty: {paths[1]}")
    brain_mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    brain_mask.CopyInformation(raw)
    head_mask = _head_mask(image)
    slices = np.nonzero(brain.any(axis=(1, 2)))[0]
    z = [image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(k)))[2] for k in (slices.min(), slices.max())]
    return CtTemplate(
        image,
        head_mask,
        brain_mask,
        float(min(z)),
        float(max(z)),
        str(paths[0]),
        _dilate_mm(brain_mask, CRANIAL_MARGIN_MM),
    )


# --------------------------------------------------------------------------- geometry


def _regular_array(volume: Volume, array: np.ndarray, order: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z, on the volume's slices) on a regular, untilted grid and its voxel affine.

    * Irregular (sparse) slices: each grid slice takes the **nearest acquired slice**. The grid
      step is the smallest acquired step, so every acquired slice lands on a grid slice
      unchanged and in its true place; only the gaps are filled with copies. This was chosen
      over registering on a point set of the acquired slices because ITK's multi-resolution
      pyramid needs a smooth image: nearest-slice filling keeps every real voxel where it was
      and errs symmetrically (at most half a gap) in between, which is the same size as the
      pyramid's smoothing and biases neither up nor down; a point set of thin slices would
      fall between the shrunk grid's samples at the coarse levels. Registration refuses gaps
      above :data:`MAX_GAP_MM` (see :func:`align_to_template`).
    * Gantry tilt (third affine column leaning away from the slice normal): an ITK image
      cannot hold a sheared geometry, so each slice is shifted in-plane (linear interpolation,
      ``fill`` where nothing was measured) onto a grid whose third axis is the slice normal.
      The slice planes are unchanged (a tilt only slides the slice origins within their
      planes), so this is exact up to in-plane interpolation; the shift is centred on the
      middle slice to lose as little of the field of view as possible.
    """
    positions = volume.positions
    affine = volume.affine
    if volume.is_regular():
        step = float(volume.slice_steps.mean()) if len(positions) > 1 else 1.0
        grid_positions = positions.copy()
        regular = np.asarray(array)
    else:
        step = float(volume.slice_steps.min())
        count = int(np.floor((positions[-1] - positions[0]) / step + 1e-6)) + 1
        grid_positions = positions[0] + step * np.arange(count)
        nearest = np.abs(grid_positions[:, None] - positions[None, :]).argmin(axis=1)
        regular = np.asarray(array)[:, :, nearest]

    normal = slice_normal(affine)
    column = affine[:3, 2] / float(affine[:3, 2] @ normal)  # origin motion per mm of normal distance
    lean = column - normal  # in-plane drift per mm (zero without tilt)
    origin = affine[:3, 3].copy()
    if np.linalg.norm(lean) > 1e-6:
        in_plane, *_ = np.linalg.lstsq(affine[:3, :2], lean, rcond=None)  # voxels per mm of p
        middle = float(grid_positions[len(grid_positions) // 2])
        origin = origin + middle * lean
        shifted = np.empty(regular.shape, dtype=np.float32)
        for k, p in enumerate(grid_positions):
            shifted[:, :, k] = ndimage.shift(
                regular[:, :, k].astype(np.float32), (p - middle) * in_plane, order=order, mode="constant", cval=fill
            )
        regular = shifted
    voxel_affine = np.eye(4)
    voxel_affine[:3, :2] = affine[:3, :2]
    voxel_affine[:3, 2] = normal * step
    voxel_affine[:3, 3] = origin + grid_positions[0] * normal
    return regular, voxel_affine


def _to_sitk(array: np.ndarray, voxel_affine: np.ndarray, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """An (X, Y, Z) array with an orthogonal RAS voxel affine as an ITK (LPS) image."""
    lps = RAS_TO_LPS @ voxel_affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise ValueError("the voxel axes are not orthogonal; ITK needs an orthonormal direction matrix")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image = sitk.Cast(image, pixel_type)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((RAS_TO_LPS @ voxel_affine[:3, 3]).tolist())
    return image


def volume_to_sitk(volume: Volume, fill: float = -1000.0) -> sitk.Image:
    """The volume as a float32 SimpleITK image (LPS) in its true physical geometry.

    A regular untilted volume is converted exactly (``volume.voxel_affine()``). A tilted volume
    is resampled in-plane onto an untilted grid, an irregular (sparse) one onto a regular grid
    by nearest acquired slice (see :func:`_regular_array`); ``fill`` is used where nothing was
    measured.
    """
    array, voxel_affine = _regular_array(volume, volume.array, order=1, fill=fill)
    return _to_sitk(array.astype(np.float32, copy=False), voxel_affine)


def sitk_to_volume(image: sitk.Image, **fields: Any) -> Volume:
    """A SimpleITK image (LPS) as a canonical :class:`Volume` (RAS, same physical voxels)."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    voxel_affine = np.eye(4)
    voxel_affine[:3, :3] = RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    voxel_affine[:3, 3] = RAS_TO_LPS @ np.asarray(image.GetOrigin())
    return volume_from_voxel_affine(sitk.GetArrayFromImage(image).transpose(2, 1, 0), voxel_affine, **fields)


def volume_world_points(volume: Volume, k: int) -> np.ndarray:
    """RAS mm of every voxel of slice ``k``: (X, Y, 3), tilt and irregular positions included."""
    i, j = np.meshgrid(np.arange(volume.shape[0]), np.arange(volume.shape[1]), indexing="ij")
    voxels = np.stack([i, j, np.full(i.shape, volume.positions[k]), np.ones(i.shape)], axis=-1)
    return (voxels @ volume.affine.T)[..., :3]


# --------------------------------------------------------------------------- the alignment


@dataclass
class RigidAlignment:
    """A fitted rigid CT -> template alignment.

    Attributes:
        transform: ``sitk.Euler3DTransform`` mapping CT physical points (LPS mm) to template
            physical points (LPS mm): the CT was the fixed image. Its centre is the CT head
            centroid.
        metric: final Mattes mutual information (negative; more negative is better), evaluated
            on every voxel of the dilated CT head mask at ~2 mm (no random sampling).
        converged: the refinement and symmetry stages stopped on their tolerances, not on
            their iteration caps.
        rotation_deg: angles (deg) about the RAS x (R), y (A), z (S) axes of the rotation taking
            CT RAS directions to template RAS directions (ITK's order: R = Rz @ Rx @ Ry).
        translation_mm: RAS mm by which the CT head centroid moves into the template.
        centre_ras: the CT head centroid (RAS mm), the rotation centre.
        brain_inferior_mm, brain_superior_mm: template brain z extent used for positions.
        cranial_correlation: correlation of the smoothed CT and the moved template inside the
            template's cranium, the acceptance measure (see :data:`MIN_CRANIAL_CORRELATION`).
        iterations: optimiser iterations per stage (multiresolution: at its finest level).
        stop_condition: ITK's stop description of the refinement stage.
        seconds: wall time of the registration.
    """

    transform: sitk.Euler3DTransform
    metric: float
    converged: bool
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    centre_ras: tuple[float, float, float]
    brain_inferior_mm: float
    brain_superior_mm: float
    cranial_correlation: float = 0.0
    iterations: dict[str, int] = field(default_factory=dict)
    stop_condition: str = ""
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def _lps_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        matrix = np.asarray(self.transform.GetMatrix()).reshape(3, 3)
        return matrix, np.asarray(self.transform.GetCenter()), np.asarray(self.transform.GetTranslation())

    def ct_points_to_template(self, points_ras: np.ndarray) -> np.ndarray:
        """(N, 3) CT RAS mm -> (N, 3) template RAS mm (MNI)."""
        matrix, centre, translation = self._lps_parts()
        lps = np.atleast_2d(np.asarray(points_ras, dtype=np.float64)) @ RAS_TO_LPS.T
        return ((lps - centre) @ matrix.T + centre + translation) @ RAS_TO_LPS.T

    def template_points_to_ct(self, points_ras: np.ndarray) -> np.ndarray:
        """(N, 3) template RAS mm -> (N, 3) CT RAS mm (the exact inverse)."""
        matrix, centre, translation = self._lps_parts()
        lps = np.atleast_2d(np.asarray(points_ras, dtype=np.float64)) @ RAS_TO_LPS.T
        return ((lps - centre - translation) @ matrix + centre) @ RAS_TO_LPS.T

    def template_z(self, volume: Volume, positions_mm: np.ndarray | None = None) -> np.ndarray:
        """Template z (mm) of the slice centre of each slice position ``p`` of ``volume``.

        The slice centre is where the line through the CT head centroid along the slice normal
        crosses the slice plane at ``p`` (so a tilted acquisition of the same head gives the
        same centres: a tilt slides slice origins within their planes, not the planes).
        """
        positions = np.asarray(volume.positions if positions_mm is None else positions_mm, dtype=np.float64)
        normal = slice_normal(volume.affine)
        origin = volume.affine[:3, 3]
        centre = np.asarray(self.centre_ras)
        # Plane p: normal . (x - origin) = p, because the affine's third column has unit
        # normal component (see lib.io.volume).
        scale = float(volume.affine[:3, 2] @ normal)
        points = centre[None, :] + ((positions * scale) - float(normal @ (centre - origin)))[:, None] * normal[None, :]
        return self.ct_points_to_template(points)[:, 2]

    def normalised_positions(self, volume: Volume, positions_mm: np.ndarray | None = None) -> np.ndarray:
        """Normalised axial positions of slices at ``positions_mm`` (the volume's ``p``).

        Same convention as :meth:`lib.data.model_frame.ModelFrame.normalised_positions` and the
        prepare step: 0 at the inferior end of the brain, 1 at the superior end, linear in
        between, below 0 / above 1 outside; here measured along the template z axis and scaled
        by the template brain's extent. Default positions: the volume's own slices.
        """
        z = self.template_z(volume, positions_mm)
        return (z - self.brain_inferior_mm) / max(self.brain_superior_mm - self.brain_inferior_mm, 1e-6)

    def resample_to_template(
        self, volume: Volume, fill: float = -1000.0, template: CtTemplate | None = None
    ) -> sitk.Image:
        """The volume resampled (linear) onto the template grid (2 mm, MNI)."""
        template = template or load_ct_template()
        inverse = self.transform.GetInverse()  # template points -> CT points, as Resample wants
        return sitk.Resample(
            volume_to_sitk(volume, fill), template.image, inverse, sitk.sitkLinear, fill, sitk.sitkFloat32
        )

    def template_to_volume(
        self, image: sitk.Image, volume: Volume, order: int = 1, fill: float = -1000.0
    ) -> np.ndarray:
        """A template-space image sampled at every voxel of ``volume``: (X, Y, Z) float32.

        The way back: works for tilted and irregular volumes alike, since it maps the true
        world position of every stored voxel.
        """
        data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
        origin = np.asarray(image.GetOrigin())
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        spacing = np.asarray(image.GetSpacing())
        out = np.empty(volume.shape, dtype=np.float32)
        for k in range(volume.shape[2]):
            world = volume_world_points(volume, k).reshape(-1, 3)
            template_lps = self.ct_points_to_template(world) @ RAS_TO_LPS.T
            continuous = ((template_lps - origin) @ direction) / spacing  # ITK index; direction is orthonormal
            out[:, :, k] = ndimage.map_coordinates(data, continuous.T, order=order, mode="constant", cval=fill).reshape(
                volume.shape[:2]
            )
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the alignment."""
        return {
            "transform": "CT physical (LPS mm) -> template physical (LPS mm), Euler3D",
            "rotation_deg": [round(float(a), 3) for a in self.rotation_deg],
            "translation_mm": [round(float(t), 3) for t in self.translation_mm],
            "centre_ras_mm": [round(float(c), 3) for c in self.centre_ras],
            "metric": round(float(self.metric), 5),
            "converged": bool(self.converged),
            "iterations": {k: int(v) for k, v in self.iterations.items()},
            "stop_condition": self.stop_condition,
            "seconds": round(float(self.seconds), 3),
            "template_brain_z_mm": [round(self.brain_inferior_mm, 3), round(self.brain_superior_mm, 3)],
            "symmetry_correction_deg": round(float(self.meta.get("symmetry_correction_deg", 0.0)), 3),
            "cranial_correlation": round(float(self.cranial_correlation), 4),
        }


def _rotation_angles_ras(matrix_lps: np.ndarray) -> tuple[float, float, float]:
    """ITK Euler (ZXY) angles of the RAS-frame rotation, in degrees."""
    ras = RAS_TO_LPS @ matrix_lps @ RAS_TO_LPS
    euler = sitk.Euler3DTransform()
    euler.SetMatrix(ras.ravel().tolist(), 1e-6)
    return tuple(float(np.degrees(a)) for a in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ()))


def _euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """The Euler3D transform inside a registration result (composite or not)."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetBackTransform()
    return sitk.Euler3DTransform(transform)


def _parts(transform: sitk.Euler3DTransform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(transform.GetMatrix()).reshape(3, 3),
        np.asarray(transform.GetCenter()),
        np.asarray(transform.GetTranslation()),
    )


def _like(array_zyx: np.ndarray, reference: sitk.Image, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Cast(sitk.GetImageFromArray(array_zyx), pixel_type)
    image.CopyInformation(reference)
    return image


def _registration_input(
    volume: Volume, mask: np.ndarray | None
) -> tuple[sitk.Image, sitk.Image, sitk.Image, list[int]]:
    """The CT at ~2 mm in HU with unmeasured voxels filled, the measured mask and the head mask.

    Voxels that were never measured (padding below -1500 HU, e.g. -2000/-3024 outside the
    reconstruction circle, or the wedges an untilted or rotated grid leaves) are excluded from
    the metric and filled with the nearest measured value, so that smoothing never turns the
    edge of the field of view into a fake head/air boundary.
    """
    array, voxel_affine = _regular_array(volume, volume.array, order=1, fill=UNMEASURED_HU)
    measured = array > MEASURED_HU
    full = _to_sitk(np.where(measured, np.clip(array, *CLAMP_HU), 0.0).astype(np.float32), voxel_affine)
    weight = _to_sitk(measured.astype(np.float32), voxel_affine)
    factors = [max(int(round(REGISTRATION_PIXEL_MM / s)), 1) for s in full.GetSpacing()]  # thin slices are binned too
    if factors != [1, 1, 1]:
        full, weight = sitk.BinShrink(full, factors), sitk.BinShrink(weight, factors)
    values, fraction = sitk.GetArrayFromImage(full), sitk.GetArrayFromImage(weight)
    inside = fraction >= 0.5
    if not inside.any():
        raise _fail(volume, "no measured voxels")
    values = np.where(inside, values / np.maximum(fraction, 1e-6), CLAMP_HU[0])
    if not inside.all():
        nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
        values = values[tuple(nearest)]
    hu = _like(values.astype(np.float32), full)
    measured_mask = _like(inside.astype(np.uint8), full, sitk.sitkUInt8)
    if mask is not None:
        if mask.shape != volume.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the volume's {volume.shape}")
        mask_array, mask_affine = _regular_array(volume, np.asarray(mask, dtype=np.float32), order=0, fill=0.0)
        mask_image = _to_sitk(mask_array, mask_affine)
        if factors != [1, 1, 1]:
            mask_image = sitk.BinShrink(mask_image, factors)
        head = sitk.And(sitk.BinaryThreshold(mask_image, 0.5, 1e9, 1, 0), measured_mask)
    else:
        head = sitk.And(_head_mask(hu), measured_mask)
    return hu, measured_mask, head, factors


def _head_mask(image: sitk.Image) -> sitk.Image:
    return _largest_component_filled(sitk.BinaryThreshold(image, HEAD_HU, 1e9, 1, 0))


def _dilate_mm(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    radius = [max(int(round(radius_mm / s)), 1) for s in mask.GetSpacing()]
    return sitk.BinaryDilate(mask, radius)


def _mattes(fixed_mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _final_metric(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, transform: sitk.Transform) -> float:
    """Mattes MI on every masked fixed voxel (no random sampling): a reproducible quality."""
    method = _mattes(fixed_mask)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


def _cranial_correlation(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, transform: sitk.Transform, template: CtTemplate
) -> float:
    """Pearson correlation of the CT and the moved template inside the template's cranium.

    The voxels are those of ``fixed_mask`` that ``transform`` puts inside the template brain
    dilated by :data:`CRANIAL_MARGIN_MM` (see :data:`MIN_CRANIAL_CORRELATION`); 0 when fewer
    than two such voxels or no contrast (nothing to correlate is no evidence of a head).
    """
    cranium = template.cranium_mask
    # Copies, not views: a view does not keep its (temporary) image alive, and reading one after
    # the image is freed gave garbage (a correlation of -0.001 for a good registration in CI).
    inside = sitk.GetArrayFromImage(sitk.Resample(cranium, fixed, transform, sitk.sitkNearestNeighbor, 0))
    voxels = inside.astype(bool) & sitk.GetArrayViewFromImage(fixed_mask).astype(bool)
    ct = sitk.GetArrayViewFromImage(fixed)[voxels].astype(np.float64)
    moved = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, CLAMP_HU[0]))
    moved = moved[voxels].astype(np.float64)
    if ct.size < 2 or ct.std() == 0 or moved.std() == 0:
        return 0.0
    return float(np.corrcoef(ct, moved)[0, 1])


def _fits_better_turned(found: tuple[float, float], turned: tuple[float, float]) -> bool:
    """Whether a turned fit (MI, correlation) beats the found one by both margins."""
    return turned[1] > found[1] + UPSIDE_DOWN_MARGIN and turned[0] < found[0] - UPSIDE_DOWN_MI_MARGIN


def _turned_fits(
    fixed, moving, fixed_mask, transform, template: CtTemplate, found: tuple[float, float]
) -> list[tuple[float, float]]:
    """Mutual information and cranial correlation of the fits refined from ``transform`` with the
    head turned 180 degrees about its anterior-posterior axis (through the transform's centre),
    from :data:`TURNED_STARTS` in turn; ``found`` is the found fit's (MI, correlation).

    The search stops at the first fit that beats ``found`` (:func:`_fits_better_turned`), and
    after the first start when that one ends over :data:`TURNED_SKIP_MARGIN` below ``found`` in
    correlation (an upright whole head: 0.38 against 0.64), which spares most scans two of the
    three refinements.

    Turning about A-P swaps superior/inferior and left/right; a head is nearly left-right
    symmetric, so this is the pose a head stored upside down (slices reversed, positions kept)
    needs, and it stays a rotation, which the rigid transform can represent. Several starts
    because the refinement from a turned pose is chaotic: 2-degree changes of the start move
    the fit of the upside-down study's every 2nd slice between correlation 0.20 and 0.64.
    One ITK thread, so that the result does not depend on the machine's thread count.
    """
    matrix, centre, translation = _parts(transform)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    fits = []
    try:
        for start in TURNED_STARTS:
            nudge = Rotation.from_rotvec(np.radians(start)).as_matrix()
            turned = sitk.Euler3DTransform()
            turned.SetCenter(centre.tolist())
            turned.SetMatrix((matrix @ nudge @ np.diag([-1.0, 1.0, -1.0])).ravel().tolist(), 1e-6)
            turned.SetTranslation(translation.tolist())
            refined, _ = _refine(fixed, moving, fixed_mask, turned)
            fit = (
                _final_metric(fixed, moving, fixed_mask, refined),
                _cranial_correlation(fixed, moving, fixed_mask, refined, template),
            )
            fits.append(fit)
            if _fits_better_turned(found, fit) or fit[1] < found[1] - TURNED_SKIP_MARGIN:
                break
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return fits


def _multiresolution(
    fixed, moving, fixed_mask, initial, seed
) -> tuple[sitk.Euler3DTransform, sitk.ImageRegistrationMethod]:
    """Stage 1: the classic pyramid (shrink 4/2/1, smoothing 2/1/0 voxels of ~2 mm), random
    sampling (all voxels at the coarsest level, half, then a tenth), gradient descent with the
    step estimated each iteration (at most 1 mm of physical shift)."""
    method = _mattes(fixed_mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel([1.0, 0.5, 0.1], seed)
    method.SetOptimizerAsGradientDescent(
        learningRate=1.0,
        numberOfIterations=100,
        convergenceMinimumValue=1e-6,
        convergenceWindowSize=10,
        estimateLearningRate=method.EachIteration,
        maximumStepSizeInPhysicalUnits=1.0,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    return _euler(method.Execute(fixed, moving)), method


def _refine(fixed, moving, fixed_mask, transform) -> tuple[sitk.Euler3DTransform, sitk.ImageRegistrationMethod]:
    """Stage 2: Powell on the deterministic metric (every voxel of the CT binned to ~4 mm
    in-plane and ~3 mm between slices).

    The head against a smooth population template gives a long shallow pitch/translation valley
    in which the stochastic stage stops anywhere within 2-5 degrees; a derivative-free search on
    a noise-free metric finishes the descent (measured: the recovery error of a known 8 degree
    rotation fell from 2-5 degrees to 0.5-0.7 with this stage and the symmetry stage).
    """
    spacing = fixed.GetSpacing()
    factors = [max(int(round(target / s)), 1) for target, s in zip((4.0, 4.0, 3.0), spacing)]
    binned = sitk.BinShrink(fixed, factors)
    binned_mask = sitk.BinaryThreshold(sitk.BinShrink(sitk.Cast(fixed_mask, sitk.sitkFloat32), factors), 0.5, 2.0, 1, 0)
    method = _mattes(binned_mask)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetOptimizerAsPowell(
        numberOfIterations=10, maximumLineIterations=10, stepLength=0.5, stepTolerance=0.1, valueTolerance=1e-5
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=False)
    return _euler(method.Execute(binned, moving)), method


def _symmetry(fixed, fixed_mask, transform, seed) -> tuple[sitk.Euler3DTransform, sitk.ImageRegistrationMethod, float]:
    """Stage 3: put the head's own mid-sagittal plane on the template's (MNI x = 0).

    Roll (about A) and yaw (about S) are nearly free against a smooth, left-right symmetric
    template: the metric changes by ~1e-4 over 3 degrees of roll, so two registrations of the
    same head disagreed by up to 4 degrees. The head itself is sharply symmetric, so: mirror
    the CT about the plane that the current transform puts on MNI x = 0 (S = T^-1 Mx T),
    register the mirror to the CT (same modality, mean squares) to get D, for which S D is the
    head's true reflection, and apply half of D: with H = D^(1/2), T' = T H maps the true
    symmetry plane onto x = 0 (H^-1 S H = S D for a reflection S). D only moves the three
    symmetry degrees of freedom, so pitch and the A/S translation from the template stay.
    """
    matrix, centre, translation = _parts(transform)
    offset = centre + translation - matrix @ centre  # T(p) = matrix p + offset
    mirror_x = np.diag([-1.0, 1.0, 1.0])  # LPS x -> -x is the MNI mid-sagittal mirror
    reflection = sitk.AffineTransform(3)
    reflection.SetMatrix((matrix.T @ mirror_x @ matrix).ravel().tolist())
    reflection.SetTranslation((matrix.T @ (mirror_x @ offset - offset)).tolist())
    mirrored = sitk.Resample(fixed, fixed, reflection, sitk.sitkLinear, CLAMP_HU[0])
    mirrored_mask = sitk.Resample(fixed_mask, fixed_mask, reflection, sitk.sitkNearestNeighbor, 0)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricFixedMask(sitk.And(fixed_mask, mirrored_mask))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel([0.5, 0.2], seed)
    method.SetOptimizerAsRegularStepGradientDescent(
        1.0, 1e-3, 200, relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    initial = sitk.Euler3DTransform()
    initial.SetCenter(centre.tolist())
    method.SetInitialTransform(initial, inPlace=False)
    double = _euler(method.Execute(fixed, mirrored))
    d_matrix, _, d_translation = _parts(double)
    rotvec = Rotation.from_matrix(d_matrix).as_rotvec()
    angle = float(np.degrees(np.linalg.norm(rotvec)))
    half = Rotation.from_rotvec(rotvec / 2).as_matrix()
    # H(p) = half (p - c) + c + u with H(H(p)) = D(p)  =>  (half + I) u = D's translation.
    u = np.linalg.solve(half + np.eye(3), d_translation)
    refined = sitk.Euler3DTransform()
    refined.SetCenter(centre.tolist())
    refined.SetMatrix((matrix @ half).ravel().tolist(), 1e-6)
    refined.SetTranslation((matrix @ u + translation).tolist())
    return refined, method, angle


def _z_range(mask: sitk.Image) -> tuple[float, float]:
    """Lowest and highest physical z (mm) of a mask's voxels."""
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(mask))
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    z = mask.GetOrigin()[2] + (np.c_[i, j, k] * np.asarray(mask.GetSpacing())) @ direction[2]
    return float(z.min()), float(z.max())


def _end_aligned_starts(
    head: sitk.Image, template_head: sitk.Image, initial: sitk.Transform
) -> list[sitk.Euler3DTransform]:
    """The centred start shifted along z so the CT head's top, then its bottom, meets the template head's.

    For a scan of part of the head (the vertex only, the skull base only) the moments start puts
    the part's centroid on the whole template head's centroid, several centimetres off, and
    the pyramid may not get out of that: measured on the upper 40 % of the real CT with a 12-15
    degree gantry tilt, the centred start ended at MI -0.09, the top-aligned one at -1.1.
    """
    ct_low, ct_high = _z_range(head)
    template_low, template_high = _z_range(template_head)
    starts = []
    for shift in (template_high - ct_high, template_low - ct_low):
        start = _euler(initial)
        translation = list(start.GetTranslation())
        translation[2] = shift
        start.SetTranslation(translation)
        starts.append(start)
    return starts


def _fail(volume: Volume, why: str) -> VolumeReadError:
    return VolumeReadError(volume.source or "<volume>", f"registration to the head CT template failed: {why}")


@contextlib.contextmanager
def _itk_stops(volume: Volume) -> Iterator[None]:
    """ITK's errors inside the block (e.g. too few samples inside both images) raised as the
    :class:`VolumeReadError` of :func:`_fail`, naming the file and ITK's last line."""
    try:
        yield
    except RuntimeError as error:
        raise _fail(volume, f"ITK stopped: {str(error).strip().splitlines()[-1]}") from error


def too_short_to_register(volume: Volume) -> str | None:
    """Why the slice stack is too small to register (too few slices, too short, too wide a gap), or None.

    A cut this small does not pin down the head's pitch; the caller decides what to do instead.
    """
    positions = volume.positions
    extent = float(positions[-1] - positions[0]) if len(positions) else 0.0
    if len(positions) < MIN_SLICES or extent < MIN_EXTENT_MM:
        return (
            f"{len(positions)} slices spanning {extent:.1f} mm are too few to register (need >= {MIN_SLICES} "
            f"slices over >= {MIN_EXTENT_MM:.0f} mm)"
        )
    if len(positions) > 1 and float(volume.slice_steps.max()) > MAX_GAP_MM:
        return (
            f"slice gaps up to {float(volume.slice_steps.max()):.1f} mm are too wide to register (max "
            f"{MAX_GAP_MM:.0f} mm)"
        )
    return None


def _check_registrable(volume: Volume) -> None:
    problem = too_short_to_register(volume)
    if problem is not None:
        raise _fail(volume, problem)
    if not np.isfinite(volume.array).all():
        raise _fail(volume, "the volume holds non-finite values")


def _stopped_by_tolerance(method: sitk.ImageRegistrationMethod) -> bool:
    return "maximum number of iterations" not in method.GetOptimizerStopConditionDescription().lower()


def align_to_template(
    volume: Volume,
    mask: np.ndarray | None = None,
    max_metric: float = MAX_METRIC,
    template: CtTemplate | None = None,
    seed: int = 20240601,
    min_correlation: float = MIN_CRANIAL_CORRELATION,
) -> RigidAlignment:
    """Rigidly register a head CT (HU) to the CT head template (CT fixed, template moving).

    Preparation: the CT on a regular untilted grid, binned in-plane to ~2 mm (the template's
    voxel size), intensities clamped to :data:`CLAMP_HU`, unmeasured voxels masked and filled,
    smoothed by :data:`FIXED_SMOOTHING_MM` (the template is a heavily smoothed average); head
    masks at :data:`HEAD_HU` (or ``mask``, an (X, Y, Z) head mask on the volume's slices); the
    Euler transform centred by the head masks' moments. Then Mattes mutual information on the
    dilated head mask in three stages: the multi-resolution pyramid, a deterministic Powell
    refinement, and the mid-sagittal symmetry correction (see the stage functions).

    Acceptance is the CT's correlation with the template inside the template's cranium
    (:data:`MIN_CRANIAL_CORRELATION`), not the mutual information, whose value follows the
    scan's coverage (see :data:`MAX_METRIC`): a tight field of view over the skull base gives a
    well-aligned real head a metric as poor as a phantom's.

    Args:
        volume: the head CT in HU (tilted and irregularly spaced slices allowed).
        mask: optional (X, Y, Z) head mask on the volume's slices (default: above :data:`HEAD_HU`).
        max_metric: mutual information below which the coarse stage is trusted without the
            end-aligned restarts; above ``EARLY_REJECT_FRACTION`` of it, not a head.
        template: the CT template (default: the shipped one).
        seed: of the random metric sampling.
        min_correlation: the smallest accepted cranial correlation.

    Raises:
        VolumeReadError: (message contains "registration") for too few / too widely spaced
            slices, no head, an optimiser that did not converge, an implausible rotation, a
            cranial correlation below ``min_correlation``, or a head that fits the template
            better turned upside down (:data:`UPSIDE_DOWN_MARGIN`).
    """
    started = time.perf_counter()
    template = template or load_ct_template()
    _check_registrable(volume)
    hu, measured, head, factors = _registration_input(volume, mask)
    head_ml = float(sitk.GetArrayViewFromImage(head).sum()) * float(np.prod(head.GetSpacing())) / 1000.0
    if head_ml < MIN_HEAD_ML:
        raise _fail(volume, f"no head found (only {head_ml:.0f} ml above {HEAD_HU:.0f} HU; need {MIN_HEAD_ML:.0f} ml)")
    fixed = sitk.SmoothingRecursiveGaussian(hu, FIXED_SMOOTHING_MM)
    fixed_mask = sitk.And(_dilate_mm(head, MASK_DILATION_MM), measured)
    moving = sitk.Clamp(template.image, sitk.sitkFloat32, *CLAMP_HU)
    initial = sitk.CenteredTransformInitializer(
        sitk.Cast(head, sitk.sitkFloat32),
        sitk.Cast(template.head_mask, sitk.sitkFloat32),
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    with _itk_stops(volume):
        coarse, stage1 = _multiresolution(fixed, moving, fixed_mask, initial, seed)
        coarse_metric = _final_metric(fixed, moving, fixed_mask, coarse)
        if not coarse_metric <= max_metric:
            # A partial scan's centroid is not the template head's: start again with the
            # scan's top (or bottom) on the template head's and keep the best.
            for start in _end_aligned_starts(head, template.head_mask, initial):
                candidate, method = _multiresolution(fixed, moving, fixed_mask, start, seed)
                candidate_metric = _final_metric(fixed, moving, fixed_mask, candidate)
                if candidate_metric < coarse_metric:
                    coarse, stage1, coarse_metric = candidate, method, candidate_metric
        if not coarse_metric <= max_metric * EARLY_REJECT_FRACTION:
            # Far from any head (noise: ~0.00): stop before the slower stages.
            raise _fail(
                volume,
                f"Mattes mutual information {coarse_metric:.3f} after the coarse stage is far worse than "
                f"{max_metric:.3f}: not a head CT",
            )
        refined, stage2 = _refine(fixed, moving, fixed_mask, coarse)
        for _ in range(REFINE_RESTARTS):
            if _stopped_by_tolerance(stage2):
                break
            # A long way to go (a partial scan that started far off): carry on from where the
            # iteration cap stopped it rather than give up.
            refined, stage2 = _refine(fixed, moving, fixed_mask, refined)
        transform, stage3, symmetry_deg = _symmetry(fixed, fixed_mask, refined, seed)
    if symmetry_deg > MAX_SYMMETRY_DEG:
        # The mirror registration went astray (a very asymmetric head, a partial field of
        # view): keep the template-only result rather than a wild correction.
        transform, symmetry_used = refined, False
    else:
        symmetry_used = True
    # Stage 1 may end on its iteration cap: stage 2 finishes its descent. Stages 2 and 3 must
    # stop on their tolerances.
    capped = [
        name
        for name, stage, used in (("refinement", stage2, True), ("symmetry", stage3, symmetry_used))
        if used and not _stopped_by_tolerance(stage)
    ]
    converged = not capped
    metric = _final_metric(fixed, moving, fixed_mask, transform)
    correlation = _cranial_correlation(fixed, moving, fixed_mask, transform, template)

    matrix, centre, translation = _parts(transform)
    rotation = float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1, 1))))
    alignment = RigidAlignment(
        transform=transform,
        metric=metric,
        converged=converged,
        rotation_deg=_rotation_angles_ras(matrix),
        translation_mm=tuple(float(t) for t in RAS_TO_LPS @ translation),
        centre_ras=tuple(float(c) for c in RAS_TO_LPS @ centre),
        brain_inferior_mm=template.brain_inferior_mm,
        brain_superior_mm=template.brain_superior_mm,
        cranial_correlation=correlation,
        iterations={
            "multiresolution": int(stage1.GetOptimizerIteration()),
            "refine": int(stage2.GetOptimizerIteration()),
            "symmetry": int(stage3.GetOptimizerIteration()),
        },
        stop_condition=stage2.GetOptimizerStopConditionDescription(),
        seconds=time.perf_counter() - started,
        meta={
            "rotation_total_deg": rotation,
            "symmetry_correction_deg": symmetry_deg / 2,
            "symmetry_used": symmetry_used,
            "head_ml": head_ml,
            "binning": factors,
            "metric_before_symmetry": _final_metric(fixed, moving, fixed_mask, refined),
        },
    )
    if not converged:
        raise _fail(
            volume,
            f"the optimiser did not converge (the {' and '.join(capped)} stage hit its iteration cap; metric "
            f"{metric:.3f})",
        )
    if not correlation >= min_correlation:
        raise _fail(
            volume,
            f"correlation with the template inside its cranium {correlation:.3f} is below {min_correlation:.2f} "
            f"(Mattes mutual information {metric:.3f}): not a head CT or badly misaligned",
        )
    if rotation > MAX_ROTATION_DEG:
        raise _fail(volume, f"implausible rotation of {rotation:.1f} degrees to the template")
    with _itk_stops(volume):
        fits = _turned_fits(fixed, moving, fixed_mask, transform, template, (metric, correlation))
    # The search stops at a refusing fit, so only the last can refuse; the record keeps the
    # best-correlated one (the refusing one when there is one: it beats the found correlation).
    turned_metric, turned_correlation = max(fits, key=lambda fit: fit[1])
    alignment.meta["turned_fit"] = {
        "metric": turned_metric,
        "cranial_correlation": turned_correlation,
        "starts": len(fits),
    }
    if _fits_better_turned((metric, correlation), fits[-1]):
        raise _fail(
            volume,
            f"the head fits the template better turned upside down (correlation {fits[-1][1]:.2f} against "
            f"{correlation:.2f}): superior and inferior look swapped in the series' geometry; check its slice "
            "positions and orientation",
        )
    return alignment
