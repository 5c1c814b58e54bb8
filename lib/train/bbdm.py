"""Training the BBDM denoiser: AdamW, EMA, mixed precision, checkpoints and resume.

A run folder holds::

    config.json        the model config, the bridge scheduler's settings and the training config
    checkpoint.pt      everything needed to resume (model, EMA, optimiser, RNG, iteration)
    model.pt           the EMA weights, the model config and the scheduler's: what inference loads
    best_model.pt      the same for the validation with the best brain PSNR so far; best.json
                       names its iteration and score
    loss.csv           iteration, loss, learning rate, seconds
    validation.csv     iteration, PSNR / SSIM (whole slice) and PSNR inside the brain mask
    curves.png         the loss and validation curves

The loop itself (resume, seeding, precision, checkpoints) is :func:`lib.train.loop.run_training`;
this module supplies the data, the network and the bridge loss.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lib.data.dataset import MIN_INPUT_COVERAGE, PreparedDataset, PreparedSlices, select_slices
from lib.data.intensity_map import fit_intensity_map
from lib.diffusion.sampler import translate_slices
from lib.diffusion.scheduler import BridgeScheduler, BridgeSchedulerConfig, BridgeStart
from lib.io.checkpoint import load_checkpoint
from lib.metrics import psnr, ssim_2d
from lib.models.denoiser import BBDM_KIND, BBDMConfig, BBDMSpec, bbdm_checkpoint, build_denoiser
from lib.models.weights_hash import state_dict_hash
from lib.options_schema import OptionWord
from lib.progress import ProgressFn
from lib.train.loop import LoopConfig, Trainer, TrainingPlan, run_training
from lib.train.run_folder import TrainingRun

LOSS_COLUMNS = ["iteration", "loss", "lr", "seconds"]
FLIP_HELP = "probability that a training slice (input, target and control together) is flipped left-right"
VALIDATION_COLUMNS = ["iteration", "psnr", "ssim", "psnr_brain"]
# Validation slices need at least this brain fraction (or the training threshold, if higher).
# The fixed validation set is a few evenly spaced slices; near the top and bottom of the head a
# slice is mostly background, whose easy zeros would inflate PSNR and SSIM and make the curves
# say little about the brain, which is what the model is for.
VALIDATION_MIN_BRAIN_FRACTION = 0.2

# (neighbours, min_brain_fraction) -> training slices and validation slices (None: no validation).
SliceSets = Callable[[int, float], tuple[Dataset, Dataset | None]]


class BridgeLoss(OptionWord):
    """How the network output is compared with the bridge's training target."""

    option = enum.nonmember("loss")

    MSE = "mse"  # mean squared error (our default since the first weights)
    L1 = "l1"  # mean absolute error, the original BBDM's choice (Li et al. 2023)


