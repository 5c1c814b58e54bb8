"""Retrieval accuracy as in METHOD.md section 2, on held-out subjects.

Each held-out subject's brain slices are split in two interleaved halves (even and odd slice
rows): the even half of every subject forms the database, the odd half the queries. A query
is a subject hit when its top-1 database slice (cosine similarity) is of the same subject,
and a position hit when it is also within ``position_tolerance`` in normalised position.

That protocol is easy: the database holds each query's own neighbouring slices, nearly
identical images, so even a random encoder scores close to 1 on it. The pipeline never
retrieves from the query's own subject, so we also report the cross-subject position
accuracy: every slice queries the slices of the OTHER held-out subjects, and is a hit when
the top-1 lies within ``position_tolerance`` (the right anatomical level in another head).
"""

from __future__ import annotations

import numpy as np
import torch

from lib.data.dataset import PreparedDataset, select_slices
from lib.models.retrieval_encoder import RetrievalEncoder, embed_slices


def held_out_slices(
    dataset: PreparedDataset, split: str, min_brain_fraction: float = 0.05
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The CT slices of a split with enough brain, with their subject keys and positions.

    Raises:
        ValueError: when the split has fewer than two subjects (no wrong subject to confuse).
    """
    table = select_slices(dataset.slices, split, min_brain_fraction)
    if table["subject"].nunique() < 2:
        raise ValueError(
            f"{dataset.root}: retrieval accuracy needs at least 2 subjects in split {split!r}, found "
            f"{table['subject'].nunique()}"
        )
    slices = np.stack(
        [dataset.array(str(s), "source")[int(i)] for s, i in zip(table["subject"], table["slice"])]
    ).astype(np.float32)
    return slices, [str(s) for s in table["subject"]], table["position"].to_numpy(dtype=np.float64)


def retrieval_accuracy(
    model: RetrievalEncoder,
    dataset: PreparedDataset,
    split: str = "val",
    position_tolerance: float = 0.1,
    min_brain_fraction: float = 0.05,
) -> dict[str, float]:
    """Top-1 subject and subject+position accuracy of queries against the other half.

    Returns:
        ``subject_accuracy``, ``position_accuracy`` (interleaved halves), ``queries`` (their
        count) and ``cross_subject_position_accuracy`` (every slice against other subjects).
    """
    slices, subjects, positions = held_out_slices(dataset, split, min_brain_fraction)
    embeddings = embed_slices(model, torch.from_numpy(slices[:, None]))
    subjects_array = np.asarray(subjects)
    # Interleave within each subject: rows alternate between database and query halves.
    rank_in_subject = np.zeros(len(subjects), dtype=int)
    for subject in np.unique(subjects_array):
        members = np.nonzero(subjects_array == subject)[0]
        rank_in_subject[members] = np.arange(len(members))
    database, queries = rank_in_subject % 2 == 0, rank_in_subject % 2 == 1
    similarities = embeddings[queries] @ embeddings[database].T
    best = similarities.argmax(axis=1)
    same_subject = subjects_array[database][best] == subjects_array[queries]
    near = np.abs(positions[database][best] - positions[queries]) <= position_tolerance
    # Cross-subject: mask out each query's own subject, then take the top-1 of the rest.
    all_similarities = embeddings @ embeddings.T
    all_similarities[subjects_array[:, None] == subjects_array[None, :]] = -np.inf
    cross_best = all_similarities.argmax(axis=1)
    return {
        "subject_accuracy": float(same_subject.mean()),
        "position_accuracy": float((same_subject & near).mean()),
        "cross_subject_position_accuracy": float(
            (np.abs(positions[cross_best] - positions) <= position_tolerance).mean()
        ),
        "queries": int(queries.sum()),
    }
