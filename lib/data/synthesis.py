"""Paired brain-only CT/T1 "pseudo-subjects" synthesised from real T1 images.

No paired CT and T1 of one head is available to this project, so the ``open`` dataset
layout makes them: a real T1 (nilearn's MNI152 template with its tissue maps, or a BraTS
T1 from ``shared/data`` when present) gives soft tissue maps (CSF, grey matter, white
matter) and, for BraTS anatomies, a lesion label map (:mod:`lib.data.lesions`: from the
BraTS tumour labels, or from the subject's FLAIR hyperintensity). The CT is painted from
those maps: each class and lesion gets its Hounsfield value, drawn per subject between the
values measured on real head CTs (:mod:`lib.data.ct_texture`); the result is blurred by
about 1 mm in-plane and by the slice profile through the slices (partial volume), and given
noise with the power spectrum and slice-to-slice correlation of real CT noise. Random smooth
deformations, shared by the CT, the T1 and the lesion map so that they stay paired voxel by
voxel, and a bias field plus a global intensity scale/gamma on the T1 side make distinct
pseudo-subjects. The T1 stays the subject's real T1, so a tumour shows on both sides. This
trains and tests the system; it is not CT physics (no skull, beam hardening or streaks).

Conventions, for every array here: numpy float32 (masks bool, label maps uint8), shape
``(X, Y, Z)`` in nibabel's RAS+ closest-canonical orientation, axial slices along the last
axis, 1 mm isotropic voxels (displacements in voxels are millimetres). The volumes are
skull-stripped, so only CSF, grey and white matter (and lesions) occur inside the brain
mask. Outside the mask the CT is air, exactly ``HU.air`` (-1000 HU), which any later CT
window (e.g. [-100, 200] HU -> [-1, 1]) clips to its lower end; the T1 is 0 there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

from lib.data.ct_texture import FWHM_PER_SIGMA, NoiseModel, RimModel, ScanTexture, load_scan_textures
from lib.data.lesions import (
    LESION_HU,
    LesionHounsfield,
    LesionLabel,
    LesionSource,
    add_calcifications,
    lesions_from_brats_labels,
    lesions_from_flair,
)

__all__ = [
    "HU",
    "TISSUE_CLASSES",
    "CtAppearance",
    "HounsfieldUnits",
    "PseudoSubject",
    "TissueModel",
    "bias_field",
    "draw_appearance",
    "make_pseudo_subject",
    "mni_ct_atlas",
    "to_canonical",
    "with_lesions",
    "random_smooth_deformation",
    "synthesise_ct",
    "tissue_model_from_mni",
    "tissue_model_from_t1",
    "warp",
]

# Order of the tissue maps in TissueModel.probabilities: T1 intensity increases along it.
TISSUE_CLASSES: tuple[str, str, str] = ("csf", "grey", "white")


@dataclass(frozen=True)
class HounsfieldUnits:
    """Literature CT numbers (HU) of head tissues (approximate; README, synthesis section).

    The synthetic CT paints the brain with values measured on real CTs
    (:func:`draw_appearance`); these literature values are the reference they are compared
    with, and paint the noise-free atlas CT that texture fitting registers. ``air`` fills
    everything outside the brain mask. The others are kept for a later whole-head model.

    Attributes:
        air: -1000 HU by definition of the scale.
        fat: about -100 HU.
        csf: cerebrospinal fluid, about 8 HU (slightly above water).
        grey: grey matter, about 40 HU.
        white: white matter, about 28 HU (lower than grey matter: more lipid-rich myelin).
        muscle: muscle and skin, about 45 HU.
        diploe: cancellous bone between the skull tables, about 400 HU.
        cortical_bone: compact bone of the skull tables, 1000-1500 HU; the middle is used.
    """

    air: float = -1000.0
    fat: float = -100.0
    csf: float = 8.0
    grey: float = 40.0
    white: float = 28.0
    muscle: float = 45.0
    diploe: float = 400.0
    cortical_bone: float = 1250.0

    @property
    def brain(self) -> np.ndarray:
        """float32 ``(3,)``: the HU of the classes in :data:`TISSUE_CLASSES` order."""
        return np.array([self.csf, self.grey, self.white], dtype=np.float32)


HU = HounsfieldUnits()


@dataclass(frozen=True, eq=False)
class TissueModel:
    """A skull-stripped T1 with its soft tissue maps, the source of pseudo-subjects.

    Arrays are coerced to the documented dtypes on construction (without copying when they
    already have them).

    Attributes:
        t1: float32 ``(X, Y, Z)`` T1 intensities, 0 outside the mask.
        mask: bool ``(X, Y, Z)`` brain mask.
        probabilities: float32 ``(3, X, Y, Z)``: CSF, grey matter, white matter
            (:data:`TISSUE_CLASSES` order); they sum to 1 inside the mask and are 0 outside.
        affine: float64 4x4 voxel-to-RAS-millimetre matrix of the arrays.
        lesions: uint8 ``(X, Y, Z)`` :class:`~lib.data.lesions.LesionLabel` map (0: no
            lesion; all 0 when not given). A lesion voxel is painted with its lesion's HU
            instead of the tissue classes'.
        lesion_source: where the lesion map came from.
    """

    t1: np.ndarray
    mask: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray
    lesions: np.ndarray | None = None
    lesion_source: LesionSource = LesionSource.NONE

    def __post_init__(self) -> None:
        # object.__setattr__ because the dataclass is frozen; coercion here keeps every
        # consumer free of dtype checks.
        object.__setattr__(self, "t1", np.asarray(self.t1, dtype=np.float32))
        object.__setattr__(self, "mask", np.asarray(self.mask, dtype=bool))
        object.__setattr__(self, "probabilities", np.asarray(self.probabilities, dtype=np.float32))
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))
        lesions = np.zeros(self.t1.shape, dtype=np.uint8) if self.lesions is None else self.lesions
        object.__setattr__(self, "lesions", np.asarray(lesions, dtype=np.uint8))
        if self.t1.ndim != 3:
            raise ValueError(f"t1 must be 3-D, got shape {self.t1.shape}")
        if self.mask.shape != self.t1.shape:
            raise ValueError(f"mask shape {self.mask.shape} differs from t1 shape {self.t1.shape}")
        if self.probabilities.shape != (len(TISSUE_CLASSES), *self.t1.shape):
            raise ValueError(
                f"probabilities must have shape {(len(TISSUE_CLASSES), *self.t1.shape)}, got {self.probabilities.shape}"
            )
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {self.affine.shape}")
        if self.lesions.shape != self.t1.shape:
            raise ValueError(f"lesions shape {self.lesions.shape} differs from t1 shape {self.t1.shape}")
        if self.lesions.max(initial=0) >= len(LesionLabel):
            raise ValueError(f"lesion labels must be LesionLabel values (0..{len(LesionLabel) - 1})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The volume shape ``(X, Y, Z)``."""
        return tuple(self.t1.shape)  # type: ignore[return-value]

    @property
    def voxel_size(self) -> np.ndarray:
        """float64 ``(3,)`` voxel edge lengths in mm, from the affine."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass(frozen=True, eq=False)
class PseudoSubject:
    """One synthetic paired CT/T1, aligned voxel by voxel.

    Attributes:
        ct: float32 ``(X, Y, Z)`` in HU; ``HU.air`` outside the mask.
        t1: float32 ``(X, Y, Z)`` T1 intensities (bias field and contrast applied), 0 outside.
        mask: bool ``(X, Y, Z)`` brain mask shared by both.
        seed: the seed that reproduces it with :func:`make_pseudo_subject`.
        affine: float64 4x4 voxel-to-RAS-millimetre matrix (that of the source model).
        lesions: uint8 ``(X, Y, Z)`` lesion label map, deformed with the pair (calcified foci
            added).
        appearance: the CT appearance it was painted with.
    """

    ct: np.ndarray
    t1: np.ndarray
    mask: np.ndarray
    seed: int
    affine: np.ndarray
    lesions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.uint8))
    appearance: CtAppearance | None = None


# --------------------------------------------------------------------------- tissue models


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``array`` to RAS+ closest canonical, as ``nib.as_closest_canonical`` would.

    Returns:
        The reoriented array (a view when possible) and its affine.
    """
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, np.asarray(affine, dtype=np.float64)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return nib.orientations.apply_orientation(array, ornt), new_affine


