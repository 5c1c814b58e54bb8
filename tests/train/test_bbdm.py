"""BBDM training on real slices with tiny models: learning, determinism, resume, checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Subset

from lib.data.dataset import PreparedSlices
from lib.diffusion.sampler import translate_slices
from lib.diffusion.scheduler import BridgeSchedulerConfig, Objective
from lib.metrics import psnr
from lib.models.denoiser import BBDMConfig, load_bbdm
from lib.train.bbdm import BBDMTrainer, TrainConfig, train_bbdm
from lib.train.loop import run_training
from lib.train.run_folder import RunExistsError


def tiny_config() -> BBDMConfig:
    return BBDMConfig(
        image_size=32,
        channels=(16, 32),
        attention_levels=(False, True),
        num_head_channels=16,
        norm_num_groups=8,
    )


def test_resumed_run_equals_an_uninterrupted_one(prepared, tmp_path):
    settings = dict(
        batch_size=2, val_every=3, val_slices=2, val_steps=3, checkpoint_every=3, seed=5, min_brain_fraction=0.1
    )
    train_bbdm(prepared, tmp_path / "whole", tiny_config(), TrainConfig(iters=6, **settings))
    train_bbdm(prepared, tmp_path / "split", tiny_config(), TrainConfig(iters=3, **settings))
    with pytest.raises(RunExistsError, match=r"resume=True continues it"):
        train_bbdm(prepared, tmp_path / "split", tiny_config(), TrainConfig(iters=6, **settings))
    train_bbdm(prepared, tmp_path / "split", tiny_config(), TrainConfig(iters=6, **settings), resume=True)
    whole, split = (pd.read_csv(tmp_path / name / "loss.csv") for name in ("whole", "split"))
    assert list(whole.iteration) == list(range(1, 7))
    np.testing.assert_array_equal(whole.loss, split.loss)
    assert len(pd.read_csv(tmp_path / "split" / "validation.csv")) == 2
    # The distance range for the directional x0 recovery was measured on the training slices, and
    # is saved with the scheduler's settings, apart from the model config.
    saved = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert "distance_range" not in saved["config"]
    low, high = saved["scheduler"]["distance_range"]
    train = PreparedSlices(prepared, "train", 0.1)
    distances = [float((train[i]["source"][0] - train[i]["target"][0]).norm()) for i in range(len(train))]
    assert min(distances) <= low < high <= max(distances)
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True)["model"] for name in ("whole", "split"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert (tmp_path / "whole" / "curves.png").stat().st_size > 1000


def test_wrong_slice_size_is_refused(prepared, tmp_path):
    config = BBDMConfig(
        image_size=64, channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=8
    )
    with pytest.raises(ValueError, match="model expects"):
        train_bbdm(prepared, tmp_path / "r", config, TrainConfig(iters=1))


@pytest.mark.parametrize("objective", list(Objective))
def test_overfitting_real_slices_learns_the_translation(prepared, tmp_path, objective):
    """Four real FLAIR -> T1 slices: the loss falls by a large factor and samples approach T1."""
    train = PreparedSlices(prepared, "train", 0.3)
    handful = Subset(train, [0, len(train) // 3, 2 * len(train) // 3, len(train) - 1])
    run = tmp_path / objective.value
    trainer = BBDMTrainer(
        lambda neighbours, min_brain_fraction: (handful, None),
        tiny_config(),
        BridgeSchedulerConfig(objective=objective),
    )
    run_training(
        trainer, run, TrainConfig(iters=400, batch_size=4, lr=2e-3, ema_decay=0.9, checkpoint_every=400, seed=0)
    )
    loss = pd.read_csv(run / "loss.csv").loss.to_numpy()
    assert loss[:20].mean() / loss[-20:].mean() > 5
    model, config = load_bbdm(run / "model.pt")
    batch = [handful[i] for i in range(4)]
    condition = torch.stack([item["source"] for item in batch])
    target = torch.stack([item["target"] for item in batch])
    result = translate_slices(model, config, condition, steps=20)
    to_unit = lambda tensor: (tensor[:, 0].permute(1, 2, 0).numpy() + 1) / 2  # noqa: E731
    identity = psnr(to_unit(condition), to_unit(target))
    learned = psnr(to_unit(result), to_unit(target))
    assert learned > identity + 3, (learned, identity)


def test_checkpoint_round_trip_gives_bit_identical_samples(prepared, tmp_path):
    train = PreparedSlices(prepared, "train", 0.3)
    train_bbdm(
        prepared,
        tmp_path / "r",
        tiny_config(),
        TrainConfig(iters=2, batch_size=2, checkpoint_every=2, min_brain_fraction=0.3, val_slices=1, val_steps=2),
    )
    y = torch.stack([train[i]["source"] for i in range(3)])

    def sample(seed: int) -> torch.Tensor:
        model, config = load_bbdm(tmp_path / "r" / "model.pt")
        generator = torch.Generator().manual_seed(seed)
        return translate_slices(model, config, y, steps=5, eta=1.0, generator=generator)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    with pytest.raises(ValueError, match="expected 'bbdm'"):
        load_bbdm(tmp_path / "r" / "checkpoint.pt")
