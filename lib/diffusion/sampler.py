"""The one sampling loop over the bridge scheduler, and the translation of CT slices with a BBDM.

Starting from x_T = y (the bridge has no noise at t = T), each visited time step runs the
network once and :meth:`lib.diffusion.scheduler.BridgeScheduler.step` moves to the next,
earlier, one; the equations are cited there. As in diffusers, the scheduler steps and this
loop drives it.

In bfloat16 (:func:`translate_slices`' ``precision``) only the network runs under autocast:
its output is taken back to float32 before the step, so x_t and the bridge's arithmetic stay
float32 and the rounding errors of the steps do not pile up in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lib.diffusion.scheduler import BridgeScheduler
from lib.models.denoiser import BBDMSpec, denoise
from lib.models.device import Precision, autocast_context, resolve_inference_precision

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# step_progress(steps_done, steps): called after each sampling step.
StepProgress = Callable[[int, int], None]


@torch.no_grad()
def sample_bridge(
    denoise_fn: DenoiseFn,
    scheduler: BridgeScheduler,
    y: torch.Tensor,
    condition: torch.Tensor,
    steps: int = 100,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: bool = True,
    progress: StepProgress | None = None,
) -> torch.Tensor:
    """Translate a batch of CT slices to MRI along the bridge.

    Args:
        denoise_fn: ``(x_t, t, condition) -> output`` (the trained network).
        scheduler: the bridge the model was trained with.
        y: the bridge's CT end, (B, 1, H, W) in [-1, 1].
        condition: what the network sees besides x_t (y and optional neighbours).
        steps: number of sampling steps out of T.
        eta: 0 for the deterministic sampler, > 0 adds noise (1 is BBDM's stochastic sampler).
        generator: random source for eta > 0 (seeded for reproducible samples).
        clip: clip each x0 estimate to [-1, 1].
        progress: called as ``progress(step_done, steps)`` after each step.

    Returns:
        x0, (B, 1, H, W).

    Raises:
        ValueError: for a negative eta or a bad step count.
    """
    visited = scheduler.set_timesteps(steps)
    x = y.clone()
    for index, t in enumerate(visited):
        output = denoise_fn(x, torch.full((y.shape[0],), t, device=y.device, dtype=torch.long), condition)
        x = scheduler.step(output, t, x, y, eta=eta, generator=generator, clip=clip)
        if progress is not None:
            progress(index + 1, len(visited))
    return x


def translate_slices(
    model: torch.nn.Module,
    config: BBDMSpec,
    condition: torch.Tensor,
    steps: int = 100,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: StepProgress | None = None,
    *,
    control: torch.Tensor | None = None,
    precision: Precision | str = Precision.FP32,
) -> torch.Tensor:
    """Sample MRI slices from CT slices with a trained denoiser and its spec.

    Args:
        model: the denoiser (in eval mode); a ``ControlledDenoiser``
            (:mod:`lib.models.controlnet`) when ``control`` is given.
        config: the model's spec as :func:`lib.models.denoiser.load_bbdm` returns it (its
            neighbours and the bridge scheduler's settings).
        condition: (B, 1 + 2 * neighbours, H, W) CT slices, the centre one is the bridge's y
            (through the bridge's source map first, when it has one).
        steps, eta, generator, progress: as in :func:`sample_bridge`.
        control: (B, 1, H, W) ControlNet control images (METHOD.md section 3), or None.
        precision: the network's arithmetic, as :func:`lib.models.device.resolve_inference_precision`
            reads it (auto: bfloat16 where the device computes it natively). float32, the
            default, runs the network exactly as without autocast. On a CPU the model should be
            ``channels_last`` (:func:`lib.models.device.inference_memory_format`), which the
            caller sets once rather than on every call.

    Raises:
        ValueError: an unknown precision word, and as :func:`sample_bridge`.
    """
    scheduler = BridgeScheduler(config.scheduler)
    condition = scheduler.map_source(condition)
    y = condition[:, config.neighbours : config.neighbours + 1]
    if control is None:
        network = lambda x, t, c: denoise(model, x, t, c)  # noqa: E731
    else:
        network = lambda x, t, c: model(torch.cat([x, c], dim=1), t, control)  # noqa: E731
    autocast = autocast_context(condition.device, resolve_inference_precision(precision, condition.device))

    def denoise_fn(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with autocast:
            output = network(x, t, c)
        return output.float()  # a no-op in float32

    return sample_bridge(
        denoise_fn,
        scheduler,
        y,
        condition,
        steps=steps,
        eta=eta,
        generator=generator,
        progress=progress,
    )
