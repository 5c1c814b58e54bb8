"""The BBDM denoiser: MONAI's 2-D DiffusionModelUNet on [x_t, y] with one config object.

A BBDM checkpoint (``model.pt``) holds the denoiser's weights, its config (:class:`BBDMConfig`,
all that is needed to rebuild the network) and, beside it, the settings of the bridge it was
trained on (:class:`lib.diffusion.scheduler.BridgeSchedulerConfig`); :class:`BBDMSpec` is the
two together, what sampling needs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

from lib.diffusion.scheduler import BridgeSchedulerConfig
from lib.io.checkpoint import load_checkpoint
from lib.models.config_dict import config_from_dict

BBDM_KIND = "bbdm"


@dataclass
class BBDMConfig:
    """Architecture of a BBDM denoiser (the bridge's settings are its scheduler's).

    Attributes:
        image_size: in-plane size of the slices it was trained on.
        channels: feature channels per UNet level.
        attention_levels: self-attention per level (expensive at high resolution).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        neighbours: CT slices on each side given as extra conditioning channels (2.5-D).
    """

    image_size: int = 128
    channels: tuple[int, ...] = (32, 64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16
    neighbours: int = 0

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(f"channels {self.channels} and attention_levels {self.attention_levels} differ in length")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every channel count {self.channels}")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {2 ** (len(self.channels) - 1)} for "
                f"{len(self.channels)} levels"
            )

    @property
    def condition_channels(self) -> int:
        """Channels of the conditioning CT input y (the slice and its neighbours)."""
        return 1 + 2 * self.neighbours

    def to_dict(self) -> dict:
        """Plain-type dict (for checkpoints and JSON)."""
        values = asdict(self)
        values["channels"] = list(self.channels)
        values["attention_levels"] = list(self.attention_levels)
        return values

    @classmethod
    def for_channels(cls, image_size: int, channels: tuple[int, ...], **options: object) -> BBDMConfig:
        """A config with attention at the deepest level only (the affordable choice, see
        INSTALL_NOTES) and GroupNorm groups that divide every channel count."""
        channels = tuple(int(c) for c in channels)
        return cls(
            image_size=image_size,
            channels=channels,
            attention_levels=tuple(level == len(channels) - 1 for level in range(len(channels))),
            norm_num_groups=min(16, min(channels)),
            **options,
        )

    @classmethod
    def from_dict(cls, values: dict) -> BBDMConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        return config_from_dict(cls, values, "BBDM config")


@dataclass(frozen=True)
class BBDMSpec:
    """A BBDM's two configs: the denoiser's architecture and the bridge it was trained on.

    Attributes:
        denoiser: the UNet's config.
        scheduler: the bridge scheduler's settings (objective, schedule, distance range).
    """

    denoiser: BBDMConfig
    scheduler: BridgeSchedulerConfig

    @property
    def image_size(self) -> int:
        """In-plane size of the slices the model works on."""
        return self.denoiser.image_size

    @property
    def neighbours(self) -> int:
        """CT slices on each side of y in the conditioning input."""
        return self.denoiser.neighbours

    def to_checkpoint(self) -> dict[str, dict]:
        """The checkpoint entries: ``config`` (the denoiser's) and ``scheduler``."""
        return {"config": self.denoiser.to_dict(), "scheduler": self.scheduler.to_dict()}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> BBDMSpec:
        """Read the two configs from a checkpoint's ``config`` and ``scheduler`` entries.

        Checkpoints written before the scheduler had its own config (the shipped presets among
        them) kept the bridge's settings inside ``config``; they are split off here, so those
        files load unchanged.

        Raises:
            ValueError: unknown keys in either config.
        """
        values = dict(state["config"])
        if "scheduler" in state:
            scheduler = state["scheduler"]
        else:
            names = {item.name for item in fields(BridgeSchedulerConfig)}
            scheduler = {name: values.pop(name) for name in list(values) if name in names}
        return cls(BBDMConfig.from_dict(values), BridgeSchedulerConfig.from_dict(scheduler))


def build_denoiser(config: BBDMConfig) -> DiffusionModelUNet:
    """The denoiser eps_theta([x_t, y], t): 1 + condition channels in, 1 channel out."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1 + config.condition_channels,
        out_channels=1,
        channels=config.channels,
        attention_levels=config.attention_levels,
        num_res_blocks=config.num_res_blocks,
        num_head_channels=config.num_head_channels,
        norm_num_groups=config.norm_num_groups,
    )


def denoise(
    model: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor
) -> torch.Tensor:
    """Run the denoiser on the concatenation [x_t, y] (METHOD.md: the network sees y)."""
    return model(torch.cat([x_t, condition], dim=1), timesteps)


def bbdm_checkpoint(weights: dict[str, torch.Tensor], spec: BBDMSpec) -> dict[str, Any]:
    """The content of a BBDM model file (``model.pt``): what :func:`load_bbdm` reads."""
    return {"kind": BBDM_KIND, **spec.to_checkpoint(), "model": weights}


def load_bbdm(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, BBDMSpec]:
    """Load a trained denoiser (EMA weights) and its spec from ``model.pt``.

    Raises:
        ValueError: not a BBDM model file.
    """
    state = load_checkpoint(path, kind=BBDM_KIND)
    spec = BBDMSpec.from_checkpoint(state)
    model = build_denoiser(spec.denoiser)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), spec
