"""Training the ControlNet on the frozen BBDM (METHOD.md section 3).

Triplets (y, r, x0): y is a training CT slice (with the BBDM's neighbour channels), r the
top-1 CT slice retrieved for y from the knowledge base, never from y's own subject and within
the position window, and x0 the MRI paired with r (``target="reference"``, METHOD.md) or y's
own MRI (``target="own"``). The retrieval of every training slice is computed once at the
start. A fraction of each batch instead uses the SLERP of y's own neighbouring CT slices as
control and y's own MRI as x0: the fallback the pipeline takes when retrieval fails
(METHOD.md section 4). The loss is the BBDM's (same objective); only the ControlNet trains.

A run folder holds::

    config.json        BBDM config and scheduler settings, training config, input files and their hashes
    triplets.csv       each training slice's reference: row, subject, slice, position,
                       reference_id, reference_subject, reference_slice, reference_position,
                       similarity, success (similarity >= tau)
    checkpoint.pt      everything needed to resume (ControlNet, EMA, optimiser, RNG, iteration)
    controlnet.pt      the EMA ControlNet, the BBDM config and the BBDM's hash: what inference
                       loads with :func:`lib.models.controlnet.load_controlled_denoiser`
    best_controlnet.pt the same for the validation with the best brain PSNR so far; best.json
                       names its iteration and score
    loss.csv           iteration, loss, learning rate, seconds
    validation.csv     iteration, PSNR / SSIM / brain PSNR of the controlled model and, for
                       comparison, of the frozen BBDM alone (bbdm_*), on fixed val slices
    curves.png         the loss and validation curves

The loop itself (resume, seeding, precision, checkpoints) is :func:`lib.train.loop.run_training`;
every random draw comes from its seeded generator, so a resumed run continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import enum
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.data.dataset import MIN_INPUT_COVERAGE, PreparedDataset, PreparedSlices
from lib.diffusion.scheduler import BridgeScheduler
from lib.diffusion.slerp import slerp
from lib.models.controlnet import ControlledDenoiser, controlnet_checkpoint, controlnet_from_denoiser, state_dict_hash
from lib.models.denoiser import BBDMSpec, load_bbdm
from lib.models.retrieval_encoder import RetrievalEncoder, embed_slices, encoder_hash, load_retrieval_encoder
from lib.options_schema import OptionWord
from lib.progress import ProgressFn
from lib.retrieval.knowledge_base import KnowledgeBase
from lib.train.bbdm import (
    VALIDATION_MIN_BRAIN_FRACTION,
    BridgeTrainer,
    TrainConfig,
    evaluate,
    flip_rows,
    validation_indices,
)
from lib.train.loop import TrainingPlan, run_training
from lib.train.run_folder import TrainingRun

CHECKPOINT_KIND = "controlnet-train"
VALIDATION_COLUMNS = ["iteration", "psnr", "ssim", "psnr_brain", "bbdm_psnr", "bbdm_ssim", "bbdm_psnr_brain"]
TRIPLET_COLUMNS = [
    "row",
    "subject",
    "slice",
    "position",
    "reference_id",
    "reference_subject",
    "reference_slice",
    "reference_position",
    "similarity",
    "success",
]
_QUERY_CHUNK = 512  # slices embedded and queried at a time, so memory stays bounded


class ControlTarget(OptionWord):
    """Which MRI a retrieval triplet is trained to produce."""

    option = enum.nonmember("target")

    REFERENCE = "reference"  # the MRI paired with the reference r (METHOD.md section 3)
    OWN = "own"  # y's own MRI


@dataclass
class ControlNetTrainConfig(TrainConfig):
    """How a ControlNet is trained: the BBDM trainer's settings plus the triplet settings.

    Attributes:
        slerp_fraction: share of each batch (rounded) whose control is the SLERP of y's own
            neighbouring CT slices and whose x0 is y's own MRI.
        target: a :class:`ControlTarget` value.
        position_tolerance: retrieval position window half-width (normalised position).
    """

    slerp_fraction: float = field(
        default=0.25,
        metadata={
            "help": "share of each batch whose control is the SLERP of y's own neighbouring CT slices",
            "min": 0.0,
            "max": 1.0,
        },
    )
    target: str = field(
        default=ControlTarget.REFERENCE.value,
        metadata={
            "help": "which MRI a retrieval triplet trains towards: the reference's (reference) or y's own (own)",
            "choices": [target.value for target in ControlTarget],
        },
    )
    position_tolerance: float = field(
        default=0.1, metadata={"help": "retrieval position window half-width (normalised position)", "min": 0.0}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target = ControlTarget.parse(self.target).value

    @property
    def slerp_count(self) -> int:
        """SLERP pairs per batch."""
        return int(round(self.slerp_fraction * self.batch_size))


def retrieve_references(
    slices: PreparedSlices,
    knowledge_base: KnowledgeBase,
    encoder: RetrievalEncoder,
    position_tolerance: float = 0.1,
    rows: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The top-1 reference of each slice: from another subject, within the position window.

    Args:
        slices: the query slices (their centre CT slice is embedded).
        knowledge_base: the knowledge base, built with ``encoder``.
        encoder: the retrieval encoder.
        position_tolerance: keep entries within this normalised position of the query's.
        rows: which items of ``slices`` to query (default: all).

    Returns:
        One row per query that found a candidate (queries with none are left out), with the
        columns :data:`TRIPLET_COLUMNS`; ``row`` is the item index in ``slices``.
    """
    rows = list(range(len(slices))) if rows is None else [int(row) for row in rows]
    table = slices.table
    records = []
    for start in range(0, len(rows), _QUERY_CHUNK):
        part = rows[start : start + _QUERY_CHUNK]
        subjects = [str(subject) for subject in table["subject"].iloc[part]]
        indices = table["slice"].iloc[part].to_numpy(dtype=int)
        positions = table["position"].iloc[part].to_numpy(dtype=np.float64)
        ct = np.stack(
            [slices.dataset.array(subject, "source")[index] for subject, index in zip(subjects, indices)]
        ).astype(np.float32)
        embeddings = embed_slices(encoder, torch.from_numpy(ct[:, None]))
        results = knowledge_base.query(
            embeddings, positions, k=1, position_tolerance=position_tolerance, exclude_subject=subjects
        )
        for row, subject, index, position, result in zip(part, subjects, indices, positions, results):
            if result.entry_id is not None:
                records.append(
                    (
                        row,
                        subject,
                        int(index),
                        float(position),
                        result.entry_id,
                        result.subject,
                        result.slice_index,
                        result.position,
                        result.similarity,
                        result.success,
                    )
                )
    return pd.DataFrame(records, columns=TRIPLET_COLUMNS)


