"""Training losses of the retrieval encoder (METHOD.md section 2).

For an anchor slice p of a batch, the positives P_p are the slices p+1 .. p+K of the same
subject present in the batch (one direction suffices); the negatives N_p are every other
batch item except the anchor itself (other positions of the same subject, all other
subjects)::

    sim(a, b)  = exp(phi(a) . phi(b) / alpha)
    L_contrast = -log( sum_pos sim / (sum_neg sim + sum_pos sim) )
    d(a, b)    = exp(-||f(a) - f(b)||^2 / beta)
    L_percept  = -log( sum_pos d / (sum_neg d + sum_pos d) )
    L          = L_contrast + lambda * L_percept

Each term is averaged over the anchors that have at least one positive in the batch; the
others are skipped. The ratios are computed as differences of log-sum-exps of the exponents
(mathematically identical, and free of overflow and underflow).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def positive_mask(subjects: Sequence[str], slices: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Which batch items are positives of which anchor.

    Args:
        subjects: subject key of each of the B batch items.
        slices: (B,) integer slice index of each item.
        k: K, how many following slices count as positives.

    Returns:
        (B, B) bool tensor, ``[p, j]`` true when item j is of the same subject as anchor p and
        its slice index is in p+1 .. p+K. The diagonal is always false.

    Raises:
        ValueError: ``k < 1``, ``slices`` not a 1-D integer tensor, or lengths differ.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if slices.ndim != 1 or slices.is_floating_point() or slices.is_complex():
        raise ValueError(f"slices must be a 1-D integer tensor, got {slices.dtype} of shape {tuple(slices.shape)}")
    if len(subjects) != len(slices):
        raise ValueError(f"{len(subjects)} subjects but {len(slices)} slice indices")
    codes = {key: code for code, key in enumerate(dict.fromkeys(subjects))}
    subject_codes = torch.tensor([codes[key] for key in subjects], device=slices.device)
    same_subject = subject_codes[:, None] == subject_codes[None, :]
    ahead = slices[None, :] - slices[:, None]
    return same_subject & (ahead >= 1) & (ahead <= k)


def _check_positives(positives: torch.Tensor, batch: int) -> None:
    if positives.dtype != torch.bool or tuple(positives.shape) != (batch, batch):
        raise ValueError(
            f"positives must be a ({batch}, {batch}) bool tensor, got {positives.dtype} of shape "
            f"{tuple(positives.shape)}"
        )
    if positives.diagonal().any():
        raise ValueError("positives marks an anchor as its own positive; the anchor is never a positive or a negative")
    if not positives.any():
        raise ValueError("no anchor has a positive in the batch; batches need runs of adjacent slices of one subject")


def _positive_share_loss(exponents: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over anchors with positives of -log(sum_pos e^x / sum_{j != anchor} e^x).

    Args:
        exponents: (B, B) values x[p, j] whose exponentials are sim or d.
        positives: (B, B) mask from :func:`positive_mask`.
    """
    # Rows without positives are dropped before the log-sum-exp, not after: an all -inf row
    # has a NaN gradient that masking the result would not remove.
    anchors = positives.any(dim=1)
    eye = torch.eye(len(exponents), dtype=torch.bool, device=exponents.device)[anchors]
    exponents, positives = exponents[anchors], positives[anchors]
    # The denominator sum_neg + sum_pos is the sum over every item but the anchor.
    log_all = torch.logsumexp(exponents.masked_fill(eye, float("-inf")), dim=1)
    log_pos = torch.logsumexp(exponents.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


def contrastive_loss(embeddings: torch.Tensor, positives: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """L_contrast with sim(a, b) = exp(phi(a) . phi(b) / alpha).

    Args:
        embeddings: (B, D) embeddings phi (unit norm from the encoder).
        positives: (B, B) bool mask from :func:`positive_mask`.
        alpha: temperature, > 0.

    Returns:
        Scalar loss, the mean over anchors that have a positive.

    Raises:
        ValueError: bad shapes, ``alpha <= 0``, or no anchor with a positive.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    _check_positives(positives, len(embeddings))
    return _positive_share_loss(embeddings @ embeddings.T / alpha, positives)


def perceptual_loss(features: Sequence[torch.Tensor], positives: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """L_percept with d(a, b) = exp(-||f(a) - f(b)||^2 / beta), averaged over feature layers.

    The mean (not the sum) over layers keeps the weight lambda independent of how many
    encoder blocks feed the term.

    Args:
        features: one (B, F) tensor per feature layer (F may differ between layers).
        positives: (B, B) bool mask from :func:`positive_mask`.
        beta: distance scale, > 0.

    Returns:
        Scalar loss.

    Raises:
        ValueError: no layers, bad shapes, ``beta <= 0``, or no anchor with a positive.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not features:
        raise ValueError("features must hold at least one (B, F) layer")
    batch = len(features[0])
    if any(f.ndim != 2 or len(f) != batch for f in features):
        raise ValueError(
            f"every feature layer must be (B, F) with B = {batch}, got shapes {[tuple(f.shape) for f in features]}"
        )
    _check_positives(positives, batch)
    losses = []
    for f in features:
        squared_norms = (f * f).sum(dim=1)
        # ||a||^2 + ||b||^2 - 2 a.b: avoids a (B, B, F) difference tensor; the clamp removes
        # rounding below 0 and, unlike cdist, has a finite gradient at zero distance.
        squared_distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * f @ f.T).clamp_min(0)
        losses.append(_positive_share_loss(-squared_distances / beta, positives))
    return torch.stack(losses).mean()


def retrieval_loss(
    embeddings: torch.Tensor,
    features: Sequence[torch.Tensor],
    positives: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    percept_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_contrast + lambda * L_percept.

    Args:
        embeddings: (B, D) embeddings phi.
        features: the encoder's perceptual features, one (B, F) tensor per layer.
        positives: (B, B) bool mask from :func:`positive_mask`.
        alpha: contrastive temperature, > 0.
        beta: perceptual distance scale, > 0.
        percept_weight: lambda, >= 0.

    Returns:
        The total loss and its detached parts ``{"contrast": ..., "percept": ...}``.

    Raises:
        ValueError: invalid arguments (see the two terms) or ``percept_weight < 0``.
    """
    if percept_weight < 0:
        raise ValueError(f"percept_weight (lambda) must be >= 0, got {percept_weight}")
    contrast = contrastive_loss(embeddings, positives, alpha)
    percept = perceptual_loss(features, positives, beta)
    return contrast + percept_weight * percept, {"contrast": contrast.detach(), "percept": percept.detach()}
