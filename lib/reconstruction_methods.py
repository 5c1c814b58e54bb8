"""The ways to fill gap slices: the method and the evaluation's baselines (METHOD.md section 6).

Each method is a small :class:`GapFilling` object chosen by its :class:`Method` name
(:func:`gap_filling`): it says whether the method queries the knowledge base, whether the
ControlNet guides it, whether it ignores tau, what each slice's provenance ``control`` is, and
it fills the dense slices from the services the pipeline hands it (a sampler and the knowledge
base's slices). The pipeline asks the object and never branches on a method's name, so a new
method is a new :class:`Method` value and a new class listed in :data:`GAP_FILLING`.

Kept free of heavy imports so that the command line can list the methods without loading torch:
the pipeline passes the sampling in as a function.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from lib.data.intensity_map import apply_intensity_map, fit_intensity_map

if TYPE_CHECKING:  # lib.io pulls in the DICOM readers; the methods only read the grid
    from lib.io.volume import DenseGrid


class Method(enum.StrEnum):
    """The method (``rebrain``) and the evaluation's baselines and ablations."""

    REBRAIN = "rebrain"
    REBRAIN_NOSLERP = "rebrain-noslerp"
    BBDM = "bbdm"
    R_AS_INPUT = "r-as-input"
    SUBSTITUTE = "substitute"
    INTERP = "interp"
    IDENTITY = "identity"
    INTENSITY_MAP = "intensity-map"


# The names, in report order, for option choices and validation.
METHODS = tuple(method.value for method in Method)

# sample(condition, control, use_control) -> (mean, std): the BBDM's translation of a run of
# adjacent slices, (Z, S, S) each; ``use_control`` false samples the BBDM without the ControlNet.
SampleFn = Callable[[np.ndarray, np.ndarray, bool], tuple[np.ndarray, np.ndarray]]


