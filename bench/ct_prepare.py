"""Benchmark of the real-CT preparation: brain extraction and registration to the CT head template.

Run with ``make bench-ct`` (or ``python -m bench.ct_prepare --help``). Prints a Markdown
table. Inputs: Debian's real Cranium CT (invesalius-examples, installable on a fresh machine)
and, when ``../shared/data/head_ct_study`` is beside the repository, the real head CT study's
2.5 mm series whole, x2 sparse and its upper 40 %. Each step runs ``--repeats`` times; times are
medians, also given as a ratio to a fixed matrix-multiply baseline timed in the same process
(steadier than seconds on a shared machine). ITK uses ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk
import torch

from bench.bbdm import baseline_seconds
from lib.data.ct_alignment import align_to_template, load_ct_template
from lib.data.ct_brain import extract_brain
from lib.data.invesalius import CRANIUM_PATH, read_inv3
from lib.data.sparse import simulate_sparse_volume
from lib.io import read_volume
from lib.io.volume import Volume

HEAD_CT_STUDY = Path(__file__).resolve().parents[2] / "shared" / "data" / "head_ct_study" / "DICOM"


def _timed(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def inputs() -> list[tuple[str, Callable[[], Volume]]]:
    """The benchmark's inputs that exist on this machine, each with a loader."""
    found: list[tuple[str, Callable[[], Volume]]] = []
    if CRANIUM_PATH.is_file():
        found.append(("Cranium (Debian), 256x256x108, 1.5 mm", read_inv3))
    if HEAD_CT_STUDY.is_dir():

        def upper(volume: Volume) -> Volume:
            count = volume.shape[2]
            return volume.take_slices(list(range(int(count * 0.6), count)))

        found.append(("head CT study, 512x512x67, 2.5 mm", lambda: read_volume(HEAD_CT_STUDY)))
        found.append(
            ("same, x2 sparse (34 slices)", lambda: simulate_sparse_volume(read_volume(HEAD_CT_STUDY), factor=2))
        )
        found.append(("same, upper 40 % (27 slices)", lambda: upper(read_volume(HEAD_CT_STUDY))))
    return found


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ITK threads (the CPU host's share)")
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    found = inputs()
    if not found:
        raise SystemExit(
            f"no real head CT here: install Debian's invesalius-examples ({CRANIUM_PATH}) or put "
            "../shared/data/head_ct_study beside the repository"
        )
    template_s, _ = _timed(load_ct_template, 1)  # cached after the first call
    base = baseline_seconds(torch.device("cpu"))
    print(
        f"Real-CT preparation benchmark: {args.repeats} repeats (medians), {args.threads} ITK thread(s); "
        f"template loaded in {template_s:.2f} s; "
        f"baseline (10 matmuls 1024^2) {base * 1e3:.1f} ms\n"
    )
    print(
        "| input | read s | brain extraction s | brain ml | registration s | registration / baseline | MI | "
        "rotation deg (R, A, S) | slice positions |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, load in found:
        read_s, volume = _timed(load, 1)
        extract_s, extraction = _timed(lambda volume=volume: extract_brain(volume), args.repeats)
        register_s, alignment = _timed(lambda volume=volume: align_to_template(volume), args.repeats)
        positions = alignment.normalised_positions(volume)
        rotation = ", ".join(f"{angle:.1f}" for angle in alignment.rotation_deg)
        print(
            f"| {name} | {read_s:.2f} | {extract_s:.2f} | {extraction.brain_volume_ml:.0f} | {register_s:.2f} "
            f"| {register_s / base:.0f} | "
            f"{alignment.metric:.3f} | {rotation} | {positions[0]:.2f}..{positions[-1]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
