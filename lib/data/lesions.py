"""Brain lesions for the synthetic CT: a lesion label map and the CT numbers of each lesion class.

A BraTS anatomy carries a glioma that its real T1 shows; the synthetic CT must show it too, as
a CT would. This module finds the lesion regions of a subject and says what CT value each gets:

* with BraTS tumour labels (``seg.nii.gz``: 1 necrotic / non-enhancing core, 2 oedema,
  4 enhancing tumour), :func:`lesions_from_brats_labels` maps them to :class:`LesionLabel`
  classes, splitting the core into fluid (necrosis, cyst) and solid non-enhancing tumour by the
  subject's own T1 and FLAIR;
* without labels, :func:`lesions_from_flair` takes the FLAIR-hyperintense region
  (:func:`flair_hyperintensity`, the rule of :class:`FlairRule`) as oedema and the regions it
  encloses as tumour core;
* :func:`add_calcifications` places a few small calcified foci in some tumours.

Lesion CT numbers (:class:`LesionHounsfield`) are drawn per subject *relative to its drawn
CSF / grey / white matter values*, so a scanner's calibration offset (the real scans here
differ by about 12 HU) moves lesions and normal tissue together and oedema stays darker than
the white matter around it. Calcification is absolute (a dense deposit, far above soft tissue).

Arrays are ``(X, Y, Z)`` on one grid (the tissue model's), label maps ``uint8``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "BRATS_LABELS",
    "FLAIR_RULE",
    "LESION_HU",
    "FlairRule",
    "LesionHounsfield",
    "LesionLabel",
    "LesionSource",
    "add_calcifications",
    "flair_hyperintensity",
    "flair_reference",
    "lesions_from_brats_labels",
    "lesions_from_flair",
]


class LesionLabel(enum.IntEnum):
    """Values of a lesion label map; 0 is normal tissue (painted from the tissue classes)."""

    NONE = 0
    OEDEMA = 1
    NON_ENHANCING = 2
    ENHANCING = 3
    NECROSIS = 4
    CYST = 5
    CALCIFICATION = 6


class LesionSource(enum.StrEnum):
    """Where a subject's lesion map came from."""

    LABELS = "labels"
    FLAIR = "flair"
    NONE = "none"


# BraTS 2018 tumour labels (as present in shared/data/brats_more: values 0, 1, 2, 4). Label 1
# is the necrotic AND non-enhancing core; it is split by the T1/FLAIR below. Label 3 is the
# older BraTS 2013 "non-enhancing" label, accepted in case a subject still carries it.
BRATS_LABELS: dict[int, str] = {
    1: "necrotic / non-enhancing tumour core",
    2: "peritumoral oedema",
    3: "non-enhancing tumour (BraTS 2013 labels)",
    4: "enhancing tumour",
}

# A core voxel is fluid (necrosis, cyst) when its T1 mixture posterior of CSF is at least this:
# on a non-contrast T1 it is then closer to CSF than to grey matter.
FLUID_PROBABILITY = 0.5


