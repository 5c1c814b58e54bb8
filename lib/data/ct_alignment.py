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

Transform convention: :attr:`RigidAlignment.transform` is the ITK registration transform with
the CT as the *fixed* image, so it maps **CT physical points to template physical points**
(both in ITK's LPS millimetres). The public point methods take and return RAS millimetres.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lib.data.model_frame import CT_FOREGROUND_HU
from lib.io.errors import VolumeReadError
from lib.io.volume import Volume, slice_normal, volume_from_voxel_affine

TEMPLATE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct_template"
TEMPLATE_FILE = "scct.nii"
TEMPLATE_BRAIN_FILE = "scct_stripped.nii"

# ITK works in LPS, the Volume in RAS: flip x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Head = tissue above this (skin, fat at -100, brain, bone); air is -1000, the foam of a head
# rest -900..-700. Also used for the template, which is smooth enough for a clean edge.
HEAD_HU = -300.0
# Intensities are clamped to this window before the metric: the CT's -3024 outside the field
# of view and metal/dense bone above the template's smoothed bone maximum (~1000 HU) would only
# waste histogram bins.
CLAMP_HU = (-1000.0, 1000.0)
# The template is 2 mm isotropic; the CT is binned in-plane to about this pixel size first.
REGISTRATION_PIXEL_MM = 2.0
# The metric samples the head mask dilated by this much, so the skin/air edge is included.
MASK_DILATION_MM = 6.0

# Acceptance threshold on the final Mattes mutual information (ITK reports it negated: more
# negative is better), evaluated deterministically on every head voxel at ~2 mm (see
# :func:`_final_metric`). Measured: the real 2.5 mm head CT (full or 128x128 copy) ~ -0.58,
# the same CT rotated 8 deg / shifted 10 mm ~ -0.58, a 12 deg tilted copy ~ -0.58; a noise
# volume ~ -0.01, a uniform box phantom ~ -0.07, a cylinder "head" ~ -0.15, the CT
# registered with a 180 deg flip about z ~ -0.26 (see tests/data/test_ct_alignment.py).
# -0.35 sits between: correctly aligned real heads are far below it, non-heads and grossly
# misaligned heads far above.
MAX_METRIC = -0.35
# Registration needs a head-sized stack: at least this many slices spanning this much, and no
# gap wider than MAX_GAP_MM (a wider gap leaves too little of the head to constrain pitch).
MIN_SLICES = 8
MIN_EXTENT_MM = 40.0
MAX_GAP_MM = 20.0
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
    """

    image: sitk.Image
    head_mask: sitk.Image
    brain_mask: sitk.Image
    brain_inferior_mm: float
    brain_superior_mm: float
    path: str


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
        folder: the folder with ``scct.nii`` and ``scct_stripped.nii`` (default:
            ``../shared/data/ct_template`` beside the repository).

    Raises:
        FileNotFoundError: naming the missing template file.
    """
    folder = Path(folder) if folder is not None else TEMPLATE_DIR
    paths = [folder / TEMPLATE_FILE, folder / TEMPLATE_BRAIN_FILE]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"CT head template not found: {path} (needs ../shared/data/ct_template beside the repository)")
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
    head_mask = _largest_component_filled(sitk.BinaryThreshold(image, HEAD_HU, 1e9, 1, 0))
    slices = np.nonzero(brain.any(axis=(1, 2)))[0]
    z = [image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(k)))[2] for k in (slices.min(), slices.max())]
    return CtTemplate(image, head_mask, brain_mask, float(min(z)), float(max(z)), str(paths[0]))


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
            shifted[:, :, k] = ndimage.shift(regular[:, :, k].astype(np.float32), (p - middle) * in_plane, order=order, mode="constant", cval=fill)
        regular = shifted
    voxel_affine = np.eye(4)
    voxel_affine[:3, :2] = affine[:3, :2]
    voxel_affine[:3, 2] = normal * step
    voxel_affine[:3, 3] = origin + grid_positions[0] * normal
    return regular, voxel_affine


