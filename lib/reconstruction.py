"""The result of a reconstruction: the volumes, the per-slice provenance and the summary.

A small module of its own, with no torch, faiss or SimpleITK import, so that the writers of
outputs (``lib/report``), the server's result store and the evaluation report can use a result
without loading the models. :meth:`Reconstruction.provenance` is the ``summary`` and ``slices``
of provenance.json and of the server's answer, a public format: its keys and their order are
those of :class:`Summary` and :class:`SliceRecord`, and :meth:`Summary.from_dict` reads a
written one back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # lib.io pulls in the DICOM readers; a result only holds a grid
    from lib.io.volume import DenseGrid


@dataclass
class SliceRecord:
    """Provenance of one output slice.

    Attributes:
        index: slice index on the dense grid.
        position_mm: its position along the slice normal (the input volume's ``p``, mm).
        normalised_position: its axial position, 0 at the bottom of the brain, 1 at the top
            (from the CT head template for a registered real CT; see :attr:`Summary.alignment`).
        acquired: true when an acquired CT slice lies on it.
        source_slice: that acquired slice's index in the input, or None.
        similarity: top-1 retrieval cosine similarity (None: retrieval off or no candidate).
        success: similarity >= tau.
        control: what guided or replaced the slice, as
            :meth:`lib.reconstruction_methods.GapFilling.control_kind` names it: ``"reference"``
            (retrieved slice), ``"slerp"`` (fallback for a gap slice), ``"acquired"`` (an
            acquired slice guides itself), ``"reference-as-input"``, ``"substituted"``,
            ``"interpolated"`` (the baselines) or ``"none"``.
        fallback: a gap slice whose retrieval failed, guided by the SLERP of its neighbours.
        reference: the reference's anonymised ``subject:slice`` key, or None.
        uncertainty_mean: mean per-voxel standard deviation in the brain (0 for one sample).
        snap_mm: for an acquired slice, how far it was moved to lie on the grid (grid minus
            acquired position, mm; real positions drift by tenths of a mm); 0 otherwise.
    """

    index: int
    position_mm: float
    normalised_position: float
    acquired: bool
    source_slice: int | None
    similarity: float | None
    success: bool
    control: str
    fallback: bool
    reference: str | None
    uncertainty_mean: float = 0.0
    snap_mm: float = 0.0


@dataclass(kw_only=True)
class Summary:
    """Counts, rates, timings and settings of one reconstruction (provenance.json's ``summary``).

    The field order is the key order of :meth:`to_dict`.

    Attributes:
        synthetic: always true: the output is a synthetic image.
        preset: the preset's name.
        source: the preset's source contrast (e.g. ``ct``).
        target: its target contrast (e.g. ``t1n``).
        versions: :meth:`lib.presets.Preset.fingerprint` of the weights used.
        method: the gap-filling method (:class:`lib.reconstruction_methods.Method` value).
        controlnet: whether the ControlNet branch guided the sampling.
        slices: output slices.
        acquired_slices: of them, those an acquired slice lies on.
        generated_slices: the others.
        retrieval_success_rate: share of all slices whose retrieval reached tau (None: no retrieval).
        generated_retrieval_success_rate: the same over the generated slices (None: no
            retrieval or no generated slice).
        fallback_count: generated slices guided by the SLERP fallback.
        mean_similarity: mean top-1 similarity over the slices that had a candidate (None: none).
        tau: the knowledge base's retrieval threshold.
        uncertainty_mean: mean of the slices' :attr:`SliceRecord.uncertainty_mean`.
        steps: sampling steps.
        samples: samples per slice.
        eta: sampler noise.
        seed: sampler seed.
        precision: the network's arithmetic while sampling, ``fp32`` or ``bf16`` (the
            ``precision`` option as the device resolved it). Results written before it was
            recorded were sampled in float32 and read back so.
        seconds: wall time per stage (``prepare``, ``retrieval``, ``sampling``, ``output``).
        brain_extraction: whether the skull was removed and how (``applied`` and its record).
        alignment: how the slice positions were found (``applied``, ``positions`` and the
            registration record or the reason). Results written before these two were
            recorded read back with empty records.
        tissue_check: for a CT-input preset, whether the synthetic T1 orders the CT's CSF, grey
            and white matter as a real T1 does (:meth:`lib.consistency.TissueCheck.to_dict`);
            empty for other presets.
        banding: the slice-to-slice jumps at acquired/generated boundaries against those
            between generated slices (:meth:`lib.consistency.Banding.to_dict`). Results
            written before these two were recorded read back with empty records.
    """

    synthetic: bool = True
    preset: str
    source: str
    target: str
    versions: dict[str, str]
    method: str
    controlnet: bool
    slices: int
    acquired_slices: int
    generated_slices: int
    retrieval_success_rate: float | None
    generated_retrieval_success_rate: float | None
    fallback_count: int
    mean_similarity: float | None
    tau: float
    uncertainty_mean: float
    steps: int
    samples: int
    eta: float
    seed: int
    precision: str = "fp32"
    seconds: dict[str, float]
    brain_extraction: dict[str, Any] = field(default_factory=dict)
    alignment: dict[str, Any] = field(default_factory=dict)
    tissue_check: dict[str, Any] = field(default_factory=dict)
    banding: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready summary: one key per field, in field order."""
        return {item.name: getattr(self, item.name) for item in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """Read a summary back from :meth:`to_dict`'s output (e.g. a written provenance.json).

        Keys this version does not know are ignored (a result written by a newer version).

        Raises:
            ValueError: a key without a default is missing.
        """
        names = [item.name for item in fields(cls)]
        try:
            return cls(**{name: data[name] for name in names if name in data})
        except TypeError as error:
            missing = [name for name in names if name not in data]
            raise ValueError(f"not a reconstruction summary: missing {missing} ({error})") from None


@dataclass
class Reconstruction:
    """The result of :meth:`lib.pipeline.ReBrainPipeline.reconstruct`.

    Attributes:
        mri: float32 (X, Y, Z) synthetic MRI on the dense grid, in [0, 1], 0 outside the brain.
        uncertainty: float32 (X, Y, Z) per-voxel standard deviation in the same units.
        ct: float32 (X, Y, Z) the input interpolated onto the dense grid (input units), for display.
        mask: bool (X, Y, Z) the brain/foreground mask on the dense grid.
        grid: the dense grid (its ``affine`` is the output's voxel-to-RAS affine).
        slices: one :class:`SliceRecord` per output slice.
        summary: counts, rates, timings and settings.
    """

    mri: np.ndarray
    uncertainty: np.ndarray
    ct: np.ndarray
    mask: np.ndarray
    grid: DenseGrid
    slices: list[SliceRecord]
    summary: Summary

    @property
    def similarities(self) -> np.ndarray:
        """Per output slice, the top-1 retrieval similarity (NaN where there is none)."""
        return np.array([np.nan if r.similarity is None else r.similarity for r in self.slices], dtype=float)

    def provenance(self) -> dict[str, Any]:
        """JSON-ready provenance: summary plus the per-slice table."""
        return {"summary": self.summary.to_dict(), "slices": [asdict(record) for record in self.slices]}
