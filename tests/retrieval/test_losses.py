"""Retrieval losses against hand computations (METHOD.md section 2), and the adjacent-run batches.

The sampler tests live here beside the losses they feed: the batches exist to put each anchor's
positives p+1 .. p+K into the batch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from lib.data.dataset import PreparedDataset
from lib.data.prepare import PrepareConfig, prepare_dataset
from lib.io.checkpoint import load_checkpoint, save_checkpoint
from lib.models.retrieval_encoder import RetrievalConfig, build_retrieval_encoder
from lib.retrieval.batches import AdjacentRunSampler, load_run_batch
from lib.retrieval.losses import contrastive_loss, perceptual_loss, positive_mask, retrieval_loss
from tests.conftest import SHARED_DATA, require


def unit(*values: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def looped_loss(vectors: list[list[float]], subjects: list[str], slices: list[int], k: int, exponent) -> float:
    """The METHOD.md ratio with explicit loops: -log(sum_pos / (sum_neg + sum_pos)), mean over anchors."""
    losses = []
    for p in range(len(vectors)):
        positive_sum = negative_sum = 0.0
        for j in range(len(vectors)):
            if j == p:
                continue
            value = math.exp(exponent(vectors[p], vectors[j]))
            if subjects[j] == subjects[p] and 1 <= slices[j] - slices[p] <= k:
                positive_sum += value
            else:
                negative_sum += value
        if positive_sum > 0:
            losses.append(-math.log(positive_sum / (negative_sum + positive_sum)))
    return sum(losses) / len(losses)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def squared_distance(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b))


# Two subjects; with K = 2 the anchors with positives are a4 (a5, a6), b5 (b6) and a5 (a6).
SUBJECTS = ["a", "b", "a", "a", "b", "a"]
SLICES = [4, 5, 5, 6, 6, 9]
EMBEDDINGS = [unit(1, 0, 0), unit(0, 1, 1), unit(1, 1, 0), unit(1, 0, 1), unit(0, 1, 0), unit(1, 1, 1)]
FEATURES = [
    [unit(1, 2), unit(2, 1), unit(1, 1), unit(-1, 1), unit(3, 1), unit(1, -2)],
    [unit(0, 1, 0), unit(1, 0, 0), unit(0, 1, 1), unit(1, 1, 0), unit(0, 0, 1), unit(1, 2, 3)],
]


def test_positive_mask_is_same_subject_next_k_slices_only():
    subjects = ["s", "s", "s", "s", "t", "t", "s"]
    slices = torch.tensor([10, 11, 12, 13, 11, 9, 10])  # the last item repeats s10
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for anchor, positive in [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (5, 4), (6, 1), (6, 2)]:
        expected[anchor, positive] = True
    torch.testing.assert_close(positive_mask(subjects, slices, k=2), expected)
    # K = 1 keeps only the very next slice; never p-1, another subject's p+1, the anchor or its duplicate.
    expected_k1 = torch.zeros(7, 7, dtype=torch.bool)
    for anchor, positive in [(0, 1), (1, 2), (2, 3), (6, 1)]:
        expected_k1[anchor, positive] = True
    torch.testing.assert_close(positive_mask(subjects, slices, k=1), expected_k1)


def test_losses_match_the_closed_form_on_three_items():
    # a0 -> a1 is the only positive pair; b0 is a0's only negative.
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    positives = positive_mask(["a", "a", "b"], torch.tensor([0, 1, 0]), k=1)
    # -log(e^1 / (e^0 + e^1)) and -log(e^0 / (e^-2 + e^0)): ||a0 - b0||^2 = 2.
    contrast, percept = math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))
    assert contrastive_loss(embeddings, positives).item() == pytest.approx(contrast, rel=1e-6)
    assert perceptual_loss([embeddings], positives).item() == pytest.approx(percept, rel=1e-6)
    total, parts = retrieval_loss(embeddings, [embeddings], positives)
    assert total.item() == pytest.approx(contrast + 0.5 * percept, rel=1e-6)
    assert parts["contrast"].item() == pytest.approx(contrast, rel=1e-6) and parts["percept"].item() == pytest.approx(
        percept, rel=1e-6
    )


@pytest.mark.parametrize("alpha, beta, k", [(1.0, 1.0, 2), (0.3, 2.5, 2), (0.7, 0.4, 1), (1.0, 1.0, 5)])
def test_losses_match_a_looped_computation(alpha, beta, k):
    positives = positive_mask(SUBJECTS, torch.tensor(SLICES), k=k)
    expected_contrast = looped_loss(EMBEDDINGS, SUBJECTS, SLICES, k, lambda a, b: dot(a, b) / alpha)
    per_layer = [
        looped_loss(layer, SUBJECTS, SLICES, k, lambda a, b: -squared_distance(a, b) / beta) for layer in FEATURES
    ]
    contrast = contrastive_loss(torch.tensor(EMBEDDINGS, dtype=torch.float64), positives, alpha)
    percept = perceptual_loss([torch.tensor(layer, dtype=torch.float64) for layer in FEATURES], positives, beta)
    assert contrast.item() == pytest.approx(expected_contrast, rel=1e-10)
    # The perceptual term is the mean (not the sum) over feature layers.
    assert percept.item() == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-10)


def test_perceptual_loss_is_scale_consistent_and_finite_for_large_feature_norms():
    positives = positive_mask(SUBJECTS, torch.tensor(SLICES), k=2)
    layers = [torch.tensor(layer, dtype=torch.float64) * 100 for layer in FEATURES]
    # Scaling f by 100 and beta by 100^2 leaves every d unchanged.
    expected = (
        sum(looped_loss(layer, SUBJECTS, SLICES, 2, lambda a, b: -squared_distance(a, b)) for layer in FEATURES) / 2
    )
    assert perceptual_loss(layers, positives, beta=1e4).item() == pytest.approx(expected, rel=1e-10)
    # At beta = 1 every d is below exp(-1000) and a direct ratio would be 0 / 0; the log-space form is not.
    assert torch.isfinite(perceptual_loss(layers, positives, beta=1.0))


def test_aligned_embeddings_score_lower_than_shuffled_ones():
    subjects = [s for s in "abc" for _ in range(3)]
    slices = torch.tensor([0, 1, 2] * 3)
    positives = positive_mask(subjects, slices, k=2)
    aligned = torch.eye(3).repeat_interleave(3, dim=0)  # each subject's slices share one axis
    shuffled = aligned[torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8])]  # each run spans all three subjects' axes
    for loss in (lambda e: contrastive_loss(e, positives), lambda e: perceptual_loss([e], positives)):
        assert loss(aligned).item() < loss(shuffled).item() - 0.5


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_lambda_weights_the_perceptual_term(weight):
    positives = positive_mask(SUBJECTS, torch.tensor(SLICES), k=2)
    embeddings = torch.tensor(EMBEDDINGS)
    features = [torch.tensor(layer) for layer in FEATURES]
    total, parts = retrieval_loss(embeddings, features, positives, percept_weight=weight)
    assert parts["percept"].item() > 0.1
    assert total.item() == pytest.approx(parts["contrast"].item() + weight * parts["percept"].item(), rel=1e-6)


def test_gradients_are_finite_with_identical_items_and_anchors_without_positives():
    embeddings = torch.tensor([[1.0, 0.0]] * 4, requires_grad=True)
    features = torch.tensor([[0.5, 0.5, 0.0]] * 4, requires_grad=True)
    positives = positive_mask(["a", "a", "b", "b"], torch.tensor([0, 1, 0, 7]), k=1)  # only a0 is an anchor
    total, _ = retrieval_loss(embeddings, [features], positives)
    total.backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(features.grad).all()
    assert total.item() == pytest.approx(1.5 * math.log(3), rel=1e-6)  # 1 positive among 3 equals


def test_invalid_arguments_raise_with_the_accepted_values():
    embeddings = torch.tensor(EMBEDDINGS)
    positives = positive_mask(SUBJECTS, torch.tensor(SLICES), k=2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        positive_mask(SUBJECTS, torch.tensor(SLICES), k=0)
    with pytest.raises(ValueError, match="integer tensor"):
        positive_mask(SUBJECTS, torch.tensor(SLICES, dtype=torch.float32))
    with pytest.raises(ValueError, match="6 subjects but 5"):
        positive_mask(SUBJECTS, torch.tensor(SLICES[:5]))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        contrastive_loss(embeddings, positives, alpha=0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        perceptual_loss([embeddings], positives, beta=-1)
    with pytest.raises(ValueError, match="lambda"):
        retrieval_loss(embeddings, [embeddings], positives, percept_weight=-0.1)
    with pytest.raises(ValueError, match="at least one"):
        perceptual_loss([], positives)
    with pytest.raises(ValueError, match=r"\(6, 6\) bool"):
        contrastive_loss(embeddings, positives.float())
    with pytest.raises(ValueError, match="own positive"):
        contrastive_loss(embeddings, positives | torch.eye(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="no anchor has a positive"):
        contrastive_loss(embeddings, torch.zeros(6, 6, dtype=torch.bool))


# --- adjacent-run batches -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("retrieval") / "prepared"
    prepare_dataset("brats", require(SHARED_DATA / "brats_dev"), out, config=PrepareConfig(size=32), max_subjects=3)
    return PreparedDataset(out)


def test_every_batch_is_runs_of_adjacent_brain_slices_of_distinct_subjects(prepared):
    table = prepared.slices
    sampler = AdjacentRunSampler(table, None, 0.2, subjects_per_batch=2, run_length=4, seed=0)
    assert sampler.batch_size == 8 and len(sampler.subjects) == 3
    seen = set()
    for _, rows in zip(range(30), sampler):
        assert len(rows) == 8
        runs = table.loc[rows].reset_index(drop=True)
        assert (runs["brain_fraction"] >= 0.2).all()
        run_subjects = []
        for start in range(0, 8, 4):
            run = runs.iloc[start : start + 4]
            assert run["subject"].nunique() == 1
            assert np.array_equal(np.diff(run["slice"].to_numpy()), [1, 1, 1])
            run_subjects.append(run["subject"].iloc[0])
        assert len(set(run_subjects)) == 2
        seen.update(run_subjects)
    assert seen == set(prepared.subjects())


def test_runs_never_bridge_a_slice_that_was_filtered_out():
    table = pd.DataFrame(
        {
            "subject": ["x"] * 6 + ["y"] * 3,
            "split": ["train"] * 6 + ["val"] * 3,
            "slice": [0, 1, 2, 3, 4, 5, 0, 1, 2],
            "brain_fraction": [0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        },
        index=range(100, 109),
    )
    sampler = AdjacentRunSampler(table, "train", 0.1, subjects_per_batch=1, run_length=2, seed=3)
    runs = {tuple(sampler.next_batch()) for _ in range(60)}
    assert runs == {(100, 101), (103, 104), (104, 105)}  # labels of table.index, slice 2 never used
    sampler = AdjacentRunSampler(table, "train", 0.1, subjects_per_batch=1, run_length=3, seed=3)
    assert {tuple(sampler.next_batch()) for _ in range(10)} == {(103, 104, 105)}


def test_sampler_is_deterministic_under_a_seed_and_resumes_exactly(prepared, tmp_path):
    def make(seed: int = 7, run_length: int = 3) -> AdjacentRunSampler:
        return AdjacentRunSampler(prepared.slices, None, 0.1, subjects_per_batch=2, run_length=run_length, seed=seed)

    a, b, c = make(), make(), make(seed=8)
    batches_a = [a.next_batch() for _ in range(5)]
    assert all(np.array_equal(x, b.next_batch()) for x in batches_a)
    assert not all(np.array_equal(x, c.next_batch()) for x in batches_a)

    interrupted = make()
    for _ in range(2):
        interrupted.next_batch()
    save_checkpoint(tmp_path / "sampler.pt", {"sampler": interrupted.state_dict()})
    resumed = make(seed=123)  # the seed is part of the state: a different one is refused
    with pytest.raises(ValueError, match=r"differs in \['seed'\]"):
        resumed.load_state_dict(load_checkpoint(tmp_path / "sampler.pt")["sampler"])
    resumed = make()
    resumed.next_batch()  # consumed state is overwritten by the loaded one
    resumed.load_state_dict(load_checkpoint(tmp_path / "sampler.pt")["sampler"])
    for expected in batches_a[2:]:
        assert np.array_equal(resumed.next_batch(), expected)
    with pytest.raises(ValueError, match="run_length"):
        make(run_length=4).load_state_dict(interrupted.state_dict())


def test_sampler_rejects_splits_too_small_for_the_request(prepared):
    with pytest.raises(ValueError, match="split 'train' has 1 subjects.*fewer than subjects_per_batch = 2"):
        AdjacentRunSampler(prepared.slices, "train", 0.1, subjects_per_batch=2, run_length=3)
    with pytest.raises(ValueError, match="has 0 subjects with a run of 200"):
        AdjacentRunSampler(prepared.slices, None, 0.0, subjects_per_batch=1, run_length=200)
    with pytest.raises(ValueError, match="has 0 subjects"):
        AdjacentRunSampler(prepared.slices, None, 1.1, subjects_per_batch=1, run_length=2)
    with pytest.raises(ValueError, match="run_length must be >= 2"):
        AdjacentRunSampler(prepared.slices, None, 0.0, subjects_per_batch=1, run_length=1)
    with pytest.raises(ValueError, match="subjects_per_batch must be >= 1"):
        AdjacentRunSampler(prepared.slices, None, 0.0, subjects_per_batch=0, run_length=2)


def test_loaded_batch_feeds_the_encoder_and_the_loss(prepared):
    sampler = AdjacentRunSampler(prepared.slices, None, 0.1, subjects_per_batch=3, run_length=3, seed=1)
    rows = sampler.next_batch()
    batch = load_run_batch(prepared, rows)
    assert batch.source.shape == (9, 1, 32, 32) and batch.source.dtype == torch.float32
    table = prepared.slices.loc[rows]
    assert batch.subjects == list(table["subject"]) and batch.slices.tolist() == list(table["slice"])
    np.testing.assert_allclose(batch.positions.numpy(), table["position"].to_numpy(), rtol=1e-6)
    for item in (0, 4, 8):
        np.testing.assert_array_equal(
            batch.source[item, 0].numpy(), prepared.array(batch.subjects[item], "source")[batch.slices[item]]
        )
    positives = positive_mask(batch.subjects, batch.slices, k=2)
    assert positives.sum().item() == 3 * (2 + 1)  # per run of 3: first slice has 2 positives, second 1
    torch.manual_seed(0)
    config = RetrievalConfig(
        image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=16, perceptual_blocks=(0, 1)
    )
    embeddings, features = build_retrieval_encoder(config)(batch.source)
    total, _ = retrieval_loss(embeddings, features, positives)
    total.backward()
    assert torch.isfinite(total)
