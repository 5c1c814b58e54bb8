"""Training the ControlNet on the frozen BBDM (METHOD.md section 3).

Triplets (y, r, x0): y is a training CT slice (with the BBDM's neighbour channels), r the
top-1 CT slice retrieved for y from the knowledge base, never from y's own subject and within
the position window, and x0 the MRI paired with r (``target="reference"``, METHOD.md) or y's
own MRI (``target="own"``). The retrieval of every training slice is computed once at the
start. A fraction of each batch instead uses the SLERP of y's own neighbouring CT slices as
control and y's own MRI as x0: the fallback the pipeline takes when retrieval fails
(METHOD.md section 4). The loss is the BBDM's (same objective); only the ControlNet trains.

A run folder holds::

    config.json        BBDM config, training config, input files and their hashes
    triplets.csv       each training slice's reference: row, subject, slice, position,
                       reference_id, reference_subject, reference_slice, reference_position,
                       similarity, success (similarity >= tau)
    checkpoint.pt      everything needed to resume (ControlNet, EMA, optimiser, RNG, iteration)
    controlnet.pt      the EMA ControlNet, the BBDM config and the BBDM's hash: what inference
                       loads with :func:`lib.models.controlnet.load_controlled_denoiser`
    loss.csv           iteration, loss, learning rate, seconds
    validation.csv     iteration, PSNR / SSIM / brain PSNR of the controlled model and, for
                       comparison, of the frozen BBDM alone (bbdm_*), on fixed val slices
    curves.png         the loss and validation curves

Every random draw comes from one seeded generator whose state is checkpointed, so a resumed
run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.data.dataset import PreparedDataset, PreparedSlices
from lib.diffusion.bridge import BridgeSchedule
from lib.diffusion.slerp import slerp
from lib.models.controlnet import ControlledDenoiser, controlnet_checkpoint, controlnet_from_denoiser, state_dict_hash
from lib.models.denoiser import BBDMConfig, load_bbdm
from lib.models.device import autocast_context, resolve_device
from lib.models.retrieval_encoder import RetrievalEncoder, embed_slices, encoder_hash, load_retrieval_encoder
from lib.retrieval.knowledge_base import KnowledgeBase
from lib.train.bbdm import (
    LOSS_COLUMNS,
    TrainConfig,
    bridge_training_pair,
    evaluate,
    optimiser_state,
    plot_curves,
    validation_indices,
)
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
# As for BBDM validation (app/cli.py): validation slices need a substantial brain area.
VALIDATION_MIN_BRAIN_FRACTION = 0.2
_QUERY_CHUNK = 512  # slices embedded and queried at a time, so memory stays bounded


class ControlTarget(str, enum.Enum):
    """Which MRI a retrieval triplet is trained to produce."""

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
        min_brain_fraction: training slices with less brain are skipped.
    """

    slerp_fraction: float = 0.25
    target: str = ControlTarget.REFERENCE.value
    position_tolerance: float = 0.1
    min_brain_fraction: float = 0.05

    def __post_init__(self) -> None:
        try:
            self.target = ControlTarget(self.target).value
        except ValueError:
            raise ValueError(f"target must be one of {[t.value for t in ControlTarget]}, got {self.target!r}") from None
        if not 0.0 <= self.slerp_fraction <= 1.0:
            raise ValueError(f"slerp_fraction must be in [0, 1], got {self.slerp_fraction}")
        if not (np.isfinite(self.position_tolerance) and self.position_tolerance >= 0):
            raise ValueError(f"position_tolerance must be finite and >= 0, got {self.position_tolerance}")

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


def controlnet_step(
    model: ControlledDenoiser,
    optimizer: torch.optim.Optimizer,
    schedule: BridgeSchedule,
    config: BBDMConfig,
    condition: torch.Tensor,
    control: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    grad_clip: float = 1.0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> float:
    """One optimiser step on the ControlNet with the BBDM's loss; returns the loss.

    The optimiser should hold ``model.trainable_parameters()`` only: the denoiser is frozen.
    """
    model.train()
    x_t, target = bridge_training_pair(schedule, config, condition, x0, t, noise)
    with autocast if autocast is not None else contextlib.nullcontext():
        output = model(torch.cat([x_t, condition], dim=1), t, control)
    loss = torch.nn.functional.mse_loss(output.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.trainable_parameters()), grad_clip)
    optimizer.step()
    return loss.item()


