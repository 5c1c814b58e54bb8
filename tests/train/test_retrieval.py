"""Retrieval encoder training, held-out accuracy and knowledge-base building on real slices."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from lib.data.dataset import PreparedDataset
from lib.data.prepare import PrepareConfig, prepare_dataset
from lib.models.retrieval_encoder import (
    RetrievalConfig,
    build_retrieval_encoder,
    embed_slices,
    encoder_hash,
    load_retrieval_encoder,
)
from lib.retrieval.build import build_knowledge_base
from lib.retrieval.evaluation import held_out_slices, retrieval_accuracy
from lib.retrieval.knowledge_base import KnowledgeBase, KnowledgeBaseError
from lib.train.retrieval import RetrievalTrainConfig, train_retrieval
from lib.train.run_folder import RunExistsError
from tests.conftest import SHARED_DATA, require

TINY = RetrievalConfig(
    image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=16, perceptual_blocks=(0, 1)
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval") / "prepared"
    # 5 subjects: 3 train, 1 val, 1 test would leave val with one subject; use 0.4 / 0.2.
    prepare_dataset(
        "brats",
        require(SHARED_DATA / "brats_dev"),
        out,
        config=PrepareConfig(size=32, val_fraction=0.4, test_fraction=0.2),
        max_subjects=5,
    )
    return out


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "encoder"
    settings = dict(subjects_per_batch=2, run_length=4, eval_every=2, checkpoint_every=2, seed=1)
    train_retrieval(prepared, run, TINY, RetrievalTrainConfig(iters=4, **settings))
    return run, settings


def test_resumed_training_equals_an_uninterrupted_run(prepared, trained, tmp_path):
    run, settings = trained
    train_retrieval(prepared, tmp_path / "split", TINY, RetrievalTrainConfig(iters=2, **settings))
    with pytest.raises(RunExistsError, match="resume=True continues it"):
        train_retrieval(prepared, tmp_path / "split", TINY, RetrievalTrainConfig(iters=4, **settings))
    train_retrieval(prepared, tmp_path / "split", TINY, RetrievalTrainConfig(iters=4, **settings), resume=True)
    whole, split = (pd.read_csv(path / "loss.csv") for path in (run, tmp_path / "split"))
    assert list(whole.iteration) == [1, 2, 3, 4]
    np.testing.assert_array_equal(whole.loss, split.loss)
    np.testing.assert_allclose(whole.loss, whole.contrast + 0.5 * whole.percept, rtol=1e-4)
    assert len(pd.read_csv(run / "accuracy.csv")) == 2
    first, _ = load_retrieval_encoder(run / "encoder.pt")
    second, _ = load_retrieval_encoder(tmp_path / "split" / "encoder.pt")
    assert encoder_hash(first, TINY) == encoder_hash(second, TINY)


def test_accuracy_follows_the_protocol(prepared, trained):
    """Recompute the interleaved-halves top-1 protocol by brute force on the same embeddings."""
    run, _ = trained
    model, _ = load_retrieval_encoder(run / "encoder.pt")
    dataset = PreparedDataset(prepared)
    result = retrieval_accuracy(model, dataset, "val", position_tolerance=0.1)
    slices, subjects, positions = held_out_slices(dataset, "val")
    embeddings = embed_slices(model, torch.from_numpy(slices[:, None]))
    seen: dict[str, int] = {}
    halves = []
    for subject in subjects:
        halves.append(seen.get(subject, 0) % 2)
        seen[subject] = seen.get(subject, 0) + 1
    database = [i for i, h in enumerate(halves) if h == 0]
    hits = near = 0
    queries = [i for i, h in enumerate(halves) if h == 1]
    for q in queries:
        best = max(database, key=lambda d: float(embeddings[q] @ embeddings[d]))
        hits += subjects[best] == subjects[q]
        near += subjects[best] == subjects[q] and abs(positions[best] - positions[q]) <= 0.1
    assert result["queries"] == len(queries)
    assert result["subject_accuracy"] == pytest.approx(hits / len(queries))
    assert result["position_accuracy"] == pytest.approx(near / len(queries))
    cross = 0
    for q in range(len(subjects)):
        others = [d for d in range(len(subjects)) if subjects[d] != subjects[q]]
        best = max(others, key=lambda d: float(embeddings[q] @ embeddings[d]))
        cross += abs(positions[best] - positions[q]) <= 0.1
    assert result["cross_subject_position_accuracy"] == pytest.approx(cross / len(subjects))


def test_build_kb_from_encoder_round_trips_and_checks_the_encoder(prepared, trained, tmp_path):
    run, _ = trained
    kb = build_knowledge_base(prepared, run / "encoder.pt", tmp_path / "kb")
    model, config = load_retrieval_encoder(run / "encoder.pt")
    dataset = PreparedDataset(prepared)
    train_slices = dataset.slices[(dataset.slices.split == "train") & (dataset.slices.brain_fraction >= 0.05)]
    assert len(kb.entries) == len(train_slices)
    assert all(str(key).startswith("sub-") for key in kb.entries.subject)
    loaded = KnowledgeBase.load(tmp_path / "kb", expected_encoder_hash=encoder_hash(model, config))
    # Querying with an entry's own CT slice finds an entry with identical CT (itself), similarity 1.
    row = loaded.entries.iloc[len(loaded.entries) // 2]
    ct = dataset.array(row.subject, "source")[int(row.slice)]
    embedding = embed_slices(model, torch.from_numpy(np.array(ct)[None, None]))
    result = loaded.query(embedding, np.array([row.position]), k=1)[0]
    assert result.similarity == pytest.approx(1.0, abs=1e-3)

    np.testing.assert_allclose(loaded.ct_slice(result.entry_id), ct, atol=1e-3)  # float16 storage
    np.testing.assert_allclose(
        loaded.mri_slice(result.entry_id), dataset.array(result.subject, "target")[result.slice_index], atol=1e-3
    )
    torch.manual_seed(99)
    with pytest.raises(KnowledgeBaseError, match="encoder"):
        KnowledgeBase.load(tmp_path / "kb", expected_encoder_hash=encoder_hash(build_retrieval_encoder(TINY), TINY))


def test_build_kb_keeps_every_kth_slice_and_leaves_out_slices_without_input(prepared, trained, tmp_path):
    run, _ = trained
    full = build_knowledge_base(prepared, run / "encoder.pt", tmp_path / "full")
    thinned = build_knowledge_base(prepared, run / "encoder.pt", tmp_path / "thin", slice_step=3)
    assert (thinned.entries.slice % 3 == 0).all()
    kept = full.entries[full.entries.slice % 3 == 0]
    assert set(zip(thinned.entries.subject, thinned.entries.slice)) == set(zip(kept.subject, kept.slice))
    first_thin = thinned.entries.iloc[0]
    same = kept[(kept.subject == first_thin.subject) & (kept.slice == first_thin.slice)].index[0]
    assert np.array_equal(thinned.mri_slice(0), full.mri_slice(int(same)))
    # A slice whose input misses most of the brain (prepare's input_coverage) is not an entry.
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    table = pd.read_csv(copy / "slices.csv")
    first = full.entries.iloc[0]
    table.loc[(table.subject == first.subject) & (table.slice == first.slice), "input_coverage"] = 0.5
    table.to_csv(copy / "slices.csv", index=False)
    without = build_knowledge_base(copy, run / "encoder.pt", tmp_path / "without")
    assert len(without.entries) == len(full.entries) - 1
    assert not ((without.entries.subject == first.subject) & (without.entries.slice == first.slice)).any()
    with pytest.raises(ValueError, match="slice_step"):
        build_knowledge_base(prepared, run / "encoder.pt", tmp_path / "bad", slice_step=0)
