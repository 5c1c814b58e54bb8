"""The retrieval knowledge base: CT-slice embeddings in a FAISS index, with metadata and slices.

A knowledge base folder holds::

    manifest.json   format version, encoder hash and config, entry count, embedding dim,
                    index kind and parameters, tau (value, percentile, pairs, seed),
                    creation time, size and sha256 of every other file
    index.faiss     the FAISS index; inner product on L2-normalised float32 vectors = cosine
    entries.csv     one row per entry, in id order: subject (anonymised key), slice, position
    ct.npy          float16 (N, S, S) in [-1, 1], the entries' CT slices (loaded memory-mapped)
    mri.npy         float16 (N, S, S) in [-1, 1], the paired MRI slices (loaded memory-mapped)

Entries are sorted by normalised axial position, so the position filter of METHOD.md section 2
(keep candidates with ``|position - query position| <= tolerance``) is one contiguous id range,
which FAISS applies during the search with an ``IDSelectorRange``; excluding a subject adds an
``IDSelectorNot(IDSelectorBatch)`` of its ids in that range. Both selectors are honoured by the
two index kinds used here (``IndexFlatIP`` and ``IndexHNSWFlat``, checked against faiss 1.15).

A folder is written under a temporary name beside the target and renamed when complete, and
``KnowledgeBase.load`` checks every file against the manifest, so a half-written or damaged
knowledge base is refused with a :class:`KnowledgeBaseError` rather than half-used.

Embeddings (of the knowledge base and of queries) must be L2-normalised: vectors whose norm is
off by more than :data:`NORM_TOLERANCE` are normalised with a warning (an encoder run in half
precision drifts slightly), and zero or non-finite vectors are refused with a ValueError.
"""

from __future__ import annotations

import enum
import json
import os
import platform
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from lib.data.layouts import file_sha256
from lib.io.atomic import STAGING_PREFIX, atomic_directory

KB_FORMAT_VERSION = 1
ENTRY_COLUMNS = ["subject", "slice", "position"]
DATA_FILES = ("index.faiss", "entries.csv", "ct.npy", "mri.npy")
NORM_TOLERANCE = 1e-3
DEFAULT_INDEX_THRESHOLD = 200_000
# Below this many candidates the approximate index is bypassed for an exact search of the
# contiguous id range: filtered HNSW loses recall (or returns nothing) when few entries pass
# the filter, and scoring a few thousand vectors directly takes well under a millisecond.
EXACT_SEARCH_LIMIT = 8192
_COPY_CHUNK = 1024  # slices copied at a time, so that building never holds a whole array twice


class KnowledgeBaseError(ValueError):
    """A knowledge base folder that is missing, incomplete, damaged or built for another encoder."""

    def __init__(self, root: str | os.PathLike[str], problem: str) -> None:
        self.root = Path(root)
        self.problem = problem
        super().__init__(f"knowledge base {self.root}: {problem}")


class IndexKind(enum.StrEnum):
    """Which FAISS index holds the embeddings."""

    FLAT = "flat"  # exact: IndexFlatIP
    HNSW = "hnsw"  # approximate: IndexHNSWFlat, for large knowledge bases


@dataclass(frozen=True)
class HNSWParams:
    """Parameters of the approximate index (faiss ``IndexHNSWFlat``).

    Chosen by measurement at 1M random unit vectors of dimension 128 with queries at cosine 0.8
    to an entry (``bench.retrieval.py``, 2 CPU cores; numbers in NOTES.md): M=32 with
    efConstruction=80 needed efSearch=256 for recall@1 0.95 (1.1 ms per query, over the 1 ms
    target); a better graph, M=48 with efConstruction=200, reaches 0.97 at efSearch=64 and
    0.99 at efSearch=96 in about 0.5 ms per query. The price is build time (about 10 minutes
    at 1M on 2 cores) and memory (about 2 * m * 4 bytes per entry for the graph). Below
    ``DEFAULT_INDEX_THRESHOLD`` entries the exact index is used anyway.

    Attributes:
        m: graph neighbours per node.
        ef_construction: candidate list size while building (build time, graph quality).
        ef_search: candidate list size while searching (latency against recall).
    """

    m: int = 48
    ef_construction: int = 200
    ef_search: int = 96