@dataclass(frozen=True)
class LesionHounsfield:
    """Per-subject CT numbers of the lesion classes, as ranges drawn uniformly (HU).

    Literature values (README, synthesis section) are approximate and vary with scanner and
    calibration, so each is a range and, except calcification, relative to the subject's own
    tissue values. At the literature calibration (CSF 8, grey 40, white 28 HU) they give:
    oedema 16-23, non-enhancing tumour 22-32, enhancing tumour 36-46, necrosis 12-20,
    cyst 8-14, calcification 150-600 HU (before the blur spreads a small focus).

    Attributes:
        oedema_below_white: oedema = white matter minus this (vasogenic oedema is water added
            to white matter: between white matter and water).
        non_enhancing_from_white: non-enhancing solid tumour = white matter plus this
            (iso- to hypodense; low-grade glioma is hypodense).
        enhancing_from_grey: enhancing (cellular) tumour = grey matter plus this (iso- to
            mildly hyperdense to grey matter).
        necrosis_above_csf: necrosis = CSF plus this (fluid with debris and protein).
        cyst_above_csf: cyst = CSF plus this (near-CSF fluid).
        calcification: absolute peak HU of a calcified focus (calcium: above 100-130 HU).
    """

    oedema_below_white: tuple[float, float] = (5.0, 12.0)
    non_enhancing_from_white: tuple[float, float] = (-6.0, 4.0)
    enhancing_from_grey: tuple[float, float] = (-4.0, 6.0)
    necrosis_above_csf: tuple[float, float] = (4.0, 12.0)
    cyst_above_csf: tuple[float, float] = (0.0, 6.0)
    calcification: tuple[float, float] = (150.0, 600.0)

    def draw(self, rng: np.random.Generator, class_hu: np.ndarray) -> np.ndarray:
        """One subject's lesion CT numbers.

        Args:
            rng: source of randomness (6 uniform draws, in :class:`LesionLabel` order).
            class_hu: the subject's (CSF, grey, white) HU.

        Returns:
            float32 ``(len(LesionLabel),)`` indexed by label value; entry 0 (no lesion) is NaN.
        """
        csf, grey, white = (float(v) for v in class_hu)
        values = np.full(len(LesionLabel), np.nan, dtype=np.float32)
        values[LesionLabel.OEDEMA] = white - rng.uniform(*self.oedema_below_white)
        values[LesionLabel.NON_ENHANCING] = white + rng.uniform(*self.non_enhancing_from_white)
        values[LesionLabel.ENHANCING] = grey + rng.uniform(*self.enhancing_from_grey)
        values[LesionLabel.NECROSIS] = csf + rng.uniform(*self.necrosis_above_csf)
        values[LesionLabel.CYST] = csf + rng.uniform(*self.cyst_above_csf)
        values[LesionLabel.CALCIFICATION] = rng.uniform(*self.calcification)
        return values


LESION_HU = LesionHounsfield()


# --------------------------------------------------------------------------- FLAIR


def flair_reference(flair: np.ndarray, white: np.ndarray) -> tuple[float, float]:
    """Median and robust SD (1.4826 x MAD) of the FLAIR in white matter.

    Raw FLAIR has no fixed scale, so every FLAIR threshold is relative to the subject's own
    normal-appearing white matter. Zero voxels (no signal: a FLAIR that misses part of the
    brain) are left out.

    Raises:
        ValueError: fewer than 100 white-matter voxels with signal.
    """
    values = np.asarray(flair, dtype=np.float32)[np.asarray(white, dtype=bool)]
    values = values[values > 0]
    if values.size < 100:
        raise ValueError(f"only {values.size} white-matter voxels with FLAIR signal: no reference")
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    return median, spread


@dataclass(frozen=True)
class FlairRule:
    """The FLAIR-hyperintensity rule for subjects without tumour labels.

    A brain voxel is hyperintense when its FLAIR exceeds the white-matter median by
    ``threshold_sd`` robust SDs AND by the factor ``min_ratio`` (the ratio guards against a
    very narrow white-matter peak). Voxels within ``rim_mm`` of the brain-mask edge are
    ignored (cortex and CSF next to the mask edge are bright on many FLAIRs: inflow and
    partial volume). A morphological opening of radius ``opening_mm`` drops thin bright
    lines (ependyma, vessels), then connected components (26-connectivity) smaller than
    ``min_component_ml`` are dropped (small vessel disease spots, noise).

    White matter for the reference: T1 mixture posterior of white matter at least
    ``white_probability`` (0.5: the voxels the mixture calls white matter; a stricter bound
    leaves no voxel at all in subjects whose T1 classes overlap, e.g. Brats18_2013_20_1).

    Calibrated once on the 17 BraTS subjects that have labels (README: Dice against their
    whole-tumour label); the thresholds are not refitted per subject.
    """

    threshold_sd: float = 2.5
    min_ratio: float = 1.2
    rim_mm: float = 3.0
    opening_mm: float = 1.0
    min_component_ml: float = 3.0
    white_probability: float = 0.5


FLAIR_RULE = FlairRule()


