"""Training the retrieval encoder with the contrastive + perceptual loss (METHOD.md section 2).

A run folder holds ``checkpoint.pt`` (resume state), ``encoder.pt`` (weights + config, what
``build-kb`` loads), ``loss.csv`` (iteration, loss, contrast, percept, seconds),
``accuracy.csv`` (iteration, subject and position retrieval accuracy on held-out subjects)
and ``config.json``. The loop is :func:`lib.train.loop.run_training`; batches come from
:class:`AdjacentRunSampler`, whose generator state is checkpointed, so a resumed run continues
exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from lib.data.dataset import PreparedDataset
from lib.models.device import Precision
from lib.models.retrieval_encoder import CHECKPOINT_KIND, RetrievalConfig, build_retrieval_encoder
from lib.progress import ProgressFn
from lib.retrieval.batches import AdjacentRunSampler, load_run_batch
from lib.retrieval.evaluation import retrieval_accuracy
from lib.retrieval.losses import positive_mask, retrieval_loss
from lib.train.loop import LoopConfig, Trainer, TrainingPlan, run_training
from lib.train.run_folder import TrainingRun

LOSS_COLUMNS = ["iteration", "loss", "contrast", "percept", "seconds"]
ACCURACY_COLUMNS = ["iteration", "subject_accuracy", "position_accuracy"]


@dataclass
class RetrievalTrainConfig(LoopConfig):
    """How the retrieval encoder is trained (saved beside the model config)."""

    iters: int = field(default=1000, metadata={"help": "train up to this iteration (also on resume)", "min": 1})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate", "min": 0.0})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay", "min": 0.0})
    checkpoint_every: int = field(default=100, metadata={"help": "iterations between checkpoints", "min": 1})
    # float32 unless asked: the encoder trained without autocast on every device before the shared loop.
    precision: Precision = field(
        default=Precision.FP32, metadata={"help": "forward-pass arithmetic: fp32, bf16 (autocast), or auto"}
    )
    subjects_per_batch: int = field(default=4, metadata={"help": "subjects in each batch", "min": 1})
    run_length: int = field(default=8, metadata={"help": "adjacent slices per subject in a batch", "min": 2})
    positives: int = field(default=2, metadata={"help": "K: slices p+1..p+K are positives of p", "min": 1})
    alpha: float = field(default=1.0, metadata={"help": "alpha, the contrastive similarity's temperature"})
    beta: float = field(default=1.0, metadata={"help": "beta, the perceptual distance's scale"})
    percept_weight: float = field(
        default=0.5, metadata={"help": "lambda, the perceptual loss's weight (0: contrastive loss only)", "min": 0.0}
    )
    min_brain_fraction: float = field(
        default=0.05, metadata={"help": "skip training slices with less brain", "min": 0.0, "max": 1.0}
    )
    position_tolerance: float = field(
        default=0.1, metadata={"help": "a near position in the held-out accuracy (normalised position)", "min": 0.0}
    )
    eval_every: int = field(default=100, metadata={"help": "iterations between held-out accuracy checks", "min": 1})


class RetrievalTrainer(Trainer):
    """The encoder's part of the training loop: adjacent-slice batches, the ViT, held-out accuracy.

    Args:
        data: prepared dataset folder (its train split; held-out accuracy on its val split).
        config: encoder config (on resume the checkpoint's is used).
    """

    kind = "retrieval-train"
    weights_name = "encoder.pt"
    loss_columns = LOSS_COLUMNS
    validation_log = "accuracy"
    validation_columns = ACCURACY_COLUMNS

    def __init__(self, data: str | os.PathLike[str], config: RetrievalConfig) -> None:
        self.data, self.config = data, config

    def prepare(self, train_config: RetrievalTrainConfig, run: TrainingRun, device: torch.device) -> TrainingPlan:
        self.train_config, self.device = train_config, device
        self.dataset = PreparedDataset(self.data)
        if run.state is not None:
            self.config = RetrievalConfig.from_dict(run.state["config"])
        size = int(self.dataset.manifest["config"]["size"])
        if self.config.image_size != size:
            raise ValueError(
                f"{self.data}: slices are {size}x{size}, the encoder config expects {self.config.image_size}"
            )
        self.sampler = AdjacentRunSampler(
            self.dataset.slices,
            "train",
            train_config.min_brain_fraction,
            train_config.subjects_per_batch,
            train_config.run_length,
            seed=train_config.seed,
        )
        can_evaluate = self.dataset.slices[self.dataset.slices["split"] == "val"]["subject"].nunique() >= 2
        return TrainingPlan(
            record={"model": self.config.to_dict()}, validate_every=train_config.eval_every if can_evaluate else None
        )

    def build(self, channels_last: bool) -> torch.nn.Module:
        # channels_last is for UNets: a ViT has a single convolution, its patch embedding.
        self.model = build_retrieval_encoder(self.config).to(self.device)
        return self.model

    def loss(
        self, generator: torch.Generator, autocast: contextlib.AbstractContextManager
    ) -> tuple[torch.Tensor, list[Any]]:
        batch = load_run_batch(self.dataset, self.sampler.next_batch())
        with autocast:
            embeddings, features = self.model(batch.source.to(self.device))
        positives = positive_mask(batch.subjects, batch.slices, self.train_config.positives).to(self.device)
        config = self.train_config
        loss, parts = retrieval_loss(
            embeddings.float(),
            [feature.float() for feature in features],
            positives,
            config.alpha,
            config.beta,
            config.percept_weight,
        )
        return loss, [f"{parts['contrast'].item():.6g}", f"{parts['percept'].item():.6g}"]

    def validate(self, module: torch.nn.Module) -> tuple[dict[str, float], str]:
        config = self.train_config
        accuracy = retrieval_accuracy(module, self.dataset, "val", config.position_tolerance, config.min_brain_fraction)
        return accuracy, (
            f"retrieval accuracy subject {accuracy['subject_accuracy']:.3f}, "
            f"subject+position {accuracy['position_accuracy']:.3f}"
        )

    def state(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "sampler": self.sampler.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def weights(self, module: torch.nn.Module) -> dict[str, Any]:
        return {"kind": CHECKPOINT_KIND, "config": self.config.to_dict(), "model": module.state_dict()}


def train_retrieval(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: RetrievalConfig,
    train_config: RetrievalTrainConfig,
    device: str = "auto",
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Train (or resume) the retrieval encoder on a prepared dataset's training split.

    Args:
        data: prepared dataset folder.
        out: the run folder.
        config: encoder config (ignored on resume: the checkpoint's config is used).
        train_config: training settings (on resume the checkpoint's, except ``iters`` and ``precision``).
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue from ``out/checkpoint.pt``.
        progress: called after each iteration (accuracy lines as its message).

    Returns:
        The last held-out accuracy (empty if the val split has fewer than 2 subjects).

    Raises:
        RunExistsError: ``out`` holds a run and ``resume`` is false.
        ValueError: no checkpoint to resume, or a config that does not fit the data.
    """
    return run_training(RetrievalTrainer(data, config), out, train_config, device, resume, progress)
