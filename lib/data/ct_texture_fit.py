"""Measuring CT texture on the brain of a CT: noise spectrum, slice correlation, tissue HU.

Used on the real head CTs to fit :mod:`lib.data.ct_texture` and, with the same code, on
synthetic CTs to check that they match. Every measurement works on axial slices resampled
in-plane to the synthesis grid (:data:`~lib.data.ct_texture.GRID_MM`, anti-aliased, as
``prepare`` resizes slices) and inside the brain mask eroded in-plane by :data:`EROSION_MM`
(the skull's partial volume and the beam-hardening rim next to it are not brain texture).

Noise (:func:`measure_noise`): the classic region-of-interest noise power spectrum, on brain
tissue instead of a water phantom. Square patches of :data:`PATCH_MM` that lie inside the
eroded brain and are homogeneous (the range of the HU smoothed by a Gaussian of
:data:`HOMOGENEITY_SMOOTHING_MM` is at most :data:`HOMOGENEITY_RANGE_HU`: white-matter
interiors) have a quadratic trend removed; the mean periodogram, radially averaged, is the
spectrum. Below :data:`FIT_BAND` the brain's anatomy still adds power, so the Gaussian noise
model is fitted inside the band only (a straight line of log power against f^2); its integral
is the noise variance. The noise of neighbouring slices correlates when the slice profile is
wider than the slice spacing: the correlation of the detrended patches of the same place in
adjacent slices gives the profile's width under the Gaussian-profile model
(:func:`thickness_from_correlation`).

Tissue HU (:func:`class_statistics`): brain CT histograms are unimodal (grey and white matter
are 8-12 HU apart with 3-6 HU of noise), so a mixture of the raw HU does not separate the
classes. Instead the MNI152 tissue maps are registered to the CT
(:func:`lib.data.atlas.atlas_priors`, affine, the atlas painted as a noise-free CT)
and voxels where a class has probability > :data:`CLASS_PROBABILITY` in a 3 x 3 in-plane
neighbourhood form its region; grey and white matter are summarised by median and robust SD
(1.4826 x MAD). The CSF regions stay mixed with tissue (registration error, small ventricles,
thick slices), so CSF is the lower component of a 2-component Gaussian mixture of its region.

Rim (:func:`measure_rim`; class HU and rim are measured in turn, twice, the classes on the CT
less the rim, since cortex lies near the edge): what the tissue classes do not explain, as a function of the distance
to the brain mask's edge. The CT minus the registered atlas painted with the measured class HU
is summarised by its median in distance bands from :data:`RIM_BANDS_MM` (each at its voxels'
median distance), and ``hu * exp(-d / length) + c`` is fitted to them (``c``: what is left
deep in the brain, a calibration difference). The first millimetres are left out: there the
real CT's brain touches bone (partial volume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from lib.data.atlas import atlas_priors
from lib.data.ct_texture import FWHM_PER_SIGMA, GRID_MM, NoiseModel, RimModel, ScanTexture
from lib.data.model_frame import resize_slices

__all__ = [
    "CLASS_PROBABILITY",
    "EROSION_MM",
    "FIT_BAND",
    "PATCH_MM",
    "ClassStatistics",
    "NoiseMeasurement",
    "TextureMeasurement",
    "class_statistics",
    "eroded_brain",
    "fit_noise_spectrum",
    "homogeneous_patches",
    "measure_noise",
    "measure_rim",
    "measure_texture",
    "radial_power_spectrum",
    "resample_in_plane",
    "thickness_from_correlation",
]

# In-plane erosion of the brain mask before any measurement (mm).
EROSION_MM = 4.0
# Side of the square noise patches (mm): room for several patches in a white-matter region
# while the frequency bins (1 / 24 cycles/mm) still resolve the spectrum's shape.
PATCH_MM = 24.0
HOMOGENEITY_SMOOTHING_MM = 3.0
HOMOGENEITY_RANGE_HU = 6.0
# Frequency band of the noise fit (cycles/mm); the upper end is the 1 mm grid's Nyquist limit.
FIT_BAND = (0.12, 0.5)
CLASS_PROBABILITY = 0.9
# Distance bands (mm from the brain mask's edge) of the rim profile.
RIM_BANDS_MM = (3.0, 5.0, 8.0, 12.0, 16.0, 20.0, 25.0, 30.0, 40.0, 60.0)


# --------------------------------------------------------------------------- grid


def resample_in_plane(
    hu: np.ndarray, mask: np.ndarray, pixel_mm: tuple[float, float], target_mm: float = GRID_MM
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample axial slices to ``target_mm`` pixels (anti-aliased bilinear, as ``prepare``).

    Returns:
        The resampled HU (float32) and mask (bool), and the 4x4 matrix that maps new voxel
        indices to old ones (compose it with the old voxel affine).
    """
    shape = tuple(max(1, int(round(n * p / target_mm))) for n, p in zip(hu.shape[:2], pixel_mm))
    scale = [hu.shape[k] / shape[k] for k in range(2)]

    def resize(volume: np.ndarray) -> np.ndarray:
        return np.moveaxis(resize_slices(np.moveaxis(volume.astype(np.float32), 2, 0), shape), 0, 2)

    index_map = np.eye(4)
    for k in range(2):
        # align_corners=False: new pixel centre i maps to old (i + 0.5) * scale - 0.5.
        index_map[k, k] = scale[k]
        index_map[k, 3] = (scale[k] - 1.0) / 2.0
    return resize(hu), resize(mask) > 0.5, index_map


