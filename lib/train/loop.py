"""The one training loop of the BBDM, the ControlNet and the retrieval encoder.

:func:`run_training` owns what every trainer shares: the run folder and its resume rules
(:class:`lib.train.run_folder.TrainingRun`), the saved training config taken over on resume,
the device, the seed, the AdamW optimiser and the optional EMA copy, mixed precision, the
step / log / validate / checkpoint cycle with its progress reports, and the final save. A
:class:`Trainer` supplies what is particular to one model: its data and frozen parts, the
module that trains, the loss of one batch, the validation, and what its files hold.

Mixed precision: the network's forward pass runs under :func:`lib.models.device.autocast_context`
(bfloat16 when the training config's ``precision`` asks for it and the device supports it); the
parameters, the loss, the EMA copy and the optimiser state stay float32. On the CPU the UNets
train in ``channels_last``, the memory layout oneDNN's convolutions are fastest in (a 128 x 128
BBDM step at batch 8, ``make bench-train``: float32 1.24x faster than contiguous, bfloat16 2.3x).

Every random draw of a trainer comes from one seeded generator (or, for the encoder, its
sampler) whose state is checkpointed, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch.optim.swa_utils import AveragedModel

from lib.io.atomic import atomic_path
from lib.io.checkpoint import save_checkpoint
from lib.models.device import Precision, autocast_context, resolve_device, resolve_precision
from lib.options_schema import check_bounds
from lib.progress import ProgressFn, report
from lib.train.run_folder import TrainingRun

# Keys of saved training configs that are no longer training settings: runs saved before the
# shared loop kept the device in the training config; it is now an argument of every train_*.
_RETIRED_KEYS = ("device",)


@dataclass
class LoopConfig:
    """The settings :func:`run_training` reads; every trainer's config extends it.

    On resume the saved run's config is used, except the fields in :attr:`RESUME_OVERRIDES`
    (how far and how to run, not what is learnt), which are taken from the new config.
    """

    RESUME_OVERRIDES: ClassVar[tuple[str, ...]] = ("iters", "precision", "decay_iters")

    iters: int = field(default=2000, metadata={"help": "train up to this iteration (also on resume)", "min": 1})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate", "min": 0.0})
    decay_iters: int = field(
        default=0,
        metadata={
            "help": "the run's last N iterations lower the learning rate linearly towards 0 "
            "(warmup-stable-decay: resume a constant-rate run with it); 0: constant",
            "min": 0,
        },
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "min": 0.0})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and of every random draw"})
    checkpoint_every: int = field(default=250, metadata={"help": "iterations between checkpoints", "min": 1})
    precision: Precision = field(
        default=Precision.AUTO,
        metadata={"help": "forward-pass arithmetic: auto (bf16 where native: CUDA, AMX/AVX512-BF16), fp32, or bf16"},
    )

    def __post_init__(self) -> None:
        self.precision = Precision.parse(self.precision)
        check_bounds(self)

    def learning_rate(self, iteration: int) -> float:
        """The rate of the update at ``iteration`` (1-based): :attr:`lr`, and over the last
        :attr:`decay_iters` iterations a linear decay to ``lr / decay_iters`` at :attr:`iters`.

        A constant rate plateaus at the level its gradient noise allows; decaying it at the end
        (the "decay" of a warmup-stable-decay schedule, Hu et al. 2024, MiniCPM) lowers the loss
        further for a fraction of the run, and it can be added to a finished constant-rate run
        by resuming it with a larger ``iters``. A function of the iteration only, so a resumed
        run follows the same rates as an uninterrupted one.
        """
        remaining = self.iters - iteration + 1
        if self.decay_iters <= 0 or remaining > self.decay_iters:
            return self.lr
        return self.lr * max(remaining, 1) / self.decay_iters

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (for checkpoints and JSON): enums as their values."""
        return {key: value.value if isinstance(value, enum.Enum) else value for key, value in asdict(self).items()}

    def resumed(self, saved: dict[str, Any]) -> Self:
        """The saved run's config (``to_dict`` output), with this config's :attr:`RESUME_OVERRIDES`."""
        values = {key: value for key, value in saved.items() if key not in _RETIRED_KEYS}
        return type(self)(**{**values, **{name: getattr(self, name) for name in self.RESUME_OVERRIDES}})


@dataclass
class TrainingPlan:
    """What a trainer's :meth:`Trainer.prepare` tells the loop.

    Attributes:
        record: entries of the run's ``config.json`` besides ``training`` (model config, inputs).
        validate_every: iterations between validations (and at the last one); None: no validation.
        ema_decay: decay of the EMA copy whose weights are shipped; None: ship the trained weights.
        grad_clip: maximum gradient norm; None: no clipping.
    """

    record: dict[str, Any]
    validate_every: int | None
    ema_decay: float | None = None
    grad_clip: float | None = None


