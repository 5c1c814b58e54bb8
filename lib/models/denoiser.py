"""The BBDM denoiser: MONAI's 2-D DiffusionModelUNet on [x_t, y] with one config object.

The config is saved inside every checkpoint and is all that is needed to rebuild the model.
"""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass

import torch
from monai.networks.nets import DiffusionModelUNet

from lib.io.checkpoint import load_checkpoint
from lib.models.config_dict import config_from_dict


class Objective(str, enum.Enum):
    """What the denoiser is trained to output (METHOD.md section 1)."""

    DIRECTIONAL = "directional"  # m_t * (y - x0) / ||y - x0|| + sqrt(delta_t) * eps
    PLAIN = "plain"  # m_t * (y - x0) + sqrt(delta_t) * eps (BBDM)


@dataclass
class BBDMConfig:
    """Architecture and bridge settings of a BBDM model.

    Attributes:
        image_size: in-plane size of the slices it was trained on.
        channels: feature channels per UNet level.
        attention_levels: self-attention per level (expensive at high resolution).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        neighbours: CT slices on each side given as extra conditioning channels (2.5-D).
        objective: training target, see :class:`Objective`.
        timesteps: T, the number of bridge steps in training.
        max_var: s, the bridge variance scale (delta_t = 2 s (m_t - m_t^2)).
        m_min: m at t = 0 (BBDM's linear grid starts at 0.001).
        m_max: m at t = T - 1 (0.999).
        direction_eps: e in the directional target's denominator.
        distance_range: 1st and 99th percentiles of ||y - x0|| over training slices; bounds
            the directional x0 recovery (measured by training when not given).
    """

    image_size: int = 128
    channels: tuple[int, ...] = (32, 64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16
    neighbours: int = 0
    objective: Objective = Objective.DIRECTIONAL
    timesteps: int = 1000
    max_var: float = 1.0
    m_min: float = 0.001
    m_max: float = 0.999
    direction_eps: float = 1e-8
    distance_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.objective = Objective(self.objective)
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if self.distance_range is not None:
            self.distance_range = (float(self.distance_range[0]), float(self.distance_range[1]))
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(f"channels {self.channels} and attention_levels {self.attention_levels} differ in length")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every channel count {self.channels}")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {2 ** (len(self.channels) - 1)} for {len(self.channels)} levels"
            )

    @property
    def condition_channels(self) -> int:
        """Channels of the conditioning CT input y (the slice and its neighbours)."""
        return 1 + 2 * self.neighbours

    def to_dict(self) -> dict:
        """Plain-type dict (for checkpoints and JSON)."""
        values = asdict(self)
        values["objective"] = self.objective.value
        values["channels"] = list(self.channels)
        values["attention_levels"] = list(self.attention_levels)
        values["distance_range"] = list(self.distance_range) if self.distance_range is not None else None
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


def load_bbdm(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, BBDMConfig]:
    """Load a trained denoiser (EMA weights) and its config from ``model.pt``.

    Raises:
        ValueError: not a BBDM model file.
    """
    state = load_checkpoint(path, kind="bbdm")
    config = BBDMConfig.from_dict(state["config"])
    model = build_denoiser(config)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config