def _check_sizes(
    size: int,
    config: BBDMConfig,
    bbdm: Path,
    knowledge_base: KnowledgeBase,
    encoder_size: int,
    encoder: Path,
    data: Path,
) -> None:
    """Every model and the knowledge base must work on the prepared dataset's slice size."""
    found = {
        f"the BBDM {bbdm}": config.image_size,
        f"the retrieval encoder {encoder}": encoder_size,
        f"the knowledge base {knowledge_base.root}": int(knowledge_base.manifest["slice_shape"][0]),
    }
    wrong = [f"{what} is for {value}x{value} slices" for what, value in found.items() if value != size]
    if wrong:
        raise ValueError(f"{data} holds {size}x{size} slices, but " + "; ".join(wrong))


def _validation_set(
    dataset: PreparedDataset,
    knowledge_base: KnowledgeBase,
    encoder: RetrievalEncoder,
    config: BBDMConfig,
    train_config: ControlNetTrainConfig,
) -> tuple[PreparedSlices | None, list[int], torch.Tensor | None]:
    """Fixed validation slices with a retrieved reference, and their controls (None: no validation)."""
    try:
        val_set = PreparedSlices(
            dataset, "val", max(train_config.min_brain_fraction, VALIDATION_MIN_BRAIN_FRACTION), config.neighbours
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


def train_controlnet(
    data: str | os.PathLike[str],
    bbdm: str | os.PathLike[str],
    kb: str | os.PathLike[str],
    encoder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    train_config: ControlNetTrainConfig,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Train (or resume training) a ControlNet on a frozen BBDM; see the module docstring.

    Validation samples fixed val-split slices (their retrieved reference as control) and
    scores them against the slices' own MRI, the pipeline's goal, for the controlled model
    and for the BBDM alone.

    Args:
        data: prepared dataset folder.
        bbdm: the trained BBDM's ``model.pt`` (frozen).
        kb: knowledge base folder.
        encoder: the retrieval encoder's ``encoder.pt`` the knowledge base was built with.
        out: the run folder.
        train_config: training settings (on resume the checkpoint's are used, except
            ``iters`` and ``device``).
        resume: continue from ``out/checkpoint.pt``.
        progress: show a progress bar.

    Returns:
        The last validation scores (empty without validation): ``psnr``, ``ssim``,
        ``psnr_brain`` and the BBDM's ``bbdm_psnr``, ``bbdm_ssim``, ``bbdm_psnr_brain``.

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is false.
        ValueError: a missing or unreadable input, a knowledge base built with another
            encoder, sizes that do not match the data, a resumed run on another BBDM, or no
            training slice with a reference.
    """
    out = Path(out)
    run = TrainingRun(out, CHECKPOINT_KIND, resume, {"loss": LOSS_COLUMNS, "validation": VALIDATION_COLUMNS})
    if run.state is not None:
        train_config = ControlNetTrainConfig(
            **{**run.state["train_config"], "iters": train_config.iters, "device": train_config.device}
        )
    device = resolve_device(train_config.device)
    dataset = PreparedDataset(data)
    denoiser, config = load_bbdm(bbdm, device)
    bbdm_hash = state_dict_hash(denoiser.state_dict())
    if run.state is not None and run.state["bbdm_hash"] != bbdm_hash:
        raise ValueError(f"{out}: this run trains a ControlNet for another BBDM than {bbdm} (weights hash differs)")
    encoder_model, encoder_config = load_retrieval_encoder(encoder, device)
    encoder_digest = encoder_hash(encoder_model, encoder_config)
    knowledge_base = KnowledgeBase.load(kb, expected_encoder_hash=encoder_digest)
    _check_sizes(
        int(dataset.manifest["config"]["size"]),
        config,
        Path(bbdm),
        knowledge_base,
        encoder_config.image_size,
        Path(encoder),
        Path(data),
    )

    train_set = PreparedSlices(dataset, "train", train_config.min_brain_fraction, config.neighbours)
    triplets = retrieve_references(train_set, knowledge_base, encoder_model, train_config.position_tolerance)
    if triplets.empty:
        raise ValueError(
            f"no training slice of {data} found a reference from another subject in {kb} (position tolerance {train_config.position_tolerance})"
        )
    batches = TripletBatches(train_set, knowledge_base, triplets, train_config.target)
    val_set, val_rows, val_control = _validation_set(dataset, knowledge_base, encoder_model, config, train_config)

    torch.manual_seed(train_config.seed)  # the control embedding's first convolution starts random
    controlnet = controlnet_from_denoiser(denoiser, config).to(device)
    model = ControlledDenoiser(denoiser, controlnet)
    # Only the ControlNet is optimised: the frozen denoiser is not part of it.
    ema, optimizer, generator = optimiser_state(controlnet, train_config, run.state, "controlnet")
    ema_model = ControlledDenoiser(denoiser, ema.module)
    run.begin(
        {
            "model": config.to_dict(),
            "training": asdict(train_config),
            "inputs": {
                "data": str(data),
                "bbdm": str(bbdm),
                "bbdm_hash": bbdm_hash,
                "kb": str(kb),
                "encoder": str(encoder),
                "encoder_hash": encoder_digest,
            },
            "triplets": {
                "slices": len(train_set),
                "with_reference": len(triplets),
                "successful": int(triplets["success"].sum()),
            },
        }
    )
    triplets.to_csv(out / "triplets.csv", index=False)

    schedule = BridgeSchedule.from_config(config)
    autocast = autocast_context(device)
    baseline: dict[str, float] = {}
    if val_set is not None:
        # The frozen BBDM's scores do not change during training: measure them once.
        baseline = evaluate(denoiser, config, val_set, val_rows, train_config.val_steps, device, seed=train_config.seed)
    scores: dict[str, float] = {}

    def save(iteration: int) -> None:
        run.save(
            iteration,
            {
                "config": config.to_dict(),
                "train_config": asdict(train_config),
                "bbdm_hash": bbdm_hash,
                "controlnet": controlnet.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
            },
            "controlnet.pt",
            controlnet_checkpoint(
                ema.module, config, bbdm_hash, {"encoder_hash": encoder_digest, "train_config": asdict(train_config)}
            ),
        )

    started = time.perf_counter()
    bar = run.iterations(train_config.iters, "train-controlnet", progress)
    for iteration in bar:
        picks = torch.randint(len(batches), (train_config.batch_size,), generator=generator)
        t = torch.randint(config.timesteps, (train_config.batch_size,), generator=generator).to(device)
        condition, control, x0 = batches.batch(picks.tolist(), train_config.slerp_count, device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        loss = controlnet_step(
            model, optimizer, schedule, config, condition, control, x0, t, noise, train_config.grad_clip, autocast
        )
        ema.update_parameters(controlnet)
        run.log("loss", [iteration, f"{loss:.6g}", train_config.lr, f"{time.perf_counter() - started:.1f}"])
        bar.set_postfix(loss=f"{loss:.4g}")

        if val_set is not None and (iteration % train_config.val_every == 0 or iteration == train_config.iters):
            controlled = evaluate(
                ema_model,
                config,
                val_set,
                val_rows,
                train_config.val_steps,
                device,
                seed=train_config.seed,
                control=val_control,
            )
            scores = {**controlled, **{f"bbdm_{name}": value for name, value in baseline.items()}}
            run.log("validation", [iteration, *(f"{scores[column]:.4f}" for column in VALIDATION_COLUMNS[1:])])
            bar.write(
                f"iteration {iteration}: validation PSNR {scores['psnr']:.2f} dB with control, {scores['bbdm_psnr']:.2f} dB BBDM alone"
            )
        if iteration % train_config.checkpoint_every == 0 or iteration == train_config.iters:
            save(iteration)
    if run.start >= train_config.iters:
        save(run.start)
    plot_curves(out)
    return scores
