"""Training the retrieval encoder with the contrastive + perceptual loss (METHOD.md section 2).

A run folder holds ``checkpoint.pt`` (resume state), ``encoder.pt`` (weights + config, what
``build-kb`` loads), ``loss.csv`` (iteration, loss, contrast, percept, seconds),
``accuracy.csv`` (iteration, subject and position retrieval accuracy on held-out subjects)
and ``config.json``. Batches come from :class:`AdjacentRunSampler`, whose generator state
is checkpointed, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from lib.data.dataset import PreparedDataset
from lib.models.device import resolve_device
from lib.models.retrieval_encoder import CHECKPOINT_KIND, RetrievalConfig, build_retrieval_encoder
from lib.retrieval.batches import AdjacentRunSampler, load_run_batch
from lib.retrieval.evaluation import retrieval_accuracy
from lib.retrieval.losses import positive_mask, retrieval_loss
from lib.train.run_folder import TrainingRun

LOSS_COLUMNS = ["iteration", "loss", "contrast", "percept", "seconds"]
ACCURACY_COLUMNS = ["iteration", "subject_accuracy", "position_accuracy"]


@dataclass
class RetrievalTrainConfig:
    """How the retrieval encoder is trained (saved beside the model config)."""

    iters: int = 1000
    subjects_per_batch: int = 4
    run_length: int = 8
    positives: int = 2
    alpha: float = 1.0
    beta: float = 1.0
    percept_weight: float = 0.5
    lr: float = 3e-4
    weight_decay: float = 0.05
    min_brain_fraction: float = 0.05
    position_tolerance: float = 0.1
    eval_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"


def train_retrieval(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: RetrievalConfig,
    train_config: RetrievalTrainConfig,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Train (or resume) the retrieval encoder on a prepared dataset's training split.

    Returns:
        The last held-out accuracy (empty if the val split has fewer than 2 subjects).

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is false.
        ValueError: no checkpoint to resume, or a config that does not fit the data.
    """
    dataset = PreparedDataset(data)
    run = TrainingRun(out, "retrieval-train", resume, {"loss": LOSS_COLUMNS, "accuracy": ACCURACY_COLUMNS})
    if run.state is not None:
        config = RetrievalConfig.from_dict(run.state["config"])
        train_config = RetrievalTrainConfig(
            **{**run.state["train_config"], "iters": train_config.iters, "device": train_config.device}
        )
    size = int(dataset.manifest["config"]["size"])
    if config.image_size != size:
        raise ValueError(f"{data}: slices are {size}x{size}, the encoder config expects {config.image_size}")

    device = resolve_device(train_config.device)
    torch.manual_seed(train_config.seed)
    model = build_retrieval_encoder(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    sampler = AdjacentRunSampler(
        dataset.slices,
        "train",
        train_config.min_brain_fraction,
        train_config.subjects_per_batch,
        train_config.run_length,
        seed=train_config.seed,
    )
    if run.state is not None:
        model.load_state_dict(run.state["model"])
        optimizer.load_state_dict(run.state["optimizer"])
        sampler.load_state_dict(run.state["sampler"])
    run.begin({"model": config.to_dict(), "training": asdict(train_config)})
    can_evaluate = dataset.slices[dataset.slices["split"] == "val"]["subject"].nunique() >= 2
    accuracy: dict[str, float] = {}

    def save(iteration: int) -> None:
        run.save(
            iteration,
            {
                "config": config.to_dict(),
                "train_config": asdict(train_config),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": sampler.state_dict(),
            },
            "encoder.pt",
            {"kind": CHECKPOINT_KIND, "config": config.to_dict(), "model": model.state_dict()},
        )

    started = time.perf_counter()
    bar = run.iterations(train_config.iters, "train-retrieval", progress)
    for iteration in bar:
        model.train()
        batch = load_run_batch(dataset, sampler.next_batch())
        embeddings, features = model(batch.source.to(device))
        positives = positive_mask(batch.subjects, batch.slices, train_config.positives).to(device)
        loss, parts = retrieval_loss(
            embeddings, features, positives, train_config.alpha, train_config.beta, train_config.percept_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(
            "loss",
            [
                iteration,
                f"{loss.item():.6g}",
                f"{parts['contrast'].item():.6g}",
                f"{parts['percept'].item():.6g}",
                f"{time.perf_counter() - started:.1f}",
            ],
        )
        bar.set_postfix(loss=f"{loss.item():.4g}")
        if can_evaluate and (iteration % train_config.eval_every == 0 or iteration == train_config.iters):
            accuracy = retrieval_accuracy(
                model, dataset, "val", train_config.position_tolerance, train_config.min_brain_fraction
            )
            run.log(
                "accuracy", [iteration, f"{accuracy['subject_accuracy']:.4f}", f"{accuracy['position_accuracy']:.4f}"]
            )
            bar.write(
                f"iteration {iteration}: retrieval accuracy subject {accuracy['subject_accuracy']:.3f}, subject+position {accuracy['position_accuracy']:.3f}"
            )
        if iteration % train_config.checkpoint_every == 0 or iteration == train_config.iters:
            save(iteration)
    if run.start >= train_config.iters:
        save(run.start)
    return accuracy
