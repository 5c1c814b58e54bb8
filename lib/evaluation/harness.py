"""The evaluation protocol: methods x sparsity x seeds on held-out subjects, scored per volume.

For every subject (one the preset's knowledge base was not built from), sparsity k and seed s:
the dense source is made k-sparse keeping every k-th slice from slice ``s mod k`` (the seed
moves the sampling phase, so seeds see different acquired slices), each method reconstructs it
(sampler seed s; with ``eta`` > 0 the sampling itself varies too), and the output is scored
against the ground truth on the reconstructed slices (lib/evaluation/score.py: NRMSE, PSNR,
SSIM, 3-D SSIM, I-SSIM inside the brain). A real scan without ground truth is evaluated for
continuity (I-SSIM) and retrieval success and fallback rates. Every run also carries the checks
that need no ground truth (lib/consistency.py, from the reconstruction's summary): tissue
consistency of a CT input with its synthetic T1, and banding at acquired/generated slices.

Results: one row per subject x method x sparsity x seed (:data:`METRIC_COLUMNS`), per-slice
PSNR along z, and the reconstructions of the first subject, first sparsity, seed 0 (figures).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lib.consistency import CHECK_COLUMNS, check_columns
from lib.data.layouts import DEFAULT_OPEN_COUNT, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, Folders, discover_subjects
from lib.data.prepare import anonymised_key, split_subjects
from lib.data.sparse import simulate_sparse_volume
from lib.evaluation.score import reference_to_unit, score_arrays
from lib.io.volume import Volume
from lib.metrics import issim, nrmse, psnr, ssim_2d
from lib.models.denoiser import load_bbdm
from lib.models.retrieval_encoder import load_retrieval_encoder
from lib.pipeline import ReBrainPipeline
from lib.progress import ProgressFn, report
from lib.reconstruction import Reconstruction
from lib.reconstruction_methods import METHODS, gap_filling
from lib.reconstruction_options import ReconstructionOptions
from lib.retrieval.build import build_knowledge_base
from lib.retrieval.knowledge_base import KnowledgeBase

METRIC_COLUMNS = (
    "subject",
    "split",
    "variant",
    "method",
    "sparsity",
    "seed",
    "kb_fraction",
    "nrmse",
    "psnr",
    "ssim",
    "ssim3d",
    "issim",
    "issim_reference",
    # The same inside the brain on the generated (gap) slices only, where the method is tested,
    # and on the acquired slices only (the ground truth normalised once, on all slices).
    "nrmse_gap",
    "psnr_gap",
    "ssim_gap",
    "nrmse_acquired",
    "psnr_acquired",
    "ssim_acquired",
    # Share of the ground truth's brain where the (dense) input has signal: under
    # LOW_INPUT_COVERAGE the scores measure missing input, not the method (report warns).
    "input_coverage",
    "retrieval_success_rate",
    "fallback_rate",
    "slices",
    "generated_slices",
    "seconds",
    # No ground truth needed: the synthetic T1 against the CT's tissue classes (CT presets)
    # and the stripes at acquired/generated boundaries (lib/consistency.py).
    *CHECK_COLUMNS,
)


# Normal FLAIR/T1 pairs cover 0.97..1.0 of the T1's brain; Brats18_2013_20_1's FLAIR covers 0.68.
LOW_INPUT_COVERAGE = 0.9


def input_coverage(source: Volume, mask: np.ndarray) -> float:
    """Share of the brain ``mask`` (the ground truth's) where ``source`` is above its background
    (its minimum: 0 in skull-stripped MRI, air in CT)."""
    brain = mask > 0
    if not brain.any() or brain.shape != source.shape:
        return float("nan")
    return float((source.array[brain] > source.array.min()).mean())


@dataclass(frozen=True)
class Variant:
    """One model setting the protocol runs with: the preset, or an ablation of it.

    Attributes:
        name: its label in the report (``preset``, ``kb=0.5``, ``bbdm=directional``, ...).
        kb_fraction: share of the knowledge base's subjects kept (METHOD.md Table 5).
        bbdm: another BBDM ``model.pt`` (Table 2: e.g. the other objective's checkpoint); the
            preset's ControlNet belongs to its own BBDM, so only methods without it run.
        encoder: another retrieval ``encoder.pt`` (Table 3); its knowledge base is built from
            ``data`` (the prepared dataset the preset was trained on).
        data: the prepared dataset for ``encoder``.
    """

    name: str = "preset"
    kb_fraction: float = 1.0
    bbdm: str | None = None
    encoder: str | None = None
    data: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.kb_fraction <= 1:
            raise ValueError(f"{self.name}: kb_fraction must be in (0, 1], got {self.kb_fraction}")
        if self.encoder is not None and self.data is None:
            raise ValueError(f"{self.name}: an encoder variant needs the prepared dataset to build its knowledge base")

    def methods(self, methods: Sequence[str]) -> tuple[str, ...]:
        """The methods whose output this variant can change."""
        if self.bbdm is not None:
            return tuple(m for m in methods if gap_filling(m).translates and not gap_filling(m).guided)
        if self.kb_fraction < 1 or self.encoder is not None:
            return tuple(m for m in methods if gap_filling(m).retrieves)
        return tuple(methods)

    @property
    def is_preset(self) -> bool:
        """Whether this variant is the preset itself (its models and whole knowledge base)."""
        return self.bbdm is None and self.encoder is None and self.kb_fraction == 1


@dataclass(frozen=True)
class EvaluationConfig:
    """What to run.

    Attributes:
        methods: method names (lib/reconstruction_methods.py), in report order.
        sparsities: keep every k-th slice, for each k.
        seeds: sparsity phase (seed mod k) and sampler seed.
        steps: sampling steps (None: the preset's).
        eta: sampler noise (0: deterministic; then only the phase varies with the seed).
        batch_size: slices per network call.
        uncertainty_samples: > 1 adds one ``rebrain`` run with that many samples (eta 1) on
            the first subject, for the uncertainty-against-error figure.
        variants: the model settings to run (:class:`Variant`): the preset itself and the
            ablations (knowledge-base size, another BBDM, another retrieval encoder).
    """

    methods: tuple[str, ...] = METHODS
    sparsities: tuple[int, ...] = (2,)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None
    eta: float = 0.0
    batch_size: int = 8
    uncertainty_samples: int = 0
    variants: tuple[Variant, ...] = (Variant(),)

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants: at least one (Variant() is the preset itself)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown or no methods {unknown}; choose from {', '.join(METHODS)}")
        if not self.sparsities or min(self.sparsities) < 1:
            raise ValueError(f"sparsities must be >= 1, got {list(self.sparsities)}")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"seeds must be >= 0, got {list(self.seeds)}")


@dataclass
class EvaluationSubject:
    """A subject to evaluate: its anonymised key, where it comes from, its volumes.

    ``target`` and ``mask`` are None for a real scan without ground truth.
    """

    key: str
    split: str
    source: Volume
    target: np.ndarray | None = None
    mask: np.ndarray | None = None


@dataclass
class EvaluationResult:
    """Everything the report needs."""

    rows: list[dict] = field(default_factory=list)
    slice_psnr: dict[str, np.ndarray] = field(default_factory=dict)  # method -> PSNR per slice (first subject)
    example: dict[str, Reconstruction] = field(default_factory=dict)  # method -> reconstruction (first subject)
    example_truth: np.ndarray | None = None  # [0, 1] ground truth on the example's slices
    example_mask: np.ndarray | None = None
    uncertainty: Reconstruction | None = None  # the several-sample rebrain run, when asked for


def held_out_subjects(
    pipeline: ReBrainPipeline,
    layout: str,
    src: Folders,
    max_subjects: int | None = None,
    open_count: int = 16,
    prepared_count: int = DEFAULT_OPEN_COUNT,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = 0,
    splits: Sequence[str] | None = None,
) -> list[EvaluationSubject]:
    """The subjects of a dataset that the preset's knowledge base does not hold.

    Their split (``test``/``val``) is recomputed as ``prepare`` assigns it (same fractions and
    seed, all the layout's subjects); a subject prepare never saw (e.g. an extra ``open``
    pseudo-subject) is ``unseen``. Subjects of the knowledge base are skipped: the models
    trained on them. A training subject the knowledge base leaves out (one whose input misses
    the brain) is labelled ``train``: pass ``splits`` to score only ``test`` subjects.

    Args:
        open_count: ``open``: pseudo-subjects to generate (those beyond ``prepared_count`` are unseen).
        prepared_count: ``open``: the pseudo-subjects ``prepare`` made and split (its ``--subjects``).
        splits: keep only subjects of these splits (e.g. ``("test",)``); None keeps all held out.

    Raises:
        ValueError: no held-out subject, or a source of the wrong modality for the preset.
    """
    records = discover_subjects(layout, src, open_count=open_count)
    keys = [anonymised_key(layout, record.name) for record in records]
    split_of = recomputed_splits(layout, keys, prepared_count, val_fraction, test_fraction, split_seed)
    in_kb = set(pipeline.kb.entries["subject"])
    subjects = []
    for record, key, split in zip(records, keys, split_of):
        if key in in_kb or (splits is not None and split not in splits):
            continue
        pair = record.load()
        pipeline.check_modality(pair.source)  # before any work, not at the first reconstruction
        subjects.append(
            EvaluationSubject(key=key, split=split, source=pair.source, target=pair.target.array, mask=pair.mask)
        )
        if max_subjects is not None and len(subjects) >= max_subjects:
            break
    if not subjects:
        raise ValueError(
            f"{src or layout}: every subject is in the knowledge base of preset {pipeline.preset.name!r} or "
            f"outside the splits asked for ({', '.join(splits) if splits else 'all'}); nothing held out to evaluate"
        )
    return subjects


def recomputed_splits(
    layout: str,
    keys: Sequence[str],
    prepared_count: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
) -> list[str]:
    """The split ``prepare`` gave each subject key, in order; ``unseen`` for those it never saw.

    ``prepare`` splits every subject of a folder layout, but only the first ``prepared_count``
    pseudo-subjects of ``open`` (its ``--subjects``): later ones are new draws.
    """
    split_count = prepared_count if layout == "open" else len(keys)
    splits_of = split_subjects(list(keys[:split_count]), val_fraction, test_fraction, split_seed)
    return [splits_of.get(key, "unseen") for key in keys]


def per_slice_psnr(prediction: np.ndarray, truth_unit: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PSNR of each slice inside the brain; NaN for slices without brain."""
    # lib.metrics works on volumes: each slice is passed as a one-slice volume.
    return np.array(
        [
            psnr(prediction[:, :, z : z + 1], truth_unit[:, :, z : z + 1], mask[:, :, z : z + 1])
            if mask[:, :, z].any()
            else np.nan
            for z in range(prediction.shape[2])
        ]
    )


def reference_slices(source: Volume, reconstruction: Reconstruction) -> np.ndarray:
    """Indices of the dense source's slices that the reconstruction's grid lies on.

    Raises:
        ValueError: a grid slice between the source's slices (another target spacing).
    """
    positions = source.positions
    index = np.searchsorted(positions, reconstruction.grid.positions)
    index = np.clip(index, 0, len(positions) - 1)
    if not np.allclose(positions[index], reconstruction.grid.positions, atol=1e-3):
        raise ValueError(
            "the reconstruction's grid does not lie on the source's slices; evaluate at the source's own slice spacing"
        )
    return index


def evaluate_subjects(
    pipeline: ReBrainPipeline,
    subjects: Sequence[EvaluationSubject],
    config: EvaluationConfig,
    progress: ProgressFn | None = None,
) -> EvaluationResult:
    """Run every method x sparsity x seed on every subject; see the module docstring.

    ``progress`` counts runs; each finished run reports its score as the message.
    """
    result = EvaluationResult()
    runs = [(variant, variant.methods(config.methods)) for variant in config.variants]
    counter = _RunCounter(
        progress, len(subjects) * len(config.sparsities) * len(config.seeds) * sum(len(m) for _, m in runs)
    )
    for variant, methods in runs:
        if not methods:
            continue
        with tempfile.TemporaryDirectory(prefix="rebrain-variant-") as work:
            variant_pipeline = pipeline_for(pipeline, variant, Path(work))
            _evaluate_all(variant_pipeline, subjects, replace(config, methods=methods), variant, result, counter)
    if config.uncertainty_samples > 1:
        first = subjects[0]
        spacing = source_spacing(first.source)
        sparse = simulate_sparse_volume(
            first.source, factor=config.sparsities[0], offset=config.seeds[0] % config.sparsities[0]
        )
        # Several samples need noise: eta 1 unless the evaluation already samples with some.
        options = ReconstructionOptions(
            steps=config.steps,
            seed=config.seeds[0],
            samples=config.uncertainty_samples,
            eta=config.eta or 1.0,
            batch_size=config.batch_size,
            target_spacing=spacing,
        )
        result.uncertainty = pipeline.reconstruct(sparse, options)
    return result


@dataclass
class _RunCounter:
    """Counts finished runs for a :data:`lib.progress.ProgressFn`."""

    progress: ProgressFn | None
    total: int
    done: int = 0

    def finished(self, message: str) -> None:
        self.done += 1
        report(self.progress, self.done, self.total, message)


def pipeline_for(pipeline: ReBrainPipeline, variant: Variant, work: Path) -> ReBrainPipeline:
    """The pipeline of a variant: the preset's parts with the variant's BBDM, encoder or
    knowledge base in their place (an encoder variant's knowledge base is built in ``work``,
    which must outlive the returned pipeline). The preset itself is ``pipeline`` as it is."""
    if variant.is_preset:
        return pipeline
    model, config = (
        (pipeline.model, pipeline.config) if variant.bbdm is None else load_bbdm(variant.bbdm, pipeline.device)
    )
    encoder, kb = pipeline.encoder, pipeline.kb
    if variant.encoder is not None:
        encoder, _ = load_retrieval_encoder(variant.encoder, pipeline.device)
        kb = build_knowledge_base(variant.data, variant.encoder, work / "kb")
    if variant.kb_fraction < 1:
        kb = kb.restricted_to(kb_subset(kb, variant.kb_fraction))
    return ReBrainPipeline.from_parts(model, config, encoder, kb, pipeline.preset, pipeline.device)


def kb_subset(kb: KnowledgeBase, fraction: float, seed: int = 0) -> list[str]:
    """A random ``fraction`` of the knowledge base's subjects (at least one), seeded."""
    subjects = sorted(set(kb.entries["subject"]))
    keep = max(1, round(fraction * len(subjects)))
    return sorted(np.random.default_rng(seed).permutation(subjects)[:keep].tolist())


def _evaluate_all(
    pipeline: ReBrainPipeline,
    subjects: Sequence[EvaluationSubject],
    config: EvaluationConfig,
    variant: Variant,
    result: EvaluationResult,
    counter: _RunCounter,
) -> None:
    """One pass over subjects x sparsities x seeds x methods with the variant's pipeline."""
    spacing = source_spacing(subjects[0].source)
    for number, subject in enumerate(subjects):
        # The dense input's coverage of the truth's brain: one number per subject, not per run.
        coverage = round(input_coverage(subject.source, subject.mask), 4) if subject.target is not None else None
        for sparsity in config.sparsities:
            for seed in config.seeds:
                sparse = simulate_sparse_volume(subject.source, factor=sparsity, offset=seed % sparsity)
                for method in config.methods:
                    options = ReconstructionOptions(
                        steps=config.steps,
                        seed=seed,
                        eta=config.eta,
                        batch_size=config.batch_size,
                        method=method,
                        # Scored against a truth: on the truth's slices. A scan without one: on
                        # the preset's grid, as `reconstruct` makes it (a 2.5-D model's
                        # neighbour slices are 1 mm away there, as in training, and the
                        # banding exists only where slices are generated).
                        target_spacing=spacing if subject.target is not None else None,
                    )
                    started = time.perf_counter()
                    reconstruction = pipeline.reconstruct(sparse, options)
                    seconds = time.perf_counter() - started
                    row = _row(subject, method, sparsity, seed, reconstruction, seconds)
                    row.update(variant=variant.name, kb_fraction=variant.kb_fraction)
                    example = (
                        number == 0
                        and sparsity == config.sparsities[0]
                        and seed == config.seeds[0]
                        and variant == config.variants[0]
                    )
                    if subject.target is not None:
                        index = reference_slices(subject.source, reconstruction)
                        truth, mask = subject.target[:, :, index], subject.mask[:, :, index]
                        row.update(score_arrays(reconstruction.mri, truth, mask))
                        truth_unit, brain = reference_to_unit(truth, mask)
                        row.update(scores_by_slice_kind(reconstruction, truth_unit, brain))
                        row["input_coverage"] = coverage
                        if example:
                            result.slice_psnr[method] = per_slice_psnr(reconstruction.mri, truth_unit, mask)
                            result.example_truth, result.example_mask = truth_unit, mask
                    else:
                        row["issim"] = issim(reconstruction.mri, reconstruction.mask)
                    if example:
                        result.example[method] = reconstruction
                    result.rows.append(row)
                    counter.finished(
                        f"{subject.key} x{sparsity} seed {seed} {variant.name} {method}: "
                        + (f"PSNR {row['psnr']:.2f} dB" if "psnr" in row else f"I-SSIM {row['issim']:.3f}")
                        + f" ({seconds:.1f} s)"
                    )


def scores_by_slice_kind(reconstruction: Reconstruction, truth_unit: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """NRMSE, PSNR and SSIM inside the brain on the gap slices and on the acquired slices apart.

    ``truth_unit`` and ``brain`` are the ground truth normalised on all its slices and its mask
    (:func:`lib.evaluation.score.reference_to_unit`, as :func:`score_arrays` normalises it), so
    the parts are on the same scale as the whole. A part without brain (or slices) is left out.
    """
    prediction = np.clip(reconstruction.mri, 0.0, 1.0)
    acquired = np.array([record.acquired for record in reconstruction.slices])
    scores: dict[str, float] = {}
    for part, keep in (("gap", ~acquired), ("acquired", acquired)):
        if not brain[:, :, keep].any():
            continue
        pred, gt, part_mask = prediction[:, :, keep], truth_unit[:, :, keep], brain[:, :, keep]
        scores[f"nrmse_{part}"] = nrmse(pred, gt, part_mask)
        scores[f"psnr_{part}"] = psnr(pred, gt, part_mask)
        scores[f"ssim_{part}"] = ssim_2d(pred, gt, part_mask)
    return scores


def source_spacing(volume: Volume) -> float:
    """The dense source's slice spacing (mm): reconstructions are made on its own slices."""
    return float(np.median(np.diff(volume.positions))) if volume.shape[2] > 1 else 1.0


def _row(
    subject: EvaluationSubject, method: str, sparsity: int, seed: int, reconstruction: Reconstruction, seconds: float
) -> dict:
    summary = reconstruction.summary
    generated = summary.generated_slices
    return {
        "subject": subject.key,
        "split": subject.split,
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "retrieval_success_rate": summary.generated_retrieval_success_rate,
        "fallback_rate": summary.fallback_count / generated
        if generated and summary.generated_retrieval_success_rate is not None
        else None,
        "slices": summary.slices,
        "generated_slices": generated,
        "seconds": round(seconds, 2),
        **check_columns(summary.tissue_check, summary.banding),
    }
