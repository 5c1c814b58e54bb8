"""Checks of a reconstruction that need no ground truth: tissue consistency and banding.

No real CT has a real T1 of the same head here, so a real CT's synthetic T1 cannot be scored
against a truth. Two things can still be measured on every reconstruction:

**Tissue consistency** (CT-input presets; :func:`tissue_check`). The CT itself says where CSF,
grey and white matter are, by Hounsfield units; a T1 orders them white > grey > CSF (CSF is
dark, white matter brightest). The check classifies the input CT's brain voxels and asks
whether the synthetic T1 keeps that order and how well its darkest voxels fall on the CT's CSF.

1. Slices: the acquired slices on the dense grid only (``acquired``). A gap slice's CT is
   interpolated between two acquired slices; its HU are a blend of two anatomies, not a
   measurement, so classifying it would mislabel every edge the two slices disagree on.
2. Brain: the reconstruction's brain mask (for a real CT the intracranial mask of
   :mod:`lib.data.ct_brain`), eroded in-plane by :attr:`TissueCheckConfig.erosion_mm` (3 mm).
   At the inner table of the skull the HU are raised by partial volume with bone (the voxels
   next to it mix 1000 HU bone into 0-40 HU tissue) and by beam hardening (a few HU over a few
   millimetres); both would turn CSF into "grey matter". In-plane only: slices are 1-5 mm
   thick, and a 3-D erosion would drop whole thick slices at the top and bottom.
3. Smoothing: the CT is smoothed in-plane with a Gaussian of :attr:`TissueCheckConfig.smoothing_mm`
   (1 mm), normalised inside the un-eroded brain mask (the sum of weights inside the mask
   divides the sum of weighted values), so no skull or air leaks in. Real brain CT noise is
   4-6 HU per voxel (measured on the head CT study and Cranium: robust standard deviation of
   the high-pass residual in the brain), as large as the gaps between the classes; 1 mm
   (2 pixels of the 0.49 mm study, 1 of Cranium) divides uncorrelated noise by about 7 and 4
   (less for real CT's correlated noise) while the cortex (2-4 mm thick) and the ventricles
   stay apart from their surroundings.
4. Classes, by the smoothed HU (:class:`TissueCheckConfig`, literature values for unenhanced
   adult brain CT): CSF [0, 15) HU, white matter [20, 30) HU, grey matter [35, 45) HU.
   Everything else stays unclassified: the ambiguous 15-20 HU (CSF/white partial volume,
   oedema) and 30-35 HU (white/grey partial volume), below 0 (fat, air, partial volume with
   them) and 45 HU and above (blood, calcification, vessels, bone edges).
5. Calibration (:attr:`TissueCheckConfig.calibrate`, on by default). Real scanners do not all
   put brain where the literature does: the two real CTs here differ by 14 HU (the head CT
   study's parenchyma peaks at 32-38 HU, Debian's Cranium at 22-24 HU with its CSF tail down
   to -6 HU), so fixed ranges would call most of the study "grey" and most of Cranium
   "white" or "unclassified". The scan's own white/grey boundary is found as the isodata
   threshold (Ridler-Calvard: the midpoint of the means of the two sides it separates) of
   its smoothed brain HU within :data:`PARENCHYMA_HU`, and every range is shifted by its
   difference to the literature boundary (32.5 HU, midway between the white and grey ranges'
   centres), at most :data:`MAX_CALIBRATION_HU`. Isodata and not the median: the median moves
   with the grey/white proportions (atrophy, erosion), the boundary between the two modes
   does not. One shift for all classes: a calibration offset moves water (CSF) as it moves
   tissue. The record keeps the shift (:attr:`TissueCheck.calibration_hu`) and the ranges
   as applied.

Measures on the classified voxels: the synthetic T1's mean in each class; whether
white > grey > CSF holds; Cohen's d (difference of the means over the pooled standard
deviation) of white vs grey and of grey vs CSF, positive in the right order; and the CSF
Dice. The T1's dark set has no free threshold: it is the ``n`` darkest classified voxels, ``n``
the number of CSF voxels (a T1 that ranks CSF below everything else scores 1). A dark set
drawn at random among the classified voxels scores the CSF share ``n / N`` on average
(:attr:`TissueCheck.csf_dice_chance`), the level to read the Dice against.

**Atlas regions** (CT-input presets; :func:`atlas_tissue_check`). The HU classes need a CT in
which grey and white matter differ by more than the noise; brain CT histograms are unimodal
(grey and white 8-12 HU apart in the literature, 3 HU on Debian's Cranium, under 4-6 HU of
noise), so on a low-contrast scan the white and grey classes are the two tails of one peak and
their T1 order says little. The second half of the check asks where the tissues *are* instead:
nilearn's MNI152 tissue maps, painted as a noise-free CT, are registered affinely to the CT's
brain (:func:`lib.data.atlas.atlas_priors`), and a class's core is where its probability
exceeds :data:`ATLAS_CORE_PROBABILITY` over a 3 x 3 in-plane neighbourhood (a margin against
registration error), inside the same eroded brain, on the acquired slices. The synthetic T1
should order the cores white > grey > CSF as a real T1 does; the CT's own median HU and
grey-white effect size in the cores say how much contrast the input carried. Limits: an affine
fit places deep white matter and the ventricles well and the cortex to a millimetre or two;
lesions and large ventricles are not in the atlas.

**Banding** (every preset; :func:`measure_banding`). Stripes across the coronal and sagittal
views appear when the slices made from an acquired CT slice differ in brightness or texture
from the generated ones between them. For every pair of adjacent output slices, inside the
brain of both: the absolute difference of the two slices' mean intensities (brightness jump)
and the mean absolute voxel difference (voxel jump, brightness and texture). Each is averaged,
weighted by the pair's brain voxels, over acquired/generated pairs and over generated/generated
pairs; the ratio of the two is 1 without stripes (a boundary slice steps as much as any other
step) and above 1 with them. Pairs of two acquired slices are left out, and the ratio is None
where a kind of pair is missing (no gap of two or more slices).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_isodata

from lib.data.ct_brain import ellipsoid

__all__ = [
    "ATLAS_CLASSES",
    "ATLAS_CORE_PROBABILITY",
    "CHECK_COLUMNS",
    "MAX_CALIBRATION_HU",
    "PARENCHYMA_HU",
    "TISSUE_LABELS",
    "UNCLASSIFIED",
    "AcquiredCt",
    "AtlasCheck",
    "Banding",
    "SlicePair",
    "TissueCheck",
    "TissueCheckConfig",
    "TissueClass",
    "acquired_ct",
    "atlas_cores",
    "atlas_tissue_check",
    "calibration_hu",
    "check_columns",
    "classify_tissue",
    "inner_brain",
    "measure_banding",
    "smoothed_hu",
    "tissue_check",
]


class TissueClass(enum.StrEnum):
    """The classes of the tissue check, in increasing HU."""

    CSF = "csf"
    WHITE = "white"
    GREY = "grey"


# Label values of :func:`classify_tissue` (0: unclassified).
TISSUE_LABELS = {TissueClass.CSF: 1, TissueClass.WHITE: 2, TissueClass.GREY: 3}
UNCLASSIFIED = 0


@dataclass(frozen=True)
class TissueCheckConfig:
    """How CT voxels are classified (see the module docstring for the reasons).

    Attributes:
        csf_hu: CSF, ``[low, high)`` HU.
        white_hu: white matter, ``[low, high)`` HU.
        grey_hu: grey matter, ``[low, high)`` HU.
        smoothing_mm: in-plane Gaussian sigma of the CT before classifying (0: none).
        erosion_mm: in-plane erosion radius of the brain mask (0: none).
        calibrate: shift the ranges to the scan's own white/grey boundary (:func:`calibration_hu`).

    Raises:
        ValueError: an empty or inverted range, ranges that overlap or are not in the order
            CSF < white < grey, or a negative length.
    """

    csf_hu: tuple[float, float] = (0.0, 15.0)
    white_hu: tuple[float, float] = (20.0, 30.0)
    grey_hu: tuple[float, float] = (35.0, 45.0)
    smoothing_mm: float = 1.0
    erosion_mm: float = 3.0
    calibrate: bool = True

    def __post_init__(self) -> None:
        ranges = self.ranges()
        for name, (low, high) in ranges.items():
            if not low < high:
                raise ValueError(f"{name}_hu must be [low, high) with low < high, got {[low, high]}")
        bounds = [bound for pair in ranges.values() for bound in pair]
        if bounds != sorted(bounds):
            raise ValueError(f"HU ranges must not overlap and must run CSF < white < grey, got {ranges}")
        if self.smoothing_mm < 0 or self.erosion_mm < 0:
            raise ValueError(f"smoothing_mm and erosion_mm must be >= 0, got {self.smoothing_mm}, {self.erosion_mm}")

    def ranges(self) -> dict[TissueClass, tuple[float, float]]:
        """Each class's HU range, in increasing HU."""
        return {TissueClass.CSF: self.csf_hu, TissueClass.WHITE: self.white_hu, TissueClass.GREY: self.grey_hu}

    def white_grey_boundary(self) -> float:
        """Midway between the white and grey ranges' centres (32.5 HU for the literature ranges)."""
        return (sum(self.white_hu) + sum(self.grey_hu)) / 4.0

    def shifted(self, offset_hu: float) -> TissueCheckConfig:
        """The same check with every range moved by ``offset_hu`` and calibration done."""

        def move(limits: tuple[float, float]) -> tuple[float, float]:
            return limits[0] + offset_hu, limits[1] + offset_hu

        return replace(
            self, csf_hu=move(self.csf_hu), white_hu=move(self.white_hu), grey_hu=move(self.grey_hu), calibrate=False
        )


