"""The knowledge base: build/load round trip, position and subject filters, tau, the HNSW path,
and refusal of damaged, incomplete or foreign knowledge bases."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pandas as pd
import pytest

from lib.retrieval import knowledge_base
from lib.retrieval.knowledge_base import (
    EmbeddingIndex,
    HNSWParams,
    IndexKind,
    KnowledgeBase,
    KnowledgeBaseError,
    compute_tau,
    sample_pairs,
)
from tests.conftest import SHARED_DATA, require

ENCODER = "enc-0123abcd"
DIM = 32
SUBJECTS = 8
SLICES = 60


def structured_data(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, np.ndarray]:
    """Embeddings that vary smoothly with axial position plus a subject offset, as an encoder's
    would, with entries given subject by subject (not sorted by position)."""
    rng = np.random.default_rng(seed)
    level_basis = rng.standard_normal((4, DIM))
    rows, vectors = [], []
    for subject in range(SUBJECTS):
        key = f"sub-{subject:010x}"
        offset = rng.standard_normal(DIM)
        positions = np.sort(rng.uniform(-0.1, 1.1, SLICES))
        for index, position in enumerate(positions):
            level = (
                np.concatenate([np.cos(np.pi * position * np.arange(1, 3)), np.sin(np.pi * position * np.arange(1, 3))])
                @ level_basis
            )
            vectors.append(2 * level + 0.6 * offset + 0.3 * rng.standard_normal(DIM))
            rows.append((key, index, position))
    embeddings = np.asarray(vectors, dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    count = len(rows)
    ct = rng.uniform(-1, 1, (count, 8, 8)).astype(np.float32)
    mri = rng.uniform(-1, 1, (count, 8, 8)).astype(np.float32)
    return embeddings, pd.DataFrame(rows, columns=["subject", "slice", "position"]), ct, mri


def build(out, data, **kwargs) -> KnowledgeBase:
    embeddings, entries, ct, mri = data
    return KnowledgeBase.build(
        out, embeddings, entries, ct, mri, ENCODER, {"model": "vit-tiny", "dim": DIM}, tau_pairs=20_000, **kwargs
    )


def noisy_queries(embeddings: np.ndarray, count: int, noise: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Perturbed copies of random entries: (queries, source rows)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(embeddings), count, replace=False)
    queries = embeddings[rows] + noise * rng.standard_normal((count, embeddings.shape[1])).astype(np.float32) / np.sqrt(
        embeddings.shape[1]
    )
    return queries / np.linalg.norm(queries, axis=1, keepdims=True), rows


def brute_force(
    kb: KnowledgeBase,
    embeddings: np.ndarray,
    query: np.ndarray,
    position: float | None,
    tolerance: float,
    exclude: str | None,
    k: int,
):
    """Top-k (ids, similarities) in the knowledge base's id order, by direct numpy computation.

    ``embeddings`` are the knowledge base's vectors in id order."""
    similarities = embeddings @ query
    keep = np.ones(len(kb), dtype=bool)
    if position is not None:
        positions = kb.entries["position"].to_numpy()
        keep &= (positions >= position - tolerance) & (positions <= position + tolerance)
    if exclude is not None:
        keep &= kb.entries["subject"].to_numpy() != exclude
    ids = np.flatnonzero(keep)
    order = np.argsort(-similarities[ids], kind="stable")[:k]
    return ids[order], similarities[ids[order]]


def kb_vectors(kb: KnowledgeBase, data) -> np.ndarray:
    """The input embeddings reordered to the knowledge base's id order."""
    embeddings, entries, _, _ = data
    lookup = {(s, int(i)): row for row, (s, i) in enumerate(zip(entries["subject"], entries["slice"]))}
    return embeddings[[lookup[(s, int(i))] for s, i in zip(kb.entries["subject"], kb.entries["slice"])]]


@pytest.fixture(scope="module")
def data():
    return structured_data()


@pytest.fixture(scope="module")
def flat_kb(tmp_path_factory, data) -> KnowledgeBase:
    return build(tmp_path_factory.mktemp("kb") / "kb", data)


@pytest.fixture(scope="module")
def hnsw_kb(tmp_path_factory, data) -> KnowledgeBase:
    return build(tmp_path_factory.mktemp("kb") / "kb_hnsw", data, index_threshold=10)