def _normalise_probabilities(probabilities: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Make ``probabilities`` (3, ...) sum to 1 inside ``mask`` and vanish outside, in place."""
    probabilities[:, ~mask] = 0.0
    total = probabilities.sum(axis=0)
    # A mask voxel whose maps are all 0 (possible only from degenerate input) becomes CSF,
    # the class of "brain-mask fluid" that is neither grey nor white matter.
    empty = mask & (total <= 1e-6)
    probabilities[0, empty] = 1.0
    total[empty] = 1.0
    total[~mask] = 1.0
    probabilities /= total
    return probabilities


def tissue_model_from_mni() -> TissueModel:
    """The tissue model of nilearn's 1 mm MNI152 template (bundled with nilearn, offline).

    Grey and white matter are nilearn's MNI152 tissue maps; CSF is what remains of the brain
    mask, ``clip(1 - GM - WM, 0, 1)``; the three are renormalised to sum to 1 inside the mask.
    The T1 template (intensities in [0, 1]) is zeroed outside the mask.

    Returns:
        The model, shape (197, 233, 189) in RAS+ canonical orientation. Loading takes ~2 s.
    """
    from nilearn import datasets  # imported here: nilearn is slow to import and only needed here

    def load(loader) -> tuple[np.ndarray, np.ndarray]:
        image = nib.as_closest_canonical(loader(resolution=1))
        return np.asarray(image.get_fdata(dtype=np.float32)), image.affine

    t1, affine = load(datasets.load_mni152_template)
    grey, _ = load(datasets.load_mni152_gm_template)
    white, _ = load(datasets.load_mni152_wm_template)
    mask_values, _ = load(datasets.load_mni152_brain_mask)
    mask = mask_values > 0.5
    csf = np.clip(1.0 - grey - white, 0.0, 1.0)
    probabilities = _normalise_probabilities(np.stack([csf, grey, white]), mask)
    t1 = np.where(mask, t1, np.float32(0.0))
    return TissueModel(t1=t1, mask=mask, probabilities=probabilities, affine=affine)


@lru_cache(maxsize=1)
def mni_ct_atlas() -> tuple[np.ndarray, TissueModel]:
    """nilearn's MNI152 painted as a noise-free brain CT (the :data:`HU` literature values of its
    tissue maps), and its tissue model: what :func:`lib.data.atlas.atlas_priors` registers to a
    real CT's brain. Loaded once per process (~5 s); the arrays are shared, do not modify them."""
    model = tissue_model_from_mni()
    return np.tensordot(HU.brain, model.probabilities, axes=1).astype(np.float32), model


