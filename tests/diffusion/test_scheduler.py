"""The bridge scheduler (schedule, forward marginal, targets, x0 recovery, step) and the sampling
loop against METHOD.md."""

from __future__ import annotations

import math

import pytest
import torch

from lib.data.intensity_map import BACKGROUND_LEVEL, apply_intensity_map
from lib.diffusion.sampler import sample_bridge
from lib.diffusion.scheduler import BridgeScheduler, BridgeSchedulerConfig, BridgeStart, Objective
from tests.conftest import BRATS_CASE, require


def scheduler(objective: Objective = Objective.DIRECTIONAL, direction_eps: float = 0.0, **settings) -> BridgeScheduler:
    """BBDM's bridge; e = 0 in the directional target makes the x0 identities exact."""
    return BridgeScheduler(BridgeSchedulerConfig(objective=objective, direction_eps=direction_eps, **settings))


def test_schedule_values_match_the_formulas():
    schedule = scheduler(timesteps=1000, max_var=0.5)
    for t in (0, 1, 500, 998, 999):
        m = 0.001 + (0.999 - 0.001) * t / 999
        assert schedule.m[t].item() == pytest.approx(m, abs=1e-12)
        assert schedule.delta[t].item() == pytest.approx(2 * 0.5 * (m - m * m), abs=1e-12)
    # Maximum variance s / 2 in the middle of the bridge; almost none at the ends.
    assert schedule.delta.max().item() == pytest.approx(0.25, abs=1e-6)
    assert schedule.delta[0].item() < 1e-3 and schedule.delta[-1].item() < 1e-3
    with pytest.raises(ValueError, match="m_min < m_max"):
        BridgeSchedulerConfig(10, m_min=0.5, m_max=0.4)
    with pytest.raises(ValueError, match="timesteps must be >= 2"):
        BridgeSchedulerConfig(1)


def test_config_round_trip_and_unknown_keys():
    config = BridgeSchedulerConfig(objective="plain", distance_range=(1, 30))
    assert config.objective is Objective.PLAIN and config.distance_range == (1.0, 30.0)
    assert BridgeSchedulerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown bridge scheduler config keys"):
        BridgeSchedulerConfig.from_dict({**config.to_dict(), "channels": [1]})


def test_source_map_is_saved_only_when_the_bridge_has_one():
    plain = BridgeSchedulerConfig()
    assert plain.start is BridgeStart.SOURCE and "source_map" not in plain.to_dict()
    mapped = BridgeSchedulerConfig(source_map=[-1, 0, 0.5, 1])
    assert mapped.start is BridgeStart.INTENSITY_MAP and mapped.source_map == (-1.0, 0.0, 0.5, 1.0)
    assert BridgeSchedulerConfig.from_dict(mapped.to_dict()) == mapped
    with pytest.raises(ValueError, match="at least 2 bins"):
        BridgeSchedulerConfig(source_map=[0.3])


def test_map_source_is_the_lookup_table_inside_the_brain_and_keeps_the_background():
    generator = torch.Generator().manual_seed(4)
    table = torch.rand(64, generator=generator) * 2 - 1
    condition = torch.rand((2, 3, 16, 16), generator=generator) * 2 - 1
    condition[:, :, :4] = -1.0  # background rows
    condition[0, 0, 5, :3] = torch.tensor([-0.999, 0.999, 1.0])  # beyond the first and last bin centres
    bridge = BridgeScheduler(BridgeSchedulerConfig(source_map=table.tolist()))
    mapped = bridge.map_source(condition)
    brain = condition > BACKGROUND_LEVEL
    expected = torch.from_numpy(apply_intensity_map(table.numpy(), condition.numpy()))
    torch.testing.assert_close(mapped[brain], expected[brain], atol=1e-6, rtol=0)
    assert torch.equal(mapped[~brain], condition[~brain])
    assert not torch.allclose(mapped[brain], condition[brain])
    # A bridge from the input itself leaves it as it is.
    assert BridgeScheduler(BridgeSchedulerConfig()).map_source(condition) is condition


def test_forward_sample_mean_and_variance_monte_carlo():
    """x_t ~ N((1 - m_t) x0 + m_t y, delta_t): checked with 200k draws per pixel value."""
    schedule = scheduler()
    generator = torch.Generator().manual_seed(0)
    x0, y = (
        torch.full((200_000, 1, 1, 1), -0.6, dtype=torch.float64),
        torch.full((200_000, 1, 1, 1), 0.8, dtype=torch.float64),
    )
    for step in (100, 500, 900):
        t = torch.full((200_000,), step)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        x_t = schedule.q_sample(x0, y, t, noise)
        m, delta = schedule.m[step].item(), schedule.delta[step].item()
        # Standard error of the mean is sqrt(delta / n) < 1.6e-3; of the variance ~ delta * sqrt(2 / n).
        assert x_t.mean().item() == pytest.approx((1 - m) * -0.6 + m * 0.8, abs=5 * math.sqrt(delta / 200_000))
        assert x_t.var().item() == pytest.approx(delta, rel=5 * math.sqrt(2 / 200_000))