def test_build_sorts_by_position_and_load_round_trips(flat_kb, data):
    embeddings, entries, ct, mri = data
    root = flat_kb.root
    assert sorted(p.name for p in root.parent.iterdir()) == ["kb"]  # no temporary folder left
    assert sorted(p.name for p in root.iterdir()) == [
        "ct.npy",
        "entries.csv",
        "index.faiss",
        "manifest.json",
        "mri.npy",
    ]
    assert flat_kb.index.kind is IndexKind.FLAT and len(flat_kb) == SUBJECTS * SLICES
    assert np.all(np.diff(flat_kb.entries["position"]) >= 0)
    manifest = json.loads((root / "manifest.json").read_text())
    assert (
        manifest["count"] == SUBJECTS * SLICES
        and manifest["dim"] == DIM
        and manifest["encoder"] == {"hash": ENCODER, "config": {"model": "vit-tiny", "dim": DIM}}
    )
    assert (
        manifest["index"]["kind"] == "flat"
        and manifest["tau"]["percentile"] == 5.0
        and manifest["tau"]["pairs"] == 20_000
    )
    assert set(manifest["files"]) == {"index.faiss", "entries.csv", "ct.npy", "mri.npy"}
    # The typed manifest is the file, key for key, and what was written is its JSON.
    assert flat_kb.manifest.to_dict() == manifest and list(flat_kb.manifest.to_dict()) == list(manifest)
    assert (root / "manifest.json").read_text() == json.dumps(flat_kb.manifest.to_dict(), indent=1)
    assert flat_kb.manifest.slice_shape == [8, 8] and flat_kb.manifest.encoder.hash == ENCODER

    # Every entry keeps its own slices and metadata through the reordering.
    lookup = {(s, int(i)): row for row, (s, i) in enumerate(zip(entries["subject"], entries["slice"]))}
    for entry_id in range(0, len(flat_kb), 37):
        row = lookup[(flat_kb.entries["subject"][entry_id], int(flat_kb.entries["slice"][entry_id]))]
        assert flat_kb.entries["position"][entry_id] == entries["position"][row]
        np.testing.assert_array_equal(flat_kb.ct_slice(entry_id), ct[row].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(flat_kb.mri_slice(entry_id), mri[row].astype(np.float16).astype(np.float32))
    assert isinstance(flat_kb._ct, np.memmap)

    loaded = KnowledgeBase.load(root, expected_encoder_hash=ENCODER)
    pd.testing.assert_frame_equal(loaded.entries, flat_kb.entries)
    assert loaded.tau == flat_kb.tau and loaded.manifest == flat_kb.manifest
    queries, _ = noisy_queries(embeddings, 20, 0.5)
    positions = np.linspace(0, 1, 20)
    for before, after in zip(flat_kb.query(queries, positions, k=4), loaded.query(queries, positions, k=4)):
        np.testing.assert_array_equal(before.ids, after.ids)
        np.testing.assert_array_equal(before.similarities, after.similarities)
        assert (before.subject, before.slice_index, before.position, before.success) == (
            after.subject,
            after.slice_index,
            after.position,
            after.success,
        )
        np.testing.assert_array_equal(loaded.mri_slice(after.entry_id), flat_kb.mri_slice(before.entry_id))


def test_query_returns_the_entry_itself_with_its_metadata(flat_kb, data):
    vectors = kb_vectors(flat_kb, data)
    results = flat_kb.query(vectors[[5, 250]], flat_kb.entries["position"].to_numpy()[[5, 250]], k=3)
    for entry_id, result in zip([5, 250], results):
        assert result.entry_id == entry_id and result.similarity == pytest.approx(1.0, abs=1e-5) and result.success
        assert (
            result.subject == flat_kb.entries["subject"][entry_id]
            and result.slice_index == flat_kb.entries["slice"][entry_id]
        )
        assert len(result.ids) == 3 and np.all(np.diff(result.similarities) <= 0)


@pytest.mark.parametrize("tolerance", [0.02, 0.1, 0.3])
def test_position_filter_matches_brute_force(flat_kb, data, tolerance):
    vectors = kb_vectors(flat_kb, data)
    queries, _ = noisy_queries(data[0], 25, 1.0)
    positions = np.random.default_rng(2).uniform(-0.2, 1.2, 25)
    results = flat_kb.query(queries, positions, k=5, position_tolerance=tolerance)
    entry_positions = flat_kb.entries["position"].to_numpy()
    for query, position, result in zip(queries, positions, results):
        ids, similarities = brute_force(flat_kb, vectors, query, position, tolerance, None, 5)
        np.testing.assert_array_equal(result.ids, ids)
        np.testing.assert_allclose(result.similarities, similarities, atol=1e-5)
        assert np.all(np.abs(entry_positions[result.ids] - position) <= tolerance + 1e-12)
    # Without positions nothing is filtered: the unfiltered optimum.
    for query, result in zip(queries, flat_kb.query(queries, None, k=5)):
        np.testing.assert_array_equal(result.ids, brute_force(flat_kb, vectors, query, None, 0, None, 5)[0])


def test_subject_exclusion_drops_the_best_match(flat_kb, data):
    vectors = kb_vectors(flat_kb, data)
    entry_ids = np.array([3, 100, 301, 470])
    subjects = flat_kb.entries["subject"].to_numpy()[entry_ids]
    positions = flat_kb.entries["position"].to_numpy()[entry_ids]
    # The query is the entry itself, so its own subject would win without the exclusion.
    assert [r.entry_id for r in flat_kb.query(vectors[entry_ids], positions)] == entry_ids.tolist()
    per_query = [subjects[0], None, subjects[2], subjects[3]]
    for exclusion in (per_query, subjects[0]):
        results = flat_kb.query(vectors[entry_ids], positions, k=10, exclude_subject=exclusion)
        for row, result in enumerate(results):
            excluded = exclusion if isinstance(exclusion, str) else exclusion[row]
            if excluded is not None:
                assert excluded not in set(flat_kb.entries["subject"].to_numpy()[result.ids])
            ids, _ = brute_force(flat_kb, vectors, vectors[entry_ids[row]], positions[row], 0.1, excluded, 10)
            np.testing.assert_array_equal(result.ids, ids)
    assert results[1].subject != subjects[0]  # one subject excluded for every query


def test_query_without_candidates_fails_softly(flat_kb, data):
    vectors = kb_vectors(flat_kb, data)
    lone = flat_kb.entries["subject"][0]
    results = flat_kb.query(vectors[:2], [5.0, 0.5], position_tolerance=0.1, exclude_subject=[None, lone])
    empty = results[0]
    assert (
        empty.similarity == -np.inf
        and not empty.success
        and empty.entry_id is None
        and empty.subject is None
        and len(empty.ids) == 0
    )
    assert results[1].entry_id is not None and results[1].subject != lone
    # A window holding one entry, whose subject is excluded.
    first = flat_kb.entries.iloc[0]
    assert flat_kb.query(vectors[:1], [first["position"]], position_tolerance=0.0)[0].entry_id == 0
    only_own = flat_kb.query(
        vectors[:1], [first["position"]], position_tolerance=0.0, exclude_subject=first["subject"]
    )[0]
    assert only_own.entry_id is None and not only_own.success and only_own.similarity == -np.inf


def test_tau_is_the_top_percentile_of_random_pair_similarities(flat_kb, data):
    embeddings = data[0]
    first, second = sample_pairs(len(embeddings), 20_000, seed=0)
    assert np.all(first != second) and first.min() >= 0 and max(first.max(), second.max()) < len(embeddings)
    similarities = np.sum(embeddings[first].astype(np.float64) * embeddings[second].astype(np.float64), axis=1)
    direct = np.percentile(similarities, 95.0)
    assert compute_tau(embeddings, 5.0, 20_000, seed=0) == pytest.approx(direct, abs=1e-9)
    assert flat_kb.tau == pytest.approx(direct, abs=1e-9) and flat_kb.manifest.tau.value == flat_kb.tau
    assert np.mean(similarities >= flat_kb.tau) == pytest.approx(0.05, abs=1e-3)
    assert compute_tau(embeddings, 20.0, 20_000) < flat_kb.tau  # a larger p is a lower bar
    with pytest.raises(ValueError, match="percentile"):
        compute_tau(embeddings, 0.0)


def test_approximate_index_agrees_with_exact_and_honours_filters(hnsw_kb, flat_kb, data, monkeypatch):
    # Force the graph search even for small candidate ranges, so that FAISS's selectors on
    # IndexHNSWFlat are what is tested.
    monkeypatch.setattr(knowledge_base, "EXACT_SEARCH_LIMIT", 0)
    assert hnsw_kb.index.kind is IndexKind.HNSW and isinstance(hnsw_kb.index.index, faiss.IndexHNSWFlat)
    assert hnsw_kb.manifest.to_dict()["index"] == {
        "kind": "hnsw",
        "metric": "inner_product",
        "params": {"m": HNSWParams.m, "ef_construction": HNSWParams.ef_construction, "ef_search": HNSWParams.ef_search},
    }
    loaded = KnowledgeBase.load(hnsw_kb.root, ENCODER)
    assert loaded.index.kind is IndexKind.HNSW and loaded.index.ef_search == HNSWParams.ef_search
    queries, rows = noisy_queries(data[0], 40, 0.3)
    positions = data[1]["position"].to_numpy()[rows] + 0.02
    excluded = [None if i % 2 else data[1]["subject"][row] for i, row in enumerate(rows)]
    for kwargs in ({}, {"positions": positions}, {"positions": positions, "exclude_subject": excluded}):
        approximate = loaded.query(queries, k=3, **kwargs)
        exact = flat_kb.query(queries, k=3, **kwargs)
        assert [r.entry_id for r in approximate] == [r.entry_id for r in exact]
        for row, result in enumerate(approximate):
            if "positions" in kwargs:
                assert np.all(np.abs(loaded.entries["position"].to_numpy()[result.ids] - positions[row]) <= 0.1 + 1e-12)
            if kwargs.get("exclude_subject") and excluded[row] is not None:
                assert excluded[row] not in set(loaded.entries["subject"].to_numpy()[result.ids])


def test_short_filtered_graph_search_falls_back_to_exact(monkeypatch):
    # A sparse graph (M=4) with a tiny candidate list and a 4-entry window: the filtered HNSW
    # walk ends before it meets the window, as it can at scale with selective filters.
    monkeypatch.setattr(knowledge_base, "EXACT_SEARCH_LIMIT", 0)
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2000, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    positions = np.sort(rng.uniform(0, 1, 2000))
    subjects = [f"sub-{i % 10:010x}" for i in range(2000)]
    index = EmbeddingIndex.build(
        vectors, positions, subjects, IndexKind.HNSW, HNSWParams(m=4, ef_construction=16, ef_search=4)
    )
    queries = vectors[rng.choice(2000, 10, replace=False)]
    windows = rng.integers(0, 1996, 10)
    query_positions = (positions[windows] + positions[windows + 3]) / 2
    tolerance = float(np.max((positions[windows + 3] - positions[windows]) / 2)) + 1e-12
    lows, highs = (
        np.searchsorted(positions, query_positions - tolerance),
        np.searchsorted(positions, query_positions + tolerance, side="right"),
    )
    short = 0
    for query, low, high in zip(queries, lows, highs):
        _, raw_ids = index.index.search(
            query[None], int(high - low), params=index._search_parameters(int(low), int(high), np.empty(0, np.int64))
        )
        short += int((raw_ids < 0).any())
    assert short > 0, "precondition: the filtered HNSW search comes up short here"
    # k covers every candidate, so the graph search is either complete or short: never merely
    # approximate, which keeps this test deterministic although threaded HNSW builds are not.
    found = index.search(queries, query_positions, k=10, position_tolerance=tolerance, exclude_subject=subjects[0])
    for query, position, (ids, similarities) in zip(queries, query_positions, found):
        keep = np.flatnonzero(
            (positions >= position - tolerance)
            & (positions <= position + tolerance)
            & (np.asarray(subjects) != subjects[0])
        )
        expected = keep[np.argsort(-(vectors[keep] @ query), kind="stable")]
        np.testing.assert_array_equal(ids, expected)
        np.testing.assert_allclose(similarities, vectors[expected] @ query, atol=1e-5)


def test_small_candidate_ranges_skip_the_graph(hnsw_kb, data):
    vectors = kb_vectors(hnsw_kb, data)
    queries, _ = noisy_queries(data[0], 10, 2.0, seed=5)
    positions = np.linspace(0, 1, 10)
    for query, position, result in zip(
        queries, positions, hnsw_kb.query(queries, positions, k=5, position_tolerance=0.05)
    ):
        ids, similarities = brute_force(hnsw_kb, vectors, query, position, 0.05, None, 5)
        np.testing.assert_array_equal(result.ids, ids)
        np.testing.assert_allclose(result.similarities, similarities, atol=1e-5)


def test_invalid_queries_are_refused_or_normalised(flat_kb, data):
    vectors = kb_vectors(flat_kb, data)[:3]
    with pytest.raises(ValueError, match="dimension"):
        flat_kb.query(vectors[:, :16])
    with pytest.raises(ValueError, match="zero vector"):
        flat_kb.query(np.zeros((1, DIM)))
    with pytest.raises(ValueError, match="positions"):
        flat_kb.query(vectors, [0.5, 0.5])
    with pytest.raises(ValueError, match="exclude_subject"):
        flat_kb.query(vectors, exclude_subject=["sub-0000000000"])
    with pytest.raises(ValueError, match="k must"):
        flat_kb.query(vectors, k=0)
    with pytest.warns(UserWarning, match="not L2-normalised"):
        scaled = flat_kb.query(vectors * 3.0)
    assert [r.entry_id for r in scaled] == [r.entry_id for r in flat_kb.query(vectors)]
    with pytest.raises(IndexError):
        flat_kb.ct_slice(len(flat_kb))


@pytest.fixture
def kb_copy(flat_kb, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(flat_kb.root, copy)
    return copy


@pytest.mark.parametrize("name", ["entries.csv", "mri.npy", "index.faiss"])
def test_flipped_bytes_are_detected(kb_copy, name):
    path = kb_copy / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(KnowledgeBaseError, match=f"checksum mismatch in {name}") as error:
        KnowledgeBase.load(kb_copy, ENCODER)
    assert str(kb_copy) in str(error.value)


def test_missing_truncated_and_miscounted_files_are_detected(kb_copy):
    (kb_copy / "ct.npy").unlink()
    with pytest.raises(KnowledgeBaseError, match="missing file ct.npy"):
        KnowledgeBase.load(kb_copy)
    shutil.copy(kb_copy / "mri.npy", kb_copy / "ct.npy")  # a file of the right size, wrong content
    with pytest.raises(KnowledgeBaseError, match="checksum mismatch in ct.npy"):
        KnowledgeBase.load(kb_copy)
    with open(kb_copy / "entries.csv", "a") as handle:
        handle.write("sub-ffffffffff,0,0.5\n")
    with pytest.raises(KnowledgeBaseError, match="entries.csv has .* bytes"):
        KnowledgeBase.load(kb_copy)


def test_count_mismatch_is_detected(kb_copy):
    manifest = json.loads((kb_copy / "manifest.json").read_text())
    manifest["count"] += 1
    (kb_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KnowledgeBaseError, match="count mismatch"):
        KnowledgeBase.load(kb_copy)


def test_an_incomplete_manifest_is_refused(kb_copy):
    manifest = json.loads((kb_copy / "manifest.json").read_text())
    del manifest["tau"]
    (kb_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KnowledgeBaseError, match="manifest.json is incomplete or malformed .*tau"):
        KnowledgeBase.load(kb_copy)


def test_half_written_knowledge_bases_are_refused(kb_copy, data, tmp_path, monkeypatch):
    staged = tmp_path / ".tmp-1a2b3c4d-kb"
    shutil.copytree(kb_copy, staged)
    with pytest.raises(KnowledgeBaseError, match="unfinished build"):
        KnowledgeBase.load(staged)
    (kb_copy / "manifest.json").unlink()  # what a build leaves before its last step
    with pytest.raises(KnowledgeBaseError, match="missing manifest.json"):
        KnowledgeBase.load(kb_copy)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # A build that fails midway leaves neither the target nor its temporary folder.
    monkeypatch.setattr(knowledge_base, "_write_slices", fail)
    target = tmp_path / "interrupted" / "kb"
    target.parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        build(target, data)
    assert list(target.parent.iterdir()) == []


def test_wrong_encoder_is_refused(flat_kb):
    with pytest.raises(KnowledgeBaseError, match=f"built with encoder {ENCODER}, but the encoder in use is enc-other"):
        KnowledgeBase.load(flat_kb.root, expected_encoder_hash="enc-other")
    assert KnowledgeBase.load(flat_kb.root, expected_encoder_hash=None).encoder_hash == ENCODER


def test_build_refuses_inconsistent_inputs(tmp_path, data):
    embeddings, entries, ct, mri = data
    with pytest.raises(FileExistsError):
        build(tmp_path, data)
    with pytest.raises(ValueError, match="entries"):
        KnowledgeBase.build(tmp_path / "a", embeddings, entries.iloc[:-1], ct, mri, ENCODER, {})
    with pytest.raises(ValueError, match="mri_slices"):
        KnowledgeBase.build(tmp_path / "b", embeddings, entries, ct, mri[:, :4, :4], ENCODER, {})
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        KnowledgeBase.build(tmp_path / "c", embeddings, entries, ct * 3, mri, ENCODER, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_real_slices(tmp_path):
    """A knowledge base of real prepared BraTS slices, with a fixed random projection as encoder."""
    from lib.data.dataset import PreparedDataset
    from lib.data.prepare import PrepareConfig, prepare_dataset

    out = tmp_path / "prepared"
    prepare_dataset("brats", require(SHARED_DATA / "brats_dev"), out, config=PrepareConfig(size=32), max_subjects=3)
    dataset = PreparedDataset(out)
    table = dataset.slices[dataset.slices["brain_fraction"] > 0.05].reset_index(drop=True)
    ct = np.stack([dataset.array(s, "source")[i] for s, i in zip(table["subject"], table["slice"])])
    mri = np.stack([dataset.array(s, "target")[i] for s, i in zip(table["subject"], table["slice"])])
    projection = np.random.default_rng(0).standard_normal((32 * 32, 64)).astype(np.float32)
    embeddings = (ct.reshape(len(ct), -1) + 1) @ projection
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    kb = KnowledgeBase.build(
        tmp_path / "kb", embeddings, table[["subject", "slice", "position"]], ct, mri, ENCODER, {"projection": "random"}
    )

    rows = np.arange(0, len(table), 25)
    own = kb.query(embeddings[rows], table["position"].to_numpy()[rows])
    for row, result in zip(rows, own):
        assert (result.subject, result.slice_index) == (table["subject"][row], table["slice"][row]) and result.success
        np.testing.assert_array_equal(kb.mri_slice(result.entry_id), mri[row].astype(np.float16).astype(np.float32))
    others = kb.query(
        embeddings[rows], table["position"].to_numpy()[rows], exclude_subject=table["subject"].to_numpy()[rows].tolist()
    )
    for row, result in zip(rows, others):
        assert result.subject != table["subject"][row] and abs(result.position - table["position"][row]) <= 0.1


def test_restricted_knowledge_base_holds_only_the_chosen_subjects(flat_kb, hnsw_kb, data):
    subjects = sorted(set(data[1]["subject"]))
    kept = subjects[: max(1, len(subjects) // 2)]
    for kb in (flat_kb, hnsw_kb):
        small = kb.restricted_to(kept)
        assert set(small.entries["subject"]) == set(kept) and small.tau == kb.tau
        assert small.manifest.to_dict() == {
            **kb.manifest.to_dict(),
            "count": len(small),
            "index": {"kind": "flat", "metric": "inner_product"},
            "restricted_to_subjects": len(kept),
        }
        full_ids = np.flatnonzero(kb.entries["subject"].isin(kept))
        assert len(small) == len(full_ids)
        # Same slices in the same order, and queries find what an exact search of those entries finds.
        np.testing.assert_array_equal(small.ct_slice(0), kb.ct_slice(int(full_ids[0])))
        queries, _ = noisy_queries(data[0], 10, 0.3)
        best = [r.entry_id for r in small.query(queries)]
        stored = kb.index.index.reconstruct_n(0, len(kb))  # in the knowledge base's id order
        expected = full_ids[np.argmax(queries @ stored[full_ids].T, axis=1)]
        np.testing.assert_array_equal(full_ids[best], expected)
    with pytest.raises(ValueError, match="none of the 1 subject"):
        flat_kb.restricted_to(["sub-nobody"])
