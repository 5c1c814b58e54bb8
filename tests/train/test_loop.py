"""The shared training loop: mixed precision, progress reports, resume after a crash, config merging."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lib.models.denoiser import BBDMConfig
from lib.models.device import Precision, supports_bf16
from lib.train.bbdm import TrainConfig, train_bbdm
from lib.train.controlnet import ControlNetTrainConfig
from lib.train.retrieval import RetrievalTrainConfig

TINY = BBDMConfig(
    image_size=32, channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=8
)
SETTINGS = dict(batch_size=2, val_every=2, val_slices=2, val_steps=2, checkpoint_every=2, seed=2)


def test_bf16_training_on_the_cpu_gives_finite_losses_and_float32_state(prepared, tmp_path):
    if not supports_bf16(torch.device("cpu")):
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16 or AMX); bf16 training would fall back to fp32")
    train_bbdm(prepared, tmp_path / "r", TINY, TrainConfig(iters=4, precision="bf16", **SETTINGS), device="cpu")
    loss = pd.read_csv(tmp_path / "r" / "loss.csv").loss.to_numpy()
    assert len(loss) == 4 and np.isfinite(loss).all() and (loss > 0).all()
    assert np.isfinite(pd.read_csv(tmp_path / "r" / "validation.csv").psnr).all()
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["train_config"]["precision"] == "bf16"
    # Parameters, EMA copy and optimiser moments stay float32; the network ran channels_last.
    assert all(tensor.dtype == torch.float32 for tensor in state["model"].values() if tensor.is_floating_point())
    assert all(tensor.dtype == torch.float32 for tensor in state["ema"].values() if tensor.is_floating_point())
    moments = [value for entry in state["optimizer"]["state"].values() for value in entry.values() if value.dim()]
    assert moments and all(value.dtype == torch.float32 for value in moments)
    assert state["model"]["conv_in.conv.weight"].is_contiguous(memory_format=torch.channels_last)


def test_fp32_training_on_the_cpu_runs_channels_last(prepared, tmp_path):
    """The layout oneDNN's float32 convolutions are fastest in (1.24x a contiguous step, make bench-train)."""
    train_bbdm(prepared, tmp_path / "r", TINY, TrainConfig(iters=2, precision="fp32", **SETTINGS), device="cpu")
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["train_config"]["precision"] == "fp32"
    assert state["model"]["conv_in.conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not state["model"]["conv_in.conv.weight"].is_contiguous()


def test_progress_reports_every_iteration_and_validation_lines(prepared, tmp_path):
    calls = []
    train_bbdm(
        prepared, tmp_path / "r", TINY, TrainConfig(iters=3, **SETTINGS), progress=lambda *call: calls.append(call)
    )
    assert [call[:2] for call in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    messages = [message for _, _, message in calls if message]
    assert len(messages) == 2 and messages[0].startswith("iteration 2: validation PSNR")
    assert all("--" not in message for message in messages)


def test_resume_after_a_crash_continues_exactly(prepared, tmp_path):
    """A run killed between checkpoints repeats the lost iterations and ends where an uninterrupted one does."""
    train_bbdm(prepared, tmp_path / "whole", TINY, TrainConfig(iters=6, **SETTINGS))

    def crash(done: int, total: int, message: str) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_bbdm(prepared, tmp_path / "crashed", TINY, TrainConfig(iters=6, **SETTINGS), progress=crash)
    assert torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=True)["iteration"] == 4
    train_bbdm(prepared, tmp_path / "crashed", TINY, TrainConfig(iters=6, **SETTINGS), resume=True)
    for log in ("loss", "validation"):
        whole, resumed = (pd.read_csv(tmp_path / name / f"{log}.csv") for name in ("whole", "crashed"))
        pd.testing.assert_frame_equal(
            whole.drop(columns="seconds", errors="ignore"), resumed.drop(columns="seconds", errors="ignore")
        )
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True)["model"] for name in ("whole", "crashed"))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("config_class", [TrainConfig, ControlNetTrainConfig, RetrievalTrainConfig])
def test_resume_keeps_the_saved_settings_but_takes_iters_precision_and_decay(config_class):
    saved = config_class(iters=10, seed=7, lr=0.5, precision="fp32").to_dict()
    assert saved["precision"] == "fp32" and type(saved["precision"]) is str  # plain types in checkpoints
    merged = config_class(iters=20, seed=1, lr=0.1, precision="bf16", decay_iters=5).resumed({**saved, "device": "cpu"})
    assert (merged.iters, merged.precision, merged.seed, merged.lr) == (20, Precision.BF16, 7, 0.5)
    assert merged.decay_iters == 5
    # A run saved before the decay existed resumes at a constant rate unless given one.
    del saved["decay_iters"]
    assert config_class(iters=20).resumed(saved).decay_iters == 0
    with pytest.raises(ValueError, match="precision must be one of"):
        config_class(precision="fp16")


