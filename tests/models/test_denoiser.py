"""The BBDM's spec: the denoiser's config and the bridge scheduler's settings, saved apart in
checkpoints, and the old single-config checkpoints (the shipped presets) split on reading."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lib.diffusion.scheduler import BridgeSchedulerConfig, Objective
from lib.io.checkpoint import save_checkpoint
from lib.models.denoiser import BBDMConfig, BBDMSpec, bbdm_checkpoint, build_denoiser, load_bbdm
from lib.presets import DEFAULT_WEIGHTS_DIR

CONFIG = BBDMConfig(
    image_size=16, channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=8
)
SCHEDULER = BridgeSchedulerConfig(timesteps=100, objective=Objective.PLAIN, distance_range=(1.5, 20.0))


def test_checkpoint_keeps_the_two_configs_apart_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_denoiser(CONFIG)
    spec = BBDMSpec(CONFIG, SCHEDULER)
    state = bbdm_checkpoint(model.state_dict(), spec)
    assert state["kind"] == "bbdm" and state["config"] == CONFIG.to_dict() and state["scheduler"] == SCHEDULER.to_dict()
    assert not set(state["config"]) & set(state["scheduler"])
    save_checkpoint(tmp_path / "model.pt", state)
    loaded, loaded_spec = load_bbdm(tmp_path / "model.pt")
    assert loaded_spec == spec and loaded_spec.image_size == 16 and loaded_spec.neighbours == 0
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_halved_weights_load_into_float32_with_only_the_rounding_changed(tmp_path):
    from lib.diffusion.sampler import translate_slices
    from lib.io.checkpoint import halve_weights
    from lib.models.weights_hash import state_dict_hash

    torch.manual_seed(0)
    model = build_denoiser(CONFIG)
    save_checkpoint(tmp_path / "model.pt", bbdm_checkpoint(model.state_dict(), BBDMSpec(CONFIG, SCHEDULER)))
    halve_weights(tmp_path / "model.pt", tmp_path / "half.pt")
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "model.pt").stat().st_size
    full, spec = load_bbdm(tmp_path / "model.pt")
    half, half_spec = load_bbdm(tmp_path / "half.pt")
    assert half_spec == spec and all(p.dtype == torch.float32 for p in half.parameters())
    for (name, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        assert torch.equal(b, a.half().float()) if a.is_floating_point() else torch.equal(a, b), name
    # Rounded weights are other weights: a ControlNet trained on the float32 file is refused by hash.
    assert state_dict_hash(half.state_dict()) != state_dict_hash(full.state_dict())
    condition = torch.rand(2, 1, 16, 16) * 2 - 1
    a = translate_slices(full, spec, condition, steps=4)
    b = translate_slices(half, spec, condition, steps=4)
    assert (a - b).abs().max() < 2e-2
    with pytest.raises(ValueError, match="no 'weights' state dict"):
        halve_weights(tmp_path / "model.pt", tmp_path / "x.pt", key="weights")


def test_old_single_config_checkpoints_are_split_on_reading():
    old = {"config": {**CONFIG.to_dict(), **SCHEDULER.to_dict()}}
    assert BBDMSpec.from_checkpoint(old) == BBDMSpec(CONFIG, SCHEDULER)
    with pytest.raises(ValueError, match="unknown BBDM config keys"):
        BBDMSpec.from_checkpoint({"config": {**CONFIG.to_dict(), "colour": 1}, "scheduler": SCHEDULER.to_dict()})
    with pytest.raises(ValueError, match="unknown bridge scheduler config keys"):
        BBDMSpec.from_checkpoint({"config": CONFIG.to_dict(), "scheduler": {"colour": 1}})


@pytest.mark.parametrize("name", ["ct2mri", "flair2t1"])
def test_shipped_bbdm_is_the_128_pixel_2_5d_model_in_float16(name):
    """Issue 19's flair2t1 and issue 20's ct2mri: 128 x 128, +-1 neighbouring input slice,
    stored in float16, loaded as float32, the file unchanged by loading. (The first ct2mri's
    older single-config format is covered by test_old_single_config_checkpoints_are_split_on_reading.)"""
    path = DEFAULT_WEIGHTS_DIR / name / "bbdm.pt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stored = torch.load(path, weights_only=True)
    assert {t.dtype for t in stored["model"].values() if t.is_floating_point()} == {torch.float16}
    model, spec = load_bbdm(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert spec == BBDMSpec.from_checkpoint(stored)
    assert spec.scheduler.objective is Objective.PLAIN and spec.scheduler.timesteps == 1000
    assert spec.denoiser == BBDMConfig(
        image_size=128,
        channels=(32, 64, 128, 256),
        attention_levels=(False, False, False, True),
        norm_num_groups=16,
        neighbours=1,
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
