"""The retrieval encoder phi: a timm ViT on one CT slice, a projection head, unit embeddings.

METHOD.md section 2. The encoder gives two things per slice: the L2-normalised embedding that
the contrastive term and the knowledge base use, and intermediate token features f for the
perceptual term. Nothing is ever downloaded: the ViT starts from random init or from a local
weights file. The config is saved inside every checkpoint and is all that is needed to
rebuild the model; :func:`encoder_hash` versions a trained encoder so that a knowledge base
built with one encoder refuses to be queried with another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lib.io.checkpoint import load_checkpoint
from lib.models.config_dict import config_from_dict
from lib.models.weights_hash import state_dict_hash

CHECKPOINT_KIND = "retrieval_encoder"


@dataclass
class RetrievalConfig:
    """Architecture of a retrieval encoder.

    Attributes:
        image_size: in-plane size of the square CT slices it takes.
        patch_size: ViT patch size (must divide ``image_size``).
        width: token width of the ViT (timm's ``embed_dim``).
        depth: number of transformer blocks.
        heads: attention heads per block (must divide ``width``).
        embedding_dim: D, the size of the retrieval embedding phi.
        perceptual_blocks: indices (0-based) of the transformer blocks whose patch tokens are
            the features f of the perceptual term.
    """

    image_size: int = 128
    patch_size: int = 16
    width: int = 192
    depth: int = 6
    heads: int = 3
    embedding_dim: int = 128
    perceptual_blocks: tuple[int, ...] = (1, 3)

    def __post_init__(self) -> None:
        self.perceptual_blocks = tuple(int(b) for b in self.perceptual_blocks)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} must divide width {self.width}")
        if not self.perceptual_blocks:
            raise ValueError("perceptual_blocks must name at least one block")
        if any(not 0 <= b < self.depth for b in self.perceptual_blocks) or len(set(self.perceptual_blocks)) != len(
            self.perceptual_blocks
        ):
            raise ValueError(
                f"perceptual_blocks {self.perceptual_blocks} must be distinct block indices in 0..{self.depth - 1}"
            )

    @property
    def tokens(self) -> int:
        """Patch tokens per slice."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def feature_dim(self) -> int:
        """F, the length of one perceptual feature vector (all patch tokens of one block)."""
        return self.tokens * self.width

    def to_dict(self) -> dict:
        """Plain-type dict (for checkpoints and JSON)."""
        values = asdict(self)
        values["perceptual_blocks"] = list(self.perceptual_blocks)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> RetrievalConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        return config_from_dict(cls, values, "retrieval config")


class RetrievalEncoder(nn.Module):
    """phi: single-channel CT slice -> (unit embedding, perceptual features).

    Args:
        config: the architecture.
    """

    def __init__(self, config: RetrievalConfig) -> None:
        super().__init__()
        self.config = config
        # num_classes=0 makes timm's head the identity, so forward_head gives the pooled
        # (class-token, final-norm) features that the projection head maps to phi.
        self.backbone = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=1,
            num_classes=0,
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.heads,
        )
        self.projection = nn.Sequential(
            nn.Linear(config.width, config.width),
            nn.GELU(),
            nn.Linear(config.width, config.embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embed a batch of slices.

        Args:
            x: (B, 1, S, S) CT slices in [-1, 1], S = ``config.image_size``.

        Returns:
            ``embedding`` (B, D), unit L2 norm per row, and ``features``: one (B, F) tensor
            per entry of ``config.perceptual_blocks`` (in that order), F = tokens * width.
            Feature f of block i is the block's output patch tokens (class token excluded,
            the embedding already summarises the slice), each token layer-normed without
            affine parameters, flattened and L2-normalised per sample. The per-token
            layer norm stops the few large-magnitude channels of the ViT residual stream
            from dominating the distance (the blocks themselves read the stream through a
            norm); the unit norm bounds ||f(a) - f(b)||^2 = 2 - 2 cos to [0, 4], so that
            d = exp(-||.||^2 / beta) with beta = 1 stays in [exp(-4), 1] instead of
            underflowing to 0 as raw features (norms in the hundreds) would make it.

        Raises:
            ValueError: if ``x`` is not (B, 1, S, S) with the configured S.
        """
        size = self.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, size, size):
            raise ValueError(f"expected slices of shape (B, 1, {size}, {size}), got {tuple(x.shape)}")
        final, intermediates = self.backbone.forward_intermediates(
            x, indices=list(self.config.perceptual_blocks), output_fmt="NLC"
        )
        embedding = F.normalize(self.projection(self.backbone.forward_head(final, pre_logits=True)), dim=1)
        features = [F.normalize(F.layer_norm(tokens, tokens.shape[-1:]).flatten(1), dim=1) for tokens in intermediates]
        return embedding, features


def _state_dict_from_file(path: str | os.PathLike[str], config: RetrievalConfig) -> Mapping[str, torch.Tensor]:
    """The encoder state dict in a weights file: an encoder checkpoint or a bare state dict."""
    state = load_checkpoint(path)
    if "model" not in state:
        return state
    if state.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path}: a {state.get('kind')!r} checkpoint, expected {CHECKPOINT_KIND!r}")
    if "config" in state and RetrievalConfig.from_dict(state["config"]) != config:
        raise ValueError(
            f"{path}: weights of a retrieval encoder with config {state['config']}, expected {config.to_dict()}"
        )
    return state["model"]


def build_retrieval_encoder(
    config: RetrievalConfig, weights_path: str | os.PathLike[str] | None = None
) -> RetrievalEncoder:
    """Build the encoder from random init (``torch`` RNG) or a local weights file.

    Args:
        config: the architecture.
        weights_path: optional local file with a checkpoint ``{"kind": "retrieval_encoder",
            "config": ..., "model": state_dict}`` or a bare encoder state dict. Never fetched
            from the network.

    Returns:
        The encoder, in training mode.

    Raises:
        ValueError: the file is unreadable, of another kind or config, or its keys or
            tensor shapes do not match the encoder.
    """
    model = RetrievalEncoder(config)
    if weights_path is None:
        return model
    loaded = _state_dict_from_file(weights_path, config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    reshaped = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in loaded and loaded[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{weights_path}: weights do not fit the retrieval encoder {config.to_dict()}: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {reshaped[:5]}{'...' if len(reshaped) > 5 else ''}"
        )
    model.load_state_dict(loaded)
    return model


def encoder_hash(
    model_or_state_dict: RetrievalEncoder | Mapping[str, torch.Tensor], config: RetrievalConfig | None = None
) -> str:
    """SHA-256 of an encoder's weights and config: equal hashes mean identical embeddings.

    Tensors are hashed in sorted key order with their dtype and shape, so the hash does not
    depend on device, on how the state dict was saved and loaded, or on memory layout.

    Args:
        model_or_state_dict: an encoder, or its state dict.
        config: the encoder's config; taken from the model when a model is given.

    Returns:
        The hex digest.

    Raises:
        ValueError: a state dict is given without a config.
    """
    if isinstance(model_or_state_dict, RetrievalEncoder):
        config = config or model_or_state_dict.config
        state = model_or_state_dict.state_dict()
    else:
        state = model_or_state_dict
    if config is None:
        raise ValueError("encoder_hash of a state dict needs the encoder's config")
    return state_dict_hash(state, prefix=json.dumps(config.to_dict(), sort_keys=True).encode())


@torch.inference_mode()
def embed_slices(model: RetrievalEncoder, slices: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Embeddings of many slices, in eval mode and batches (the model's mode is restored).

    Args:
        model: the encoder.
        slices: (N, 1, S, S) CT slices in [-1, 1], on any device.
        batch_size: slices per forward pass.

    Returns:
        float32 array (N, D) of unit-norm embeddings, in the order of ``slices``.

    Raises:
        ValueError: ``batch_size`` is not positive (shape errors come from the model).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model(slices[start : start + batch_size].to(device))[0].float().cpu()
            for start in range(0, len(slices), batch_size)
        ]
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, model.config.embedding_dim), dtype=np.float32)
    return torch.cat(chunks).numpy()


def load_retrieval_encoder(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[RetrievalEncoder, RetrievalConfig]:
    """Load an ``encoder.pt`` (weights and config) in eval mode.

    Raises:
        ValueError: not a retrieval encoder file.
    """
    state = load_checkpoint(path, kind=CHECKPOINT_KIND)
    config = RetrievalConfig.from_dict(state["config"])
    return build_retrieval_encoder(config, path).to(device).eval(), config