def _to_sitk(array: np.ndarray, voxel_affine: np.ndarray, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """An (X, Y, Z) array with an orthogonal RAS voxel affine as an ITK (LPS) image."""
    lps = _RAS_TO_LPS @ voxel_affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise ValueError("the voxel axes are not orthogonal; ITK needs an orthonormal direction matrix")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image = sitk.Cast(image, pixel_type)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((_RAS_TO_LPS @ voxel_affine[:3, 3]).tolist())
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
    voxel_affine[:3, :3] = _RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    voxel_affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.GetOrigin())
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
            on all head voxels at ~2 mm.
        converged: the optimiser stopped on its step/gradient criterion, not the iteration cap.
        rotation_deg: angles (deg) about the RAS x (R), y (A), z (S) axes of the rotation taking
            CT RAS directions to template RAS directions (ITK's order: R = Rz @ Rx @ Ry).
        translation_mm: RAS mm by which the CT head centroid moves into the template.
        centre_ras: the CT head centroid (RAS mm), the rotation centre.
        brain_inferior_mm, brain_superior_mm: template brain z extent used for positions.
        iterations: optimiser iterations at the finest level.
        stop_condition: ITK's stop description.
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
    iterations: int = 0
    stop_condition: str = ""
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def _lps_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        matrix = np.asarray(self.transform.GetMatrix()).reshape(3, 3)
        return matrix, np.asarray(self.transform.GetCenter()), np.asarray(self.transform.GetTranslation())

    def ct_points_to_template(self, points_ras: np.ndarray) -> np.ndarray:
        """(N, 3) CT RAS mm -> (N, 3) template RAS mm (MNI)."""
        matrix, centre, translation = self._lps_parts()
        lps = np.atleast_2d(np.asarray(points_ras, dtype=np.float64)) @ _RAS_TO_LPS.T
        return ((lps - centre) @ matrix.T + centre + translation) @ _RAS_TO_LPS.T

    def template_points_to_ct(self, points_ras: np.ndarray) -> np.ndarray:
        """(N, 3) template RAS mm -> (N, 3) CT RAS mm (the exact inverse)."""
        matrix, centre, translation = self._lps_parts()
        lps = np.atleast_2d(np.asarray(points_ras, dtype=np.float64)) @ _RAS_TO_LPS.T
        return ((lps - centre - translation) @ matrix + centre) @ _RAS_TO_LPS.T

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

    def resample_to_template(self, volume: Volume, fill: float = -1000.0, template: CtTemplate | None = None) -> sitk.Image:
        """The volume resampled (linear) onto the template grid (2 mm, MNI)."""
        template = template or load_ct_template()
        inverse = self.transform.GetInverse()  # template points -> CT points, as Resample wants
        return sitk.Resample(volume_to_sitk(volume, fill), template.image, inverse, sitk.sitkLinear, fill, sitk.sitkFloat32)

    def template_to_volume(self, image: sitk.Image, volume: Volume, order: int = 1, fill: float = -1000.0) -> np.ndarray:
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
            template_lps = self.ct_points_to_template(world) @ _RAS_TO_LPS.T
            continuous = ((template_lps - origin) @ direction) / spacing  # ITK index; direction is orthonormal
            out[:, :, k] = ndimage.map_coordinates(data, continuous.T, order=order, mode="constant", cval=fill).reshape(volume.shape[:2])
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
            "iterations": int(self.iterations),
            "stop_condition": self.stop_condition,
            "seconds": round(float(self.seconds), 3),
            "template_brain_z_mm": [round(self.brain_inferior_mm, 3), round(self.brain_superior_mm, 3)],
        }


def _rotation_angles_ras(matrix_lps: np.ndarray) -> tuple[float, float, float]:
    """ITK Euler (ZXY) angles of the RAS-frame rotation, in degrees."""
    ras = _RAS_TO_LPS @ matrix_lps @ _RAS_TO_LPS
    euler = sitk.Euler3DTransform()
    euler.SetMatrix(ras.ravel().tolist(), 1e-6)
    return tuple(float(np.degrees(a)) for a in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ()))


def _head_mask(image: sitk.Image) -> sitk.Image:
    return _largest_component_filled(sitk.BinaryThreshold(image, HEAD_HU, 1e9, 1, 0))


