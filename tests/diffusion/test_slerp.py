"""SLERP (METHOD.md section 4): end points, the great-circle formula, the linear fallback, types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.diffusion.slerp import slerp


def unit_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two orthogonal unit 'images' (batch of one, 1 x 2 x 2)."""
    a = np.zeros((1, 1, 2, 2), dtype=np.float64)
    b = np.zeros((1, 1, 2, 2), dtype=np.float64)
    a[0, 0, 0, 0] = 1.0
    b[0, 0, 1, 1] = 1.0
    return a, b


@pytest.mark.parametrize("to", [np.asarray, torch.from_numpy])
def test_end_points_give_the_inputs(to):
    rng = np.random.default_rng(0)
    a, b = (to(rng.standard_normal((3, 1, 4, 4))) for _ in range(2))
    for alpha, expected in ((0.0, a), (1.0, b)):
        result = slerp(a, b, alpha)
        assert type(result) is type(a)
        np.testing.assert_allclose(np.asarray(result), np.asarray(expected), atol=1e-12)


def test_midpoint_of_orthogonal_unit_vectors():
    a, b = unit_pair()
    np.testing.assert_allclose(slerp(a, b, 0.5), (a + b) / np.sqrt(2), atol=1e-12)
    # Off the midpoint the weights follow the formula: cos and sin of alpha * 90 degrees.
    np.testing.assert_allclose(slerp(a, b, 1 / 3), np.cos(np.pi / 6) * a + np.sin(np.pi / 6) * b, atol=1e-12)


def test_equal_norm_inputs_keep_their_norm():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 4, 1, 8, 8))
    b *= (
        np.linalg.norm(a.reshape(4, -1), axis=1)[:, None, None, None]
        / np.linalg.norm(b.reshape(4, -1), axis=1)[:, None, None, None]
    )
    result = slerp(a, b, np.array([0.1, 0.4, 0.5, 0.9]))
    np.testing.assert_allclose(
        np.linalg.norm(result.reshape(4, -1), axis=1), np.linalg.norm(a.reshape(4, -1), axis=1), rtol=1e-10
    )
    # Linear interpolation would shrink them.
    assert np.linalg.norm((0.5 * a + 0.5 * b)[2]) < np.linalg.norm(a[2]) - 1e-3


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["parallel", "anti-parallel"])
@pytest.mark.parametrize("to", [np.asarray, torch.from_numpy])
def test_parallel_inputs_fall_back_to_linear(sign, to):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    b = sign * 2.0 * a
    result = np.asarray(slerp(to(a), to(b), 0.3))
    assert np.isfinite(result).all()
    np.testing.assert_allclose(result, 0.7 * a + 0.3 * b, rtol=1e-6, atol=1e-6)


def test_zero_vectors_fall_back_to_linear_without_nan():
    a = np.zeros((2, 3))
    b = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    result = slerp(a, b, 0.25)
    assert np.isfinite(result).all()
    np.testing.assert_allclose(result, 0.25 * b)


def test_identical_slices_come_through_unchanged():
    """The pipeline passes an acquired slice as both neighbours (alpha 0): bit-identical out."""
    a = np.random.default_rng(3).uniform(-1, 1, (5, 16, 16)).astype(np.float32)
    result = slerp(a, a.copy(), np.zeros(5))
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, a)


def test_per_sample_alpha():
    a, b = unit_pair()
    a, b = np.concatenate([a, a, a]), np.concatenate([b, b, b])
    alphas = [0.0, 0.5, 1.0]
    result = slerp(a, b, alphas)
    for row, alpha in enumerate(alphas):
        np.testing.assert_allclose(result[row : row + 1], slerp(a[:1], b[:1], alpha), atol=1e-12)
    torch_result = slerp(torch.from_numpy(a), torch.from_numpy(b), torch.tensor(alphas))
    np.testing.assert_allclose(torch_result.numpy(), result, atol=1e-12)
    with pytest.raises(ValueError, match="one value per batch item"):
        slerp(a, b, [0.1, 0.2])


def test_numpy_and_torch_agree_and_keep_the_dtype():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 6, 1, 8, 8)).astype(np.float32)
    alpha = rng.uniform(0, 1, 6)
    from_numpy = slerp(a, b, alpha)
    from_torch = slerp(torch.from_numpy(a), torch.from_numpy(b), alpha)
    assert from_numpy.dtype == np.float32 and from_torch.dtype == torch.float32
    np.testing.assert_allclose(from_torch.numpy(), from_numpy, rtol=1e-6, atol=1e-6)


def test_mixed_or_mismatched_inputs_are_refused():
    a = np.zeros((2, 4))
    with pytest.raises(ValueError, match="numpy arrays or both torch tensors"):
        slerp(a, torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="same shape"):
        slerp(a, np.zeros((2, 5)), 0.5)