# Brain HU that can be white or grey matter on any scanner within MAX_CALIBRATION_HU of the
# literature (CSF below, blood and calcification above): where the white/grey boundary is sought.
PARENCHYMA_HU = (10.0, 60.0)
# The largest calibration shift believed: beyond it, the scan or its brain mask is wrong, not
# the scanner (the two real CTs here need -9.6 and +4.6 HU).
MAX_CALIBRATION_HU = 15.0


def calibration_hu(hu: np.ndarray, config: TissueCheckConfig) -> float:
    """The shift that moves the literature white/grey boundary onto this scan's.

    ``hu``: the smoothed brain HU (any shape). 0 when fewer than 100 values lie in
    :data:`PARENCHYMA_HU` or they have no spread; clipped to +-:data:`MAX_CALIBRATION_HU`.
    """
    values = np.asarray(hu, dtype=np.float64).ravel()
    values = values[(values >= PARENCHYMA_HU[0]) & (values < PARENCHYMA_HU[1])]
    if values.size < 100 or np.ptp(values) == 0:
        return 0.0
    boundary = float(threshold_isodata(values))
    # To a tenth of a HU: the record's thresholds stay readable, and finer is below the noise.
    return round(float(np.clip(boundary - config.white_grey_boundary(), -MAX_CALIBRATION_HU, MAX_CALIBRATION_HU)), 1)


