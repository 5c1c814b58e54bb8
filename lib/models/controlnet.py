"""ControlNet guidance on the frozen BBDM denoiser (METHOD.md section 3).

A trainable copy of the denoiser's input convolution, time embedding, encoder and middle
block (MONAI's ``ControlNet``) sees the same input ``[x_t, y]`` and time step, plus the
control image r (a retrieved reference CT slice) added after its input convolution through a
zero-initialised embedding. Its features reach the frozen denoiser's skip connections and
middle block through zero-initialised 1x1 convolutions::

    h = F(x) + Z2(F_c(x + Z1(r)))

so at initialisation the controlled output equals the frozen BBDM's output exactly.

A ControlNet checkpoint (``controlnet.pt``) holds its weights, the BBDM config and a hash of
the BBDM weights it was trained on; loading it on any other BBDM is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from torch import nn

from lib.io.checkpoint import load_checkpoint, save_checkpoint
from lib.models.denoiser import BBDMConfig, BBDMSpec, load_bbdm
from lib.models.weights_hash import state_dict_hash

CONTROLNET_KIND = "controlnet"
# The ControlNet's own modules, which have no counterpart in the denoiser: the control-image
# embedding and the zero-initialised projections into the denoiser.
CONTROLNET_ONLY_PREFIXES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
_RESERVED_KEYS = ("kind", "config", "bbdm_hash", "model")


def build_controlnet(config: BBDMConfig) -> ControlNet:
    """A ControlNet with exactly the denoiser's encoder architecture (random init).

    The control image is one slice (1 channel). Its embedding has a single level so that it
    stays at full resolution: MONAI's embedding downsamples once per extra entry of
    ``conditioning_embedding_num_channels``, and its output is added to ``conv_in(x)``.
    """
    return ControlNet(
        spatial_dims=2,
        in_channels=1 + config.condition_channels,
        num_res_blocks=config.num_res_blocks,
        channels=config.channels,
        attention_levels=config.attention_levels,
        norm_num_groups=config.norm_num_groups,
        num_head_channels=config.num_head_channels,
        conditioning_embedding_in_channels=1,
        conditioning_embedding_num_channels=(config.channels[0],),
    )


def controlnet_from_denoiser(denoiser: DiffusionModelUNet, config: BBDMConfig) -> ControlNet:
    """A ControlNet initialised from a trained denoiser (ControlNet's standard initialisation).

    Every ControlNet weight with a counterpart in the denoiser (``conv_in``, ``time_embed``,
    ``down_blocks``, ``middle_block``) is copied; the control embedding and the projections
    keep their zero initialisation.

    Raises:
        ValueError: a weight that should have been copied was not (the denoiser does not
            have the architecture ``config`` describes).
    """
    controlnet = build_controlnet(config)
    # The decoder (up_blocks, out) has no counterpart: the ControlNet ends at the middle block.
    source = {
        name: tensor for name, tensor in denoiser.state_dict().items() if not name.startswith(("up_blocks.", "out."))
    }
    wanted = controlnet.state_dict()
    reshaped = [
        f"{name}: {tuple(tensor.shape)} vs {tuple(wanted[name].shape)}"
        for name, tensor in source.items()
        if name in wanted and tensor.shape != wanted[name].shape
    ]
    missing = [name for name in wanted if name not in source and not name.startswith(CONTROLNET_ONLY_PREFIXES)]
    unexpected = [name for name in source if name not in wanted]
    if reshaped or missing or unexpected:
        raise ValueError(
            f"the denoiser does not have the architecture of the BBDM config {config.to_dict()}: "
            f"shape mismatches {reshaped[:3]}, ControlNet weights without a counterpart {missing[:3]}, "
            f"denoiser weights without one {unexpected[:3]}"
        )
    controlnet.load_state_dict(source, strict=False)
    return controlnet


class ControlledDenoiser(nn.Module):
    """The frozen BBDM denoiser guided by a trainable ControlNet.

    The denoiser's parameters never require gradients and it stays in eval mode even when
    ``train()`` is called on the wrapper (only the ControlNet trains).

    Args:
        denoiser: the trained BBDM denoiser (frozen in place).
        controlnet: the ControlNet (see :func:`controlnet_from_denoiser`).
    """

    def __init__(self, denoiser: DiffusionModelUNet, controlnet: ControlNet) -> None:
        super().__init__()
        self.denoiser = denoiser.requires_grad_(False).eval()
        self.controlnet = controlnet

    def train(self, mode: bool = True) -> ControlledDenoiser:
        """Set the ControlNet's mode; the frozen denoiser stays in eval mode."""
        super().train(mode)
        self.denoiser.eval()
        return self

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, control: torch.Tensor, conditioning_scale: float = 1.0
    ) -> torch.Tensor:
        """The guided network output.

        Args:
            x: the denoiser's usual input ``torch.cat([x_t, condition], 1)``.
            timesteps: (B,) step indices.
            control: (B, 1, H, W) control images r.
            conditioning_scale: factor on the ControlNet's residuals (0 gives the BBDM alone).
        """
        down, mid = self.controlnet(x, timesteps, controlnet_cond=control, conditioning_scale=conditioning_scale)
        return self.denoiser(x, timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The ControlNet's parameters (the only ones to optimise)."""
        return self.controlnet.parameters()


def controlnet_checkpoint(
    controlnet: ControlNet, config: BBDMConfig, bbdm_hash: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The content of a ControlNet weights file (what :func:`save_controlnet` writes).

    Raises:
        ValueError: ``extra`` uses a reserved key.
    """
    extra = dict(extra or {})
    clashes = sorted(set(extra) & set(_RESERVED_KEYS))
    if clashes:
        raise ValueError(f"extra keys {clashes} are reserved for the ControlNet checkpoint")
    return {
        **extra,
        "kind": CONTROLNET_KIND,
        "config": config.to_dict(),
        "bbdm_hash": bbdm_hash,
        "model": controlnet.state_dict(),
    }


def save_controlnet(
    path: str | os.PathLike[str],
    controlnet: ControlNet,
    config: BBDMConfig,
    bbdm_hash: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a ControlNet weights file atomically.

    Args:
        path: the file (``controlnet.pt``).
        controlnet: the ControlNet.
        config: the config of the BBDM it guides.
        bbdm_hash: :func:`state_dict_hash` of that BBDM's weights.
        extra: further plain values to store (training settings, encoder hash, ...).
    """
    return save_checkpoint(path, controlnet_checkpoint(controlnet, config, bbdm_hash, extra))


def load_controlled_denoiser(
    bbdm_path: str | os.PathLike[str], controlnet_path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[ControlledDenoiser, BBDMSpec]:
    """Load a BBDM ``model.pt`` and a ``controlnet.pt`` trained on it, in eval mode, with the BBDM's spec.

    Raises:
        ValueError: a file is missing or of the wrong kind, or the ControlNet was trained on
            another BBDM.
    """
    denoiser, spec = load_bbdm(bbdm_path)
    state = load_checkpoint(controlnet_path, kind=CONTROLNET_KIND)
    expected = state_dict_hash(denoiser.state_dict())
    if state["bbdm_hash"] != expected:
        raise ValueError(
            f"{controlnet_path} was trained on another BBDM (weights hash {state['bbdm_hash'][:16]}...) than "
            f"{bbdm_path} "
            f"({expected[:16]}...); use the BBDM it was trained with or retrain the ControlNet"
        )
    controlnet = build_controlnet(spec.denoiser)
    controlnet.load_state_dict(state["model"])
    return ControlledDenoiser(denoiser, controlnet).to(device).eval(), spec