# Atlas priors are smoothed by this Gaussian (SD, mm) and mixed with a uniform prior of this
# weight: an affine registration misplaces thin cortex by a millimetre or two, and the T1 must
# be able to overrule the atlas where they disagree (ventricles of another size, a tumour).
ATLAS_PRIOR_SMOOTHING_MM = 1.0
ATLAS_PRIOR_FLOOR = 0.1
ATLAS_EM_ITERATIONS = 30


def _atlas_posteriors(x: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Class posteriors of intensities ``x`` (N,) under per-voxel priors ``(3, N)``.

    The expectation-maximisation of a Gaussian mixture whose mixing weights are the voxel's
    atlas priors (the E and M steps of unified segmentation, Ashburner & Friston, NeuroImage
    26:839-851, 2005, without its bias field and warp updates): the priors are normalised and
    mixed with :data:`ATLAS_PRIOR_FLOOR` of a uniform prior; class means and SDs start at the
    prior-weighted ones and are refitted :data:`ATLAS_EM_ITERATIONS` times.

    Returns:
        float64 ``(3, N)`` posteriors summing to 1.
    """
    priors = priors / np.maximum(priors.sum(axis=0), 1e-6)
    priors = (1.0 - ATLAS_PRIOR_FLOOR) * priors + ATLAS_PRIOR_FLOOR / len(priors)
    posteriors = priors
    for _ in range(ATLAS_EM_ITERATIONS):
        weight = posteriors.sum(axis=1)
        means = posteriors @ x / weight
        sds = np.sqrt(np.maximum(np.einsum("cn,cn->c", posteriors, (x[None] - means[:, None]) ** 2) / weight, 1e-12))
        likelihood = priors * np.exp(-0.5 * ((x[None] - means[:, None]) / sds[:, None]) ** 2) / sds[:, None]
        posteriors = likelihood / np.maximum(likelihood.sum(axis=0), 1e-300)
    return posteriors


def tissue_model_from_t1(
    t1: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    seed: int = 0,
    max_fit_voxels: int = 100_000,
    atlas: TissueModel | None = None,
) -> TissueModel:
    """Soft 3-class segmentation of a skull-stripped T1 into a tissue model.

    Without an atlas, a 1-D Gaussian mixture (scikit-learn) is fitted to the T1 intensities
    of a random subsample of the brain voxels (the histogram needs far fewer than millions
    of samples), then gives every brain voxel its posterior class probabilities. Components
    are ordered by mean intensity: on T1, CSF is darkest, then grey matter, then white
    matter.

    With an atlas (nilearn's MNI152 model), its tissue maps are registered affinely to the T1
    (:func:`lib.data.atlas.atlas_priors`) and serve as per-voxel class priors of the mixture
    (:func:`_atlas_posteriors`). The BraTS T1 images have weak grey/white contrast: a plain
    mixture leaves 7 % (BraTS-GLI-00001-000) to 14 % (Brats18_CBICA_AOO_1) of the brain with
    any class posterior above 0.9 and paints a nearly uniform CT; with the priors 28 % and
    41 %, and the cortex and deep grey matter come out as grey matter.

    Pathology (e.g. a glioma in BraTS) is absorbed by whichever class it resembles; the lesion
    map (:func:`with_lesions`) then paints it on the CT.

    Args:
        t1: ``(X, Y, Z)`` T1 intensities, any orientation, 1 mm voxels expected.
        mask: ``(X, Y, Z)`` brain mask (non-zero = brain), e.g. ``t1 > 0`` for BraTS.
        affine: 4x4 voxel-to-world matrix of both arrays.
        seed: seeds the voxel subsample and the mixture fit.
        max_fit_voxels: at most this many brain voxels are used for the fit (without atlas).
        atlas: a tissue model whose maps become spatial priors (e.g. :func:`tissue_model_from_mni`).

    Returns:
        The model reoriented to RAS+ canonical; ``t1`` is zeroed outside the mask.

    Raises:
        ValueError: shapes differ, or the mask holds too few voxels for three classes.
    """
    from sklearn.mixture import GaussianMixture

    t1 = np.asarray(t1, dtype=np.float32)
    mask = np.asarray(mask) != 0
    if t1.ndim != 3 or mask.shape != t1.shape:
        raise ValueError(f"t1 {t1.shape} and mask {mask.shape} must be the same 3-D shape")
    t1, canonical_affine = to_canonical(t1, np.asarray(affine, dtype=np.float64))
    mask, _ = to_canonical(mask, np.asarray(affine, dtype=np.float64))
    values = t1[mask]
    if values.size < 30:
        raise ValueError(f"the brain mask holds {values.size} voxels, too few to segment")

    # Divide by the median so the mixture's absolute covariance regulariser (1e-6) is
    # negligible whatever the scanner's intensity scale.
    scale = float(np.median(values)) or 1.0
    x = (values / scale).astype(np.float64)[:, None]
    if atlas is not None:
        from lib.data.atlas import atlas_priors

        priors = atlas_priors(t1, mask, canonical_affine, atlas.t1, atlas.mask, atlas.affine, atlas.probabilities)
        sigma = ATLAS_PRIOR_SMOOTHING_MM / np.linalg.norm(canonical_affine[:3, :3], axis=0)
        priors = np.stack([ndimage.gaussian_filter(prior, sigma)[mask] for prior in priors])
        posteriors = _atlas_posteriors(x[:, 0], priors).T.astype(np.float32)
    else:
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(x.shape[0], size=min(max_fit_voxels, x.shape[0]), replace=False)]
        # Starting from low/middle/high quantiles makes the fit deterministic and avoids a
        # k-means start splitting the large white-matter peak in two.
        means_init = np.quantile(sample, [0.1, 0.5, 0.9])[:, None]
        gmm = GaussianMixture(n_components=3, means_init=means_init, random_state=seed, max_iter=200)
        gmm.fit(sample)
        order = np.argsort(gmm.means_[:, 0])
        posteriors = gmm.predict_proba(x)[:, order].astype(np.float32)

    probabilities = np.zeros((3, *t1.shape), dtype=np.float32)
    probabilities[:, mask] = posteriors.T
    probabilities = _normalise_probabilities(probabilities, mask)
    t1 = np.where(mask, t1, np.float32(0.0))
    return TissueModel(t1=t1, mask=mask, probabilities=probabilities, affine=canonical_affine)


def with_lesions(
    model: TissueModel,
    labels: np.ndarray | None = None,
    flair: np.ndarray | None = None,
    affine: np.ndarray | None = None,
) -> TissueModel:
    """The model with its lesion label map, from BraTS tumour labels or else from the FLAIR.

    Tumour labels win when given (:func:`~lib.data.lesions.lesions_from_brats_labels`; the
    FLAIR then only separates cysts from necrosis); with the FLAIR alone the FLAIR rule finds
    the lesion (:func:`~lib.data.lesions.lesions_from_flair`); with neither the model has no
    lesion.

    Args:
        model: the tissue model (its T1 gives the fluid/solid split of the tumour core).
        labels: BraTS label map on the model's grid (or on ``affine``'s).
        flair: FLAIR on the model's grid (or on ``affine``'s).
        affine: the voxel-to-world matrix of ``labels`` and ``flair`` when they are not yet in
            the model's canonical orientation; they are reoriented and must then match it.

    Raises:
        ValueError: the inputs do not lie on the model's grid.
    """

    def on_grid(array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        array = np.asarray(array)
        if affine is not None:
            array, canonical_affine = to_canonical(array, np.asarray(affine, dtype=np.float64))
            if not np.allclose(canonical_affine, model.affine, atol=1e-3):
                raise ValueError("labels/flair are not on the tissue model's grid")
        if array.shape != model.shape:
            raise ValueError(f"labels/flair shape {array.shape} differs from the model's {model.shape}")
        return array

    labels, flair = on_grid(labels), on_grid(flair)
    if labels is not None:
        lesions = lesions_from_brats_labels(labels, model.mask, model.probabilities, flair)
        source = LesionSource.LABELS
    elif flair is not None:
        lesions = lesions_from_flair(flair, model.mask, model.probabilities, model.voxel_size)
        source = LesionSource.FLAIR
    else:
        lesions, source = None, LesionSource.NONE
    return replace(model, lesions=lesions, lesion_source=source)


# --------------------------------------------------------------------------- CT synthesis

# Spatial scale (SD, mm) of the tissue heterogeneity that noise does not explain
# (ScanTexture.tissue_sd_hu): a few millimetres, the size of small vessels and perivascular
# spaces; the real scans do not constrain it better.
TISSUE_TEXTURE_MM = 2.0


@dataclass(frozen=True, eq=False)
class CtAppearance:
    """How one pseudo-subject's CT looks: tissue and lesion HU, noise, tissue texture.

    Attributes:
        class_hu: float32 ``(3,)`` HU of (CSF, grey, white matter).
        lesion_hu: float32 ``(len(LesionLabel),)`` HU per lesion label (entry 0 unused).
        noise: the CT noise (level, in-plane kernel, slice profile; the slice profile also
            blurs the anatomy through the slices).
        tissue_sd_hu: SD of a smooth heterogeneity field (scale :data:`TISSUE_TEXTURE_MM`).
        rim: the HU rise towards the edge of the brain (towards the skull).
        description: which real scans it was drawn from.
    """

    class_hu: np.ndarray
    lesion_hu: np.ndarray
    noise: NoiseModel
    tissue_sd_hu: float = 0.0
    rim: RimModel = RimModel()
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_hu", np.asarray(self.class_hu, dtype=np.float32))
        object.__setattr__(self, "lesion_hu", np.asarray(self.lesion_hu, dtype=np.float32))
        if self.class_hu.shape != (len(TISSUE_CLASSES),) or self.lesion_hu.shape != (len(LesionLabel),):
            raise ValueError(
                f"class_hu must have {len(TISSUE_CLASSES)} values and lesion_hu {len(LesionLabel)}, "
                f"got {self.class_hu.shape} and {self.lesion_hu.shape}"
            )
        if self.tissue_sd_hu < 0:
            raise ValueError(f"tissue_sd_hu must be non-negative, got {self.tissue_sd_hu}")

    @classmethod
    def of_texture(
        cls, texture: ScanTexture, rng: np.random.Generator, lesion_hu: LesionHounsfield = LESION_HU
    ) -> CtAppearance:
        """Exactly one real scan's appearance (lesion HU drawn relative to its tissue HU)."""
        class_hu = np.asarray(texture.class_hu, dtype=np.float32)
        return cls(
            class_hu, lesion_hu.draw(rng, class_hu), texture.noise, texture.tissue_sd_hu, texture.rim, texture.name
        )

    def without_noise(self) -> CtAppearance:
        """The same appearance with no noise and no heterogeneity (the slice profile and rim stay)."""
        return replace(self, noise=replace(self.noise, sd_hu=0.0), tissue_sd_hu=0.0)