class ReferenceSlices(Protocol):
    """The knowledge base's slices (:class:`lib.retrieval.knowledge_base.KnowledgeBase`)."""

    def ct_slice(self, entry_id: int) -> np.ndarray: ...

    def mri_slice(self, entry_id: int) -> np.ndarray: ...

    def slice_pairs(self, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


@dataclass(frozen=True)
class SlicePlan:
    """What the pipeline prepared for the dense slices, in the model frame.

    Attributes:
        y: (Z, S, S) the BBDM input of every dense slice (acquired, or the SLERP of its
            acquired neighbours).
        acquired: (A, S, S) the acquired slices.
        control: (Z, S, S) the control image of every dense slice.
        references: per dense slice, the knowledge-base entry id of the reference it uses
            (:meth:`GapFilling.uses_reference`), or None.
        grid: the dense grid (which slices are acquired, how to interpolate between them).
        controlled: whether the ControlNet guides the sampling (:meth:`GapFilling.guided_by`).
    """

    y: np.ndarray
    acquired: np.ndarray
    control: np.ndarray
    references: list[int | None]
    grid: DenseGrid
    controlled: bool

    def gap_references(self) -> list[tuple[int, int]]:
        """(slice, entry id) of every gap slice that uses a reference, in slice order."""
        return [
            (z, entry_id)
            for z, entry_id in enumerate(self.references)
            if entry_id is not None and not self.grid.acquired[z]
        ]


class GapFilling:
    """How a method fills the dense slices; by default the BBDM alone on y, without a reference.

    Attributes:
        method: the method's name.
        translates: whether the BBDM makes its slices (false for the baselines without a model).
        retrieves: whether it queries the knowledge base.
        guided: whether the ControlNet guides it, with the reference (or the SLERP fallback)
            as control, when the preset has one.
        ignores_tau: whether it uses the top candidate even below tau.
    """

    method: ClassVar[Method]
    translates: ClassVar[bool] = True
    retrieves: ClassVar[bool] = False
    guided: ClassVar[bool] = False
    ignores_tau: ClassVar[bool] = False

    def uses_reference(self, success: bool, candidate: bool) -> bool:
        """Whether a slice uses its retrieved reference: when retrieval succeeded, or, for the
        methods that ignore tau, whenever there is a candidate at all."""
        return success or (candidate and self.ignores_tau)

    def guided_by(self, has_controlnet: bool) -> bool:
        """Whether the ControlNet guides this reconstruction (``has_controlnet``: the preset has
        one and the options allow it)."""
        return self.guided and has_controlnet

    def control_kind(self, acquired: bool, reference: bool, controlled: bool) -> str:
        """The provenance ``control`` of a slice (see :class:`lib.reconstruction.SliceRecord`).

        Args:
            acquired: an acquired slice lies on it.
            reference: it uses its retrieved reference (:meth:`uses_reference`).
            controlled: the ControlNet guides this reconstruction.
        """
        return "none"

    def fill(self, plan: SlicePlan, sample: SampleFn, knowledge_base: ReferenceSlices) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of every dense slice, (Z, S, S) each, in [-1, 1] units.

        The slices :meth:`pasted` names are the reference's MRI slice; the others are sampled
        together (a run of adjacent slices, as the 2.5-D models need) from :meth:`condition`.
        """
        pasted = self.pasted(plan)
        sampled = np.setdiff1d(np.arange(len(plan.y)), [z for z, _ in pasted])
        mean = np.empty(plan.y.shape, dtype=np.float32)
        std = np.zeros(plan.y.shape, dtype=np.float32)
        for z, entry_id in pasted:
            mean[z] = knowledge_base.mri_slice(entry_id)
        if len(sampled):
            condition = self.condition(plan, knowledge_base)
            mean[sampled], std[sampled] = sample(condition[sampled], plan.control[sampled], plan.controlled)
        return mean, std

    def condition(self, plan: SlicePlan, knowledge_base: ReferenceSlices) -> np.ndarray:
        """(Z, S, S) the BBDM input the sampled slices are translated from: y."""
        return plan.y

    def pasted(self, plan: SlicePlan) -> list[tuple[int, int]]:
        """(slice, entry id) of the slices filled with the reference's MRI instead of sampled: none."""
        return []


class BBDMAlone(GapFilling):
    """The BBDM alone on y: no retrieval, no ControlNet."""

    method = Method.BBDM


class ReBrain(GapFilling):
    """The method: y is the acquired slice or the SLERP of its neighbours; the ControlNet is
    guided by the retrieved reference when its similarity reaches tau, else by the SLERP."""

    method = Method.REBRAIN
    retrieves = True
    guided = True

    def control_kind(self, acquired: bool, reference: bool, controlled: bool) -> str:
        if not controlled:
            return "none"
        return "reference" if reference else ("acquired" if acquired else "slerp")


class ReBrainNoSlerp(ReBrain):
    """The same, but a retrieval failure still uses its (below-tau) reference: no SLERP fallback."""

    method = Method.REBRAIN_NOSLERP
    ignores_tau = True


class ReferenceAsInput(GapFilling):
    """The retrieved reference replaces y of a gap slice (when it reaches tau); no ControlNet."""

    method = Method.R_AS_INPUT
    retrieves = True

    def control_kind(self, acquired: bool, reference: bool, controlled: bool) -> str:
        return "reference-as-input" if reference and not acquired else "none"

    def condition(self, plan: SlicePlan, knowledge_base: ReferenceSlices) -> np.ndarray:
        condition = plan.y.copy()
        for z, entry_id in plan.gap_references():
            condition[z] = knowledge_base.ct_slice(entry_id)
        return condition


class Substitute(GapFilling):
    """A gap slice is the retrieved reference's MRI slice (no diffusion, even below tau);
    acquired slices are translated by the BBDM alone."""

    method = Method.SUBSTITUTE
    retrieves = True
    ignores_tau = True

    def control_kind(self, acquired: bool, reference: bool, controlled: bool) -> str:
        return "substituted" if reference and not acquired else "none"

    def pasted(self, plan: SlicePlan) -> list[tuple[int, int]]:
        return plan.gap_references()


class Interpolation(GapFilling):
    """Only the acquired slices are translated (the BBDM alone); gaps are the linear
    interpolation of their translated neighbours (a sparsity-unaware translator)."""

    method = Method.INTERP

    def control_kind(self, acquired: bool, reference: bool, controlled: bool) -> str:
        return "none" if acquired else "interpolated"

    def fill(self, plan: SlicePlan, sample: SampleFn, knowledge_base: ReferenceSlices) -> tuple[np.ndarray, np.ndarray]:
        translated, translated_std = sample(plan.acquired, plan.acquired, False)
        return plan.grid.interpolate(translated), plan.grid.interpolate(translated_std)


class Identity(GapFilling):
    """The input contrast taken as the output (the trivial baseline of an MRI-input preset, e.g.
    the FLAIR as the T1): every slice is its y, the acquired slice or the SLERP of its
    neighbours, normalised as the models see it."""

    method = Method.IDENTITY
    translates = False

    def fill(self, plan: SlicePlan, sample: SampleFn, knowledge_base: ReferenceSlices) -> tuple[np.ndarray, np.ndarray]:
        return plan.y.astype(np.float32, copy=True), np.zeros(plan.y.shape, dtype=np.float32)


class IntensityMap(GapFilling):
    """A voxelwise lookup table from the input contrast to the target (no spatial context at
    all), fitted on the brain voxels of the knowledge base's slice pairs: the training subjects
    after the same normalisation. Applied to every slice's y."""

    method = Method.INTENSITY_MAP
    translates = False

    def __init__(self) -> None:
        # One table per knowledge base, fitted at its first use: an evaluation reconstructs many
        # volumes with the same knowledge base, and the fit reads all its slices.
        self._tables: weakref.WeakKeyDictionary[ReferenceSlices, np.ndarray] = weakref.WeakKeyDictionary()

    def fill(self, plan: SlicePlan, sample: SampleFn, knowledge_base: ReferenceSlices) -> tuple[np.ndarray, np.ndarray]:
        table = self._tables.get(knowledge_base)
        if table is None:
            table = self._tables[knowledge_base] = fit_intensity_map(knowledge_base.slice_pairs(chunk=256))
        return apply_intensity_map(table, plan.y), np.zeros(plan.y.shape, dtype=np.float32)


# One object per method: the registry :func:`gap_filling` looks them up in.
GAP_FILLING: dict[Method, GapFilling] = {
    strategy.method: strategy
    for strategy in (
        ReBrain(),
        ReBrainNoSlerp(),
        BBDMAlone(),
        ReferenceAsInput(),
        Substitute(),
        Interpolation(),
        Identity(),
        IntensityMap(),
    )
}


def gap_filling(method: Method | str) -> GapFilling:
    """The object of a method name.

    Raises:
        ValueError: an unknown name, listing the accepted ones.
    """
    try:
        return GAP_FILLING[Method(method)]
    except ValueError:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}") from None