@dataclass(frozen=True, eq=False)
class RetrievalResult:
    """The outcome of one query.

    Attributes:
        similarity: cosine similarity of the best candidate; -inf when no candidate passed
            the filters.
        success: ``similarity >= tau`` (never true without a candidate).
        entry_id: id of the best candidate (use with ``KnowledgeBase.ct_slice`` /
            ``mri_slice``), or None.
        subject: the best candidate's anonymised subject key, or None.
        slice_index: its slice index within that subject, or None.
        position: its normalised axial position, or None.
        ids: ids of the top-k candidates, best first (fewer than k when fewer passed).
        similarities: their cosine similarities.
    """

    similarity: float
    success: bool
    entry_id: int | None
    subject: str | None
    slice_index: int | None
    position: float | None
    ids: np.ndarray = field(repr=False)
    similarities: np.ndarray = field(repr=False)


def normalise_embeddings(embeddings: np.ndarray, dim: int | None = None, what: str = "embeddings") -> np.ndarray:
    """Check embeddings and return them as C-contiguous L2-normalised float32 (Q, D).

    Args:
        embeddings: (Q, D) vectors, meant to be unit-norm already.
        dim: the required D, or None for any.
        what: a name for messages.

    Returns:
        The vectors as float32; renormalised (with a warning) where a norm is off by more
        than :data:`NORM_TOLERANCE`.

    Raises:
        ValueError: wrong shape or dimension, non-finite values, or a zero vector.
    """
    array = np.asarray(embeddings)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{what}: expected a (count, dim) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what}: dimension {array.shape[1]}, but the knowledge base has dimension {dim}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: non-finite values")
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{what}: zero vector at rows {np.flatnonzero(norms == 0)[:10].tolist()}")
    if np.abs(norms - 1).max(initial=0.0) > NORM_TOLERANCE:
        warnings.warn(
            f"{what}: not L2-normalised (norms {norms.min():.4g}..{norms.max():.4g}); normalising", stacklevel=2
        )
        array = array / norms[:, None]
    return array


