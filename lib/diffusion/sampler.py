"""BBDM's skip-step bridge sampler: deterministic (eta = 0) or stochastic (eta > 0).

Starting from x_T = y (the bridge has no noise at t = T), each step estimates x0 and moves
to the next, earlier, time step s < t with BBDM's posterior (Li et al. 2023, eq. 13 and its
skip-step form in the reference implementation):

    eps_hat   = (x_t - (1 - m_t) x0_hat - m_t y) / sqrt(delta_t)          (implied noise)
    sigma2    = (delta_t - delta_s (1 - m_t)^2 / (1 - m_s)^2) * delta_s / delta_t
    x_s       = (1 - m_s) x0_hat + m_s y + sqrt(delta_s - eta^2 sigma2) eps_hat + eta sigma z

With eta = 0 this is the DDIM-like deterministic path x_s = (1 - m_s) x0_hat + m_s y +
sqrt(delta_s) eps_hat; at the last step (t = 0) the output is x0_hat itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lib.diffusion.bridge import BridgeSchedule, predict_x0
from lib.models.denoiser import BBDMConfig, Objective, denoise

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """The step indices visited: T-1 down to 1 evenly, then 0 (e.g. 999, 989, ..., 1, 0).

    Raises:
        ValueError: unless 2 <= steps <= timesteps.
    """
    if not 2 <= steps <= timesteps:
        raise ValueError(f"steps must be between 2 and {timesteps}, got {steps}")
    upper = np.round(np.linspace(timesteps - 1, 1, steps - 1)).astype(int).tolist()
    return upper + [0]


@torch.no_grad()
def sample_bridge(
    denoise_fn: DenoiseFn,
    y: torch.Tensor,
    condition: torch.Tensor,
    schedule: BridgeSchedule,
    objective: Objective,
    steps: int = 100,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: bool = True,
    progress: Callable[[int, int], None] | None = None,
    distance_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Translate a batch of CT slices to MRI along the bridge.

    Args:
        denoise_fn: ``(x_t, t, condition) -> output`` (the trained network).
        y: the bridge's CT end, (B, 1, H, W) in [-1, 1].
        condition: what the network sees besides x_t (y and optional neighbours).
        schedule: the bridge schedule the model was trained with.
        objective: the model's training target (decides the x0 recovery).
        steps: number of sampling steps out of T.
        eta: 0 for the deterministic sampler, > 0 adds noise (1 is BBDM's stochastic sampler).
        generator: random source for eta > 0 (seeded for reproducible samples).
        clip: clip each x0 estimate to [-1, 1].
        progress: called as ``progress(step_done, steps)`` after each step.
        distance_range: bounds for ||y - x0|| in the directional x0 recovery
            (:func:`lib.diffusion.bridge.predict_x0`); use the model config's.

    Returns:
        x0, (B, 1, H, W).

    Raises:
        ValueError: for a negative eta or a bad step count.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    visited = sampling_timesteps(schedule.timesteps, steps)
    batch = y.shape[0]
    x = y.clone()
    for index, t_value in enumerate(visited):
        t = torch.full((batch,), t_value, device=y.device, dtype=torch.long)
        output = denoise_fn(x, t, condition)
        x0 = predict_x0(schedule, output, x, y, t, objective, clip=clip, distance_range=distance_range)
        if t_value == 0:
            x = x0
        else:
            s = torch.full((batch,), visited[index + 1], device=y.device, dtype=torch.long)
            m_t, delta_t = schedule.coefficients(t, x)
            m_s, delta_s = schedule.coefficients(s, x)
            eps_hat = (x - (1.0 - m_t) * x0 - m_t * y) / delta_t.sqrt()
            sigma2 = (delta_t - delta_s * (1.0 - m_t) ** 2 / (1.0 - m_s) ** 2) * delta_s / delta_t
            sigma2 = (eta**2 * sigma2).clamp(min=0.0)
            x = (1.0 - m_s) * x0 + m_s * y + (delta_s - sigma2).clamp(min=0.0).sqrt() * eps_hat
            if eta > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + sigma2.sqrt() * noise
        if progress is not None:
            progress(index + 1, len(visited))
    return x


def translate_slices(
    model: torch.nn.Module,
    config: BBDMConfig,
    condition: torch.Tensor,
    steps: int = 100,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    control: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample MRI slices from CT slices with a trained denoiser and its config.

    Args:
        model: the denoiser (in eval mode); a ``ControlledDenoiser``
            (:mod:`lib.models.controlnet`) when ``control`` is given.
        config: its config (objective, schedule, neighbours, distance range).
        condition: (B, 1 + 2 * neighbours, H, W) CT slices, the centre one is the bridge's y.
        steps, eta, generator, progress: as in :func:`sample_bridge`.
        control: (B, 1, H, W) ControlNet control images (METHOD.md section 3), or None.
    """
    y = condition[:, config.neighbours : config.neighbours + 1]
    if control is None:
        denoise_fn = lambda x, t, c: denoise(model, x, t, c)  # noqa: E731
    else:
        denoise_fn = lambda x, t, c: model(torch.cat([x, c], dim=1), t, control)  # noqa: E731
    return sample_bridge(
        denoise_fn,
        y,
        condition,
        BridgeSchedule.from_config(config),
        config.objective,
        steps=steps,
        eta=eta,
        generator=generator,
        progress=progress,
        distance_range=config.distance_range,
    )