def smoothed_hu(ct_hu: np.ndarray, brain: np.ndarray, pixel_spacing: Sequence[float], sigma_mm: float) -> np.ndarray:
    """The CT smoothed in-plane inside ``brain`` (Gaussian, ``sigma_mm``; 0: unchanged), float64.

    Normalised convolution: the weights that fall outside the brain are dropped, so the
    skull's 1000 HU never blur into the brain's edge.
    """
    hu = np.asarray(ct_hu, dtype=np.float64)
    if sigma_mm <= 0:
        return hu
    sigma = (sigma_mm / pixel_spacing[0], sigma_mm / pixel_spacing[1], 0.0)
    weights = ndimage.gaussian_filter(brain.astype(np.float64), sigma)
    return ndimage.gaussian_filter(np.where(brain, hu, 0.0), sigma) / np.maximum(weights, 1e-12)


def inner_brain(brain: np.ndarray, pixel_spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """``brain`` eroded in-plane by a disk of ``radius_mm`` (0: unchanged); each slice on its own."""
    brain = np.asarray(brain, dtype=bool)
    if radius_mm <= 0:
        return brain
    disk = ellipsoid(radius_mm, (float(pixel_spacing[0]), float(pixel_spacing[1])))[:, :, None]
    return ndimage.binary_erosion(brain, structure=disk)


def _labels(hu: np.ndarray, inner: np.ndarray, config: TissueCheckConfig) -> np.ndarray:
    labels = np.zeros(inner.shape, dtype=np.int8)
    for tissue, (low, high) in config.ranges().items():
        labels[inner & (hu >= low) & (hu < high)] = TISSUE_LABELS[tissue]
    return labels


def classify_tissue(
    ct_hu: np.ndarray,
    brain: np.ndarray,
    pixel_spacing: Sequence[float],
    config: TissueCheckConfig = TissueCheckConfig(),
) -> np.ndarray:
    """Label the brain voxels of a CT by HU: :data:`TISSUE_LABELS`, :data:`UNCLASSIFIED` elsewhere.

    Each axial slice (last axis) on its own: smoothed in-plane inside ``brain``
    (:func:`smoothed_hu`), classified inside ``brain`` eroded in-plane (:func:`inner_brain`).

    Args:
        ct_hu: (X, Y, Z) CT in HU.
        brain: (X, Y, Z) bool brain mask.
        pixel_spacing: in-plane voxel size (mm) along X and Y.
        config: thresholds, smoothing, erosion and calibration.

    Returns:
        (X, Y, Z) int8 labels.
    """
    brain = np.asarray(brain, dtype=bool)
    hu = smoothed_hu(ct_hu, brain, pixel_spacing, config.smoothing_mm)
    inner = inner_brain(brain, pixel_spacing, config.erosion_mm)
    return _labels(hu, inner, _calibrated(hu[inner], config)[0])


def _calibrated(hu: np.ndarray, config: TissueCheckConfig) -> tuple[TissueCheckConfig, float]:
    """The config as applied to brain HU ``hu``, and the shift it moved the ranges by."""
    if not config.calibrate:
        return config, 0.0
    shift = calibration_hu(hu, config)
    return config.shifted(shift), shift


def _cohen_d(higher: np.ndarray, lower: np.ndarray) -> float | None:
    """(mean(higher) - mean(lower)) / pooled standard deviation; None with under 2 values in
    either, or no spread at all."""
    if len(higher) < 2 or len(lower) < 2:
        return None
    pooled = np.sqrt(
        ((len(higher) - 1) * higher.var(ddof=1) + (len(lower) - 1) * lower.var(ddof=1)) / (len(higher) + len(lower) - 2)
    )
    return float((higher.mean() - lower.mean()) / pooled) if pooled > 0 else None


def _dark_set_dice(values: np.ndarray, csf: np.ndarray) -> float | None:
    """Dice of the ``csf.sum()`` lowest ``values`` with ``csf``; None without CSF.

    Both sets have ``n`` members, so Dice = 2 |dark & csf| / 2n. Ties are broken by position
    (a stable sort): deterministic, and with a continuous T1 ties are rare.
    """
    count = int(csf.sum())
    if count == 0:
        return None
    dark = np.argsort(values, kind="stable")[:count]
    return float(csf[dark].sum() / count)


def _rounded(value: Any, digits: int = 4) -> Any:
    """Floats in a JSON-ready structure rounded (provenance is read by people too)."""
    if isinstance(value, float):  # numpy's float64 too, returned as a plain float
        return round(float(value), digits)
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    return value


@dataclass
class TissueCheck:
    """The tissue-consistency check of one reconstruction (see the module docstring).

    Attributes:
        slices: acquired slices the check used.
        brain_median_hu: median smoothed HU in the eroded brain (a scanner calibrated off the
            literature shows here; None: no brain voxel).
        voxels: classified voxels per class, and ``unclassified`` (eroded brain, in no class).
        t1_mean: the synthetic T1's mean per class (None: an empty class).
        order_holds: white > grey > CSF in ``t1_mean`` (None: a class is empty).
        cohen_d: ``white_grey`` and ``grey_csf``, positive in the T1 order (None: a class with
            under 2 voxels, or no spread).
        csf_dice: Dice of the ``n`` darkest classified T1 voxels with the CSF class (``n`` =
            CSF voxels; None: no CSF voxel).
        csf_dice_chance: the Dice a random dark set of the same size scores on average (the
            CSF share of the classified voxels; None: nothing classified).
        calibration_hu: the shift applied to every range (0: calibration off or impossible).
        config: the thresholds (as applied, after calibration), smoothing and erosion.
    """

    slices: int
    brain_median_hu: float | None
    voxels: dict[str, int]
    t1_mean: dict[str, float | None]
    order_holds: bool | None
    cohen_d: dict[str, float | None]
    csf_dice: float | None
    csf_dice_chance: float | None
    calibration_hu: float = 0.0
    config: TissueCheckConfig = field(default_factory=TissueCheckConfig)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (provenance.json's ``summary.tissue_check``), floats rounded."""
        record = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "config"}
        return {
            **_rounded(record),
            "thresholds_hu": {tissue.value: list(limits) for tissue, limits in self.config.ranges().items()},
            "smoothing_mm": self.config.smoothing_mm,
            "erosion_mm": self.config.erosion_mm,
        }


@dataclass(frozen=True)
class AcquiredCt:
    """A CT's acquired slices as the checks read them (:func:`acquired_ct`): made once per
    reconstruction and passed to :func:`tissue_check` and :func:`atlas_tissue_check`, which
    otherwise each smooth the CT again.

    Attributes:
        keep: (Z,) bool, the acquired slices.
        hu: (X, Y, acquired) the CT's brain HU smoothed in-plane (:func:`smoothed_hu`), float64.
        inner: (X, Y, acquired) the brain eroded in-plane (:func:`inner_brain`).
        smoothing_mm, erosion_mm: the configuration they were made with.
    """

    keep: np.ndarray
    hu: np.ndarray
    inner: np.ndarray
    smoothing_mm: float
    erosion_mm: float


def acquired_ct(
    ct_hu: np.ndarray,
    brain: np.ndarray,
    acquired: np.ndarray,
    pixel_spacing: Sequence[float],
    config: TissueCheckConfig = TissueCheckConfig(),
) -> AcquiredCt:
    """The acquired slices of ``ct_hu``, smoothed and eroded by ``config`` (see :class:`AcquiredCt`).

    Args:
        ct_hu, brain, acquired, pixel_spacing: as for :func:`tissue_check`.
        config: its smoothing and erosion are used.

    Raises:
        ValueError: ``acquired`` of another length than Z.
    """
    keep = np.asarray(acquired, dtype=bool)
    if keep.shape != (ct_hu.shape[2],):
        raise ValueError(f"acquired has {keep.shape[0] if keep.ndim else 0} entries for {ct_hu.shape[2]} slices")
    brain = np.asarray(brain, dtype=bool)[:, :, keep]
    hu = smoothed_hu(ct_hu[:, :, keep], brain, pixel_spacing, config.smoothing_mm)
    inner = inner_brain(brain, pixel_spacing, config.erosion_mm)
    return AcquiredCt(keep, hu, inner, config.smoothing_mm, config.erosion_mm)


def _acquired_brain(
    ct_hu: np.ndarray,
    t1: np.ndarray,
    brain: np.ndarray,
    acquired: np.ndarray,
    pixel_spacing,
    config: TissueCheckConfig,
    prepared: AcquiredCt | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The acquired slices (``keep``), their smoothed brain HU, eroded brain (``prepared``, or
    :func:`acquired_ct` when None) and T1 (float64).

    Raises:
        ValueError: ``acquired`` of another length than Z, or ``prepared`` made for other
            slices or with another smoothing or erosion than ``config``'s.
    """
    if prepared is None:
        prepared = acquired_ct(ct_hu, brain, acquired, pixel_spacing, config)
    elif (
        not np.array_equal(prepared.keep, np.asarray(acquired, dtype=bool))
        or prepared.hu.shape[:2] != ct_hu.shape[:2]
        or (prepared.smoothing_mm, prepared.erosion_mm) != (config.smoothing_mm, config.erosion_mm)
    ):
        raise ValueError("prepared was made for other acquired slices, another grid or another smoothing/erosion")
    keep = prepared.keep
    return keep, prepared.hu, prepared.inner, np.asarray(t1, dtype=np.float64)[:, :, keep]


def _t1_order(
    by_class: dict[TissueClass, np.ndarray],
) -> tuple[dict[str, float | None], bool | None, dict[str, float | None]]:
    """The T1's mean per class, whether white > grey > CSF (None: a class is empty), and Cohen's
    d of white vs grey and grey vs CSF (positive in that order)."""
    means = {tissue: float(v.mean()) if v.size else None for tissue, v in by_class.items()}
    order = (
        bool(means[TissueClass.WHITE] > means[TissueClass.GREY] > means[TissueClass.CSF])
        if all(mean is not None for mean in means.values())
        else None
    )
    effect = {
        "white_grey": _cohen_d(by_class[TissueClass.WHITE], by_class[TissueClass.GREY]),
        "grey_csf": _cohen_d(by_class[TissueClass.GREY], by_class[TissueClass.CSF]),
    }
    return {tissue.value: mean for tissue, mean in means.items()}, order, effect


def tissue_check(
    ct_hu: np.ndarray,
    t1: np.ndarray,
    brain: np.ndarray,
    acquired: np.ndarray,
    pixel_spacing: Sequence[float],
    config: TissueCheckConfig = TissueCheckConfig(),
    prepared: AcquiredCt | None = None,
) -> TissueCheck:
    """Does the synthetic T1 order the CT's tissue classes as a real T1 does?

    Args:
        ct_hu: (X, Y, Z) the input CT in HU on the output grid.
        t1: (X, Y, Z) the synthetic T1 on the same grid.
        brain: (X, Y, Z) bool brain mask.
        acquired: (Z,) bool, the slices an acquired CT slice lies on (the others are left out).
        pixel_spacing: in-plane voxel size (mm) along X and Y.
        config: thresholds, smoothing, erosion and calibration.
        prepared: ``acquired_ct(ct_hu, brain, acquired, pixel_spacing, config)`` when already
            made (shared with :func:`atlas_tissue_check`); None: made here.

    Raises:
        ValueError: arrays of different shapes, ``acquired`` of another length than Z, or a
            ``prepared`` that does not match.
    """
    if not ct_hu.shape == t1.shape == brain.shape:
        raise ValueError(f"CT {ct_hu.shape}, T1 {t1.shape} and brain {brain.shape} must have one shape")
    keep, hu, inner, values = _acquired_brain(ct_hu, t1, brain, acquired, pixel_spacing, config, prepared)
    applied, shift = _calibrated(hu[inner], config)
    labels = _labels(hu, inner, applied)
    by_class = {tissue: values[labels == TISSUE_LABELS[tissue]] for tissue in TissueClass}
    means, order, effect = _t1_order(by_class)
    classified = labels != UNCLASSIFIED
    return TissueCheck(
        slices=int(keep.sum()),
        brain_median_hu=float(np.median(hu[inner])) if inner.any() else None,
        voxels={
            **{tissue.value: int(v.size) for tissue, v in by_class.items()},
            "unclassified": int(inner.sum() - classified.sum()),
        },
        t1_mean=means,
        order_holds=order,
        cohen_d=effect,
        csf_dice=_dark_set_dice(values[classified], labels[classified] == TISSUE_LABELS[TissueClass.CSF]),
        csf_dice_chance=float(by_class[TissueClass.CSF].size / classified.sum()) if classified.any() else None,
        calibration_hu=shift,
        config=applied,
    )


# A voxel is in a class's atlas core when the registered map gives the class more than this
# probability there and at its 8 in-plane neighbours.
ATLAS_CORE_PROBABILITY = 0.9
# The order of the atlas maps :func:`atlas_tissue_check` takes (lib.data.synthesis's tissue models).
ATLAS_CLASSES = (TissueClass.CSF, TissueClass.GREY, TissueClass.WHITE)


@dataclass
class AtlasCheck:
    """The synthetic T1 in the registered atlas's tissue cores (see the module docstring).

    Attributes:
        voxels: core voxels per class.
        t1_mean: the synthetic T1's mean per core (None: an empty core).
        order_holds: white > grey > CSF in ``t1_mean`` (None: a core is empty).
        cohen_d: ``white_grey`` and ``grey_csf`` of the T1 in the cores, positive in the T1 order.
        ct_median_hu: the input CT's median HU per core (smoothed as the HU classes are).
        ct_d_grey_white: Cohen's d of the CT's HU, grey core over white core: the grey/white
            contrast the input carried (positive in the CT's order, grey denser).
    """

    voxels: dict[str, int]
    t1_mean: dict[str, float | None]
    order_holds: bool | None
    cohen_d: dict[str, float | None]
    ct_median_hu: dict[str, float | None]
    ct_d_grey_white: float | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (provenance.json's ``summary.tissue_check.atlas``), floats rounded."""
        return _rounded(asdict(self))


def atlas_cores(
    priors: np.ndarray, inner: np.ndarray, probability: float = ATLAS_CORE_PROBABILITY
) -> dict[TissueClass, np.ndarray]:
    """Per class (:data:`ATLAS_CLASSES` order of ``priors``, (3, X, Y, Z)), the voxels of ``inner``
    where the class's probability exceeds ``probability`` at the voxel and its in-plane neighbours."""
    return {
        tissue: inner & (ndimage.minimum_filter(priors[index], size=(3, 3, 1)) > probability)
        for index, tissue in enumerate(ATLAS_CLASSES)
    }


def atlas_tissue_check(
    ct_hu: np.ndarray,
    t1: np.ndarray,
    brain: np.ndarray,
    acquired: np.ndarray,
    pixel_spacing: Sequence[float],
    priors: np.ndarray,
    config: TissueCheckConfig = TissueCheckConfig(),
    prepared: AcquiredCt | None = None,
) -> AtlasCheck:
    """Does the synthetic T1 order the atlas's white, grey and CSF cores as a real T1 does?

    Args:
        ct_hu, t1, brain, acquired, pixel_spacing: as for :func:`tissue_check`.
        priors: (3, X, Y, Z) the atlas's CSF, grey and white maps registered onto the grid.
        config: its smoothing and erosion are used (the HU ranges are not).
        prepared: as for :func:`tissue_check`.

    Raises:
        ValueError: arrays of different shapes, ``acquired`` of another length than Z, or a
            ``prepared`` that does not match.
    """
    if not ct_hu.shape == t1.shape == brain.shape == priors.shape[1:] or priors.shape[0] != len(ATLAS_CLASSES):
        raise ValueError(
            f"CT {ct_hu.shape}, T1 {t1.shape}, brain {brain.shape} and atlas maps {priors.shape} do not match"
        )
    keep, hu, inner, values = _acquired_brain(ct_hu, t1, brain, acquired, pixel_spacing, config, prepared)
    cores = atlas_cores(priors[:, :, :, keep], inner)
    means, order, effect = _t1_order({tissue: values[core] for tissue, core in cores.items()})
    return AtlasCheck(
        voxels={tissue.value: int(core.sum()) for tissue, core in cores.items()},
        t1_mean=means,
        order_holds=order,
        cohen_d=effect,
        ct_median_hu={
            tissue.value: float(np.median(hu[core])) if core.any() else None for tissue, core in cores.items()
        },
        ct_d_grey_white=_cohen_d(hu[cores[TissueClass.GREY]], hu[cores[TissueClass.WHITE]]),
    )


class SlicePair(enum.StrEnum):
    """Kinds of adjacent output slices the banding measure compares."""

    ACQUIRED_GENERATED = "acquired_generated"
    GENERATED_GENERATED = "generated_generated"


@dataclass
class Banding:
    """Slice-to-slice jumps at acquired/generated boundaries against those between generated slices.

    Attributes:
        pairs: adjacent slice pairs with brain in both, per :class:`SlicePair`.
        brightness_jump: per kind, the mean |difference of the two slices' brain means|,
            weighted by the pair's brain voxels (None: no pair of that kind).
        voxel_jump: per kind, the mean absolute voxel difference over the pairs' brain voxels.
        brightness_ratio: acquired/generated over generated/generated brightness jump (> 1:
            stripes; None: a kind is missing or the generated/generated jump is 0).
        voxel_ratio: the same for the voxel jump.
    """

    pairs: dict[str, int]
    brightness_jump: dict[str, float | None]
    voxel_jump: dict[str, float | None]
    brightness_ratio: float | None
    voxel_ratio: float | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (provenance.json's ``summary.banding``), floats rounded."""
        return _rounded(asdict(self))


def _ratio(jumps: dict[str, float | None]) -> float | None:
    boundary, inside = jumps[SlicePair.ACQUIRED_GENERATED], jumps[SlicePair.GENERATED_GENERATED]
    return boundary / inside if boundary is not None and inside else None


def measure_banding(volume: np.ndarray, brain: np.ndarray, acquired: np.ndarray) -> Banding:
    """Measure the stripes an output has where acquired and generated slices meet.

    Args:
        volume: (X, Y, Z) the output (e.g. the synthetic T1), slices along the last axis.
        brain: (X, Y, Z) bool brain mask; a pair is compared on the voxels in both slices' brain.
        acquired: (Z,) bool, the slices an acquired input slice lies on.

    Raises:
        ValueError: shapes that do not fit.
    """
    keep = np.asarray(acquired, dtype=bool)
    if volume.shape != brain.shape or keep.shape != (volume.shape[2],):
        raise ValueError(f"volume {volume.shape}, brain {brain.shape} and acquired {keep.shape} do not fit")
    voxels = dict.fromkeys(SlicePair, 0)
    pairs = dict.fromkeys(SlicePair, 0)
    brightness = dict.fromkeys(SlicePair, 0.0)
    voxel = dict.fromkeys(SlicePair, 0.0)
    for z in range(volume.shape[2] - 1):
        if keep[z] and keep[z + 1]:
            continue
        both = brain[:, :, z] & brain[:, :, z + 1]
        count = int(both.sum())
        if count == 0:
            continue
        kind = SlicePair.ACQUIRED_GENERATED if keep[z] or keep[z + 1] else SlicePair.GENERATED_GENERATED
        lower = volume[:, :, z][both].astype(np.float64)
        upper = volume[:, :, z + 1][both].astype(np.float64)
        pairs[kind] += 1
        voxels[kind] += count
        brightness[kind] += count * abs(lower.mean() - upper.mean())
        voxel[kind] += float(np.abs(lower - upper).sum())
    brightness_jump = {kind.value: brightness[kind] / voxels[kind] if voxels[kind] else None for kind in SlicePair}
    voxel_jump = {kind.value: voxel[kind] / voxels[kind] if voxels[kind] else None for kind in SlicePair}
    return Banding(
        pairs={kind.value: pairs[kind] for kind in SlicePair},
        brightness_jump=brightness_jump,
        voxel_jump=voxel_jump,
        brightness_ratio=_ratio(brightness_jump),
        voxel_ratio=_ratio(voxel_jump),
    )


# Flat columns of both checks, for the evaluation's metrics.csv and the batch manifest.
CHECK_COLUMNS = (
    "tissue_order",
    "t1_white",
    "t1_grey",
    "t1_csf",
    "d_white_grey",
    "d_grey_csf",
    "csf_dice",
    "csf_dice_chance",
    "atlas_order",
    "atlas_d_white_grey",
    "atlas_ct_d_grey_white",
    "banding_brightness_ratio",
    "banding_voxel_ratio",
)


def check_columns(tissue: dict[str, Any], banding: dict[str, Any]) -> dict[str, Any]:
    """:data:`CHECK_COLUMNS` from the records :meth:`TissueCheck.to_dict` and
    :meth:`Banding.to_dict` wrote (a summary's ``tissue_check`` and ``banding``); None for what a
    record lacks (an MRI-input preset has no tissue check, an older result neither)."""
    means = tissue.get("t1_mean") or {}
    effect = tissue.get("cohen_d") or {}
    atlas = tissue.get("atlas") or {}
    return {
        "tissue_order": tissue.get("order_holds"),
        "t1_white": means.get(TissueClass.WHITE),
        "t1_grey": means.get(TissueClass.GREY),
        "t1_csf": means.get(TissueClass.CSF),
        "d_white_grey": effect.get("white_grey"),
        "d_grey_csf": effect.get("grey_csf"),
        "csf_dice": tissue.get("csf_dice"),
        "csf_dice_chance": tissue.get("csf_dice_chance"),
        "atlas_order": atlas.get("order_holds"),
        "atlas_d_white_grey": (atlas.get("cohen_d") or {}).get("white_grey"),
        "atlas_ct_d_grey_white": atlas.get("ct_d_grey_white"),
        "banding_brightness_ratio": banding.get("brightness_ratio"),
        "banding_voxel_ratio": banding.get("voxel_ratio"),
    }