def _pair(seed: int = 0, shape=(3, 1, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    y = torch.rand(shape, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    return x0, y


@pytest.mark.parametrize("objective", list(Objective))
def test_targets_match_the_formulas(objective):
    schedule = scheduler(objective)
    x0, y = _pair()
    t = torch.tensor([10, 500, 990])
    noise = torch.randn_like(x0)
    target = schedule.training_target(x0, y, t, noise)
    for b in range(3):
        m, delta = schedule.m[t[b]].item(), schedule.delta[t[b]].item()
        direction = y[b] - x0[b]
        if objective is Objective.DIRECTIONAL:
            direction = direction / direction.norm()
        torch.testing.assert_close(target[b], m * direction + math.sqrt(delta) * noise[b])
    x_t, paired = schedule.training_pair(x0, y, t, noise)
    assert torch.equal(x_t, schedule.q_sample(x0, y, t, noise)) and torch.equal(paired, target)


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("step", [0, 1, 300, 700, 998, 999])
def test_x0_recovery_is_exact_for_the_exact_target(objective, step):
    schedule = scheduler(objective)
    x0, y = _pair(seed=step)
    t = torch.full((3,), step)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t, target = schedule.training_pair(x0, y, t, noise)
    recovered = schedule.predict_x0(target, x_t, y, t, clip=False)
    torch.testing.assert_close(recovered, x0, atol=1e-9, rtol=0)


def test_naive_recovery_is_wrong_for_the_directional_objective():
    """METHOD.md's caution: x_t - eps_theta is not x0 under the directional target."""
    schedule = BridgeScheduler(BridgeSchedulerConfig(objective=Objective.DIRECTIONAL))
    x0, y = _pair()
    t = torch.full((3,), 500)
    noise = torch.randn_like(x0)
    x_t, target = schedule.training_pair(x0, y, t, noise)
    assert (x_t - target - x0).abs().max() > 0.1


def oracle(x0: torch.Tensor, schedule: BridgeScheduler):
    """A denoiser that knows x0 and returns the exact target for the current x_t.

    The noise it implies is eps = (x_t - (1 - m_t) x0 - m_t y) / sqrt(delta_t).
    """

    def denoise(x_t, t, condition):
        y = condition[:, :1]
        m, delta = schedule.coefficients(t, x_t)
        eps = (x_t - (1 - m) * x0 - m * y) / delta.sqrt()
        return schedule.training_target(x0, y, t, eps)

    return denoise


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("steps", [2, 10, 100, 1000])
def test_sampler_with_an_oracle_recovers_x0(objective, steps):
    schedule = scheduler(objective)
    x0, y = _pair(seed=steps)
    result = sample_bridge(oracle(x0, schedule), schedule, y, y, steps=steps)
    torch.testing.assert_close(result, x0, atol=1e-6, rtol=0)


def test_sampler_on_a_real_slice_pair_with_eta():
    """Real FLAIR -> T1 slice; oracle denoiser; stochastic sampling still lands on x0."""
    import nibabel as nib
    import numpy as np

    folder = require(BRATS_CASE)
    t1 = np.asarray(nib.load(str(folder / "t1n.nii.gz")).dataobj, dtype=np.float64)[60:124, 60:124, 80]
    flair = np.asarray(nib.load(str(folder / "t2f.nii.gz")).dataobj, dtype=np.float64)[60:124, 60:124, 80]
    x0 = torch.from_numpy(t1 / t1.max() * 2 - 1)[None, None]
    y = torch.from_numpy(flair / flair.max() * 2 - 1)[None, None]
    schedule = scheduler(Objective.DIRECTIONAL)
    calls = []
    generator = torch.Generator().manual_seed(3)
    result = sample_bridge(
        oracle(x0, schedule),
        schedule,
        y,
        y,
        steps=25,
        eta=1.0,
        generator=generator,
        progress=lambda done, total: calls.append((done, total)),
    )
    torch.testing.assert_close(result, x0, atol=1e-6, rtol=0)
    assert calls[-1] == (25, 25) and len(calls) == 25


def test_step_follows_the_posterior_formulas():
    """One step from t to s, written out with the equations of BridgeScheduler.step."""
    schedule = scheduler(Objective.PLAIN)
    visited = schedule.set_timesteps(10)
    x0, y = _pair(seed=4)
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.1
    t, s = visited[3], visited[4]
    x_t = schedule.q_sample(x0, y, torch.full((3,), t), torch.randn_like(x0))
    x0_hat = (x_t - output).clamp(-1, 1)
    m_t, d_t, m_s, d_s = (
        schedule.m[t].item(),
        schedule.delta[t].item(),
        schedule.m[s].item(),
        schedule.delta[s].item(),
    )
    eps_hat = (x_t - (1 - m_t) * x0_hat - m_t * y) / math.sqrt(d_t)
    torch.testing.assert_close(
        schedule.step(output, t, x_t, y), (1 - m_s) * x0_hat + m_s * y + math.sqrt(d_s) * eps_hat
    )
    sigma2 = (d_t - d_s * (1 - m_t) ** 2 / (1 - m_s) ** 2) * d_s / d_t
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    stochastic = schedule.step(output, t, x_t, y, eta=1.0, generator=torch.Generator().manual_seed(6))
    expected = (1 - m_s) * x0_hat + m_s * y + math.sqrt(d_s - sigma2) * eps_hat + math.sqrt(sigma2) * z
    torch.testing.assert_close(stochastic, expected)
    # The last step returns the x0 estimate itself.
    torch.testing.assert_close(schedule.step(output, 0, x_t, y), x0_hat)


def test_sampling_timesteps_and_errors():
    schedule = scheduler(timesteps=1000)
    assert schedule.set_timesteps(100)[:3] == [999, 989, 979]
    assert schedule.set_timesteps(100)[-2:] == [1, 0]
    assert len(schedule.set_timesteps(100)) == 100 and schedule.set_timesteps(2) == [999, 0]
    assert schedule.timesteps == [999, 0]
    with pytest.raises(ValueError, match="between 2 and 1000"):
        schedule.set_timesteps(1)
    x0, y = _pair()
    with pytest.raises(ValueError, match="not on the sampling path"):
        schedule.step(y, 500, y, y)
    with pytest.raises(ValueError, match="eta"):
        sample_bridge(lambda *a: a[0], scheduler(Objective.PLAIN, timesteps=10), y, y, steps=5, eta=-1)