class Trainer(abc.ABC):
    """The model-specific half of a training run; :func:`run_training` drives it.

    The loop calls, in order: :meth:`prepare` (data, frozen parts; no random initialisation),
    then seeds torch and calls :meth:`build`, restores a resumed run (:meth:`restore`), writes
    ``config.json``, calls :meth:`begin`, and then for each iteration :meth:`loss` (before the
    optimiser step) and, when due, :meth:`validate`; :meth:`state` and :meth:`weights` at each
    checkpoint; :meth:`finish` at the end.
    """

    kind: ClassVar[str]  # the resume checkpoint's kind, e.g. "bbdm-train"
    lr: float = 0.0  # the learning rate of the coming update (the loop sets it before each loss())
    weights_name: ClassVar[str]  # the inference weights file in the run folder, e.g. "model.pt"
    weights_key: ClassVar[str] = "model"  # where the resume checkpoint keeps the trained module's weights
    loss_columns: ClassVar[list[str]]  # loss.csv: iteration, loss, what loss() adds, seconds
    validation_log: ClassVar[str] = "validation"
    validation_columns: ClassVar[list[str]]  # iteration, then the validate() scores (written with 4 decimals)
    # The validate() score (higher is better) that picks the best weights, kept beside the last
    # ones as best_<weights_name> with best.json; None: keep only the last weights.
    selection: ClassVar[str | None] = None

    @abc.abstractmethod
    def prepare(self, train_config: Any, run: TrainingRun, device: torch.device) -> TrainingPlan:
        """Load the data and any frozen model; on resume (``run.state``) take the model config from it.

        Raises:
            ValueError: inputs that do not fit together.
        """

    @abc.abstractmethod
    def build(self, channels_last: bool) -> torch.nn.Module:
        """The module the optimiser trains, freshly initialised (torch is seeded just before).

        ``channels_last``: put the convolutional networks in that memory layout (on a CPU).
        """

    @abc.abstractmethod
    def loss(
        self, generator: torch.Generator, autocast: contextlib.AbstractContextManager
    ) -> tuple[torch.Tensor, list[Any]]:
        """The float32 loss of one batch drawn with ``generator``, the forward pass under ``autocast``.

        Returns:
            The loss, and the values loss.csv records between the loss and the seconds.
        """

    @abc.abstractmethod
    def validate(self, module: torch.nn.Module) -> tuple[dict[str, float], str]:
        """Scores of ``module`` (the EMA copy, if any) by :attr:`validation_columns` name, and a line for
        users (the loop puts the iteration before it)."""

    def state(self) -> dict[str, Any]:
        """What the resume checkpoint holds besides the weights, optimiser, EMA and generator."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:  # noqa: B027 (an optional hook)
        """Take up a resumed run's own state (e.g. a sampler's); the loop restores the rest."""

    @abc.abstractmethod
    def weights(self, module: torch.nn.Module) -> dict[str, Any]:
        """The inference weights file's content for ``module`` (the EMA copy, if any)."""

    def begin(self, out: Path) -> None:  # noqa: B027 (an optional hook)
        """Write the trainer's own files once the run folder exists."""

    def finish(self, out: Path) -> None:  # noqa: B027 (an optional hook)
        """After the last iteration (e.g. plot the curves)."""


def warmup_ema(decay: float):
    """A ``multi_avg_fn`` for :class:`AveragedModel`: an EMA whose decay warms up to ``decay``.

    The decay after ``n`` updates is ``min(decay, (1 + n) / (10 + n))`` (the warm-up diffusers'
    ``EMAModel`` uses). A fixed 0.999 from the first step leaves the copy mostly made of the
    first few hundred (still poor) weights for the first thousand iterations, so short runs and
    early validations scored the initialisation rather than the training; with the warm-up the
    copy follows the model early and averages over ~1000 steps only once the run is long.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        step_decay = min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - step_decay)
        else:  # integer buffers (e.g. counters): lerp has no integer kernel
            for mine, theirs in zip(averaged, current, strict=True):
                mine.copy_(mine * step_decay + theirs * (1.0 - step_decay))

    return update


def optimisation_step(
    loss: torch.Tensor,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    ema: AveragedModel | None,
) -> None:
    """One update from a batch's loss: backward, gradient clipping, the optimiser, the EMA (all float32)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()
    if ema is not None:
        ema.update_parameters(module)