def draw_appearance(
    rng: np.random.Generator,
    textures: tuple[ScanTexture, ...] | None = None,
    class_jitter_hu: float = 2.0,
    noise_scale_range: tuple[float, float] = (0.8, 1.25),
    lesion_hu: LesionHounsfield = LESION_HU,
) -> CtAppearance:
    """A pseudo-subject's CT appearance, drawn between two real scans.

    Two of the real scans' textures ``a`` and ``b`` (possibly the same) and a weight ``u``
    in [0, 1] are drawn; every number (class HU, noise level, kernel, slice profile, tissue
    heterogeneity, rim) is ``(1 - u) a + u b``, so subjects span the scanners, calibrations and
    slice thicknesses measured, and the numbers of one subject stay consistent (a thick
    slice comes with its lower noise). Then each class HU moves by up to
    ``class_jitter_hu`` (tissue differs between people by a few HU) and the noise level is
    scaled within ``noise_scale_range`` (dose varies more than two scanners show). Lesion HU
    are drawn relative to the class HU (:class:`~lib.data.lesions.LesionHounsfield`).

    Random draws, in order: 2 scan indices, ``u``, 3 class jitters, the noise scale, then the
    6 lesion HU.

    Args:
        rng: source of randomness.
        textures: the real scans (default: the fitted ``ct_texture.json``).
        class_jitter_hu: bound of the per-class HU change.
        noise_scale_range: (low, high) of the noise-level factor.
        lesion_hu: lesion HU ranges.
    """
    textures = load_scan_textures() if textures is None else textures
    low, high = noise_scale_range
    if not 0.0 <= low <= high or class_jitter_hu < 0:
        raise ValueError(
            "need 0 <= noise_scale_range[0] <= noise_scale_range[1] and class_jitter_hu >= 0, "
            f"got {noise_scale_range} and {class_jitter_hu}"
        )
    first, second = (textures[int(k)] for k in rng.integers(len(textures), size=2))
    u = float(rng.uniform())

    def mix(a: float, b: float) -> float:
        return (1.0 - u) * a + u * b

    class_hu = np.array([mix(a, b) for a, b in zip(first.class_hu, second.class_hu)], dtype=np.float32)
    class_hu += rng.uniform(-class_jitter_hu, class_jitter_hu, size=3).astype(np.float32)
    noise = NoiseModel(
        sd_hu=mix(first.noise.sd_hu, second.noise.sd_hu) * float(rng.uniform(low, high)),
        kernel_mm=mix(first.noise.kernel_mm, second.noise.kernel_mm),
        thickness_mm=mix(first.noise.thickness_mm, second.noise.thickness_mm),
    )
    return CtAppearance(
        class_hu=class_hu,
        lesion_hu=lesion_hu.draw(rng, class_hu),
        noise=noise,
        tissue_sd_hu=mix(first.tissue_sd_hu, second.tissue_sd_hu),
        rim=RimModel(hu=mix(first.rim.hu, second.rim.hu), length_mm=mix(first.rim.length_mm, second.rim.length_mm)),
        description=f"{first.name} x {1.0 - u:.2f} + {second.name} x {u:.2f}",
    )


