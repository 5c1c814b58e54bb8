"""Building the knowledge base from a prepared dataset and a trained retrieval encoder."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch

from lib.data.dataset import PreparedDataset
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
) -> KnowledgeBase:
    """Embed every CT slice of a split (the training subjects) and store the knowledge base.

    Entries carry only the anonymised subject key, the slice index and the normalised
    position; the paired CT and MRI slices are stored beside the index.

    Raises:
        ValueError: no slices in the split, or an unreadable encoder.
    """
    dataset = PreparedDataset(data)
    model, config = load_retrieval_encoder(encoder_path)
    table = dataset.slices[
        (dataset.slices["split"] == split) & (dataset.slices["brain_fraction"] >= min_brain_fraction)
    ]
    if table.empty:
        raise ValueError(f"{data}: no slices in split {split!r} with brain fraction >= {min_brain_fraction}")
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
