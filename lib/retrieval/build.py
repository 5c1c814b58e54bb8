"""Building the knowledge base from a prepared dataset and a trained retrieval encoder."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch

from lib.data.dataset import MIN_INPUT_COVERAGE, PreparedDataset, PreparedSlices
from lib.models.retrieval_encoder import embed_slices, encoder_hash, load_retrieval_encoder
from lib.retrieval.knowledge_base import KnowledgeBase


def build_knowledge_base(
    data: str | os.PathLike[str],
    encoder_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    min_brain_fraction: float = 0.05,
    tau_percentile: float = 5.0,
    overwrite: bool = False,
    slice_step: int = 1,
) -> KnowledgeBase:
    """Embed the CT slices of a split (the training subjects) and store the knowledge base.

    Entries carry only the anonymised subject key, the slice index and the normalised
    position; the paired CT and MRI slices are stored beside the index. Slices whose input
    covers less of the brain than :data:`~lib.data.dataset.MIN_INPUT_COVERAGE` are left out.

    Args:
        slice_step: keep every ``slice_step``-th slice of each subject (slice index divisible by
            it). Adjacent 1 mm slices are near-duplicates for retrieval (normalised positions
            ~0.007 apart against a position tolerance of 0.1), and at 128 x 128 every slice of
            20 subjects is 161 MB of float16, more than a preset should weigh.

    Raises:
        ValueError: no slices in the split, or an unreadable encoder.
    """
    if slice_step < 1:
        raise ValueError(f"slice_step must be >= 1, got {slice_step}")
    dataset = PreparedDataset(data)
    model, config = load_retrieval_encoder(encoder_path)
    # The training sets' own selection (split, brain fraction, input coverage), then the step.
    selected = PreparedSlices(dataset, split, min_brain_fraction, min_input_coverage=MIN_INPUT_COVERAGE).table
    table = selected[selected["slice"] % slice_step == 0]
    if table.empty:
        raise ValueError(
            f"{data}: none of the {len(selected)} slices of split {split!r} has an index divisible by {slice_step}"
        )
    subjects = [str(s) for s in table["subject"]]
    indices = table["slice"].to_numpy(dtype=int)
    ct = np.stack([dataset.array(s, "source")[i] for s, i in zip(subjects, indices)]).astype(np.float32)
    mri = np.stack([dataset.array(s, "target")[i] for s, i in zip(subjects, indices)]).astype(np.float32)
    embeddings = embed_slices(model, torch.from_numpy(ct[:, None]))
    entries = pd.DataFrame(
        {"subject": subjects, "slice": indices, "position": table["position"].to_numpy(dtype=np.float64)}
    )
    return KnowledgeBase.build(
        out,
        embeddings,
        entries,
        ct,
        mri,
        encoder_hash(model, config),
        config.to_dict(),
        tau_percentile=tau_percentile,
        overwrite=overwrite,
    )
