"""How to run one reconstruction: the options every front end fills in (CLI, server, batch, Slicer).

Kept free of heavy imports (no torch), so that front ends can validate options and build
their help without loading the models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lib.presets import Preset
from lib.reconstruction_methods import METHODS


@dataclass(frozen=True)
class ReconstructionOptions:
    """How to run one reconstruction.

    Attributes:
        steps: sampling steps, at least 2 (None: the preset's default).
        samples: samples per slice; > 1 gives a mean and a standard deviation.
        eta: sampler stochasticity (None: 0 for one sample, 1 for several; several
            deterministic samples would be identical).
        seed: random seed of the stochastic sampler.
        batch_size: slices per network call (small batches are faster on a CPU).
        position_tolerance: retrieval position filter (None: the preset's).
        target_spacing: dense grid spacing in mm, positive (None: the preset's slice spacing).
        use_retrieval: query the knowledge base (off: every slice uses the SLERP control).
        use_controlnet: use the ControlNet branch when the preset has one (off: BBDM alone).
        brain_extraction: for CT presets, find the intracranial mask of a real head CT
            (:mod:`lib.data.ct_brain`) and give the models the brain only; off for inputs
            that are already brain-only (it is skipped anyway when a CT has no skull).
        alignment: when the brain was extracted, register the head rigidly to the CT head
            template (:mod:`lib.data.ct_alignment`) and take every slice's normalised axial
            position (the retrieval filter) from the template brain; off, or for a stack too
            short to register, positions come from the extracted brain's own extent, which is
            right only when the CT covers the whole brain.
        method: how gap slices are made (see :data:`lib.reconstruction_methods.METHODS`);
            ``"rebrain"`` is the method, the others are the evaluation's baselines and
            ablations (METHOD.md section 6).

    Raises:
        ValueError: an unknown method or an out-of-range number, naming the field.
    """

    steps: int | None = None
    samples: int = 1
    eta: float | None = None
    seed: int = 0
    batch_size: int = 8
    position_tolerance: float | None = None
    target_spacing: float | None = None
    use_retrieval: bool = True
    use_controlnet: bool = True
    brain_extraction: bool = True
    alignment: bool = True
    method: str = "rebrain"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        # None, not a falsy value, means "the preset's": 0 is refused rather than read as the default.
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"steps must be >= 2 (None: the preset's), got {self.steps}")
        if self.target_spacing is not None and not 0 < self.target_spacing < math.inf:
            raise ValueError(
                f"target_spacing must be a positive number of mm (None: the preset's), got {self.target_spacing}"
            )
        if self.position_tolerance is not None and not 0 <= self.position_tolerance < math.inf:
            raise ValueError(f"position_tolerance must be >= 0 (None: the preset's), got {self.position_tolerance}")
        if self.eta is not None and not 0 <= self.eta < math.inf:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.samples > 1 and self.eta == 0:
            raise ValueError("several samples need eta > 0 (deterministic samples are identical)")

    @property
    def effective_eta(self) -> float:
        """The eta actually used."""
        return self.eta if self.eta is not None else (0.0 if self.samples == 1 else 1.0)

    def effective_steps(self, preset: Preset) -> int:
        """The sampling steps actually used: ``steps``, or the preset's when it is None."""
        return preset.steps if self.steps is None else self.steps

    def effective_spacing(self, preset: Preset) -> float:
        """The dense grid's slice spacing actually used: ``target_spacing``, or the preset's when it is None."""
        return preset.slice_spacing_mm if self.target_spacing is None else self.target_spacing
