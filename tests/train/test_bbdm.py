"""BBDM training on real slices with tiny models: learning, determinism, resume, checkpoints."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Subset

from lib.data.dataset import PreparedDataset, PreparedSlices
from lib.diffusion.sampler import translate_slices
from lib.diffusion.scheduler import BridgeScheduler, BridgeSchedulerConfig, Objective
from lib.io.checkpoint import halve_weights
from lib.metrics import psnr
from lib.models.denoiser import BBDMConfig, load_bbdm
from lib.train.bbdm import (
    BBDMTrainer,
    BridgeLoss,
    TrainConfig,
    bridge_loss,
    flip_rows,
    prepared_slices,
    train_bbdm,
)
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
    # 150 iterations are plenty (measured: loss ratio >= 16, samples >= 8 dB above identity, both
    # objectives and precisions); 400 cost CI minutes on float32-only CPUs for no extra coverage.
    run_training(
        trainer, run, TrainConfig(iters=150, batch_size=4, lr=2e-3, ema_decay=0.9, checkpoint_every=150, seed=0)
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


def test_flip_rows_mirrors_only_the_chosen_items():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    flipped = flip_rows(images, torch.tensor([True, False]))
    assert torch.equal(flipped[0, 0], torch.tensor([[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]))  # along W only
    assert torch.equal(flipped[1], images[1])
    assert flip_rows(images, None) is images


def test_flipped_training_items_mirror_input_and_target_together(prepared):
    trainer = BBDMTrainer(lambda n, f: prepared_slices(prepared, n, f), tiny_config())
    trainer.train_set, _ = prepared_slices(prepared, 0, 0.3)
    trainer.device, trainer.model = torch.device("cpu"), None
    plain_condition, plain_x0, _ = trainer.batch([0, 5])
    condition, x0, _ = trainer.batch([0, 5], torch.tensor([False, True]))
    assert torch.equal(condition[0], plain_condition[0]) and torch.equal(x0[0], plain_x0[0])
    assert torch.equal(condition[1], plain_condition[1].flip(-1)) and torch.equal(x0[1], plain_x0[1].flip(-1))
    assert not torch.equal(condition[1], plain_condition[1])  # a brain slice is not mirror-symmetric


def test_flips_are_drawn_from_the_checkpointed_generator(prepared, tmp_path):
    """With flips on, a resumed run still equals an uninterrupted one, and the flips change what is learnt."""
    settings = dict(batch_size=2, val_every=10, checkpoint_every=2, seed=5, min_brain_fraction=0.1)
    train_bbdm(prepared, tmp_path / "whole", tiny_config(), TrainConfig(iters=4, flip_probability=0.5, **settings))
    train_bbdm(prepared, tmp_path / "split", tiny_config(), TrainConfig(iters=2, flip_probability=0.5, **settings))
    train_bbdm(
        prepared, tmp_path / "split", tiny_config(), TrainConfig(iters=4, flip_probability=0.5, **settings), resume=True
    )
    train_bbdm(prepared, tmp_path / "plain", tiny_config(), TrainConfig(iters=4, **settings))
    whole, split, plain = (pd.read_csv(tmp_path / name / "loss.csv") for name in ("whole", "split", "plain"))
    np.testing.assert_array_equal(whole.loss, split.loss)
    assert not np.array_equal(whole.loss, plain.loss)


def test_bridge_loss_kinds_compare_output_and_target_as_named():
    """The L1 loss is the mean absolute error of the network output against the bridge target."""
    scheduler = BridgeScheduler(BridgeSchedulerConfig(timesteps=10))
    generator = torch.Generator().manual_seed(0)
    condition, x0, noise = (torch.randn((2, 1, 8, 8), generator=generator) for _ in range(3))
    t = torch.tensor([2, 7])
    output = torch.randn((2, 1, 8, 8), generator=generator)
    _, target = scheduler.training_pair(x0, condition, t, noise)
    args = (scheduler, lambda _input, _t: output, condition, x0, t, noise, 0, contextlib.nullcontext())
    absolute = bridge_loss(*args, BridgeLoss.L1)
    squared = bridge_loss(*args, BridgeLoss.MSE)
    assert torch.isclose(absolute, (output - target).abs().mean())
    assert torch.isclose(squared, ((output - target) ** 2).mean())
    assert torch.equal(bridge_loss(*args), squared)  # the default stays the squared error
    assert not torch.isclose(absolute, squared)


def test_loss_kind_is_saved_and_a_run_without_it_resumes_with_mse(prepared, tmp_path):
    settings = dict(batch_size=2, val_every=10, checkpoint_every=2, seed=5, min_brain_fraction=0.1)
    train_bbdm(prepared, tmp_path / "l1", tiny_config(), TrainConfig(iters=2, loss="l1", **settings))
    train_bbdm(prepared, tmp_path / "mse", tiny_config(), TrainConfig(iters=2, **settings))
    saved = json.loads((tmp_path / "l1" / "config.json").read_text())["training"]
    assert saved["loss"] == "l1"
    l1, mse = (pd.read_csv(tmp_path / name / "loss.csv") for name in ("l1", "mse"))
    assert not np.array_equal(l1.loss, mse.loss)  # same draws, a different loss
    # Configs saved before the option existed have no "loss": they resume with the squared error.
    old = {key: value for key, value in TrainConfig(iters=2).to_dict().items() if key != "loss"}
    assert TrainConfig(iters=4).resumed(old).loss is BridgeLoss.MSE
    assert TrainConfig(iters=4, loss="l1").resumed(saved).loss is BridgeLoss.L1
    with pytest.raises(ValueError, match=r"loss must be one of \['mse', 'l1'\], got 'huber'"):
        TrainConfig(loss="huber")


def test_a_run_can_start_from_trained_weights(prepared, tmp_path):
    """The new run's first weights are the given ones (lr 0 keeps them), its bridge is theirs, and
    the run records where it started; another model config is refused, naming the file."""
    settings = dict(batch_size=2, val_every=10, checkpoint_every=3, seed=5, min_brain_fraction=0.1)
    bridge = BridgeSchedulerConfig(distance_range=(1.5, 9.0))
    train_bbdm(prepared, tmp_path / "first", tiny_config(), TrainConfig(iters=3, lr=1e-3, **settings), bridge)
    first = tmp_path / "first" / "model.pt"
    halved = halve_weights(first, tmp_path / "halved.pt")
    for start, tolerance in ((first, 0.0), (halved, 1e-3)):
        out = tmp_path / f"from_{start.stem}"
        train_bbdm(prepared, out, tiny_config(), TrainConfig(iters=1, lr=0.0, **settings), init=start)
        (model, spec), (trained, _) = load_bbdm(out / "model.pt"), load_bbdm(first)
        assert spec.scheduler.distance_range == (1.5, 9.0)
        for name, tensor in trained.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], tensor, atol=tolerance, rtol=0.0)
        assert json.loads((out / "config.json").read_text())["init"]["path"] == str(start)
    # Without the start the same seed gives other weights: the start was used.
    train_bbdm(prepared, tmp_path / "fresh", tiny_config(), TrainConfig(iters=1, lr=0.0, **settings))
    fresh, _ = load_bbdm(tmp_path / "fresh" / "model.pt")
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())
    wider = replace(tiny_config(), channels=(16, 48))
    with pytest.raises(ValueError, match=r"model\.pt: its model config .* differs"):
        train_bbdm(prepared, tmp_path / "wider", wider, TrainConfig(iters=1, **settings), init=first)


def test_a_bridge_from_the_intensity_map_fits_its_table_on_the_training_brains(prepared, tmp_path):
    """The table is each input bin's mean target over the training split's brain voxels (never
    the validation split's), it is saved with the bridge, the distance range is measured on the
    mapped inputs, and a resumed run keeps the table it started with."""
    settings = dict(batch_size=2, val_every=10, checkpoint_every=2, seed=5, min_brain_fraction=0.1)
    train_bbdm(
        prepared, tmp_path / "run", tiny_config(), TrainConfig(iters=2, **settings), bridge_start="intensity-map"
    )
    _, spec = load_bbdm(tmp_path / "run" / "model.pt")
    table = np.asarray(spec.scheduler.source_map)
    assert table.shape == (256,)
    dataset = PreparedDataset(prepared)
    pairs = {split: [] for split in ("train", "val")}
    for split, found in pairs.items():
        for subject in dataset.subjects(split):
            keep = dataset.slices[(dataset.slices.subject == subject) & (dataset.slices.input_coverage >= 0.8)]
            source, target = (np.asarray(dataset.array(subject, name))[keep["slice"]] for name in ("source", "target"))
            brain = source > -1 + 1e-3
            found.append((source[brain], target[brain]))
    source, target = (np.concatenate(values) for values in zip(*pairs["train"], strict=True))
    # The most crowded bin's table value is the mean target of the training voxels in it.
    index = np.clip(((source + 1) / 2 * 256).astype(int), 0, 255)
    crowded = np.bincount(index, minlength=256).argmax()
    assert table[crowded] == pytest.approx(float(target[index == crowded].mean()), abs=1e-5)
    val_source, val_target = (np.concatenate(values) for values in zip(*pairs["val"], strict=True))
    val_index = np.clip(((val_source + 1) / 2 * 256).astype(int), 0, 255)
    busy = np.bincount(val_index, minlength=256).argmax()
    assert table[busy] != pytest.approx(float(val_target[val_index == busy].mean()), abs=1e-5)
    # The distances are those from the mapped input to the target.
    train = PreparedSlices(prepared, "train", 0.1)
    bridge = BridgeScheduler(spec.scheduler)
    mapped = [
        float((bridge.map_source(train[i]["source"][None])[0, 0] - train[i]["target"][0]).norm())
        for i in range(len(train))
    ]
    raw = [float((train[i]["source"][0] - train[i]["target"][0]).norm()) for i in range(len(train))]
    low, high = spec.scheduler.distance_range
    assert min(mapped) <= low < high <= max(mapped)
    assert np.median(mapped) < np.median(raw)  # the table brings the input closer to the T1
    # Resuming keeps the saved table (the bridge the weights were trained on), whatever is asked.
    train_bbdm(prepared, tmp_path / "run", tiny_config(), TrainConfig(iters=4, **settings), resume=True)
    _, resumed = load_bbdm(tmp_path / "run" / "model.pt")
    assert resumed.scheduler.source_map == spec.scheduler.source_map