def flair_hyperintensity(
    flair: np.ndarray,
    mask: np.ndarray,
    white_probability: np.ndarray,
    voxel_size: np.ndarray | tuple[float, float, float] = (1.0, 1.0, 1.0),
    rule: FlairRule = FLAIR_RULE,
) -> np.ndarray:
    """The FLAIR-hyperintense region of a skull-stripped brain (see :class:`FlairRule`).

    Args:
        flair: FLAIR intensities (raw units) on the grid of ``mask``.
        mask: brain mask.
        white_probability: T1 mixture posterior of white matter (same grid).
        voxel_size: voxel edge lengths in mm.
        rule: thresholds and filters.

    Returns:
        bool ``(X, Y, Z)``.

    Raises:
        ValueError: shapes differ, or the FLAIR has no usable white-matter reference.
    """
    # Imported here: lib.data.ct_brain pulls in torch (through the model frame), which the
    # command line's help and the dataset layouts must not load.
    from lib.data.ct_brain import _remove_small_components, ellipsoid

    flair = np.asarray(flair, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if flair.shape != mask.shape or white_probability.shape != mask.shape:
        raise ValueError(f"flair {flair.shape}, mask {mask.shape} and white {white_probability.shape} must match")
    voxel_size = np.asarray(voxel_size, dtype=np.float64)
    median, spread = flair_reference(flair, mask & (white_probability >= rule.white_probability))
    threshold = max(median + rule.threshold_sd * spread, rule.min_ratio * median)
    inner = ndimage.binary_erosion(mask, ellipsoid(rule.rim_mm, tuple(voxel_size))) if rule.rim_mm > 0 else mask
    bright = inner & (flair > threshold)
    if rule.opening_mm > 0:
        bright = ndimage.binary_opening(bright, ellipsoid(rule.opening_mm, tuple(voxel_size)))
    min_voxels = max(1, int(round(rule.min_component_ml * 1000.0 / float(np.prod(voxel_size)))))
    return _remove_small_components(bright, min_voxels)


def _split_core(
    core: np.ndarray, csf_probability: np.ndarray, flair: np.ndarray | None, flair_white_median: float | None
) -> np.ndarray:
    """Label tumour-core voxels: fluid (T1 CSF-like) is necrosis, or cyst where the FLAIR is
    suppressed like free water (not above the white-matter FLAIR); the rest is solid
    non-enhancing tumour."""
    labels = np.zeros(core.shape, dtype=np.uint8)
    fluid = core & (csf_probability >= FLUID_PROBABILITY)
    labels[core & ~fluid] = LesionLabel.NON_ENHANCING
    labels[fluid] = LesionLabel.NECROSIS
    if flair is not None and flair_white_median is not None:
        labels[fluid & (flair <= flair_white_median)] = LesionLabel.CYST
    return labels


def lesions_from_brats_labels(
    labels: np.ndarray,
    mask: np.ndarray,
    probabilities: np.ndarray,
    flair: np.ndarray | None = None,
    white_probability: float = FLAIR_RULE.white_probability,
) -> np.ndarray:
    """Lesion label map from BraTS tumour labels.

    2 -> oedema, 4 -> enhancing tumour, 3 -> non-enhancing tumour; the core label 1 is split
    (see :func:`_split_core`): T1 fluid-like voxels (CSF posterior >= 0.5) are necrosis, or
    cyst when the FLAIR is given and not above the white-matter FLAIR median; the others are
    non-enhancing tumour. Labels outside the brain mask are dropped.

    Args:
        labels: BraTS label map (values in 0, 1, 2, 3, 4).
        mask: brain mask.
        probabilities: the T1 tissue posteriors (CSF, grey, white), ``(3, X, Y, Z)``.
        flair: optional FLAIR on the same grid (separates cysts from necrosis).
        white_probability: white-matter posterior above which a voxel is reference white matter.

    Returns:
        uint8 lesion label map.

    Raises:
        ValueError: shapes differ or a label value is not a BraTS label.
    """
    labels = np.rint(np.asarray(labels)).astype(np.int64)
    mask = np.asarray(mask, dtype=bool)
    if labels.shape != mask.shape or probabilities.shape[1:] != mask.shape:
        raise ValueError(f"labels {labels.shape}, mask {mask.shape}, probabilities {probabilities.shape} differ")
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *BRATS_LABELS})
    if unknown:
        raise ValueError(f"label values {unknown} are not BraTS tumour labels (0, {', '.join(map(str, BRATS_LABELS))})")
    labels = np.where(mask, labels, 0)
    reference = None
    if flair is not None:
        reference, _ = flair_reference(flair, mask & (labels == 0) & (probabilities[2] >= white_probability))
    out = _split_core(labels == 1, probabilities[0], flair, reference)
    out[labels == 2] = LesionLabel.OEDEMA
    out[labels == 3] = LesionLabel.NON_ENHANCING
    out[labels == 4] = LesionLabel.ENHANCING
    return out


