"""Spherical linear interpolation (SLERP) between batches of images (METHOD.md section 4).

The pipeline fills a slice position with no acquired CT from its two acquired neighbours, and
uses the SLERP of the neighbouring CT slices as the ControlNet's control when retrieval fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def slerp(
    a: ArrayOrTensor,
    b: ArrayOrTensor,
    alpha: float | Sequence[float] | np.ndarray | torch.Tensor,
    eps: float = 1e-4,
) -> ArrayOrTensor:
    """Spherical interpolation from ``a`` (alpha = 0) to ``b`` (alpha = 1), per sample.

    Each batch item is treated as one flattened vector::

        theta = arccos(clip(a . b / (||a|| ||b||), -1, 1))
        slerp(a, b; alpha) = sin((1 - alpha) theta) / sin(theta) * a + sin(alpha theta) / sin(theta) * b

    Where ``sin(theta) < eps`` (near-parallel or anti-parallel vectors, where the great circle
    is undefined or the division is ill-conditioned) or a norm is 0, the item falls back to
    the linear interpolation ``(1 - alpha) a + alpha b``. The result is never NaN for finite
    inputs. The computation is done in float64 and cast back to the inputs' floating dtype
    (integer inputs give float32).

    Args:
        a: (B, ...) numpy array or torch tensor.
        b: same shape and type as ``a``.
        alpha: interpolation fraction, one float or one per batch item (length B).
        eps: threshold on sin(theta) below which the linear fallback is used.

    Returns:
        (B, ...) of the inputs' type (numpy in, numpy out; torch in, torch out, on their device).

    Raises:
        ValueError: different types or shapes, a 0-d input, or an alpha of the wrong length.
    """
    is_numpy = isinstance(a, np.ndarray)
    if is_numpy != isinstance(b, np.ndarray) or not (
        is_numpy or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor))
    ):
        raise ValueError(
            f"a and b must both be numpy arrays or both torch tensors, got {type(a).__name__} and {type(b).__name__}"
        )
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"a and b must have the same shape (B, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    if is_numpy:
        dtype = np.result_type(a.dtype, b.dtype)
        dtype = dtype if np.issubdtype(dtype, np.floating) else np.float32
        result = _slerp_float64(
            torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64)), alpha, eps
        )
        return result.numpy().astype(dtype, copy=False)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return _slerp_float64(a.double(), b.double(), alpha, eps).to(dtype if dtype.is_floating_point else torch.float32)


def _slerp_float64(
    a: torch.Tensor, b: torch.Tensor, alpha: float | Sequence[float] | np.ndarray | torch.Tensor, eps: float
) -> torch.Tensor:
    batch = a.shape[0]
    fractions = torch.as_tensor(
        np.asarray(alpha, dtype=np.float64) if not isinstance(alpha, torch.Tensor) else alpha,
        dtype=torch.float64,
        device=a.device,
    )
    if fractions.ndim == 0:
        fractions = fractions.expand(batch)
    if fractions.shape != (batch,):
        raise ValueError(
            f"alpha must be a float or have one value per batch item ({batch}), got shape {tuple(fractions.shape)}"
        )
    flat_a, flat_b = a.reshape(batch, -1), b.reshape(batch, -1)
    norms = flat_a.norm(dim=1) * flat_b.norm(dim=1)
    # A zero norm would make the cosine 0/0; such items take the linear branch below.
    cosine = ((flat_a * flat_b).sum(dim=1) / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(-1.0, 1.0)
    theta = torch.arccos(cosine)
    sin_theta = torch.sin(theta)
    linear = (sin_theta < eps) | (norms == 0)
    # Both branches are evaluated; a safe denominator keeps the unused one finite.
    safe_sin = torch.where(linear, torch.ones_like(sin_theta), sin_theta)
    weight_a = torch.where(linear, 1.0 - fractions, torch.sin((1.0 - fractions) * theta) / safe_sin)
    weight_b = torch.where(linear, fractions, torch.sin(fractions * theta) / safe_sin)
    shape = (batch,) + (1,) * (a.ndim - 1)
    return weight_a.view(shape) * a + weight_b.view(shape) * b
