"""Training the BBDM denoiser: AdamW, EMA, mixed precision on GPU, checkpoints and resume.

A run folder holds::

    config.json        the model config and the training config
    checkpoint.pt      everything needed to resume (model, EMA, optimiser, RNG, iteration)
    model.pt           the EMA weights and the model config: what inference loads
    loss.csv           iteration, loss, learning rate, seconds
    validation.csv     iteration, PSNR / SSIM (whole slice) and PSNR inside the brain mask
    curves.png         the loss and validation curves

Every random draw (batch indices, time steps, noise) comes from one seeded generator whose
state is checkpointed, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

from lib.diffusion.bridge import BridgeSchedule, q_sample, training_target
from lib.diffusion.sampler import translate_slices
from lib.metrics import psnr, ssim_2d
from lib.models.denoiser import BBDMConfig, build_denoiser, denoise
from lib.models.device import autocast_context, resolve_device
from lib.train.run_folder import TrainingRun

LOSS_COLUMNS = ["iteration", "loss", "lr", "seconds"]
VALIDATION_COLUMNS = ["iteration", "psnr", "ssim", "psnr_brain"]


@dataclass
class TrainConfig:
    """How a BBDM model is trained (saved beside the model config)."""

    iters: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 250
    val_slices: int = 16
    val_steps: int = 10
    checkpoint_every: int = 250
    device: str = "auto"


def bridge_training_pair(
    schedule: BridgeSchedule,
    config: BBDMConfig,
    condition: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network input x_t and its training target for one batch (METHOD.md section 1).

    Args:
        schedule: the bridge schedule.
        config: the model config (neighbours, objective).
        condition: (B, C, H, W) CT slices; the centre channel is the bridge's y.
        x0: (B, 1, H, W) MRI slices.
        t: (B,) step indices.
        noise: (B, 1, H, W) standard normal noise.

    Returns:
        ``x_t`` from :func:`q_sample` and the target from :func:`training_target`.
    """
    y = condition[:, config.neighbours : config.neighbours + 1]
    x_t = q_sample(schedule, x0, y, t, noise)
    return x_t, training_target(schedule, x0, y, t, noise, config.objective, config.direction_eps)


def _batch(dataset: Dataset, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in ("source", "target", "mask")}


def validation_indices(dataset: Dataset, count: int) -> list[int]:
    """``count`` evenly spaced items: a fixed validation set across the run."""
    return np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int).tolist()


def measure_distance_range(dataset: Dataset, neighbours: int = 0, count: int = 512) -> tuple[float, float]:
    """1st and 99th percentiles of ||y - x0|| (per slice) over up to ``count`` training slices."""
    distances = []
    for index in validation_indices(dataset, count):
        item = dataset[index]
        distances.append(float((item["source"][neighbours] - item["target"][0]).norm()))
    low, high = np.percentile(distances, [1, 99])
    return float(low), float(high)