def lesions_from_flair(
    flair: np.ndarray,
    mask: np.ndarray,
    probabilities: np.ndarray,
    voxel_size: np.ndarray | tuple[float, float, float] = (1.0, 1.0, 1.0),
    rule: FlairRule = FLAIR_RULE,
) -> np.ndarray:
    """Lesion label map from the FLAIR alone (no tumour labels).

    The hyperintense region (:func:`flair_hyperintensity`) is oedema. What it encloses in an
    axial slice (holes of the region, filled per slice) is tumour core, split like the BraTS
    core label (:func:`_split_core`). Limits: FLAIR cannot tell oedema from infiltrating
    non-enhancing tumour (both are bright), so the bright region is all oedema; without a
    contrast T1 no voxel is enhancing tumour; a core that is itself FLAIR-bright is counted
    as oedema; any other FLAIR-bright lesion (demyelination, infarct, gliosis) larger than the
    size filter is painted as oedema too.

    Returns:
        uint8 lesion label map.
    """
    bright = flair_hyperintensity(flair, mask, probabilities[2], voxel_size, rule)
    filled = np.stack([ndimage.binary_fill_holes(bright[:, :, z]) for z in range(bright.shape[2])], axis=2)
    mask = np.asarray(mask, dtype=bool)
    core = filled & ~bright & mask
    median, _ = flair_reference(flair, mask & ~filled & (probabilities[2] >= rule.white_probability))
    out = _split_core(core, probabilities[0], np.asarray(flair, dtype=np.float32), median)
    out[bright] = LesionLabel.OEDEMA
    return out


# --------------------------------------------------------------------------- calcification


def add_calcifications(
    lesions: np.ndarray,
    rng: np.random.Generator,
    probability: float = 0.2,
    count: tuple[int, int] = (1, 3),
    radius_mm: tuple[float, float] = (1.0, 2.5),
    voxel_size: np.ndarray | tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Place calcified foci in a tumour, with probability ``probability`` per lesion-bearing subject.

    Calcification is where the tumour is: solid core (non-enhancing, enhancing) when there is
    one, else anywhere in the lesion (a FLAIR-only lesion: low-grade gliomas such as
    oligodendroglioma are the ones that calcify most often). Each focus is a ball of radius
    drawn in ``radius_mm`` centred on a random candidate voxel, clipped to the lesion.

    Random draws, in order: the yes/no draw (always), then count, and per focus its centre and
    radius. A subject without lesions gets none.

    Returns:
        a new uint8 label map (``lesions`` is not modified).
    """
    out = np.array(lesions, dtype=np.uint8, copy=True)
    place = rng.uniform() < probability
    lesion = out != LesionLabel.NONE
    if not place or not lesion.any():
        return out
    solid = (out == LesionLabel.NON_ENHANCING) | (out == LesionLabel.ENHANCING)
    candidates = np.flatnonzero(solid if solid.any() else lesion)
    voxel_size = np.asarray(voxel_size, dtype=np.float64)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], out.shape))
        radius = rng.uniform(*radius_mm)
        half = np.ceil(radius / voxel_size).astype(int)
        low = np.maximum(centre - half, 0)
        high = np.minimum(centre + half + 1, out.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(low, high, centre, voxel_size)]
        offsets = np.meshgrid(*axes, indexing="ij")
        ball = sum(o**2 for o in offsets) <= radius**2
        out[box][ball & lesion[box]] = LesionLabel.CALCIFICATION
    return out