def neighbour_slerp(volume: np.ndarray, index: int, alpha: float = 0.5) -> torch.Tensor:
    """SLERP of the slices below and above ``index`` (edge-clamped) of a (Z, S, S) volume, as (1, S, S)."""
    below, above = np.clip([index - 1, index + 1], 0, volume.shape[0] - 1)
    pair = torch.from_numpy(np.asarray(volume[[below, above]], dtype=np.float32))
    return slerp(pair[:1], pair[1:], alpha)


class TripletBatches:
    """Training batches (condition y, control r, target x0) from a retrieval table.

    Args:
        slices: the training slices (``source`` with the BBDM's neighbour channels).
        knowledge_base: where the references' CT and MRI slices come from.
        triplets: :func:`retrieve_references` of ``slices``.
        target: which MRI the retrieval triplets are trained to produce.
    """

    def __init__(
        self, slices: PreparedSlices, knowledge_base: KnowledgeBase, triplets: pd.DataFrame, target: ControlTarget | str
    ) -> None:
        self.slices = slices
        self.knowledge_base = knowledge_base
        self.triplets = triplets.reset_index(drop=True)
        self.target = ControlTarget(target)

    def __len__(self) -> int:
        return len(self.triplets)

    def batch(
        self, picks: Sequence[int], slerp_count: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stack the triplets ``picks``; the first ``slerp_count`` become SLERP pairs.

        Returns:
            ``condition`` (B, C, S, S), ``control`` (B, 1, S, S) and ``x0`` (B, 1, S, S).
        """
        conditions, controls, targets = [], [], []
        for position, pick in enumerate(picks):
            record = self.triplets.iloc[int(pick)]
            item = self.slices[int(record["row"])]
            if position < slerp_count:
                control = neighbour_slerp(self.slices.dataset.array(item["subject"], "source"), item["slice"])
                target = item["target"]
            else:
                reference = int(record["reference_id"])
                control = torch.from_numpy(self.knowledge_base.ct_slice(reference))[None]
                target = (
                    torch.from_numpy(self.knowledge_base.mri_slice(reference))[None]
                    if self.target is ControlTarget.REFERENCE
                    else item["target"]
                )
            conditions.append(item["source"])
            controls.append(control)
            targets.append(target)
        return tuple(torch.stack(tensors).to(device) for tensors in (conditions, controls, targets))  # type: ignore[return-value]


def _check_sizes(
    size: int,
    spec: BBDMSpec,
    bbdm: Path,
    knowledge_base: KnowledgeBase,
    encoder_size: int,
    encoder: Path,
    data: Path,
) -> None:
    """Every model and the knowledge base must work on the prepared dataset's slice size."""
    found = {
        f"the BBDM {bbdm}": spec.image_size,
        f"the retrieval encoder {encoder}": encoder_size,
        f"the knowledge base {knowledge_base.root}": int(knowledge_base.manifest.slice_shape[0]),
    }
    wrong = [f"{what} is for {value}x{value} slices" for what, value in found.items() if value != size]
    if wrong:
        raise ValueError(f"{data} holds {size}x{size} slices, but " + "; ".join(wrong))


def _validation_set(
    dataset: PreparedDataset,
    knowledge_base: KnowledgeBase,
    encoder: RetrievalEncoder,
    neighbours: int,
    train_config: ControlNetTrainConfig,
) -> tuple[PreparedSlices | None, list[int], torch.Tensor | None]:
    """Fixed validation slices with a retrieved reference, and their controls (None: no validation)."""
    try:
        val_set = PreparedSlices(
            dataset,
            "val",
            max(train_config.min_brain_fraction, VALIDATION_MIN_BRAIN_FRACTION),
            neighbours,
            MIN_INPUT_COVERAGE,
        )
    except ValueError:
        warnings.warn(f"{dataset.root}: no validation slices; training the ControlNet without validation", stacklevel=3)
        return None, [], None
    table = retrieve_references(
        val_set,
        knowledge_base,
        encoder,
        train_config.position_tolerance,
        validation_indices(val_set, train_config.val_slices),
    )
    if table.empty:
        warnings.warn(
            "no validation slice found a reference in the knowledge base; training the ControlNet without validation",
            stacklevel=3,
        )
        return None, [], None
    control = torch.stack(
        [torch.from_numpy(knowledge_base.ct_slice(int(entry)))[None] for entry in table["reference_id"]]
    )
    return val_set, table["row"].tolist(), control


class ControlNetTrainer(BridgeTrainer):
    """The ControlNet's part of the training loop: triplets, the frozen BBDM, the guided loss.

    Args:
        data: prepared dataset folder.
        bbdm: the trained BBDM's ``model.pt`` (frozen).
        kb: knowledge base folder.
        encoder: the retrieval encoder's ``encoder.pt`` the knowledge base was built with.
    """

    kind = CHECKPOINT_KIND
    weights_name = "controlnet.pt"
    weights_key = "controlnet"
    validation_columns = VALIDATION_COLUMNS
    selection = "psnr_brain"

    def __init__(
        self,
        data: str | os.PathLike[str],
        bbdm: str | os.PathLike[str],
        kb: str | os.PathLike[str],
        encoder: str | os.PathLike[str],
    ) -> None:
        self.data, self.bbdm, self.kb, self.encoder = data, bbdm, kb, encoder

    def prepare(self, train_config: ControlNetTrainConfig, run: TrainingRun, device: torch.device) -> TrainingPlan:
        self.train_config, self.device = train_config, device
        dataset = PreparedDataset(self.data)
        self.denoiser, self.spec = load_bbdm(self.bbdm, device)
        self.bbdm_hash = state_dict_hash(self.denoiser.state_dict())
        if run.state is not None and run.state["bbdm_hash"] != self.bbdm_hash:
            raise ValueError(
                f"{run.out}: this run trains a ControlNet for another BBDM than {self.bbdm} (weights hash differs)"
            )
        encoder_model, encoder_config = load_retrieval_encoder(self.encoder, device)
        self.encoder_hash = encoder_hash(encoder_model, encoder_config)
        knowledge_base = KnowledgeBase.load(self.kb, expected_encoder_hash=self.encoder_hash)
        _check_sizes(
            int(dataset.manifest["config"]["size"]),
            self.spec,
            Path(self.bbdm),
            knowledge_base,
            encoder_config.image_size,
            Path(self.encoder),
            Path(self.data),
        )
        self.train_set = PreparedSlices(
            dataset, "train", train_config.min_brain_fraction, self.spec.neighbours, MIN_INPUT_COVERAGE
        )
        self.triplets = retrieve_references(
            self.train_set, knowledge_base, encoder_model, train_config.position_tolerance
        )
        if self.triplets.empty:
            raise ValueError(
                f"no training slice of {self.data} found a reference from another subject in {self.kb} (position "
                f"tolerance {train_config.position_tolerance})"
            )
        self.batches = TripletBatches(self.train_set, knowledge_base, self.triplets, train_config.target)
        self.items = len(self.batches)
        self.val_set, self.val_rows, self.val_control = _validation_set(
            dataset, knowledge_base, encoder_model, self.spec.neighbours, train_config
        )
        self.scheduler = BridgeScheduler(self.spec.scheduler)
        # The frozen BBDM's scores do not change during training: measure them once.
        self.baseline = (
            evaluate(
                self.denoiser,
                self.spec,
                self.val_set,
                self.val_rows,
                train_config.val_steps,
                device,
                seed=train_config.seed,
            )
            if self.val_set is not None
            else {}
        )
        return TrainingPlan(
            record={
                "model": self.spec.denoiser.to_dict(),
                "scheduler": self.spec.scheduler.to_dict(),
                "inputs": {
                    "data": str(self.data),
                    "bbdm": str(self.bbdm),
                    "bbdm_hash": self.bbdm_hash,
                    "kb": str(self.kb),
                    "encoder": str(self.encoder),
                    "encoder_hash": self.encoder_hash,
                },
                "triplets": {
                    "slices": len(self.train_set),
                    "with_reference": len(self.triplets),
                    "successful": int(self.triplets["success"].sum()),
                },
            },
            validate_every=train_config.val_every if self.val_set is not None else None,
            ema_decay=train_config.ema_decay,
            grad_clip=train_config.grad_clip,
        )

    def build(self, channels_last: bool) -> torch.nn.Module:
        # The control embedding's first convolution starts random (the loop has seeded torch).
        controlnet = controlnet_from_denoiser(self.denoiser, self.spec.denoiser).to(self.device)
        # Only the ControlNet is optimised: the frozen denoiser is not part of the trained module.
        self.model = ControlledDenoiser(self.denoiser, controlnet)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        return self.model.controlnet

    def batch(
        self, picks: list[int], flips: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        condition, control, x0 = (
            flip_rows(tensor, flips) for tensor in self.batches.batch(picks, self.train_config.slerp_count, self.device)
        )
        return condition, x0, partial(self.model, control=control)

    def validate(self, module: torch.nn.Module) -> tuple[dict[str, float], str]:
        controlled = evaluate(
            ControlledDenoiser(self.denoiser, module),
            self.spec,
            self.val_set,
            self.val_rows,
            self.train_config.val_steps,
            self.device,
            seed=self.train_config.seed,
            control=self.val_control,
        )
        scores = {**controlled, **{f"bbdm_{name}": value for name, value in self.baseline.items()}}
        return scores, f"validation PSNR {scores['psnr']:.2f} dB with control, {scores['bbdm_psnr']:.2f} dB BBDM alone"

    def state(self) -> dict[str, Any]:
        return {**self.spec.to_checkpoint(), "bbdm_hash": self.bbdm_hash}

    def weights(self, module: torch.nn.Module) -> dict[str, Any]:
        return controlnet_checkpoint(
            module,
            self.spec.denoiser,
            self.bbdm_hash,
            {"encoder_hash": self.encoder_hash, "train_config": self.train_config.to_dict()},
        )

    def begin(self, out: Path) -> None:
        self.triplets.to_csv(out / "triplets.csv", index=False)


def train_controlnet(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    bbdm: str | os.PathLike[str],
    kb: str | os.PathLike[str],
    encoder: str | os.PathLike[str],
    train_config: ControlNetTrainConfig,
    device: str = "auto",
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Train (or resume training) a ControlNet on a frozen BBDM; see the module docstring.

    Validation samples fixed val-split slices (their retrieved reference as control) and
    scores them against the slices' own MRI, the pipeline's goal, for the controlled model
    and for the BBDM alone.

    Args:
        data: prepared dataset folder.
        out: the run folder.
        bbdm: the trained BBDM's ``model.pt`` (frozen).
        kb: knowledge base folder.
        encoder: the retrieval encoder's ``encoder.pt`` the knowledge base was built with.
        train_config: training settings (on resume the checkpoint's are used, except
            ``iters`` and ``precision``).
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue from ``out/checkpoint.pt``.
        progress: called after each iteration (validation lines as its message).

    Returns:
        The last validation scores (empty without validation): ``psnr``, ``ssim``,
        ``psnr_brain`` and the BBDM's ``bbdm_psnr``, ``bbdm_ssim``, ``bbdm_psnr_brain``.

    Raises:
        RunExistsError: ``out`` holds a run and ``resume`` is false.
        ValueError: a missing or unreadable input, a knowledge base built with another
            encoder, sizes that do not match the data, a resumed run on another BBDM, or no
            training slice with a reference.
    """
    return run_training(ControlNetTrainer(data, bbdm, kb, encoder), out, train_config, device, resume, progress)
