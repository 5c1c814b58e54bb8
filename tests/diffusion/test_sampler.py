"""translate_slices' precision: float32 runs the network exactly as before, bfloat16 stays close to
it, the step's arithmetic stays float32, and the ControlNet path runs in both."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lib.diffusion import sampler
from lib.diffusion.sampler import sample_bridge, translate_slices
from lib.diffusion.scheduler import BridgeScheduler
from lib.metrics import psnr
from lib.models.controlnet import ControlledDenoiser, controlnet_from_denoiser
from lib.models.denoiser import BBDMSpec, denoise
from lib.models.device import Precision, inference_memory_format, supports_bf16
from tests.models.test_controlnet import SCHEDULER, SIZE, random_denoiser, tiny_config

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not supports_bf16(CPU), reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")


def random_model(controlled: bool) -> torch.nn.Module:
    """A denoiser, or one guided by a ControlNet, with every weight random (none zero-initialised)."""
    config = tiny_config()
    denoiser = random_denoiser(config)
    if not controlled:
        return denoiser
    controlnet = controlnet_from_denoiser(denoiser, config)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.normal_(0.0, 0.05)
    return ControlledDenoiser(denoiser, controlnet).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Condition (CT slices in [-1, 1]) and control images of three slices."""
    generator = torch.Generator().manual_seed(2)
    condition = torch.rand((3, 1, SIZE, SIZE), generator=generator) * 2 - 1
    return condition, torch.rand((3, 1, SIZE, SIZE), generator=generator)


def translate(model: torch.nn.Module, controlled: bool, **options) -> torch.Tensor:
    condition, control = batch()
    spec = BBDMSpec(tiny_config(), SCHEDULER)
    return translate_slices(model, spec, condition, steps=4, control=control if controlled else None, **options)


@pytest.mark.parametrize("controlled", [False, True], ids=["bbdm", "controlnet"])
def test_float32_is_the_network_without_autocast(controlled):
    """The default and an explicit fp32 give bit for bit what the sampler gave before precisions."""
    model = random_model(controlled)
    condition, control = batch()
    if controlled:
        network = lambda x, t, c: model(torch.cat([x, c], dim=1), t, control)  # noqa: E731
    else:
        network = lambda x, t, c: denoise(model, x, t, c)  # noqa: E731
    before = sample_bridge(network, BridgeScheduler(SCHEDULER), condition, condition, steps=4)
    assert torch.equal(translate(model, controlled), before)
    assert torch.equal(translate(model, controlled, precision="fp32"), before)


@needs_bf16
@pytest.mark.parametrize("controlled", [False, True], ids=["bbdm", "controlnet"])
def test_bfloat16_is_close_to_float32_and_steps_in_float32(controlled, monkeypatch):
    model = random_model(controlled)
    fp32 = translate(model, controlled)
    model.to(memory_format=inference_memory_format(CPU))
    steps = []
    step = BridgeScheduler.step

    def recording_step(self, output, t, x, *args, **kwargs):
        steps.append((output.dtype, x.dtype))
        return step(self, output, t, x, *args, **kwargs)

    monkeypatch.setattr(sampler.BridgeScheduler, "step", recording_step)
    bf16 = translate(model, controlled, precision=Precision.BF16)
    assert steps and set(steps) == {(torch.float32, torch.float32)}
    assert bf16.dtype == torch.float32
    # It did run in bfloat16 (the outputs differ), and far below anything visible: the slices
    # span [-1, 1], so the peak is 2.
    assert not torch.equal(bf16, fp32)
    assert psnr(bf16[:, 0].numpy(), fp32[:, 0].numpy(), data_range=2.0) > 50.0
    # auto is bfloat16 here.
    assert torch.equal(translate(model, controlled, precision="auto"), bf16)


def test_an_unknown_precision_is_refused_naming_the_words():
    with pytest.raises(ValueError, match=r"precision must be one of \['auto', 'fp32', 'bf16'\], got 'fp16'"):
        translate(random_model(False), False, precision="fp16")


def test_a_mapped_bridge_translates_the_mapped_input_once():
    """A BBDM whose bridge starts from the mapped input samples exactly as a plain bridge does from
    the input mapped beforehand: the map is applied once, to every channel, before the network."""
    model = random_model(controlled=False)
    condition, _ = batch()
    table = torch.linspace(-0.8, 0.6, 32) ** 2 - 0.5  # not monotonic, as FLAIR -> T1 is not
    mapped_spec = BBDMSpec(tiny_config(), replace(SCHEDULER, source_map=tuple(table.tolist())))
    premapped = BridgeScheduler(mapped_spec.scheduler).map_source(condition)
    assert not torch.allclose(premapped, condition)
    through_map = translate_slices(model, mapped_spec, condition, steps=3)
    beforehand = translate_slices(model, BBDMSpec(tiny_config(), SCHEDULER), premapped, steps=3)
    torch.testing.assert_close(through_map, beforehand, atol=1e-6, rtol=0)
    assert not torch.allclose(
        through_map, translate_slices(model, BBDMSpec(tiny_config(), SCHEDULER), condition, steps=3)
    )