def _masked_blur(values: np.ndarray, mask: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    """Gaussian blur of ``values`` using only voxels inside ``mask`` (normalised convolution).

    Blurring the brain together with the -1000 HU outside would paint a dark rim of
    impossible values round the brain; real skull-stripped CT ends sharply at the mask.
    """
    weight = mask.astype(np.float32)
    numerator = ndimage.gaussian_filter(values * weight, sigma_vox)
    denominator = ndimage.gaussian_filter(weight, sigma_vox)
    out = np.zeros_like(values)
    # Inside the mask the denominator holds at least the voxel's own kernel weight (> 0).
    np.divide(numerator, denominator, out=out, where=mask)
    return out


def synthesise_ct(
    model: TissueModel,
    rng: np.random.Generator,
    appearance: CtAppearance | None = None,
    blur_mm: float = 1.0,
) -> np.ndarray:
    """Paint a brain-only CT (HU) from a tissue model and its lesion map.

    Each brain voxel gets the probability-weighted sum of the class HU (partial volume), or
    its lesion's HU where the lesion map has a label. The result is blurred inside the brain
    by a Gaussian of SD ``blur_mm`` in-plane (scanner resolution) and, through the slices, of
    SD ``sqrt(blur_mm^2 + (thickness / FWHM_PER_SIGMA)^2)`` (the slice profile of
    ``appearance.noise``); the rise towards the brain's edge
    (:meth:`~lib.data.ct_texture.RimModel.offset`, measured to the brain mask: the skull of a
    real CT lies a few millimetres of CSF further out), a smooth heterogeneity field of SD
    ``appearance.tissue_sd_hu`` and the CT noise
    (:meth:`~lib.data.ct_texture.NoiseModel.sample`) are added, and everything outside the
    mask is set to ``HU.air``.

    Random draws, in order: the appearance (when not given, :func:`draw_appearance`), the
    heterogeneity field, the noise field.

    Args:
        model: tissue maps, lesion map and mask.
        rng: source of randomness.
        appearance: tissue/lesion HU and noise (default: drawn from the real scans).
        blur_mm: in-plane standard deviation of the Gaussian blur in mm (0 disables it).

    Returns:
        float32 ``(X, Y, Z)`` CT in HU.
    """
    if blur_mm < 0:
        raise ValueError(f"blur_mm must be non-negative, got {blur_mm}")
    appearance = draw_appearance(rng) if appearance is None else appearance
    values = appearance.class_hu
    p = model.probabilities
    ct = values[0] * p[0] + values[1] * p[1] + values[2] * p[2]
    lesion = model.lesions != LesionLabel.NONE
    ct[lesion] = appearance.lesion_hu[model.lesions[lesion]]
    profile_mm = appearance.noise.thickness_mm / FWHM_PER_SIGMA
    sigma_mm = np.array([blur_mm, blur_mm, math.hypot(blur_mm, profile_mm)])
    if np.any(sigma_mm > 0):
        ct = _masked_blur(ct, model.mask, sigma_mm / model.voxel_size)
    ct += appearance.rim.offset(model.mask, model.voxel_size)
    heterogeneity = NoiseModel(
        sd_hu=appearance.tissue_sd_hu, kernel_mm=TISSUE_TEXTURE_MM, thickness_mm=TISSUE_TEXTURE_MM * FWHM_PER_SIGMA
    )
    ct += heterogeneity.sample(model.shape, rng, model.voxel_size)
    ct += appearance.noise.sample(model.shape, rng, model.voxel_size)
    ct[~model.mask] = HU.air
    return ct


# --------------------------------------------------------------------------- deformations


def _smooth_random_field(shape: tuple[int, ...], rng: np.random.Generator, sigma: float, channels: int) -> np.ndarray:
    """Gaussian-smoothed white noise, float32 ``(channels, *shape)``.

    The noise lives on a lattice of spacing ``sigma / 2`` reaching ``3 sigma`` beyond the
    volume (so the edges are not attenuated) and the Gaussian kernel is evaluated at every
    voxel. The kernel is separable, so this is three small matrix products instead of a
    convolution of the full volume with a kernel a hundred voxels wide.
    """
    axes = []
    for n in shape:
        nodes = np.arange(-3.0 * sigma, n - 1 + 3.0 * sigma + 1e-6, sigma / 2.0)
        voxels = np.arange(n, dtype=np.float64)
        axes.append(np.exp(-0.5 * ((voxels[:, None] - nodes[None, :]) / sigma) ** 2).astype(np.float32))
    wx, wy, wz = axes
    noise = rng.standard_normal((channels, wx.shape[1], wy.shape[1], wz.shape[1]), dtype=np.float32)
    field = np.einsum("ia,cabk->cibk", wx, noise)
    field = np.einsum("jb,cibk->cijk", wy, field)
    field = field @ wz.T  # the large product, last axis: BLAS
    return np.ascontiguousarray(field, dtype=np.float32)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix about the x, then y, then z axis."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_smooth_deformation(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    max_displacement_mm: float = 4.0,
    smoothness_mm: float = 20.0,
    max_rotation_deg: float = 5.0,
    scale_range: tuple[float, float] = (0.95, 1.05),
) -> np.ndarray:
    """A random smooth displacement field: non-linear warp composed with a global affine.

    The non-linear part ``u`` is 3-channel white noise smoothed with a Gaussian of standard
    deviation ``smoothness_mm``, scaled so that its largest vector length is exactly
    ``max_displacement_mm``. The affine part ``A`` rotates about each axis by up to
    ``max_rotation_deg`` and scales each axis by a factor in ``scale_range``, about the
    volume centre ``c``. The output voxel ``x`` samples the input at
    ``c + A (x + u(x) - c)``; the returned field is that position minus ``x``. With the
    affine disabled (``max_rotation_deg=0``, ``scale_range=(1, 1)``) the largest
    displacement is ``max_displacement_mm``; with it, points far from the centre move more.

    Args:
        shape: ``(X, Y, Z)`` of the volume (1 mm voxels).
        rng: source of randomness (draws: noise lattice, 3 angles, 3 scales).
        max_displacement_mm: largest length of the non-linear displacement.
        smoothness_mm: standard deviation of the smoothing Gaussian.
        max_rotation_deg: bound of the rotation about each axis.
        scale_range: (low, high) bounds of the per-axis scale factors.

    Returns:
        float32 ``(3, X, Y, Z)`` displacement in voxels (= mm), for :func:`warp`.
    """
    if max_displacement_mm < 0 or smoothness_mm <= 0 or max_rotation_deg < 0:
        raise ValueError("need max_displacement_mm >= 0, smoothness_mm > 0, max_rotation_deg >= 0")
    if not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    shape = tuple(int(n) for n in shape)
    # Drawn even at zero amplitude so the later draws do not depend on the amplitude.
    field = _smooth_random_field(shape, rng, smoothness_mm, 3)
    longest = float(np.sqrt(np.max(np.einsum("c...,c...->...", field, field))))
    field *= np.float32(max_displacement_mm / longest) if longest > 0 else np.float32(0.0)

    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    scales = rng.uniform(scale_range[0], scale_range[1], size=3)
    a = (_rotation(angles) @ np.diag(scales)).astype(np.float32)
    linear = a - np.eye(3, dtype=np.float32)
    # Centred voxel coordinates as broadcastable 1-D axes: no full coordinate grids needed.
    grids = [
        (np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2.0)).reshape([-1 if k == axis else 1 for k in range(3)])
        for axis, n in enumerate(shape)
    ]
    out = np.empty_like(field)
    for i in range(3):
        # displacement = (A - I)(x - c) + A u(x)
        out[i] = a[i, 0] * field[0] + a[i, 1] * field[1] + a[i, 2] * field[2]
        out[i] += linear[i, 0] * grids[0] + linear[i, 1] * grids[1] + linear[i, 2] * grids[2]
    return out