@dataclass
class TrainConfig(LoopConfig):
    """How a BBDM model is trained (saved beside the model config)."""

    batch_size: int = field(default=8, metadata={"help": "slices per training batch", "min": 1})
    ema_decay: float = field(
        default=0.999, metadata={"help": "decay of the weights' moving average that is shipped", "min": 0.0, "max": 1.0}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "maximum gradient norm", "min": 0.0})
    val_every: int = field(default=250, metadata={"help": "iterations between validations", "min": 1})
    val_slices: int = field(default=16, metadata={"help": "fixed validation slices", "min": 1})
    val_steps: int = field(default=10, metadata={"help": "sampling steps used for validation", "min": 2})
    min_brain_fraction: float = field(
        default=0.05, metadata={"help": "skip training slices with less brain", "min": 0.0, "max": 1.0}
    )
    # Left-right flips: heads are nearly symmetric and lesions fall on either side, so a flipped
    # training slice is a plausible new one (a model trained without flips scores 0.6 dB lower on
    # flipped validation inputs: it has learnt side-specific detail of 20 subjects; NOTES.md).
    flip_probability: float = field(default=0.0, metadata={"help": FLIP_HELP, "min": 0.0, "max": 1.0})
    # A run saved before this option existed has no "loss" key and resumes with the default,
    # the loss it was trained with.
    loss: BridgeLoss = field(
        default=BridgeLoss.MSE,
        metadata={"help": "the bridge loss: mse (squared error) or l1 (absolute error, as in the original BBDM)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loss = BridgeLoss.parse(self.loss)


def prepared_slices(
    data: str | os.PathLike[str], neighbours: int, min_brain_fraction: float
) -> tuple[PreparedSlices, PreparedSlices | None]:
    """The training and validation slices of a prepared dataset (:data:`SliceSets` with ``data`` bound).

    Validation slices need :data:`VALIDATION_MIN_BRAIN_FRACTION`; a dataset without any trains
    without validation, with a warning. Both leave out slices under :data:`MIN_INPUT_COVERAGE`.
    """
    train_set = PreparedSlices(data, "train", min_brain_fraction, neighbours, MIN_INPUT_COVERAGE)
    try:
        val_set = PreparedSlices(
            data, "val", max(min_brain_fraction, VALIDATION_MIN_BRAIN_FRACTION), neighbours, MIN_INPUT_COVERAGE
        )
    except ValueError:
        warnings.warn(f"{data}: no validation slices; training without validation", stacklevel=2)
        val_set = None
    return train_set, val_set


def flip_rows(tensor: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
    """``tensor`` (B, C, H, W) with the rows where ``flips`` (B,) is true flipped left-right (along W)."""
    if flips is None:
        return tensor
    return torch.where(flips.to(tensor.device)[:, None, None, None], tensor.flip(-1), tensor)


def _batch(dataset: Dataset, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in ("source", "target", "mask")}


def validation_indices(dataset: Dataset, count: int) -> list[int]:
    """``count`` evenly spaced items: a fixed validation set across the run."""
    return np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int).tolist()


def measure_distance_range(
    dataset: Dataset, neighbours: int = 0, count: int = 512, bridge: BridgeScheduler | None = None
) -> tuple[float, float]:
    """1st and 99th percentiles of ||y - x0|| (per slice) over up to ``count`` training slices,
    y through ``bridge``'s source map when given."""
    distances = []
    for index in validation_indices(dataset, count):
        item = dataset[index]
        condition = item["source"] if bridge is None else bridge.map_source(item["source"][None])[0]
        distances.append(float((condition[neighbours] - item["target"][0]).norm()))
    low, high = np.percentile(distances, [1, 99])
    return float(low), float(high)


def slices_as_unit_volume(slices: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) slices in [-1, 1] as an (H, W, N) volume in [0, 1], the metrics' form."""
    return ((slices[:, 0].permute(1, 2, 0).float().cpu().numpy() + 1) / 2).clip(0, 1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    spec: BBDMSpec,
    dataset: Dataset,
    indices: Sequence[int],
    steps: int,
    device: torch.device,
    seed: int = 0,
    control: torch.Tensor | None = None,
) -> dict[str, float]:
    """Sample the given slices and score them against their targets (values mapped to [0, 1]).

    ``control``: (N, 1, H, W) control images for a ControlNet-guided ``model``, or None.
    """
    model.eval()
    batch = _batch(dataset, indices, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    control = control.to(device) if control is not None else None
    prediction = translate_slices(model, spec, batch["source"], steps=steps, generator=generator, control=control)
    predicted, target = slices_as_unit_volume(prediction), slices_as_unit_volume(batch["target"])
    mask = batch["mask"][:, 0].permute(1, 2, 0).cpu().numpy() > 0.5
    return {
        "psnr": psnr(predicted, target),
        "ssim": ssim_2d(predicted, target),
        "psnr_brain": psnr(predicted, target, mask) if mask.any() else float("nan"),
    }


def plot_curves(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Plot a run's loss (smoothed) and validation curves to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    run = Path(run)
    out = Path(out) if out is not None else run / "curves.png"
    loss = pd.read_csv(run / "loss.csv")
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(loss.iteration, loss.loss.rolling(25, min_periods=1).mean())
    axes[0].set(xlabel="iteration", ylabel="training loss (smoothed)", yscale="log")
    if (run / "validation.csv").is_file():
        validation = pd.read_csv(run / "validation.csv")
        axes[1].plot(validation.iteration, validation.psnr, marker="o", label="whole slice")
        axes[1].plot(validation.iteration, validation.psnr_brain, marker="o", label="brain")
        axes[1].set(xlabel="iteration", ylabel="validation PSNR (dB)")
        axes[1].legend()
        axes[2].plot(validation.iteration, validation.ssim, marker="o")
        axes[2].set(xlabel="iteration", ylabel="validation SSIM")
    figure.suptitle(run.name)
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


def plot_comparison(runs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Overlay the validation curves (PSNR whole / brain, SSIM) of several runs in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for run in map(Path, runs):
        validation = pd.read_csv(run / "validation.csv")
        for axis, column in zip(axes, ("psnr", "psnr_brain", "ssim")):
            axis.plot(validation.iteration, validation[column], marker="o", markersize=3, label=run.name)
    for axis, label in zip(
        axes, ("validation PSNR, whole slice (dB)", "validation PSNR, brain (dB)", "validation SSIM")
    ):
        axis.set(xlabel="iteration", ylabel=label)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return Path(out)


def bridge_loss(
    scheduler: BridgeScheduler,
    network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    condition: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    neighbours: int,
    autocast: contextlib.AbstractContextManager,
    kind: BridgeLoss = BridgeLoss.MSE,
) -> torch.Tensor:
    """The BBDM loss of one batch (METHOD.md section 1), in float32.

    Args:
        scheduler: the bridge.
        network: ``(input, t) -> output`` on the input ``[x_t, condition]`` (the denoiser, or the
            ControlNet-guided denoiser with its control bound).
        condition: (B, C, H, W) CT slices; the centre channel is the bridge's y (both through
            the bridge's source map first, when it has one).
        x0: (B, 1, H, W) MRI slices.
        t: (B,) step indices.
        noise: (B, 1, H, W) standard normal noise.
        neighbours: CT slices on each side of y in ``condition``.
        autocast: the forward pass's mixed-precision context.
        kind: squared or absolute error.

    Returns:
        The mean squared (or absolute) error between the network output and the training target.
    """
    condition = scheduler.map_source(condition)
    x_t, target = scheduler.training_pair(x0, condition[:, neighbours : neighbours + 1], t, noise)
    with autocast:
        output = network(torch.cat([x_t, condition], dim=1), t)
    if kind == BridgeLoss.L1:
        return torch.nn.functional.l1_loss(output.float(), target)
    return torch.nn.functional.mse_loss(output.float(), target)


class BridgeTrainer(Trainer):
    """What the BBDM and the ControlNet trainers share: batches drawn with the loop's generator,
    the bridge loss (:func:`bridge_loss`), and the curves.

    A subclass's :meth:`prepare` sets the attributes below; :meth:`batch` gives the batch.
    """

    loss_columns = LOSS_COLUMNS
    spec: BBDMSpec  # the BBDM's configs
    scheduler: BridgeScheduler  # the bridge the BBDM is trained on
    train_config: TrainConfig
    device: torch.device
    items: int  # how many training items the batches are drawn from

    @abc.abstractmethod
    def batch(
        self, picks: list[int], flips: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The items ``picks``: condition (B, C, S, S), x0 (B, 1, S, S), and the network that
        translates them (``(input, t) -> output``, on the input ``[x_t, condition]``); the
        items where ``flips`` (B,) is true flipped left-right, every image of them alike."""

    def loss(
        self, generator: torch.Generator, autocast: contextlib.AbstractContextManager
    ) -> tuple[torch.Tensor, list[Any]]:
        size = self.train_config.batch_size
        picks = torch.randint(self.items, (size,), generator=generator)
        t = torch.randint(self.scheduler.config.timesteps, (size,), generator=generator).to(self.device)
        # Drawn only when flips are on, so that runs without them keep their random stream.
        probability = self.train_config.flip_probability
        flips = torch.rand(size, generator=generator) < probability if probability > 0 else None
        condition, x0, network = self.batch(picks.tolist(), flips)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        loss = bridge_loss(
            self.scheduler, network, condition, x0, t, noise, self.spec.neighbours, autocast, self.train_config.loss
        )
        return loss, [f"{self.lr:.6g}"]

    def finish(self, out: Path) -> None:
        plot_curves(out)


class BBDMTrainer(BridgeTrainer):
    """The BBDM's part of the training loop: slices, the denoiser, the bridge loss, validation.

    Args:
        slices: where the training and validation slices come from.
        config: model config (on resume the checkpoint's is used).
        scheduler: the bridge's settings (default: BBDM's; on resume the checkpoint's). A
            ``distance_range`` of None is measured on the training slices.
        init: a trained BBDM's weights file (``model.pt``, or a preset's halved ``bbdm.pt``) a
            new run starts from instead of a random initialisation (fine-tuning, or going on
            when a run's checkpoint is lost); its model config must be ``config``, and its bridge
            settings are taken over, since the weights were learnt on that bridge. Ignored on
            resume (the checkpoint holds the weights).
    """

    kind = "bbdm-train"
    weights_name = "model.pt"
    validation_columns = VALIDATION_COLUMNS
    selection = "psnr_brain"

    def __init__(
        self,
        slices: SliceSets,
        config: BBDMConfig,
        scheduler: BridgeSchedulerConfig | None = None,
        init: str | os.PathLike[str] | None = None,
    ) -> None:
        self.slices = slices
        self.spec = BBDMSpec(config, scheduler if scheduler is not None else BridgeSchedulerConfig())
        self.init = init
        self.init_weights: dict[str, torch.Tensor] | None = None

    def prepare(self, train_config: TrainConfig, run: TrainingRun, device: torch.device) -> TrainingPlan:
        record: dict[str, Any] = {}
        if run.state is not None:
            self.spec = BBDMSpec.from_checkpoint(run.state)
        elif self.init is not None:
            state = load_checkpoint(self.init, kind=BBDM_KIND)
            start = BBDMSpec.from_checkpoint(state)
            if start.denoiser != self.spec.denoiser:
                raise ValueError(
                    f"{self.init}: its model config {start.denoiser.to_dict()} differs from the one asked for "
                    f"{self.spec.denoiser.to_dict()}; ask for the same channels, neighbours and residual blocks"
                )
            self.spec, self.init_weights = start, state["model"]
            record["init"] = {"path": str(self.init), "weights_hash": state_dict_hash(self.init_weights)}
        self.train_config, self.device = train_config, device
        self.train_set, self.val_set = self.slices(self.spec.neighbours, train_config.min_brain_fraction)
        sample = self.train_set[0]
        expected = (self.spec.denoiser.condition_channels, self.spec.image_size, self.spec.image_size)
        if tuple(sample["source"].shape) != expected:
            raise ValueError(
                f"training slices have shape {tuple(sample['source'].shape)}, the model expects {expected} "
                "(image_size, neighbours)"
            )
        if self.spec.scheduler.distance_range is None:
            measured = measure_distance_range(
                self.train_set, self.spec.neighbours, bridge=BridgeScheduler(self.spec.scheduler)
            )
            self.spec = replace(self.spec, scheduler=replace(self.spec.scheduler, distance_range=measured))
        self.scheduler = BridgeScheduler(self.spec.scheduler)
        self.items = len(self.train_set)
        self.val_indices = validation_indices(self.val_set, train_config.val_slices) if self.val_set is not None else []
        return TrainingPlan(
            record={"model": self.spec.denoiser.to_dict(), "scheduler": self.spec.scheduler.to_dict(), **record},
            validate_every=train_config.val_every if self.val_indices else None,
            ema_decay=train_config.ema_decay,
            grad_clip=train_config.grad_clip,
        )

    def build(self, channels_last: bool) -> torch.nn.Module:
        self.model = build_denoiser(self.spec.denoiser)
        if self.init_weights is not None:
            self.model.load_state_dict(self.init_weights)  # halved weights are cast back to float32
        self.model = self.model.to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        return self.model

    def batch(
        self, picks: list[int], flips: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        batch = _batch(self.train_set, picks, self.device)
        return flip_rows(batch["source"], flips), flip_rows(batch["target"], flips), self.model

    def validate(self, module: torch.nn.Module) -> tuple[dict[str, float], str]:
        scores = evaluate(
            module,
            self.spec,
            self.val_set,
            self.val_indices,
            self.train_config.val_steps,
            self.device,
            seed=self.train_config.seed,
        )
        return scores, (
            f"validation PSNR {scores['psnr']:.2f} dB (brain {scores['psnr_brain']:.2f}), SSIM {scores['ssim']:.4f}"
        )

    def state(self) -> dict[str, Any]:
        return self.spec.to_checkpoint()

    def weights(self, module: torch.nn.Module) -> dict[str, Any]:
        return bbdm_checkpoint(module.state_dict(), self.spec)


def fit_source_map(data: str | os.PathLike[str]) -> tuple[float, ...]:
    """The intensity lookup table of a bridge that starts from the mapped input
    (:attr:`BridgeStart.INTENSITY_MAP`): fitted on the brain voxels of every training-split
    slice of a prepared dataset whose input covers the brain (``MIN_INPUT_COVERAGE``), the
    slices the training may draw from.

    Raises:
        ValueError: not a prepared dataset, or no brain voxel in its training split.
    """
    dataset = PreparedDataset(data)
    rows = select_slices(dataset.slices, "train", 0.0, MIN_INPUT_COVERAGE)

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for subject, subject_rows in rows.groupby("subject", sort=False):
            picked = subject_rows["slice"].to_numpy()
            yield dataset.array(subject, "source")[picked], dataset.array(subject, "target")[picked]

    return tuple(float(value) for value in fit_intensity_map(pairs()))


def train_bbdm(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: BBDMConfig,
    train_config: TrainConfig,
    scheduler: BridgeSchedulerConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: ProgressFn | None = None,
    init: str | os.PathLike[str] | None = None,
    bridge_start: BridgeStart | str = BridgeStart.SOURCE,
) -> dict[str, float]:
    """Train (or resume training) a BBDM denoiser on a prepared dataset; see the module docstring.

    Args:
        data: prepared dataset folder (its train and val splits).
        out: the run folder.
        config: model config (ignored on resume: the checkpoint's config is used).
        train_config: training settings (on resume the checkpoint's, except ``iters`` and ``precision``).
        scheduler: the bridge's settings (default: BBDM's; ignored on resume).
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue from ``out/checkpoint.pt``.
        progress: called after each iteration (validation lines as its message).
        init: weights a new run starts from (see :class:`BBDMTrainer`).
        bridge_start: where a new run's bridge starts (:class:`BridgeStart`); for the intensity
            map its table is fitted here (:func:`fit_source_map`). A resumed or initialised run
            keeps the bridge it was trained on.

    Returns:
        The last validation scores (empty without a validation set).

    Raises:
        RunExistsError: ``out`` holds a run and ``resume`` is false.
        ValueError: no checkpoint to resume, data that does not fit the model, or ``init``
            unreadable or of another model config.
    """
    scheduler = scheduler if scheduler is not None else BridgeSchedulerConfig()
    if BridgeStart(bridge_start) is BridgeStart.INTENSITY_MAP and not resume and init is None:
        scheduler = replace(scheduler, source_map=fit_source_map(data))
    trainer = BBDMTrainer(partial(prepared_slices, data), config, scheduler, init)
    return run_training(trainer, out, train_config, device, resume, progress)