def sample_pairs(count: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random pairs (i, j) of distinct indices in [0, count), uniformly, reproducibly.

    Raises:
        ValueError: fewer than 2 items or a non-positive number of pairs.
    """
    if count < 2:
        raise ValueError(f"need at least 2 embeddings to form pairs, got {count}")
    if pairs < 1:
        raise ValueError(f"pairs must be positive, got {pairs}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, count, pairs)
    # Drawing the second from count - 1 values and skipping over the first keeps it uniform
    # among the other indices without rejection.
    second = rng.integers(0, count - 1, pairs)
    second += second >= first
    return first, second


def compute_tau(embeddings: np.ndarray, percentile: float = 5.0, pairs: int = 100_000, seed: int = 0) -> float:
    """The retrieval threshold tau of METHOD.md section 2.

    Cosine similarities of ``pairs`` random pairs of distinct training slices (from
    :func:`sample_pairs`); tau is the value at the top-``percentile`` percent, i.e.
    ``np.percentile(similarities, 100 - percentile)``.

    Args:
        embeddings: (N, D) embeddings of the training CT slices (see
            :func:`normalise_embeddings`).
        percentile: p, in (0, 100).
        pairs: number of random pairs.
        seed: seed of the pair sampling.

    Returns:
        tau.

    Raises:
        ValueError: invalid percentile or embeddings.
    """
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    vectors = normalise_embeddings(embeddings)
    first, second = sample_pairs(len(vectors), pairs, seed)
    similarities = np.empty(pairs, dtype=np.float64)
    for start in range(0, pairs, 65536):
        stop = min(start + 65536, pairs)
        a = vectors[first[start:stop]].astype(np.float64)
        b = vectors[second[start:stop]].astype(np.float64)
        similarities[start:stop] = np.einsum("ij,ij->i", a, b)
    return float(np.percentile(similarities, 100 - percentile))


class EmbeddingIndex:
    """A FAISS index over position-sorted embeddings, searched with position and subject filters.

    Args:
        index: an ``IndexFlatIP`` or ``IndexHNSWFlat`` (inner-product metric) whose id i is
            entry i.
        positions: (N,) normalised axial positions, non-decreasing in id.
        subjects: (N,) subject key of each entry.
        ef_search: HNSW candidate list size (ignored by the flat index); may be changed later.

    Raises:
        ValueError: unsupported index, or metadata that does not match it.
    """

    def __init__(
        self, index: faiss.Index, positions: np.ndarray, subjects: Sequence[str], ef_search: int = HNSWParams.ef_search
    ) -> None:
        if isinstance(index, faiss.IndexHNSWFlat):
            self.kind = IndexKind.HNSW
        elif isinstance(index, faiss.IndexFlatIP):
            self.kind = IndexKind.FLAT
        else:
            raise ValueError(f"unsupported index type {type(index).__name__}; expected IndexFlatIP or IndexHNSWFlat")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the index must use the inner-product metric (cosine on normalised vectors)")
        self.positions = np.asarray(positions, dtype=np.float64)
        if len(self.positions) != index.ntotal or len(subjects) != index.ntotal:
            raise ValueError(f"{index.ntotal} vectors but {len(self.positions)} positions and {len(subjects)} subjects")
        if not np.isfinite(self.positions).all() or (np.diff(self.positions) < 0).any():
            raise ValueError("positions must be finite and sorted in id order")
        self.index = index
        self.ef_search = ef_search
        # Each subject's ids, ascending, so its ids inside an id range are one slice of them.
        keys = np.asarray(subjects)
        self.subject_ids: dict[str, np.ndarray] = {
            str(key): np.asarray(ids, dtype=np.int64) for key, ids in pd.Series(keys).groupby(keys).indices.items()
        }
        storage = faiss.downcast_index(index.storage) if self.kind is IndexKind.HNSW else index
        # A view of the stored vectors (no copy), for exact searches of an id range.
        self._vectors = faiss.rev_swig_ptr(storage.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        positions: np.ndarray,
        subjects: Sequence[str],
        kind: IndexKind,
        hnsw: HNSWParams = HNSWParams(),
    ) -> EmbeddingIndex:
        """Index normalised ``vectors`` (already sorted by position) with the given kind."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        kind = IndexKind(kind)
        if kind is IndexKind.HNSW:
            index = faiss.IndexHNSWFlat(vectors.shape[1], hnsw.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = hnsw.ef_construction
            index.hnsw.efSearch = hnsw.ef_search
        else:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index, positions, subjects, hnsw.ef_search)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.index.d)

    def search(
        self,
        queries: np.ndarray,
        positions: np.ndarray | Sequence[float] | None = None,
        k: int = 1,
        position_tolerance: float = 0.1,
        exclude_subject: str | Sequence[str | None] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k entries by cosine similarity for each query, within the filters.

        Args:
            queries: (Q, D) query embeddings (see :func:`normalise_embeddings`).
            positions: (Q,) normalised axial positions of the queries; None for no position
                filter. An entry is a candidate when its position lies in
                ``[position - position_tolerance, position + position_tolerance]``.
            k: number of results per query.
            position_tolerance: half-width of the position window, >= 0.
            exclude_subject: a subject key whose entries are never returned (for every query),
                one key or None per query, or None.

        Returns:
            One ``(ids, similarities)`` pair per query, best first; shorter than k (possibly
            empty) when fewer entries pass the filters.

        Raises:
            ValueError: invalid arguments.
        """
        vectors = normalise_embeddings(queries, self.dim, "queries")
        count = len(vectors)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not (np.isfinite(position_tolerance) and position_tolerance >= 0):
            raise ValueError(f"position_tolerance must be finite and >= 0, got {position_tolerance}")
        lows, highs = self._position_ranges(positions, position_tolerance, count)
        excluded = self._per_query_exclusions(exclude_subject, count)

        # Queries with the same filter share one search call, so unfiltered batches stay batched.
        groups: dict[tuple[int, int, str | None], list[int]] = {}
        for row in range(count):
            groups.setdefault((int(lows[row]), int(highs[row]), excluded[row]), []).append(row)
        results: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0, np.int64), np.empty(0, np.float32))] * count
        for (low, high, subject), rows in groups.items():
            removed = self._excluded_ids(subject, low, high)
            wanted = min(k, high - low - len(removed))
            if wanted <= 0:
                continue
            if self.kind is IndexKind.HNSW and high - low <= EXACT_SEARCH_LIMIT:
                for row in rows:
                    results[row] = self._exact_range(vectors[row], low, high, removed, wanted)
                continue
            similarities, ids = self.index.search(
                vectors[rows], wanted, params=self._search_parameters(low, high, removed)
            )
            for row, row_ids, row_similarities in zip(rows, ids, similarities):
                valid = row_ids >= 0
                if valid.sum() < wanted:
                    # The filtered graph search ran out of candidates before finding `wanted`
                    # entries that pass; the exact search of the range always finds them.
                    results[row] = self._exact_range(vectors[row], low, high, removed, wanted)
                else:
                    results[row] = (row_ids[valid].astype(np.int64), row_similarities[valid])
        return results

    def _position_ranges(
        self, positions: np.ndarray | Sequence[float] | None, tolerance: float, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per query, the id range [low, high) of entries inside the position window."""
        if positions is None:
            return np.zeros(count, dtype=np.int64), np.full(count, len(self), dtype=np.int64)
        query_positions = np.asarray(positions, dtype=np.float64)
        if query_positions.shape != (count,):
            raise ValueError(f"positions: expected shape ({count},), got {query_positions.shape}")
        if not np.isfinite(query_positions).all():
            raise ValueError("positions: non-finite values")
        lows = np.searchsorted(self.positions, query_positions - tolerance, side="left")
        highs = np.searchsorted(self.positions, query_positions + tolerance, side="right")
        return lows, highs

    @staticmethod
    def _per_query_exclusions(exclude_subject: str | Sequence[str | None] | None, count: int) -> list[str | None]:
        if exclude_subject is None or isinstance(exclude_subject, str):
            return [exclude_subject] * count
        excluded = list(exclude_subject)
        if len(excluded) != count:
            raise ValueError(f"exclude_subject: {len(excluded)} entries for {count} queries")
        if not all(item is None or isinstance(item, str) for item in excluded):
            raise ValueError("exclude_subject: entries must be subject keys (str) or None")
        return excluded

    def _excluded_ids(self, subject: str | None, low: int, high: int) -> np.ndarray:
        """Ids of ``subject``'s entries inside [low, high) (sorted)."""
        ids = self.subject_ids.get(subject) if subject is not None else None
        if ids is None:
            return np.empty(0, dtype=np.int64)
        return ids[np.searchsorted(ids, low) : np.searchsorted(ids, high)]

    def _search_parameters(self, low: int, high: int, removed: np.ndarray) -> faiss.SearchParameters:
        """FAISS search parameters with a selector for the id range minus ``removed``.

        The faiss Python wrapper keeps references to the selectors inside the returned object.
        """
        selectors = []
        if low > 0 or high < len(self):
            selectors.append(faiss.IDSelectorRange(low, high))
        if len(removed):
            selectors.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(removed)))
        parameters = (
            faiss.SearchParametersHNSW(efSearch=self.ef_search)
            if self.kind is IndexKind.HNSW
            else faiss.SearchParameters()
        )
        if len(selectors) == 2:
            parameters.sel = faiss.IDSelectorAnd(*selectors)
        elif selectors:
            parameters.sel = selectors[0]
        return parameters

    def _exact_range(
        self, query: np.ndarray, low: int, high: int, removed: np.ndarray, wanted: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``wanted`` of the id range [low, high) minus ``removed``."""
        similarities = self._vectors[low:high] @ query
        similarities[removed - low] = -np.inf
        top = (
            np.argpartition(-similarities, wanted - 1)[:wanted]
            if wanted < len(similarities)
            else np.arange(len(similarities))
        )
        # Best first; equal similarities in id order, as FAISS returns them.
        top = top[np.lexsort((top, -similarities[top]))]
        return (top + low).astype(np.int64), similarities[top].astype(np.float32)


@dataclass(frozen=True)
class EncoderInfo:
    """The encoder a knowledge base's embeddings come from (manifest ``encoder``).

    Attributes:
        hash: the encoder's hash; :meth:`KnowledgeBase.load` can require it.
        config: its config, JSON-ready.
    """

    hash: str
    config: dict[str, Any]


@dataclass(frozen=True)
class IndexInfo:
    """The FAISS index (manifest ``index``).

    Attributes:
        kind: an :class:`IndexKind` value.
        metric: ``inner_product`` (cosine on normalised vectors).
        params: the HNSW index's parameters; None for the flat index (then not written).
    """

    kind: str
    metric: str
    params: HNSWParams | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "metric": self.metric,
            **({"params": asdict(self.params)} if self.params is not None else {}),
        }


@dataclass(frozen=True)
class TauInfo:
    """The retrieval threshold and how it was computed (manifest ``tau``; see :func:`compute_tau`)."""

    value: float
    percentile: float
    pairs: int
    seed: int


@dataclass(frozen=True)
class FileInfo:
    """Size and SHA-256 of one data file (manifest ``files``)."""

    size: int
    sha256: str


@dataclass(frozen=True)
class KnowledgeBaseManifest:
    """manifest.json of a knowledge base folder; :meth:`to_dict` is the JSON written, key for key.

    Attributes:
        format_version: :data:`KB_FORMAT_VERSION` of the folder.
        created: ISO time of the build (UTC).
        encoder: the encoder of the embeddings.
        count: entries.
        dim: embedding dimension.
        slice_shape: ``[S, S]`` of the stored slices.
        index: the FAISS index.
        sorted_by: the entry order (``position``).
        tau: the retrieval threshold.
        files: size and checksum of every data file, by name.
        versions: Python, faiss and numpy versions of the build.
        restricted_to_subjects: for a knowledge base restricted in memory
            (:meth:`KnowledgeBase.restricted_to`), its subject count; None otherwise (then not
            written).
    """

    format_version: int
    created: str
    encoder: EncoderInfo
    count: int
    dim: int
    slice_shape: list[int]
    index: IndexInfo
    sorted_by: str
    tau: TauInfo
    files: dict[str, FileInfo]
    versions: dict[str, str]
    restricted_to_subjects: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready manifest, keys in field order."""
        out = {item.name: getattr(self, item.name) for item in fields(self)}
        out.update(
            encoder=asdict(self.encoder),
            index=self.index.to_dict(),
            tau=asdict(self.tau),
            files={name: asdict(info) for name, info in self.files.items()},
        )
        if self.restricted_to_subjects is None:
            del out["restricted_to_subjects"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgeBaseManifest:
        """Read a manifest back from :meth:`to_dict`'s output.

        Raises:
            KeyError, TypeError: a missing or malformed entry.
        """
        index = data["index"]
        params = index.get("params")
        return cls(
            format_version=data["format_version"],
            created=data["created"],
            encoder=EncoderInfo(**data["encoder"]),
            count=data["count"],
            dim=data["dim"],
            slice_shape=data["slice_shape"],
            index=IndexInfo(
                kind=index["kind"], metric=index["metric"], params=None if params is None else HNSWParams(**params)
            ),
            sorted_by=data["sorted_by"],
            tau=TauInfo(**data["tau"]),
            files={name: FileInfo(**info) for name, info in data["files"].items()},
            versions=data["versions"],
            restricted_to_subjects=data.get("restricted_to_subjects"),
        )


def _json_ready(value: Any) -> Any:
    """Make an encoder config JSON-serialisable (enums to their values, other objects to str)."""
    return json.loads(json.dumps(value, default=lambda item: item.value if isinstance(item, enum.Enum) else str(item)))


def _check_slices(name: str, slices: np.ndarray, count: int) -> None:
    if slices.ndim != 3 or slices.shape[0] != count or slices.shape[1] != slices.shape[2]:
        raise ValueError(f"{name}: expected ({count}, S, S) slices, got shape {slices.shape}")


def _write_slices(path: Path, slices: np.ndarray, order: np.ndarray, name: str) -> None:
    """Write ``slices[order]`` as float16 chunk by chunk, checking the [-1, 1] range."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(order), *slices.shape[1:]))
    for start in range(0, len(order), _COPY_CHUNK):
        # Sorted indices read a memory-mapped input in order; `order` restores the id order.
        chunk_order = order[start : start + _COPY_CHUNK]
        reading = np.sort(chunk_order)
        chunk = np.asarray(slices[reading], dtype=np.float32)[np.searchsorted(reading, chunk_order)]
        if not np.isfinite(chunk).all() or chunk.min() < -1 - 1e-3 or chunk.max() > 1 + 1e-3:
            raise ValueError(f"{name}: values must be finite and in [-1, 1]")
        out[start : start + len(chunk_order)] = np.clip(chunk, -1, 1)
    out.flush()
    del out


class KnowledgeBase:
    """A knowledge base folder, loaded (see the module docstring).

    Build one with :meth:`build`, open one with :meth:`load`.

    Attributes:
        root: the folder.
        manifest: its manifest.
        entries: the entry table (subject, slice, position), row i = entry id i.
        index: the :class:`EmbeddingIndex`.
        tau: the retrieval threshold.
    """

    def __init__(
        self,
        root: Path,
        manifest: KnowledgeBaseManifest,
        entries: pd.DataFrame,
        index: EmbeddingIndex,
        ct: np.ndarray,
        mri: np.ndarray,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.entries = entries
        self.index = index
        self.tau = float(manifest.tau.value)
        # Plain arrays: a pandas row lookup per query would dominate a fast index search.
        self._subjects = entries["subject"].to_numpy()
        self._slices = entries["slice"].to_numpy()
        self._positions = entries["position"].to_numpy()
        self._ct = ct
        self._mri = mri

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.index.dim

    @property
    def encoder_hash(self) -> str:
        """Hash of the encoder whose embeddings the index holds."""
        return self.manifest.encoder.hash

    @classmethod
    def build(
        cls,
        out_dir: str | os.PathLike[str],
        embeddings: np.ndarray,
        entries: pd.DataFrame,
        ct_slices: np.ndarray,
        mri_slices: np.ndarray,
        encoder_hash: str,
        encoder_config: dict,
        tau_percentile: float = 5.0,
        tau_pairs: int = 100_000,
        index_threshold: int = DEFAULT_INDEX_THRESHOLD,
        index_kind: IndexKind | str | None = None,
        hnsw: HNSWParams = HNSWParams(),
        overwrite: bool = False,
    ) -> KnowledgeBase:
        """Build a knowledge base folder from the training slices and return it loaded.

        Entries are reordered by position (ties by subject, then slice); tau is computed from
        ``embeddings`` with :func:`compute_tau` (seed 0). The folder is written under a
        temporary name beside ``out_dir`` and renamed when complete.

        Args:
            out_dir: the folder to create.
            embeddings: (N, D) encoder embeddings of the CT slices.
            entries: N rows with columns subject (anonymised key), slice, position.
            ct_slices: (N, S, S) CT slices in [-1, 1] (stored as float16); may be memory-mapped.
            mri_slices: (N, S, S) paired MRI slices in [-1, 1].
            encoder_hash: identifies the encoder; :meth:`load` can require it.
            encoder_config: the encoder's config, stored in the manifest.
            tau_percentile: p of tau (top-p percent of random-pair similarities).
            tau_pairs: random pairs used for tau.
            index_threshold: with ``index_kind`` None, the approximate (HNSW) index is used
                from this many entries on, the exact flat index below.
            index_kind: force an index kind, or None to choose by ``index_threshold``.
            hnsw: parameters of the HNSW index.
            overwrite: replace an existing ``out_dir``.

        Returns:
            The knowledge base, loaded from the written folder.

        Raises:
            FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
            ValueError: inconsistent or invalid inputs.
        """
        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
        if out.name.startswith(STAGING_PREFIX):
            raise ValueError(f"{out}: names starting with {STAGING_PREFIX!r} are reserved for unfinished builds")
        if not encoder_hash:
            raise ValueError("encoder_hash must not be empty")
        vectors = normalise_embeddings(embeddings)
        count = len(vectors)
        missing = [column for column in ENTRY_COLUMNS if column not in entries.columns]
        if missing:
            raise ValueError(f"entries: missing columns {missing}; expected {ENTRY_COLUMNS}")
        if len(entries) != count:
            raise ValueError(f"{count} embeddings but {len(entries)} entries")
        table = pd.DataFrame(
            {
                "subject": entries["subject"].astype(str).to_numpy(),
                "slice": entries["slice"].astype(np.int64).to_numpy(),
                "position": entries["position"].astype(np.float64).to_numpy(),
            }
        )
        if not np.isfinite(table["position"]).all():
            raise ValueError("entries: non-finite positions")
        _check_slices("ct_slices", ct_slices, count)
        _check_slices("mri_slices", mri_slices, count)
        if ct_slices.shape != mri_slices.shape:
            raise ValueError(f"ct_slices {ct_slices.shape} and mri_slices {mri_slices.shape} differ in shape")
        kind = (
            IndexKind(index_kind)
            if index_kind is not None
            else IndexKind.HNSW
            if count >= index_threshold
            else IndexKind.FLAT
        )
        tau = compute_tau(vectors, tau_percentile, tau_pairs, seed=0)

        order = np.lexsort((table["slice"].to_numpy(), table["subject"].to_numpy(), table["position"].to_numpy()))
        table = table.iloc[order].reset_index(drop=True)
        vectors = vectors[order]

        with atomic_directory(out) as staging:
            index = EmbeddingIndex.build(vectors, table["position"].to_numpy(), table["subject"].tolist(), kind, hnsw)
            faiss.write_index(index.index, str(staging / "index.faiss"))
            table.to_csv(staging / "entries.csv", index=False)
            _write_slices(staging / "ct.npy", ct_slices, order, "ct_slices")
            _write_slices(staging / "mri.npy", mri_slices, order, "mri_slices")
            manifest = KnowledgeBaseManifest(
                format_version=KB_FORMAT_VERSION,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                encoder=EncoderInfo(hash=encoder_hash, config=_json_ready(encoder_config)),
                count=count,
                dim=int(vectors.shape[1]),
                slice_shape=list(ct_slices.shape[1:]),
                index=IndexInfo(
                    kind=kind.value, metric="inner_product", params=hnsw if kind is IndexKind.HNSW else None
                ),
                sorted_by="position",
                tau=TauInfo(value=tau, percentile=tau_percentile, pairs=tau_pairs, seed=0),
                files={
                    name: FileInfo(size=(staging / name).stat().st_size, sha256=file_sha256(staging / name))
                    for name in DATA_FILES
                },
                versions={"python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__},
            )
            (staging / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=1))
        return cls.load(out, expected_encoder_hash=encoder_hash)

    @classmethod
    def load(cls, root: str | os.PathLike[str], expected_encoder_hash: str | None = None) -> KnowledgeBase:
        """Open a knowledge base folder, verifying it completely.

        Args:
            root: the folder.
            expected_encoder_hash: the hash of the encoder that will embed the queries; None
                accepts any (for inspection only: embeddings of another encoder are meaningless).

        Returns:
            The knowledge base; its slices are memory-mapped.

        Raises:
            KnowledgeBaseError: not a complete knowledge base of this format (missing file,
                size or checksum mismatch, count mismatch, unsorted entries), or built with
                another encoder than ``expected_encoder_hash``.
        """
        root = Path(root)
        if root.name.startswith(STAGING_PREFIX):
            raise KnowledgeBaseError(
                root,
                f"a temporary folder of an unfinished build (name starts with {STAGING_PREFIX!r}); rebuild the "
                "knowledge base",
            )
        if not root.is_dir():
            raise KnowledgeBaseError(root, "no such folder")
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise KnowledgeBaseError(root, "missing manifest.json (not a knowledge base, or an incomplete one)")
        try:
            written = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise KnowledgeBaseError(root, f"manifest.json is not valid JSON ({error})") from error
        if not isinstance(written, dict) or written.get("format_version") != KB_FORMAT_VERSION:
            version = written.get("format_version") if isinstance(written, dict) else None
            raise KnowledgeBaseError(root, f"format version {version!r}, expected {KB_FORMAT_VERSION}")
        try:
            manifest = KnowledgeBaseManifest.from_dict(written)
        except (KeyError, TypeError, AttributeError) as error:
            raise KnowledgeBaseError(root, f"manifest.json is incomplete or malformed ({error!r})") from None
        built_with = manifest.encoder.hash
        if expected_encoder_hash is not None and built_with != expected_encoder_hash:
            raise KnowledgeBaseError(
                root,
                f"built with encoder {built_with}, but the encoder in use is {expected_encoder_hash}; rebuild "
                "the knowledge base with this encoder",
            )
        for name in DATA_FILES:
            path = root / name
            expected = manifest.files.get(name)
            if expected is None:
                raise KnowledgeBaseError(root, f"manifest.json lists no checksum for {name}")
            if not path.is_file():
                raise KnowledgeBaseError(root, f"missing file {name}")
            if path.stat().st_size != expected.size:
                raise KnowledgeBaseError(
                    root, f"{name} has {path.stat().st_size} bytes, the manifest says {expected.size}"
                )
            if file_sha256(path) != expected.sha256:
                raise KnowledgeBaseError(root, f"checksum mismatch in {name} (the file was modified or damaged)")

        count = manifest.count
        # The default fast float parser may be off by an ulp; positions must round-trip exactly.
        entries = pd.read_csv(
            root / "entries.csv",
            dtype={"subject": str, "slice": np.int64, "position": np.float64},
            float_precision="round_trip",
        )
        faiss_index = faiss.read_index(str(root / "index.faiss"))
        ct = np.load(root / "ct.npy", mmap_mode="r")
        mri = np.load(root / "mri.npy", mmap_mode="r")
        counts = {
            "entries.csv rows": len(entries),
            "index.faiss vectors": faiss_index.ntotal,
            "ct.npy slices": ct.shape[0],
            "mri.npy slices": mri.shape[0],
        }
        wrong = {what: number for what, number in counts.items() if number != count}
        if wrong:
            raise KnowledgeBaseError(root, f"count mismatch: the manifest says {count} entries, but {wrong}")
        if list(entries.columns) != ENTRY_COLUMNS:
            raise KnowledgeBaseError(root, f"entries.csv has columns {list(entries.columns)}, expected {ENTRY_COLUMNS}")
        if faiss_index.d != manifest.dim:
            raise KnowledgeBaseError(root, f"index dimension {faiss_index.d}, the manifest says {manifest.dim}")
        ef_search = (manifest.index.params or HNSWParams()).ef_search
        try:
            index = EmbeddingIndex(faiss_index, entries["position"].to_numpy(), entries["subject"].tolist(), ef_search)
        except ValueError as error:
            raise KnowledgeBaseError(root, str(error)) from error
        if index.kind.value != manifest.index.kind:
            raise KnowledgeBaseError(
                root, f"index.faiss is a {index.kind.value} index, the manifest says {manifest.index.kind}"
            )
        return cls(root, manifest, entries, index, ct, mri)

    def restricted_to(self, subjects: Collection[str]) -> KnowledgeBase:
        """The same knowledge base holding only the entries of ``subjects`` (in memory).

        For the knowledge-base-size ablation (METHOD.md Table 5): the entries keep their
        order, embeddings and slices, tau stays the full knowledge base's (the threshold is a
        property of the encoder, not of the base's size), and the index is exact.

        Raises:
            ValueError: none of ``subjects`` is in the knowledge base.
        """
        ids = np.flatnonzero(np.isin(self._subjects, list(subjects)))
        if not len(ids):
            raise ValueError(f"{self.root}: none of the {len(subjects)} subject(s) is in the knowledge base")
        vectors = self.index.index.reconstruct_n(0, len(self)) if len(self) else np.empty((0, self.dim), np.float32)
        entries = self.entries.iloc[ids].reset_index(drop=True)
        index = EmbeddingIndex.build(
            vectors[ids], entries["position"].to_numpy(), entries["subject"].tolist(), IndexKind.FLAT
        )
        manifest = replace(
            self.manifest,
            count=len(ids),
            index=IndexInfo(kind=IndexKind.FLAT.value, metric="inner_product"),
            restricted_to_subjects=len(set(entries["subject"])),
        )
        return KnowledgeBase(self.root, manifest, entries, index, np.asarray(self._ct[ids]), np.asarray(self._mri[ids]))

    def query(
        self,
        embeddings: np.ndarray,
        positions: np.ndarray | Sequence[float] | None = None,
        k: int = 1,
        position_tolerance: float = 0.1,
        exclude_subject: str | Sequence[str | None] | None = None,
    ) -> list[RetrievalResult]:
        """Retrieve the most similar entries for each query slice (METHOD.md section 2).

        Args:
            embeddings: (Q, D) query embeddings from the same encoder (L2-normalised; see
                :func:`normalise_embeddings`).
            positions: (Q,) normalised axial positions of the queries, or None for no
                position filter.
            k: candidates kept per query (``RetrievalResult.ids``).
            position_tolerance: keep entries whose position is within this of the query's.
            exclude_subject: a subject key to leave out for every query (e.g. the query's own
                subject in training), one key or None per query, or None.

        Returns:
            One :class:`RetrievalResult` per query; a query that no entry passes the filters
            for gets similarity -inf, success False and no reference.

        Raises:
            ValueError: invalid arguments (wrong dimension or shapes, k < 1, ...).
        """
        found = self.index.search(embeddings, positions, k, position_tolerance, exclude_subject)
        results = []
        for ids, similarities in found:
            if len(ids) == 0:
                results.append(RetrievalResult(-np.inf, False, None, None, None, None, ids, similarities))
                continue
            best = int(ids[0])
            results.append(
                RetrievalResult(
                    similarity=float(similarities[0]),
                    success=bool(similarities[0] >= self.tau),
                    entry_id=best,
                    subject=str(self._subjects[best]),
                    slice_index=int(self._slices[best]),
                    position=float(self._positions[best]),
                    ids=ids,
                    similarities=similarities,
                )
            )
        return results

    def ct_slice(self, entry_id: int) -> np.ndarray:
        """The CT slice of an entry, float32 (S, S) in [-1, 1]."""
        return np.asarray(self._ct[self._checked_id(entry_id)], dtype=np.float32)

    def mri_slice(self, entry_id: int) -> np.ndarray:
        """The paired MRI slice of an entry, float32 (S, S) in [-1, 1]."""
        return np.asarray(self._mri[self._checked_id(entry_id)], dtype=np.float32)

    def slice_pairs(self, chunk: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every entry's (CT, MRI) slices in [-1, 1], float32, ``chunk`` entries at a time (N, S, S)."""
        for start in range(0, len(self), chunk):
            stop = min(start + chunk, len(self))
            ct, mri = self._ct[start:stop], self._mri[start:stop]
            yield np.asarray(ct, dtype=np.float32), np.asarray(mri, dtype=np.float32)

    def _checked_id(self, entry_id: int) -> int:
        if not 0 <= int(entry_id) < len(self):
            raise IndexError(f"entry id {entry_id} out of range [0, {len(self)})")
        return int(entry_id)