def _sample(volume: np.ndarray, positions: np.ndarray, order: int, cval: float) -> np.ndarray:
    """Interpolate a 3-D float volume at voxel positions ``(3, N)``."""
    if order > 1:
        coefficients = ndimage.spline_filter(volume, order=order, output=np.float32, mode="grid-constant")
        return ndimage.map_coordinates(
            coefficients, positions, order=order, mode="grid-constant", cval=cval, prefilter=False
        )
    return ndimage.map_coordinates(volume, positions, order=order, mode="constant", cval=cval)


def warp(
    volume: np.ndarray,
    displacement: np.ndarray,
    order: int = 1,
    cval: float = 0.0,
    where: np.ndarray | None = None,
) -> np.ndarray:
    """Resample ``volume`` through a displacement field: ``out[x] = volume[x + d(x)]``.

    Args:
        volume: ``(X, Y, Z)``, or ``(C, X, Y, Z)`` warped channel by channel. A bool volume
            (a mask) is interpolated as 0/1 and thresholded at 0.5, so with ``order=0``
            it is nearest-neighbour, as masks need.
        displacement: float ``(3, X, Y, Z)`` in voxels, e.g. from
            :func:`random_smooth_deformation`.
        order: spline order (0 nearest, 1 linear, up to 5).
        cval: value of samples falling outside the input.
        where: optional bool ``(X, Y, Z)``; only these output voxels are computed, the
            others are ``cval`` (saves time when only the brain matters).

    Returns:
        The warped volume, bool for a bool input, float32 otherwise.
    """
    volume = np.asarray(volume)
    spatial = volume.shape[-3:]
    if volume.ndim not in (3, 4) or displacement.shape != (3, *spatial):
        raise ValueError(
            f"volume {volume.shape} must be (X, Y, Z) or (C, X, Y, Z) and displacement "
            f"(3, X, Y, Z) with the same X, Y, Z, got {displacement.shape}"
        )
    is_mask = volume.dtype == bool
    channels = volume.astype(np.float32, copy=False).reshape(-1, *spatial)

    if where is None:
        where = np.ones(spatial, dtype=bool)
    out = np.full(channels.shape, np.float32(cval), dtype=np.float32)
    # Slabs along the first axis bound the float64 coordinate arrays map_coordinates makes;
    # the sample positions of a slab are computed once for all channels.
    slab = max(1, 2_000_000 // max(1, spatial[1] * spatial[2]))
    for x0 in range(0, spatial[0], slab):
        x1 = min(spatial[0], x0 + slab)
        index = np.nonzero(where[x0:x1])
        if index[0].size == 0:
            continue
        positions = np.stack([index[k] + (x0 if k == 0 else 0) + displacement[k, x0:x1][index] for k in range(3)])
        for source, target in zip(channels, out):
            target[x0:x1][index] = _sample(source, positions, order, cval)
    out = out.reshape(volume.shape)
    return out > 0.5 if is_mask else out


# --------------------------------------------------------------------------- MRI variation


def bias_field(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    strength: float = 0.2,
    smoothness_mm: float = 60.0,
) -> np.ndarray:
    """A smooth multiplicative MRI bias field around 1.

    Heavily smoothed noise (Gaussian of standard deviation ``smoothness_mm``), shifted and
    scaled so that it spans exactly ``[1 - strength, 1 + strength]``: coil inhomogeneity
    varies over the scale of the head, not of the anatomy.

    Args:
        shape: ``(X, Y, Z)``.
        rng: source of randomness.
        strength: half-width of the field's range, in [0, 1).
        smoothness_mm: standard deviation of the smoothing Gaussian.

    Returns:
        float32 ``(X, Y, Z)`` field to multiply the T1 by.
    """
    if not 0.0 <= strength < 1.0 or smoothness_mm <= 0:
        raise ValueError("need 0 <= strength < 1 and smoothness_mm > 0")
    field = _smooth_random_field(tuple(int(n) for n in shape), rng, smoothness_mm, 1)[0]
    low, high = float(field.min()), float(field.max())
    half_range = (high - low) / 2.0
    if half_range == 0.0:
        return np.ones(field.shape, dtype=np.float32)
    field -= np.float32((high + low) / 2.0)
    field *= np.float32(strength / half_range)
    field += np.float32(1.0)
    return field


# --------------------------------------------------------------------------- pseudo-subjects


def make_pseudo_subject(
    model: TissueModel,
    seed: int,
    *,
    max_displacement_mm: float = 4.0,
    smoothness_mm: float = 20.0,
    max_rotation_deg: float = 5.0,
    scale_range: tuple[float, float] = (0.95, 1.05),
    appearance: CtAppearance | None = None,
    textures: tuple[ScanTexture, ...] | None = None,
    blur_mm: float = 1.0,
    calcification_probability: float = 0.2,
    bias_strength: float = 0.2,
    gamma_range: tuple[float, float] = (0.9, 1.1),
    intensity_scale_range: tuple[float, float] = (0.9, 1.1),
) -> PseudoSubject:
    """One paired CT/T1 pseudo-subject, reproducible from ``seed``.

    The tissue maps, T1, lesion map and mask are deformed by ONE shared random smooth
    deformation, so the pair stays aligned voxel by voxel; a tumour may then get calcified
    foci (:func:`~lib.data.lesions.add_calcifications`, CT only: calcification shows poorly
    and variably on T1) and the CT is painted from the deformed maps
    (:func:`synthesise_ct`) with an appearance drawn from the real scans
    (:func:`draw_appearance`). The T1 gets a random gamma (contrast) and global scale about
    its 99th brain percentile, then a multiplicative bias field.

    Random draws, in order: deformation, the seed of the calcification's own generator,
    appearance (unless given), CT heterogeneity and noise, T1 bias field, gamma, scale.

    Args:
        model: the source tissue model (1 mm voxels).
        seed: seeds ``np.random.default_rng``; the same seed gives the same subject.
        max_displacement_mm, smoothness_mm, max_rotation_deg, scale_range: see
            :func:`random_smooth_deformation`.
        appearance: a fixed CT appearance instead of a drawn one (tests, comparisons).
        textures: the real scans to draw the appearance from (default: ``ct_texture.json``).
        blur_mm: see :func:`synthesise_ct`.
        calcification_probability: chance that a subject with lesions gets calcified foci.
        bias_strength: see :func:`bias_field`.
        gamma_range: (low, high) of the T1 gamma exponent.
        intensity_scale_range: (low, high) of the T1 global intensity factor.

    Returns:
        The pseudo-subject, on the model's grid and affine.
    """
    rng = np.random.default_rng(seed)
    displacement = random_smooth_deformation(
        model.shape, rng, max_displacement_mm, smoothness_mm, max_rotation_deg, scale_range
    )
    mask = warp(model.mask, displacement, order=0)
    # Maps and T1 are needed only inside the deformed mask: 4-5x less interpolation.
    # One 4-channel warp: the sample positions are computed once for maps and T1.
    warped = warp(np.concatenate([model.probabilities, model.t1[None]]), displacement, order=1, where=mask)
    probabilities = _normalise_probabilities(warped[:3], mask)
    t1 = warped[3]
    lesions = model.lesions
    if lesions.any():
        lesions = np.rint(warp(lesions, displacement, order=0, where=mask)).astype(np.uint8)
    # The calcification draws vary with the lesion; a generator of their own (one draw here)
    # keeps every later draw, and so the CT noise and the T1, independent of them.
    calcification_rng = np.random.default_rng(rng.integers(2**63))
    lesions = add_calcifications(lesions, calcification_rng, calcification_probability, voxel_size=model.voxel_size)
    deformed = replace(model, t1=t1, mask=mask, probabilities=probabilities, lesions=lesions)
    appearance = draw_appearance(rng, textures) if appearance is None else appearance
    ct = synthesise_ct(deformed, rng, appearance, blur_mm=blur_mm)

    bias = bias_field(model.shape, rng, strength=bias_strength)
    gamma = rng.uniform(*gamma_range)
    scale = rng.uniform(*intensity_scale_range)
    brain = t1[mask]
    # Gamma about a robust reference intensity keeps the T1's scale whatever its units.
    reference = float(np.percentile(brain, 99)) if brain.size else 1.0
    reference = reference if reference > 0 else 1.0
    t1_out = np.zeros_like(t1)
    t1_out[mask] = (scale * reference * np.power(np.maximum(brain, 0.0) / reference, gamma) * bias[mask]).astype(
        np.float32
    )
    return PseudoSubject(
        ct=ct,
        t1=t1_out,
        mask=mask,
        seed=int(seed),
        affine=model.affine.copy(),
        lesions=lesions,
        appearance=appearance,
    )
