"""Benchmark of ``batch``'s engines: series per hour, local against Ray with 1 and 2 workers.

Run with ``make bench-batch`` (or ``python -m bench.batch --help``). Writes a DICOM tree of
``--series`` CT series cut from the real head CT study in ``../shared/data`` (or from Debian's
Cranium CT when the study is absent), then reconstructs it with the shipped ``ct2mri`` preset
at ``--steps`` (few: this measures the engines, not the model) with

- the local engine (in this process; the preset loaded once),
- Ray with 1 and with 2 workers (a Ray instance started for each run, as ``--engine ray``
  without ``--address`` does; each worker loads the preset once).

Ray's processes listen on every interface of their network namespace, so when this runs as
root it re-runs itself inside a network namespace of its own that has only ``lo`` (as the
tests run Orthanc and Ray); otherwise it says so and runs as it is.

Prints a Markdown table: wall time, series per hour, the median time a worker spent on one
series, start-up (preset load, or Ray start + workers' preset load) and Ray's added time per
series against the local engine; medians of ``--repeats`` interleaved runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO.parent / "shared" / "data" / "head_ct_study" / "DICOM"
STUDY_SERIES = "1.3.6.1.4.1.5962.99.1.1761388472.1291962045.1616669124536.2634.0"  # axial 2.5 mm


def source_volume():
    """A real head CT: the study's 2.5 mm axial series, else Debian's Cranium."""
    from lib.io import read_volume

    if STUDY.is_dir():
        return read_volume(STUDY, modality="CT", series_uid=STUDY_SERIES)
    from lib.data.invesalius import read_inv3

    return read_inv3()


def write_tree(root: Path, count: int, slices: int) -> None:
    """``count`` CT series of ``slices`` consecutive slices each, from the middle of the head."""
    from lib.io.dicom_writer import SeriesDescription, write_dicom_series

    volume = source_volume()
    middle = volume.shape[2] // 2
    starts = [middle - slices + (k % 3) * (slices // 2) for k in range(count)]
    for k, start in enumerate(starts):
        description = SeriesDescription(modality="CT", series_description=f"bench series {k}")
        write_dicom_series(volume.take_slices(list(range(start, start + slices))), root / f"s{k}", description)


def run_engine(tree: Path, out: Path, engine: str, workers: int, steps: int) -> dict[str, float]:
    """One batch run; wall and start-up seconds and each series' own seconds."""
    from app.batch import run_batch_with
    from lib.pipeline import ReBrainPipeline, ReconstructionOptions
    from lib.presets import load_preset

    preset = load_preset("ct2mri")
    options = ReconstructionOptions(steps=steps)
    started = time.perf_counter()
    if engine == "local":
        from app.batch import LocalRunner

        pipeline = ReBrainPipeline.from_preset(preset)
        ready = time.perf_counter()
        outcomes = run_batch_with(tree, out, LocalRunner(pipeline, options, None, tree), "CT", progress=False)
    else:
        from app.batch_ray import RayOptions, RayRunner

        with RayRunner(preset, options, None, tree, RayOptions(workers=workers)) as runner:
            ready = time.perf_counter()
            outcomes = run_batch_with(tree, out, runner, "CT", progress=False)
    wall = time.perf_counter() - started
    done = [o for o in outcomes if o.status == "done"]
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise RuntimeError(f"{engine}: {len(failed)} series failed: {failed[0].message}")
    return {"wall": wall, "startup": ready - started, "series": [o.seconds for o in done]}


def measure(args: argparse.Namespace) -> None:
    configs = [("local", 1), ("ray", 1), ("ray", 2)]
    runs: dict[tuple[str, int], list[dict]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory(prefix="rebrain-bench-batch-") as work:
        tree = Path(work) / "in"
        write_tree(tree, args.series, args.slices)
        # Interleaved repeats: a load that comes and goes on a shared machine hits every engine alike.
        for repeat in range(args.repeats):
            for engine, workers in configs:
                out = Path(work) / f"out-{engine}-{workers}-{repeat}"
                runs[(engine, workers)].append(run_engine(tree, out, engine, workers, args.steps))
    results = {
        config: {
            "wall": statistics.median(run["wall"] for run in config_runs),
            "startup": statistics.median(run["startup"] for run in config_runs),
            "series": statistics.median(statistics.median(run["series"]) for run in config_runs),
        }
        for config, config_runs in runs.items()
    }
    local_per_series = results[("local", 1)]["wall"] / args.series
    print(
        f"\n{args.series} CT series of {args.slices} slices, ct2mri, {args.steps} steps, {os.cpu_count()} cores, "
        f"median of {args.repeats} interleaved runs\n"
    )
    print("| engine | workers | wall s | series / hour | median series s | start-up s | added s per series vs local |")
    print("|---|---|---|---|---|---|---|")
    for (engine, workers), result in results.items():
        per_series = result["wall"] / args.series
        added = per_series * workers - local_per_series if engine == "ray" else 0.0
        print(
            f"| {engine} | {workers} | {result['wall']:.1f} | {3600 / per_series:.0f} | "
            f"{result['series']:.1f} | {result['startup']:.1f} | {added:+.1f} |"
        )
    print(
        "\nStart-up: the local engine's preset load; Ray's start plus its workers' preset load (once per worker). "
        "Added time per series: a Ray run's wall time per series times its workers, minus the local engine's "
        "wall time per series (the start-up included in both)."
    )


def in_own_namespace(argv: list[str]) -> int | None:
    """Re-run this benchmark inside a fresh network namespace with only ``lo``; None if impossible."""
    name = f"rebrain-bench-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return None
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        command = ["ip", "netns", "exec", name, sys.executable, "-m", "bench.batch", "--inside", *argv]
        return subprocess.run(command, cwd=REPO).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=6, help="series in the tree (default 6)")
    parser.add_argument("--slices", type=int, default=16, help="slices per series (default 16)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per engine; medians (default 3)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.inside:
        code = in_own_namespace(list(argv if argv is not None else sys.argv[1:]))
        if code is not None:
            return code
        print("note: no network namespace (needs root): Ray's processes listen on this machine's interfaces")
    measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
