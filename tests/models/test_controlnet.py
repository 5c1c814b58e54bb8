"""The ControlNet branch: exact identity at initialisation, weight copy, frozen denoiser,
the sampler hook, and checkpoints tied to the BBDM they were trained on."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from lib.diffusion.sampler import translate_slices
from lib.diffusion.scheduler import BridgeScheduler, BridgeSchedulerConfig
from lib.io.checkpoint import save_checkpoint
from lib.models.controlnet import (
    CONTROLNET_ONLY_PREFIXES,
    ControlledDenoiser,
    build_controlnet,
    controlnet_from_denoiser,
    load_controlled_denoiser,
    save_controlnet,
    state_dict_hash,
)
from lib.models.denoiser import BBDMConfig, BBDMSpec, bbdm_checkpoint, build_denoiser
from lib.train.bbdm import bridge_loss

SIZE = 16
SCHEDULER = BridgeSchedulerConfig(timesteps=100)


def tiny_config(neighbours: int = 0) -> BBDMConfig:
    return BBDMConfig(
        image_size=SIZE,
        channels=(16, 32),
        attention_levels=(False, True),
        num_head_channels=16,
        norm_num_groups=8,
        neighbours=neighbours,
    )


def random_denoiser(config: BBDMConfig, seed: int = 0) -> torch.nn.Module:
    """A denoiser with every weight random: MONAI zero-initialises its output convolution, which
    would make any comparison of outputs trivially true."""
    torch.manual_seed(seed)
    model = build_denoiser(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    return model.eval()


def inputs(config: BBDMConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Denoiser input [x_t, condition], time steps and a non-zero control, batch of 2."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 1 + config.condition_channels, SIZE, SIZE), generator=generator)
    control = torch.rand((2, 1, SIZE, SIZE), generator=generator) + 0.5
    return x, torch.tensor([3, 70]), control


@pytest.mark.parametrize("neighbours", [0, 1])
def test_output_at_initialisation_equals_the_frozen_denoiser(neighbours):
    config = tiny_config(neighbours)
    denoiser = random_denoiser(config)
    x, t, control = inputs(config)
    with torch.no_grad():
        expected = denoiser(x, t)
        assert expected.abs().max() > 1e-3
        model = ControlledDenoiser(denoiser, controlnet_from_denoiser(denoiser, config))
        assert torch.equal(model(x, t, control), expected)


def test_copied_weights_equal_the_denoiser_and_the_rest_is_zero_or_embedding():
    config = tiny_config()
    denoiser = random_denoiser(config)
    controlnet = controlnet_from_denoiser(denoiser, config)
    source = denoiser.state_dict()
    own = [name for name in controlnet.state_dict() if name.startswith(CONTROLNET_ONLY_PREFIXES)]
    copied = [name for name in controlnet.state_dict() if name not in own]
    assert {name.split(".")[0] for name in copied} == {"conv_in", "time_embed", "down_blocks", "middle_block"}
    for name in copied:
        assert torch.equal(controlnet.state_dict()[name], source[name]), name
    # Copies, not shared storage: training the ControlNet must never touch the denoiser.
    assert all(p.data_ptr() != q.data_ptr() for p in controlnet.parameters() for q in denoiser.parameters())
    zero = [name for name in own if not name.startswith("controlnet_cond_embedding.conv_in")]
    assert all(not controlnet.state_dict()[name].any() for name in zero)
    with pytest.raises(ValueError, match="does not have the architecture"):
        controlnet_from_denoiser(build_denoiser(tiny_config(neighbours=1)), config)


def test_control_embedding_stays_at_full_resolution():
    config = tiny_config()
    controlnet = build_controlnet(config)
    embedded = controlnet.controlnet_cond_embedding(torch.zeros(1, 1, SIZE, SIZE))
    assert embedded.shape == (1, config.channels[0], SIZE, SIZE)


def test_only_the_controlnet_trains():
    config = tiny_config()
    denoiser = random_denoiser(config)
    before = {name: tensor.clone() for name, tensor in denoiser.state_dict().items()}
    model = ControlledDenoiser(denoiser, controlnet_from_denoiser(denoiser, config))
    initial = {name: tensor.clone() for name, tensor in model.controlnet.state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    scheduler = BridgeScheduler(SCHEDULER)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        condition, x0, noise = (torch.randn((2, 1, SIZE, SIZE), generator=generator) for _ in range(3))
        control = torch.rand((2, 1, SIZE, SIZE), generator=generator)
        t = torch.randint(SCHEDULER.timesteps, (2,), generator=generator)
        model.train()
        network = functools.partial(model, control=control)
        loss = bridge_loss(scheduler, network, condition, x0, t, noise, 0, contextlib.nullcontext())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert loss.item() > 0
    assert not denoiser.training and model.controlnet.training
    assert all(not p.requires_grad for p in denoiser.parameters())
    assert all(torch.equal(tensor, before[name]) for name, tensor in denoiser.state_dict().items())
    changed = [name for name, tensor in model.controlnet.state_dict().items() if not torch.equal(tensor, initial[name])]
    assert any(name.startswith("controlnet_down_blocks") for name in changed)
    assert any(name.startswith("controlnet_cond_embedding") for name in changed)
    x, t, control = inputs(config)
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(model(x, t, control), model(x, t, -control))
        assert not torch.allclose(model(x, t, control), denoiser(x, t))


def test_sampler_hook_with_a_fresh_controlnet_equals_the_bbdm_alone():
    config = tiny_config()
    denoiser = random_denoiser(config)
    model = ControlledDenoiser(denoiser, controlnet_from_denoiser(denoiser, config)).eval()
    condition = torch.rand((2, 1, SIZE, SIZE)) * 2 - 1
    control = torch.rand((2, 1, SIZE, SIZE))
    spec = BBDMSpec(config, SCHEDULER)
    plain = translate_slices(denoiser, spec, condition, steps=4)
    controlled = translate_slices(model, spec, condition, steps=4, control=control)
    assert torch.equal(plain, controlled)


def save_bbdm(path, denoiser: torch.nn.Module, config: BBDMConfig) -> None:
    save_checkpoint(path, bbdm_checkpoint(denoiser.state_dict(), BBDMSpec(config, SCHEDULER)))


def test_checkpoint_round_trip_and_refusal_on_another_bbdm(tmp_path):
    config = tiny_config()
    denoiser = random_denoiser(config)
    save_bbdm(tmp_path / "model.pt", denoiser, config)
    controlnet = controlnet_from_denoiser(denoiser, config)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(0.01)
    bbdm_hash = state_dict_hash(denoiser.state_dict())
    save_controlnet(tmp_path / "controlnet.pt", controlnet, config, bbdm_hash, {"iteration": 7})
    loaded, loaded_config = load_controlled_denoiser(tmp_path / "model.pt", tmp_path / "controlnet.pt")
    assert loaded_config == BBDMSpec(config, SCHEDULER) and not loaded.training
    x, t, control = inputs(config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, control), ControlledDenoiser(denoiser, controlnet)(x, t, control))

    # The hash depends on the weights only, not on how they were stored.
    assert state_dict_hash(loaded.denoiser.state_dict()) == bbdm_hash
    other = random_denoiser(config, seed=5)
    assert state_dict_hash(other.state_dict()) != bbdm_hash
    save_bbdm(tmp_path / "other.pt", other, config)
    with pytest.raises(ValueError, match="another BBDM") as error:
        load_controlled_denoiser(tmp_path / "other.pt", tmp_path / "controlnet.pt")
    assert "controlnet.pt" in str(error.value) and "other.pt" in str(error.value)
    with pytest.raises(ValueError, match="expected 'controlnet'"):
        load_controlled_denoiser(tmp_path / "model.pt", tmp_path / "model.pt")
    with pytest.raises(ValueError, match="reserved"):
        save_controlnet(tmp_path / "bad.pt", controlnet, config, bbdm_hash, {"model": {}})