def _dilate_mm(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    radius = [max(int(round(radius_mm / s)), 1) for s in mask.GetSpacing()]
    return sitk.BinaryDilate(mask, radius)


def _registration_method(fixed_mask: sitk.Image, seed: int) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetNumberOfThreads(1)
    return method


def _final_metric(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, transform: sitk.Transform) -> float:
    """Mattes MI on every masked fixed voxel (no random sampling): a reproducible quality."""
    method = _registration_method(fixed_mask, 0)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


def _fail(volume: Volume, why: str) -> VolumeReadError:
    return VolumeReadError(volume.source or "<volume>", f"registration to the head CT template failed: {why}")


def _check_registrable(volume: Volume) -> None:
    positions = volume.positions
    extent = float(positions[-1] - positions[0]) if len(positions) else 0.0
    if len(positions) < MIN_SLICES or extent < MIN_EXTENT_MM:
        raise _fail(volume, f"{len(positions)} slices spanning {extent:.1f} mm is not regular enough to register (need >= {MIN_SLICES} slices over >= {MIN_EXTENT_MM:.0f} mm)")
    if len(positions) > 1 and float(volume.slice_steps.max()) > MAX_GAP_MM:
        raise _fail(volume, f"slice gaps up to {float(volume.slice_steps.max()):.1f} mm are not regular enough to register (max {MAX_GAP_MM:.0f} mm)")
    if not np.isfinite(volume.array).all():
        raise _fail(volume, "the volume holds non-finite values")


def align_to_template(
    volume: Volume,
    mask: np.ndarray | None = None,
    max_metric: float = MAX_METRIC,
    template: CtTemplate | None = None,
    seed: int = 20240601,
) -> RigidAlignment:
    """Rigidly register a head CT (HU) to the CT head template.

    Steps: bin the CT in-plane to ~2 mm (the template's voxel size); head masks at
    :data:`HEAD_HU` (or ``mask``, an (X, Y, Z) head/brain mask on the volume's slices);
    centre the Euler transform by the masks' moments; Mattes mutual information on the
    (dilated) CT head mask with intensities clamped to :data:`CLAMP_HU`, 3 levels (shrink
    4/2/1, smoothing 2/1/0 voxels of ~2 mm), regular-step gradient descent.

    Raises:
        VolumeReadError: (message contains "registration") for too few / too widely spaced
            slices, no head, an optimiser that did not converge, an implausible rotation, or
            a final metric above ``max_metric``.
    """
    started = time.perf_counter()
    template = template or load_ct_template()
    _check_registrable(volume)

    array, voxel_affine = _regular_array(volume, volume.array, order=1, fill=CLAMP_HU[0])
    fixed_full = _to_sitk(np.clip(array, *CLAMP_HU), voxel_affine)
    spacing = fixed_full.GetSpacing()
    factors = [max(int(round(REGISTRATION_PIXEL_MM / s)), 1) for s in spacing[:2]] + [1]
    fixed = sitk.BinShrink(fixed_full, factors) if factors != [1, 1, 1] else fixed_full
    if mask is not None:
        if mask.shape != volume.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the volume's {volume.shape}")
        mask_array, mask_affine = _regular_array(volume, np.asarray(mask, dtype=np.float32), order=0, fill=0.0)
        head = sitk.BinaryThreshold(sitk.BinShrink(_to_sitk(mask_array, mask_affine), factors), 0.5, 1e9, 1, 0)
    else:
        head = _head_mask(fixed)
    head_ml = float(sitk.GetArrayViewFromImage(head).sum()) * float(np.prod(head.GetSpacing())) / 1000.0
    if head_ml < 100.0:
        raise _fail(volume, f"no head found (only {head_ml:.0f} ml above {HEAD_HU:.0f} HU)")
    fixed_mask = _dilate_mm(head, MASK_DILATION_MM)
    moving = sitk.Clamp(template.image, sitk.sitkFloat32, *CLAMP_HU)

    initial = sitk.CenteredTransformInitializer(
        sitk.Cast(head, sitk.sitkFloat32),
        sitk.Cast(template.head_mask, sitk.sitkFloat32),
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )

    method = _registration_method(fixed_mask, seed)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, seed)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    try:
        result = method.Execute(fixed, moving)
    except RuntimeError as error:  # e.g. too few samples inside both images
        raise _fail(volume, f"ITK stopped: {str(error).strip().splitlines()[-1]}") from error
    transform = sitk.Euler3DTransform(sitk.CompositeTransform(result).GetBackTransform()) if isinstance(result, sitk.CompositeTransform) else sitk.Euler3DTransform(result)
    stop = method.GetOptimizerStopConditionDescription()
    converged = "maximum number of iterations" not in stop.lower()
    metric = _final_metric(fixed, moving, head, transform)

    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    angles = _rotation_angles_ras(matrix)
    rotation = float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1, 1))))
    centre_ras = _RAS_TO_LPS @ np.asarray(transform.GetCenter())
    alignment = RigidAlignment(
        transform=transform,
        metric=metric,
        converged=converged,
        rotation_deg=angles,
        translation_mm=tuple(float(t) for t in _RAS_TO_LPS @ np.asarray(transform.GetTranslation())),
        centre_ras=tuple(float(c) for c in centre_ras),
        brain_inferior_mm=template.brain_inferior_mm,
        brain_superior_mm=template.brain_superior_mm,
        iterations=int(method.GetOptimizerIteration()),
        stop_condition=stop,
        seconds=time.perf_counter() - started,
        meta={"rotation_total_deg": rotation, "head_ml": head_ml, "binning": factors},
    )
    if not converged:
        raise _fail(volume, f"the optimiser did not converge ({stop}; metric {metric:.3f})")
    if not metric <= max_metric:
        raise _fail(volume, f"final Mattes mutual information {metric:.3f} is worse than {max_metric:.3f}: not a head CT or badly misaligned")
    if rotation > MAX_ROTATION_DEG:
        raise _fail(volume, f"implausible rotation of {rotation:.1f} degrees to the template")
    return alignment
