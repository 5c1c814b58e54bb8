"""How to run one reconstruction: the options every front end fills in (CLI, server, batch, Slicer).

Kept free of heavy imports (no torch), so that front ends can validate options and build
their help without loading the models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.models.precision import Precision
from lib.options_schema import check_bounds
from lib.presets import Preset
from lib.reconstruction_methods import METHODS, Method

# The most sampling steps: the bridge's training timesteps T (1000 in every model so far; the
# skip-step sampler refuses more than a model's own T).
MAX_STEPS = 1000


@dataclass(frozen=True)
class ReconstructionOptions:
    """How to run one reconstruction.

    Attributes:
        steps: sampling steps, 2 to :data:`MAX_STEPS` (None: the preset's default).
        samples: samples per slice; > 1 gives a mean and a standard deviation.
        eta: sampler stochasticity (None: 0 for one sample, 1 for several; several
            deterministic samples would be identical).
        seed: random seed of the stochastic sampler.
        batch_size: slices per network call (small batches are faster on a CPU).
        precision: the network's arithmetic while sampling: ``auto`` is bfloat16 where the
            device computes it natively (a CUDA GPU, a CPU with AVX512-BF16 or AMX), float32
            elsewhere (see :func:`lib.models.device.resolve_inference_precision`); the
            summary records the one used.
        position_tolerance: retrieval position filter (None: the preset's).
        target_spacing: dense grid spacing in mm (None: the preset's slice spacing).
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

    Each field's help and bounds are in its metadata (see :mod:`lib.options_schema`).

    Raises:
        ValueError: an unknown method or precision, or a number out of its field's bounds,
            naming the field.
    """

    # The metadata is the one description of each option (lib.options_schema): the command line's
    # arguments, the server's request parameters and their help are made from it, and the bounds
    # are checked here, so every front end accepts the same values.
    steps: int | None = field(
        default=None,
        metadata={"help": "sampling steps", "min": 2, "max": MAX_STEPS, "none": "the preset's"},
    )
    samples: int = field(
        default=1,
        metadata={"help": "samples per slice; > 1 gives a mean and an uncertainty map", "min": 1, "max": 64},
    )
    eta: float | None = field(
        default=None,
        metadata={"help": "sampler noise", "min": 0.0, "max": 1.0, "none": "0 for one sample, 1 for several"},
    )
    seed: int = field(default=0, metadata={"help": "random seed of the sampler", "min": 0, "max": 2**31 - 1})
    batch_size: int = field(default=8, metadata={"help": "slices per network call", "min": 1})
    precision: Precision = field(
        default=Precision.AUTO,
        metadata={
            "help": "arithmetic of the network: auto (bf16 where the device computes it natively, else fp32), "
            "fp32, or bf16"
        },
    )
    position_tolerance: float | None = field(
        default=None,
        metadata={"help": "retrieval position window (normalised axial position)", "min": 0.0, "none": "the preset's"},
    )
    target_spacing: float | None = field(
        default=None,
        metadata={
            "help": "output slice spacing in mm",
            "min": 0.1,
            "max": 20.0,
            "none": "the preset's, 1 mm",
            "metavar": "MM",
        },
    )
    use_retrieval: bool = field(
        default=True,
        metadata={
            "help": "query the knowledge base for reference slices (off: every slice uses the SLERP control)",
            "cli": "--no-retrieval",
        },
    )
    use_controlnet: bool = field(
        default=True,
        metadata={
            "help": "use the ControlNet branch when the preset has one (off: BBDM alone)",
            "cli": "--no-controlnet",
        },
    )
    destripe: bool = field(
        default=True,
        metadata={
            "help": "average each output slice's brightness and regional contrast (scales above 5 mm) over its "
            "neighbours along z, so no stripes cross the coronal and sagittal views (off: every slice as sampled)",
            "cli": "--no-destripe",
        },
    )
    brain_extraction: bool = field(
        default=True,
        metadata={
            "help": "remove the skull and scalp of a real head CT first (CT presets; off for inputs that are "
            "already brain-only, and off skips the alignment too)"
        },
    )
    alignment: bool = field(
        default=True,
        metadata={
            "help": "register a real head CT to the CT head template for the slice positions (off: positions "
            "come from the brain's own extent, right only when the CT covers the whole brain)"
        },
    )
    method: Method = field(
        default=Method.REBRAIN,
        metadata={
            "help": "how gap slices are made: rebrain (the method) or an evaluation baseline "
            "(lib/reconstruction_methods.py)"
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        object.__setattr__(self, "method", Method(self.method))  # a name given as a plain word
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        # None, not a falsy value, means "the preset's": 0 is refused rather than read as the default.
        check_bounds(self)
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


@dataclass(frozen=True)
class InputOptions:
    """What is done to the input volume before it is reconstructed.

    Attributes:
        simulate_sparsity: keep every k-th acquired slice first: a dense input made sparse, to
            try the method where the truth is known (None: the input is the sparse scan).

    Raises:
        ValueError: a number out of its field's bounds, naming the field.
    """

    simulate_sparsity: int | None = field(
        default=None,
        metadata={
            "help": "keep every K-th input slice first, for dense inputs",
            "min": 2,
            "max": 16,
            "none": "off, the input is the sparse scan",
            "metavar": "K",
        },
    )

    def __post_init__(self) -> None:
        check_bounds(self)