def slices_as_unit_volume(slices: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) slices in [-1, 1] as an (H, W, N) volume in [0, 1], the metrics' form."""
    return ((slices[:, 0].permute(1, 2, 0).float().cpu().numpy() + 1) / 2).clip(0, 1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    config: BBDMConfig,
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
    prediction = translate_slices(model, config, batch["source"], steps=steps, generator=generator, control=control)
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


def optimiser_state(
    model: torch.nn.Module, train_config: TrainConfig, resumed: dict | None, weights_key: str
) -> tuple[AveragedModel, torch.optim.Optimizer, torch.Generator]:
    """EMA copy, AdamW optimiser and sampling generator of ``model``, restored from a resume
    checkpoint (``resumed``, whose ``weights_key`` holds the model's weights) when given."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train_config.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    generator = torch.Generator().manual_seed(train_config.seed)
    if resumed is not None:
        model.load_state_dict(resumed[weights_key])
        ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        generator.set_state(resumed["generator"])
    return ema, optimizer, generator


def train_bbdm(
    train_set: Dataset,
    val_set: Dataset | None,
    out: str | os.PathLike[str],
    config: BBDMConfig,
    train_config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Train (or resume training) a BBDM denoiser; see the module docstring for the outputs.

    Args:
        train_set: items with ``source`` (C, S, S), ``target`` and ``mask`` (1, S, S).
        val_set: held-out items for periodic validation (None: no validation).
        out: the run folder.
        config: model config (ignored on resume: the checkpoint's config is used).
        train_config: training settings.
        resume: continue from ``out/checkpoint.pt``.
        progress: show a progress bar.

    Returns:
        The last validation scores (empty without a validation set).

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is false.
        ValueError: no checkpoint to resume, or data that does not fit the model.
    """
    out = Path(out)
    run = TrainingRun(out, "bbdm-train", resume, {"loss": LOSS_COLUMNS, "validation": VALIDATION_COLUMNS})
    if run.state is not None:
        config = BBDMConfig.from_dict(run.state["config"])
        train_config = TrainConfig(
            **{**run.state["train_config"], "iters": train_config.iters, "device": train_config.device}
        )
    sample = train_set[0]
    expected = (config.condition_channels, config.image_size, config.image_size)
    if tuple(sample["source"].shape) != expected:
        raise ValueError(
            f"training slices have shape {tuple(sample['source'].shape)}, the model expects {expected} (image_size, neighbours)"
        )

    if config.distance_range is None:
        config = replace(config, distance_range=measure_distance_range(train_set, config.neighbours))
    device = resolve_device(train_config.device)
    torch.manual_seed(train_config.seed)
    model = build_denoiser(config).to(device)
    ema, optimizer, generator = optimiser_state(model, train_config, run.state, "model")
    run.begin({"model": config.to_dict(), "training": asdict(train_config)})

    schedule = BridgeSchedule.from_config(config)
    val_indices = validation_indices(val_set, train_config.val_slices) if val_set is not None else []
    autocast = autocast_context(device)
    scores: dict[str, float] = {}

    def save(iteration: int) -> None:
        run.save(
            iteration,
            {
                "config": config.to_dict(),
                "train_config": asdict(train_config),
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
            },
            "model.pt",
            {"kind": "bbdm", "config": config.to_dict(), "model": ema.module.state_dict()},
        )

    started = time.perf_counter()
    bar = run.iterations(train_config.iters, "train-bbdm", progress)
    for iteration in bar:
        model.train()
        indices = torch.randint(len(train_set), (train_config.batch_size,), generator=generator)
        t = torch.randint(config.timesteps, (train_config.batch_size,), generator=generator)
        batch = _batch(train_set, indices.tolist(), device)
        condition, x0 = batch["source"], batch["target"]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        x_t, target = bridge_training_pair(schedule, config, condition, x0, t.to(device), noise)
        with autocast:
            output = denoise(model, x_t, t.to(device), condition)
        loss = torch.nn.functional.mse_loss(output.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        ema.update_parameters(model)
        run.log("loss", [iteration, f"{loss.item():.6g}", train_config.lr, f"{time.perf_counter() - started:.1f}"])
        bar.set_postfix(loss=f"{loss.item():.4g}")

        if val_indices and (iteration % train_config.val_every == 0 or iteration == train_config.iters):
            scores = evaluate(
                ema.module, config, val_set, val_indices, train_config.val_steps, device, seed=train_config.seed
            )
            run.log(
                "validation",
                [iteration, f"{scores['psnr']:.4f}", f"{scores['ssim']:.4f}", f"{scores['psnr_brain']:.4f}"],
            )
            bar.write(
                f"iteration {iteration}: validation PSNR {scores['psnr']:.2f} dB (brain {scores['psnr_brain']:.2f}), SSIM {scores['ssim']:.4f}"
            )
        if iteration % train_config.checkpoint_every == 0 or iteration == train_config.iters:
            save(iteration)
    if run.start >= train_config.iters:
        save(run.start)
    plot_curves(out)
    return scores
