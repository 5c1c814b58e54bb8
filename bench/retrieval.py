"""Benchmark of the knowledge-base index: exact (flat) against approximate (HNSW) search.

Run with ``python -m bench.retrieval --help``. Prints a Markdown table per size.

Data: ``size`` random unit vectors of ``--dim`` dimensions, with random sorted positions in
[0, 1] and 155 entries per subject, as in the knowledge base. Each query is made from a random
entry (its source) at cosine ``--query-similarity`` to it (0 gives independent random
queries, the hardest and least realistic case: every entry is then about equally far).
"filtered" searches keep the position window ``[p - tol, p + tol]`` around the query's
position (a jitter of up to tol / 2 around its source's, so the source stays inside) and
exclude one other subject; filtered searches of at most ``EXACT_SEARCH_LIMIT`` candidates
are exact by design, whatever the index.

Timings go through ``EmbeddingIndex.search``, as the pipeline's do (argument checks,
selectors, fallbacks included), and are medians over ``--repeats`` runs:
"one at a time" searches the first ``--single-queries`` queries with one call each (the
latency of one slice); "batched" searches all queries in one call (throughput per slice).
Ratios divide by the flat index's time for the same size, measure and filter, taken in the
same process, which is steadier than seconds on a shared machine. On a machine whose cores are
busy, one-at-a-time searches are faster with ``--threads 1``: a single query gains nothing from
OpenMP threads but waits for them. Recall@1 is the fraction of
queries whose top-1 equals the exact (flat) top-1 under the same filter.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import faiss
import numpy as np

from lib.retrieval import knowledge_base
from lib.retrieval.knowledge_base import EmbeddingIndex, HNSWParams, IndexKind

SLICES_PER_SUBJECT = 155
_DEFAULT_PARAMS = (HNSWParams.m, HNSWParams.ef_construction, HNSWParams.ef_search)


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def make_data(
    size: int, dim: int, queries: int, similarity: float, tolerance: float, seed: int
) -> dict[str, np.ndarray]:
    """Random entries and queries (see the module docstring)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((size, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    positions = np.sort(rng.uniform(0, 1, size))
    subjects = rng.permutation(np.arange(size) // SLICES_PER_SUBJECT)
    sources = rng.integers(0, size, queries)
    noise = rng.standard_normal((queries, dim), dtype=np.float32)
    # Removing the component along the source makes the cosine to it exactly `similarity`.
    noise -= np.sum(noise * vectors[sources], axis=1, keepdims=True) * vectors[sources]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    query_vectors = similarity * vectors[sources] + np.sqrt(1 - similarity**2) * noise
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    query_positions = positions[sources] + rng.uniform(-tolerance / 2, tolerance / 2, queries)
    # One other subject per query: shifting by a non-zero amount modulo the count never hits its own.
    subject_count = int(subjects.max()) + 1
    other = (subjects[sources] + rng.integers(1, max(subject_count, 2), queries)) % max(subject_count, 2)
    return {
        "vectors": vectors,
        "positions": positions,
        "subjects": np.char.add("sub-", subjects.astype(str)),
        "queries": query_vectors.astype(np.float32),
        "query_positions": query_positions,
        "exclude": np.char.add("sub-", other.astype(str)),
    }


def measure(
    index: EmbeddingIndex,
    data: dict[str, np.ndarray],
    filtered: bool,
    tolerance: float,
    single_queries: int,
    repeats: int,
) -> tuple[float, float, np.ndarray]:
    """Per-query seconds one at a time and batched, and the batched top-1 ids."""
    queries = data["queries"]
    positions = data["query_positions"] if filtered else None
    exclude = data["exclude"].tolist() if filtered else None

    def batched() -> list[tuple[np.ndarray, np.ndarray]]:
        return index.search(queries, positions, 1, tolerance, exclude)

    def one_at_a_time() -> None:
        for row in range(min(single_queries, len(queries))):
            index.search(
                queries[row : row + 1],
                None if positions is None else positions[row : row + 1],
                1,
                tolerance,
                None if exclude is None else exclude[row],
            )

    batched()  # warm-up: page in the index
    single = _median_seconds(one_at_a_time, repeats) / min(single_queries, len(queries))
    batch = _median_seconds(batched, repeats) / len(queries)
    top = np.array([ids[0] if len(ids) else -1 for ids, _ in batched()])
    return single, batch, top


def run(size: int, args: argparse.Namespace) -> list[tuple[str, ...]]:
    """Measure one size; return table rows."""
    data = make_data(size, args.dim, args.queries, args.query_similarity, args.tolerance, args.seed)
    hnsw = HNSWParams(m=args.m, ef_construction=args.ef_construction)
    started = time.perf_counter()
    flat = EmbeddingIndex.build(data["vectors"], data["positions"], data["subjects"].tolist(), IndexKind.FLAT)
    flat_build = time.perf_counter() - started
    started = time.perf_counter()
    approximate = EmbeddingIndex.build(
        data["vectors"], data["positions"], data["subjects"].tolist(), IndexKind.HNSW, hnsw
    )
    hnsw_build = time.perf_counter() - started

    rows = []
    for filtered in (False, True):
        label = "filtered" if filtered else "none"
        flat_single, flat_batch, exact_top = measure(
            flat, data, filtered, args.tolerance, args.single_queries, args.repeats
        )
        rows.append(
            (
                f"{size:,}",
                "flat (exact)",
                "",
                f"{flat_build:.2f}",
                "1.00",
                label,
                f"{flat_single * 1e3:.3f}",
                "1.00",
                f"{flat_batch * 1e3:.3f}",
                "1.00",
                "1.000",
            )
        )
        for ef_search in args.ef_search:
            approximate.ef_search = ef_search
            single, batch, top = measure(approximate, data, filtered, args.tolerance, args.single_queries, args.repeats)
            default = " (default)" if (hnsw.m, hnsw.ef_construction, ef_search) == _DEFAULT_PARAMS else ""
            rows.append(
                (
                    f"{size:,}",
                    "HNSW",
                    f"M={hnsw.m} efC={hnsw.ef_construction} efS={ef_search}{default}",
                    f"{hnsw_build:.2f}",
                    f"{hnsw_build / flat_build:.1f}",
                    label,
                    f"{single * 1e3:.3f}",
                    f"{single / flat_single:.3f}",
                    f"{batch * 1e3:.3f}",
                    f"{batch / flat_batch:.3f}",
                    f"{np.mean(top == exact_top):.3f}",
                )
            )
    return rows


def main() -> None:
    """Parse arguments, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000, help="queries searched batched and for recall")
    parser.add_argument("--single-queries", type=int, default=200, help="of them, searched one at a time for latency")
    parser.add_argument(
        "--query-similarity",
        type=float,
        default=0.8,
        help="cosine of a query to its source entry; 0: independent random queries",
    )
    parser.add_argument("--tolerance", type=float, default=0.1, help="position filter half-width")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, HNSWParams.ef_search, 256])
    parser.add_argument("--m", type=int, default=HNSWParams.m, help="HNSW graph neighbours per node")
    parser.add_argument(
        "--ef-construction", type=int, default=HNSWParams.ef_construction, help="HNSW build candidate list size"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="FAISS (OpenMP) threads; 0 keeps its default (all cores)"
    )
    args = parser.parse_args()
    if not 0 <= args.query_similarity < 1:
        parser.error("--query-similarity must be in [0, 1)")
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    print(
        f"Retrieval index benchmark: dim {args.dim}, {args.queries} queries at cosine {args.query_similarity} "
        "to an entry, "
        f"filter +-{args.tolerance} and one subject excluded; exact below {knowledge_base.EXACT_SEARCH_LIMIT} "
        "candidates; "
        f"faiss {faiss.__version__}, OpenMP threads: {faiss.omp_get_max_threads()}\n"
    )
    print(
        "| entries | index | parameters | build s | build ratio | filter | one at a time ms/query | ratio | "
        "batched ms/query | ratio | recall@1 vs exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for row in run(size, args):
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