class BestWeights:
    """The best-validation weights of a run: ``best_<weights_name>`` and ``best.json`` in the run folder.

    The validation curve of a diffusion model is noisy and not monotone (the flair2t1 BBDM peaked
    at iteration 600 of 1000 by 0.2 dB brain PSNR), so the weights worth shipping are the best
    ones, not the last. The record (iteration, score) travels in the resume checkpoint, so a
    resumed run only replaces the file with weights that beat every earlier validation.
    """

    def __init__(self, out: Path, trainer: Trainer, state: dict[str, Any] | None) -> None:
        self.column = trainer.selection
        self.trainer = trainer
        self.path = out / f"best_{trainer.weights_name}"
        self.record: dict[str, Any] | None = (state or {}).get("best")

    def consider(self, iteration: int, scores: dict[str, float], module: torch.nn.Module) -> bool:
        """Keep ``module``'s weights if ``scores`` beat the best so far; True when they did."""
        if self.column is None:
            return False
        score = float(scores[self.column])
        if self.record is not None and not score > self.record["score"]:
            return False
        self.record = {"iteration": iteration, "column": self.column, "score": score}
        save_checkpoint(self.path, {**self.trainer.weights(module), "iteration": iteration})
        with atomic_path(self.path.parent / "best.json") as temporary:
            temporary.write_text(json.dumps(self.record, indent=1))
        return True


def run_training(
    trainer: Trainer,
    out: str | os.PathLike[str],
    train_config: LoopConfig,
    device: str = "auto",
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Train (or resume training) with ``trainer`` into the run folder ``out``.

    Args:
        trainer: the model-specific parts.
        out: the run folder.
        train_config: training settings (on resume the saved run's, except its
            :attr:`LoopConfig.RESUME_OVERRIDES`).
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue from ``out/checkpoint.pt``.
        progress: called after each iteration with (iteration, iters, message); the message is a
            validation line when one was run, else "".

    Returns:
        The last validation scores (empty without validation).

    Raises:
        RunExistsError: ``out`` holds a run and ``resume`` is false.
        ValueError: no checkpoint to resume, or inputs that do not fit together.
    """
    run = TrainingRun(
        out, trainer.kind, resume, {"loss": trainer.loss_columns, trainer.validation_log: trainer.validation_columns}
    )
    if run.state is not None:
        train_config = train_config.resumed(run.state["train_config"])
    where = resolve_device(device)
    precision = resolve_precision(train_config.precision, where)
    plan = trainer.prepare(train_config, run, where)

    torch.manual_seed(train_config.seed)
    module = trainer.build(channels_last=where.type == "cpu")
    ema = (
        AveragedModel(module, multi_avg_fn=warmup_ema(plan.ema_decay), use_buffers=True)
        if plan.ema_decay is not None
        else None
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    generator = torch.Generator().manual_seed(train_config.seed)
    if run.state is not None:
        module.load_state_dict(run.state[trainer.weights_key])
        if ema is not None:
            ema.load_state_dict(run.state["ema"])
        optimizer.load_state_dict(run.state["optimizer"])
        if "generator" in run.state:  # the encoder's runs saved before the shared loop had none (nor used it)
            generator.set_state(run.state["generator"])
        trainer.restore(run.state)
    run.begin({**plan.record, "training": train_config.to_dict()})
    trainer.begin(run.out)
    shipped = ema.module if ema is not None else module
    best = BestWeights(run.out, trainer, run.state)

    def save(iteration: int) -> None:
        state = {
            **trainer.state(),
            "train_config": train_config.to_dict(),
            trainer.weights_key: module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        if best.record is not None:
            state["best"] = best.record
        run.save(iteration, state, trainer.weights_name, trainer.weights(shipped))

    autocast = autocast_context(where, precision)
    scores: dict[str, float] = {}
    iters = train_config.iters
    report(progress, min(run.start, iters), iters)
    started = time.perf_counter()
    for iteration in range(run.start + 1, iters + 1):
        module.train()
        trainer.lr = train_config.learning_rate(iteration)
        for group in optimizer.param_groups:
            group["lr"] = trainer.lr
        loss, values = trainer.loss(generator, autocast)
        optimisation_step(loss, module, optimizer, plan.grad_clip, ema)
        run.log("loss", [iteration, f"{loss.item():.6g}", *values, f"{time.perf_counter() - started:.1f}"])

        message = ""
        if plan.validate_every is not None and (iteration % plan.validate_every == 0 or iteration == iters):
            scores, line = trainer.validate(shipped)
            message = f"iteration {iteration}: {line}"
            run.log(
                trainer.validation_log,
                [iteration, *(f"{scores[column]:.4f}" for column in trainer.validation_columns[1:])],
            )
            if best.consider(iteration, scores, shipped):
                message += f" (best so far: {best.path.name})"
        if iteration % train_config.checkpoint_every == 0 or iteration == iters:
            save(iteration)
        report(progress, iteration, iters, message)
    if run.start >= iters:
        save(run.start)
    trainer.finish(run.out)
    return scores