def test_the_learning_rate_decays_linearly_over_the_last_iterations_only():
    config = TrainConfig(iters=10, lr=1e-3, decay_iters=4)
    rates = [config.learning_rate(iteration) for iteration in range(1, 11)]
    np.testing.assert_allclose(rates, [1e-3] * 6 + [1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert TrainConfig(iters=10, lr=1e-3).learning_rate(10) == 1e-3  # no decay by default
    # A decay longer than the run starts below lr and still ends at lr / decay_iters.
    assert TrainConfig(iters=2, lr=1.0, decay_iters=4).learning_rate(1) == 0.5


def test_a_decay_added_on_resume_follows_the_rates_of_an_uninterrupted_decayed_run(prepared, tmp_path):
    """A constant-rate run resumed with a larger iters and decay_iters (what a finished run gets
    for its decay phase) logs and applies the same rates, and ends on the same weights, as one
    that had the schedule from the start."""
    settings = {**SETTINGS, "lr": 2e-3}
    train_bbdm(prepared, tmp_path / "whole", TINY, TrainConfig(iters=6, decay_iters=2, **settings))
    train_bbdm(prepared, tmp_path / "split", TINY, TrainConfig(iters=4, **settings))
    train_bbdm(prepared, tmp_path / "split", TINY, TrainConfig(iters=6, decay_iters=2, **settings), resume=True)
    whole, split = (pd.read_csv(tmp_path / name / "loss.csv") for name in ("whole", "split"))
    np.testing.assert_allclose(whole.lr, [2e-3] * 5 + [1e-3])
    pd.testing.assert_frame_equal(whole.drop(columns="seconds"), split.drop(columns="seconds"))
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True)["model"] for name in ("whole", "split"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert state["train_config"]["decay_iters"] == 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_every_training_setting_is_described_for_the_front_ends():
    from dataclasses import fields

    for config_class in (TrainConfig, ControlNetTrainConfig, RetrievalTrainConfig):
        undescribed = [item.name for item in fields(config_class) if not item.metadata.get("help")]
        assert not undescribed, (config_class.__name__, undescribed)


def test_the_ema_copy_warms_up_then_averages_with_the_configured_decay():
    from torch.optim.swa_utils import AveragedModel

    from lib.train.loop import warmup_ema

    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    ema = AveragedModel(model, multi_avg_fn=warmup_ema(0.9), use_buffers=True)
    ema.update_parameters(model)  # the first update copies
    expected = 0.0
    for n in range(1, 200):
        model.weight.data.fill_(float(n))
        ema.update_parameters(model)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * n
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
        if n == 1:  # the first average already weighs the new weights 9/11, not 1 - 0.9
            assert ema.module.weight.item() == pytest.approx(9 / 11)
    # Late in the run the decay is the configured one: the copy lags the ramp by decay / (1 - decay) steps.
    assert ema.module.weight.item() == pytest.approx(199 - 9, abs=0.01)


def test_the_best_validation_weights_are_kept_beside_the_last_and_survive_a_resume(prepared, tmp_path):
    """best_model.pt holds the EMA weights of the validation with the highest brain PSNR, not the last ones."""
    settings = {**SETTINGS, "val_every": 1, "checkpoint_every": 1}
    run = tmp_path / "r"
    snapshots = {}

    def snapshot(done: int, total: int, message: str) -> None:
        if done:
            snapshots[done] = torch.load(run / "model.pt", weights_only=True)["model"]

    train_bbdm(prepared, run, TINY, TrainConfig(iters=4, lr=3e-3, **settings), progress=snapshot)
    train_bbdm(prepared, run, TINY, TrainConfig(iters=7, lr=3e-3, **settings), resume=True, progress=snapshot)
    validation = pd.read_csv(run / "validation.csv")
    assert validation.iteration.tolist() == list(range(1, 8))
    winner = int(validation.iteration[validation.psnr_brain.idxmax()])
    record = json.loads((run / "best.json").read_text())
    assert record["iteration"] == winner and record["column"] == "psnr_brain"
    assert record["score"] == pytest.approx(validation.psnr_brain.max(), abs=1e-4)
    best = torch.load(run / "best_model.pt", weights_only=True)
    assert best["iteration"] == winner and best["config"] == torch.load(run / "model.pt", weights_only=True)["config"]
    assert all(torch.equal(best["model"][key], snapshots[winner][key]) for key in best["model"])
    if winner != 7:  # the last weights differ from the best ones
        assert not all(torch.equal(best["model"][key], snapshots[7][key]) for key in best["model"])