def eroded_brain(mask: np.ndarray, pixel_mm: float = GRID_MM, erosion_mm: float = EROSION_MM) -> np.ndarray:
    """The brain mask eroded in-plane, slice by slice, by ``erosion_mm``."""
    iterations = max(1, int(round(erosion_mm / pixel_mm)))
    return np.stack(
        [ndimage.binary_erosion(mask[:, :, z], iterations=iterations) for z in range(mask.shape[2])], axis=2
    )


# --------------------------------------------------------------------------- noise


def homogeneous_patches(
    hu: np.ndarray,
    mask: np.ndarray,
    size: int,
    max_range_hu: float = HOMOGENEITY_RANGE_HU,
    smoothing_px: float = HOMOGENEITY_SMOOTHING_MM / GRID_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Square in-plane patches inside ``mask`` whose smoothed HU varies by at most ``max_range_hu``.

    Patches sit on a grid of step ``size // 2`` (half-overlapping) in every slice.

    Returns:
        ``patches`` float32 ``(N, size, size)`` and ``where`` int ``(N, 3)``: (x, y, z) corner.
    """
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), (smoothing_px, smoothing_px, 0))
    patches, where = [], []
    step = max(1, size // 2)
    for z in range(hu.shape[2]):
        inside = mask[:, :, z]
        if inside.sum() < size * size:
            continue
        for i in range(0, hu.shape[0] - size + 1, step):
            for j in range(0, hu.shape[1] - size + 1, step):
                box = (slice(i, i + size), slice(j, j + size), z)
                if inside[box[:2]].all() and np.ptp(smooth[box]) <= max_range_hu:
                    patches.append(hu[box])
                    where.append((i, j, z))
    if not patches:
        return np.zeros((0, size, size), dtype=np.float32), np.zeros((0, 3), dtype=int)
    return np.asarray(patches, dtype=np.float32), np.asarray(where, dtype=int)


def _detrend(patches: np.ndarray) -> np.ndarray:
    """Patches minus their least-squares quadratic surface (slow anatomy and beam hardening)."""
    size = patches.shape[1]
    x, y = np.meshgrid(np.arange(size) / size - 0.5, np.arange(size) / size - 0.5, indexing="ij")
    design = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1).reshape(-1, 6)
    flat = patches.reshape(len(patches), -1).T.astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(design, flat, rcond=None)
    return (flat - design @ coefficients).T.reshape(patches.shape)


def radial_power_spectrum(patches: np.ndarray, pixel_mm: float = GRID_MM) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged noise power spectrum of detrended square patches.

    ``NPS(f) = pixel^2 / size^2 * mean |DFT(patch - trend)|^2`` (HU^2 mm^2), averaged over
    rings of width ``1 / (size * pixel)`` up to the Nyquist frequency.

    Returns:
        ``frequency`` (cycles/mm, each ring's mean radius) and ``power``.

    Raises:
        ValueError: no patch.
    """
    if len(patches) == 0:
        raise ValueError("no patch to measure a noise spectrum on")
    size = patches.shape[1]
    # A Hann window keeps the patch edges from leaking power across frequencies (a plain
    # square window flattens a steep spectrum: the kernel came out ~6 % too small on
    # synthetic noise of known kernel); dividing by its mean square keeps the variance.
    hann = np.hanning(size + 2)[1:-1]
    window = np.outer(hann, hann)
    residual = _detrend(patches) * window
    power_2d = np.mean(np.abs(np.fft.fft2(residual)) ** 2, axis=0) * pixel_mm**2 / (size**2 * np.mean(window**2))
    frequencies = np.fft.fftfreq(size, pixel_mm)
    radius = np.hypot(*np.meshgrid(frequencies, frequencies, indexing="ij"))
    width = 1.0 / (size * pixel_mm)
    rings = np.floor(radius / width + 0.5).astype(int)
    last = int(np.floor(0.5 / pixel_mm / width))
    sums = np.bincount(rings.ravel(), power_2d.ravel(), minlength=last + 1)[: last + 1]
    counts = np.maximum(np.bincount(rings.ravel(), minlength=last + 1)[: last + 1], 1)
    # Each ring's mean radius (not its nominal centre): the low rings hold few, off-centre points.
    centres = np.bincount(rings.ravel(), radius.ravel(), minlength=last + 1)[: last + 1] / counts
    return centres, sums / counts


def fit_noise_spectrum(
    frequency: np.ndarray, power: np.ndarray, band: tuple[float, float] = FIT_BAND, pixel_mm: float = GRID_MM
) -> NoiseModel:
    """Fit ``A exp(-4 pi^2 k^2 f^2)`` to a radial spectrum inside ``band`` (log power linear in f^2).

    Returns:
        The noise model (``thickness_mm`` 0): ``kernel_mm = k``; ``sd_hu`` from the model's
        integral over the Nyquist square of ``pixel_mm`` pixels.

    Raises:
        ValueError: fewer than 2 spectrum points with positive power inside the band.
    """
    frequency = np.asarray(frequency, dtype=np.float64)
    power = np.asarray(power, dtype=np.float64)
    inside = (frequency >= band[0]) & (frequency <= band[1] + 1e-9) & (power > 0)
    if inside.sum() < 2:
        raise ValueError(f"fewer than 2 spectrum points with power inside {band} cycles/mm")
    slope, intercept = np.polyfit(frequency[inside] ** 2, np.log(power[inside]), 1)
    kernel = math.sqrt(max(-slope, 0.0) / (4.0 * math.pi**2))
    shape = NoiseModel(sd_hu=1.0, kernel_mm=kernel)
    # The unit-SD model's amplitude tells how the fitted amplitude converts to a variance.
    unit_amplitude = float(shape.in_plane_nps(np.zeros(1), pixel_mm)[0])
    return NoiseModel(sd_hu=math.sqrt(math.exp(intercept) / unit_amplitude), kernel_mm=kernel)


def thickness_from_correlation(correlation: float, spacing_mm: float) -> float:
    """Slice-profile FWHM (mm) from the noise correlation of slices ``spacing_mm`` apart.

    Inverts :meth:`NoiseModel.slice_correlation`:
    ``thickness = FWHM_PER_SIGMA * spacing / (2 sqrt(-ln rho))``; 0 for ``rho <= 0``.
    """
    if correlation <= 0:
        return 0.0
    correlation = min(correlation, 0.999)
    return FWHM_PER_SIGMA * spacing_mm / (2.0 * math.sqrt(-math.log(correlation)))


@dataclass
class NoiseMeasurement:
    """What :func:`measure_noise` found."""

    model: NoiseModel
    frequency: np.ndarray
    power: np.ndarray
    patch_count: int
    adjacent_slice_correlation: float
    pair_count: int


def measure_noise(
    hu: np.ndarray, brain: np.ndarray, spacing_mm: float, pixel_mm: float = GRID_MM, patch_mm: float = PATCH_MM
) -> NoiseMeasurement:
    """Noise spectrum, model and adjacent-slice correlation of a CT's brain (see the module docstring).

    Args:
        hu: ``(X, Y, Z)`` HU on ``pixel_mm`` pixels.
        brain: the (eroded) brain mask to take patches from.
        spacing_mm: distance between the slices (for the slice profile).
        pixel_mm: in-plane pixel size.
        patch_mm: patch side.

    Raises:
        ValueError: no homogeneous patch.
    """
    size = int(round(patch_mm / pixel_mm))
    patches, where = homogeneous_patches(hu, brain, size, smoothing_px=HOMOGENEITY_SMOOTHING_MM / pixel_mm)
    frequency, power = radial_power_spectrum(patches, pixel_mm)
    fitted = fit_noise_spectrum(frequency, power, pixel_mm=pixel_mm)

    # The same place in the next slice, when that patch is homogeneous too.
    index = {tuple(w): k for k, w in enumerate(where.tolist())}
    pairs = [(k, index[(i, j, z + 1)]) for k, (i, j, z) in enumerate(where.tolist()) if (i, j, z + 1) in index]
    correlation = 0.0
    if pairs:
        residual = _detrend(patches)
        first = residual[[a for a, _ in pairs]].ravel()
        second = residual[[b for _, b in pairs]].ravel()
        correlation = float(np.sum(first * second) / math.sqrt(np.sum(first**2) * np.sum(second**2)))
    model = NoiseModel(
        sd_hu=fitted.sd_hu,
        kernel_mm=fitted.kernel_mm,
        thickness_mm=thickness_from_correlation(correlation, spacing_mm),
    )
    return NoiseMeasurement(model, frequency, power, len(patches), correlation, len(pairs))


# --------------------------------------------------------------------------- tissue classes


@dataclass
class ClassStatistics:
    """Median-like centre, spread and region size of CSF, grey and white matter HU."""

    hu: tuple[float, float, float]
    sd_hu: tuple[float, float, float]
    voxels: tuple[int, int, int]


def class_statistics(hu: np.ndarray, brain: np.ndarray, priors: np.ndarray) -> ClassStatistics:
    """Tissue-class HU from atlas regions (see the module docstring).

    Args:
        hu: ``(X, Y, Z)`` HU.
        brain: the (eroded) brain mask.
        priors: ``(3, X, Y, Z)`` registered atlas probabilities (CSF, grey, white).

    Raises:
        ValueError: a class region holds fewer than 50 voxels.
    """
    from sklearn.mixture import GaussianMixture

    centres, spreads, counts = [], [], []
    for c in range(3):
        # Minimum over the in-plane neighbourhood: a voxel counts only when its neighbours are
        # just as surely the class (a 1-voxel margin against registration error).
        region = brain & (ndimage.minimum_filter(priors[c], size=(3, 3, 1)) > CLASS_PROBABILITY)
        values = hu[region].astype(np.float64)
        if values.size < 50:
            raise ValueError(f"the atlas region of class {c} holds {values.size} voxels: too few")
        if c == 0:
            mixture = GaussianMixture(n_components=2, random_state=0).fit(values[:, None])
            lower = int(np.argmin(mixture.means_[:, 0]))
            centre = float(mixture.means_[lower, 0])
            spread = float(np.sqrt(mixture.covariances_[lower].ravel()[0]))
        else:
            centre = float(np.median(values))
            spread = 1.4826 * float(np.median(np.abs(values - centre)))
        centres.append(centre)
        spreads.append(spread)
        counts.append(int(values.size))
    return ClassStatistics(tuple(centres), tuple(spreads), tuple(counts))  # type: ignore[arg-type]


@dataclass
class RimMeasurement:
    """What :func:`measure_rim` found: the model, and the profile it was fitted to (less the constant)."""

    model: RimModel
    distance_mm: np.ndarray
    excess_hu: np.ndarray


def measure_rim(
    hu: np.ndarray,
    mask: np.ndarray,
    priors: np.ndarray,
    class_hu: tuple[float, float, float],
    voxel_size: np.ndarray | tuple[float, float, float],
) -> RimMeasurement:
    """The HU rise towards the brain's edge that the tissue classes do not explain.

    Args:
        hu: ``(X, Y, Z)`` HU.
        mask: the (uneroded) brain mask: distances are measured to its edge.
        priors: ``(3, X, Y, Z)`` registered atlas probabilities.
        class_hu: the measured (CSF, grey, white) HU that paint the atlas.
        voxel_size: voxel edge lengths in mm.

    Raises:
        ValueError: fewer than 3 distance bands hold brain.
    """
    from scipy.optimize import curve_fit

    mask = np.asarray(mask, dtype=bool)
    total = priors.sum(axis=0)
    predicted = np.tensordot(np.asarray(class_hu, dtype=np.float32), priors, axes=1) / np.maximum(total, 1e-3)
    distance = ndimage.distance_transform_edt(mask, sampling=np.asarray(voxel_size, dtype=np.float64))
    inside = mask & (total > 0.5)
    distances, excess = [], []
    for low, high in zip(RIM_BANDS_MM[:-1], RIM_BANDS_MM[1:]):
        band = inside & (distance >= low) & (distance < high)
        if band.sum() >= 100:
            distances.append(float(np.median(distance[band])))
            excess.append(float(np.median(hu[band] - predicted[band])))
    if len(distances) < 4:
        raise ValueError("too few distance bands with brain to measure the rim")
    (amplitude, length, deep), _ = curve_fit(
        lambda d, a, s, c: a * np.exp(-d / s) + c,
        np.asarray(distances),
        np.asarray(excess),
        p0=(5.0, 8.0, 0.0),
        bounds=([-30.0, 1.0, -50.0], [80.0, 40.0, 50.0]),
    )
    model = RimModel(hu=float(amplitude), length_mm=float(length))
    return RimMeasurement(model, np.asarray(distances), np.asarray(excess) - deep)


# --------------------------------------------------------------------------- a whole scan


@dataclass
class TextureMeasurement:
    """A scan's texture and the material behind it (for figures and reports)."""

    texture: ScanTexture
    noise: NoiseMeasurement
    classes: ClassStatistics
    rim: RimMeasurement
    brain_hu: np.ndarray = field(repr=False)


def measure_texture(
    hu: np.ndarray,
    mask: np.ndarray,
    voxel_affine: np.ndarray,
    atlas_image: np.ndarray,
    atlas_mask: np.ndarray,
    atlas_affine: np.ndarray,
    atlas_probabilities: np.ndarray,
    name: str,
    source: str,
    nominal_thickness_mm: float | None = None,
) -> TextureMeasurement:
    """Measure one CT's texture: noise (:func:`measure_noise`), classes (:func:`class_statistics`), rim.

    Args:
        hu: ``(X, Y, Z)`` HU, axial slices last, any in-plane pixel size (resampled to the grid
            here); ``voxel_affine`` its orthogonal voxel-to-RAS matrix (regular slices).
        mask: brain mask on the same grid.
        atlas_image, atlas_mask, atlas_affine, atlas_probabilities: the atlas (see
            :func:`lib.data.atlas.atlas_priors`); its image should look like a brain CT.
        name, source: for the :class:`ScanTexture`.
        nominal_thickness_mm: the declared slice thickness, when known.
    """
    pixel = np.linalg.norm(voxel_affine[:3, :3], axis=0)
    grid_hu, grid_mask, index_map = resample_in_plane(hu, mask, (float(pixel[0]), float(pixel[1])))
    grid_affine = np.asarray(voxel_affine, dtype=np.float64) @ index_map
    brain = eroded_brain(grid_mask)
    noise = measure_noise(grid_hu, brain, float(pixel[2]))
    priors = atlas_priors(grid_hu, grid_mask, grid_affine, atlas_image, atlas_mask, atlas_affine, atlas_probabilities)
    # The rim and the class HU confound each other (cortex lies near the edge): classes, then
    # the rim given them, then the classes of the CT without that rim, then the rim again.
    voxel_size = (GRID_MM, GRID_MM, float(pixel[2]))
    classes = class_statistics(grid_hu, brain, priors)
    rim = measure_rim(grid_hu, grid_mask, priors, classes.hu, voxel_size)
    classes = class_statistics(grid_hu - rim.model.offset(grid_mask, voxel_size), brain, priors)
    rim = measure_rim(grid_hu, grid_mask, priors, classes.hu, voxel_size)
    tissue_sd = math.sqrt(max(0.0, classes.sd_hu[2] ** 2 - noise.model.sd_hu**2))
    texture = ScanTexture(
        name=name,
        source=source,
        class_hu=classes.hu,
        class_sd_hu=classes.sd_hu,
        noise=noise.model,
        tissue_sd_hu=tissue_sd,
        rim=rim.model,
        slice_spacing_mm=float(pixel[2]),
        adjacent_slice_correlation=noise.adjacent_slice_correlation,
        nominal_thickness_mm=nominal_thickness_mm,
    )
    return TextureMeasurement(texture=texture, noise=noise, classes=classes, rim=rim, brain_hu=grid_hu[brain])
