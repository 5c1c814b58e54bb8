"""A tiny but complete preset (BBDM, ControlNet, retrieval encoder, knowledge base) for tests.

Built from real BraTS slices at 32 x 32 with untrained tiny networks: fast to make, and every
file is the real format the shipped presets use, so pipeline, server and batch tests exercise
the real loading and checking code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lib.data.prepare import PrepareConfig, prepare_dataset
from lib.diffusion.scheduler import BridgeSchedulerConfig, Objective
from lib.io.checkpoint import save_checkpoint
from lib.models.controlnet import controlnet_from_denoiser, save_controlnet, state_dict_hash
from lib.models.denoiser import BBDMConfig, BBDMSpec, bbdm_checkpoint, build_denoiser
from lib.models.retrieval_encoder import CHECKPOINT_KIND, RetrievalConfig, build_retrieval_encoder
from lib.presets import Preset, assemble_preset
from lib.retrieval.build import build_knowledge_base
from tests.conftest import SHARED_DATA, require

TINY_BBDM = BBDMConfig(
    image_size=32,
    channels=(16, 32),
    attention_levels=(False, True),
    num_head_channels=16,
    norm_num_groups=8,
)
TINY_SCHEDULER = BridgeSchedulerConfig(objective=Objective.PLAIN)
TINY_ENCODER = RetrievalConfig(
    image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=16, perceptual_blocks=(0, 1)
)


def make_tiny_preset(
    folder: Path,
    name: str = "tiny",
    controlnet: bool = True,
    max_subjects: int = 3,
    seed: int = 0,
    layout: str = "brats",
) -> Preset:
    """Prepare ``layout`` at 32 x 32 and assemble a preset from random networks seeded with ``seed``.

    ``brats``: real BraTS FLAIR -> T1 (an MR-input preset); ``open``: synthetic CT -> T1
    pseudo-subjects (a CT-input preset, like the shipped ct2mri).
    """
    prepared = folder / "prepared"
    brats = require(SHARED_DATA / "brats_dev")
    if layout == "open":
        prepare_dataset("open", brats, prepared, config=PrepareConfig(size=32), open_count=max_subjects)
    else:
        prepare_dataset("brats", brats, prepared, config=PrepareConfig(size=32), max_subjects=max_subjects)
    torch.manual_seed(seed)
    denoiser = build_denoiser(TINY_BBDM)
    bbdm_path = save_checkpoint(
        folder / "bbdm.pt", bbdm_checkpoint(denoiser.state_dict(), BBDMSpec(TINY_BBDM, TINY_SCHEDULER))
    )
    encoder = build_retrieval_encoder(TINY_ENCODER)
    encoder_path = save_checkpoint(
        folder / "encoder.pt",
        {"kind": CHECKPOINT_KIND, "config": TINY_ENCODER.to_dict(), "model": encoder.state_dict()},
    )
    build_knowledge_base(prepared, encoder_path, folder / "kb")
    controlnet_path = None
    if controlnet:
        controlnet_path = folder / "controlnet.pt"
        save_controlnet(
            controlnet_path,
            controlnet_from_denoiser(denoiser, TINY_BBDM),
            TINY_BBDM,
            state_dict_hash(denoiser.state_dict()),
            {},
        )
    return assemble_preset(
        folder / name,
        name,
        f"tiny untrained test preset ({'synthetic CT' if layout == 'open' else 'BraTS FLAIR'} -> T1, 32 x 32)",
        prepared,
        bbdm_path,
        encoder_path,
        folder / "kb",
        controlnet_path,
        steps=3,
    )
