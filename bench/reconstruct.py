"""Benchmark of whole-volume reconstruction with a shipped preset: time by stage, quality by steps.

Run with ``make bench`` (or ``python -m bench.reconstruct --help``). Prints a Markdown table.

Input: the demo's synthetic CT/T1 pair (lib/data/demo_inputs.py, a pseudo-subject the models
never saw), or ``--source``/``--reference`` (e.g. a held-out BraTS FLAIR and T1 for
flair2t1), cut to ``--slices`` central slices and made x2 sparse, so the dense output has
``--slices`` slices and a ground truth to score. For each step count the whole job runs
``--repeats`` times: read the NIfTI, reconstruct (frame and normalise, retrieval, sampling,
back to the input grid) and write the four outputs; each stage's time is the median over the
repeats, and every total is also given as a ratio to a fixed matrix-multiply baseline timed in
the same process (steadier than seconds on a shared machine). Quality (PSNR, SSIM in the brain)
comes from the deterministic (eta = 0) output, identical across repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib

from bench.bbdm import baseline_seconds, peak_memory_mb
from lib.data.demo_inputs import make_demo_inputs
from lib.data.sparse import simulate_sparse_volume
from lib.evaluation.score import score_volumes
from lib.io import read_volume
from lib.models.device import resolve_inference_precision
from lib.pipeline import ReBrainPipeline, ReconstructionOptions
from lib.presets import load_preset
from lib.report.outputs import input_geometry, write_outputs

TARGET_S = 60.0  # issue 19's target for a 155-slice volume on this 2-core CPU, default settings


def central_slices(source: Path, reference: Path, slices: int, out: Path) -> tuple[Path, Path]:
    """Cut the pair to its ``slices`` central slices (odd counts keep the last x2 slice on the grid)."""
    paths = []
    for path in (source, reference):
        image = nib.load(path)
        start = max((image.shape[2] - slices) // 2, 0)
        cut = image.slicer[:, :, start : start + slices]
        paths.append(out / path.name)
        nib.save(cut, paths[-1])
    return paths[0], paths[1]


def run_once(pipeline: ReBrainPipeline, source: Path, out: Path, options: ReconstructionOptions) -> dict[str, float]:
    """One whole job; seconds per stage."""
    started = time.perf_counter()
    volume = simulate_sparse_volume(read_volume(source, modality=pipeline.preset.input_modality), factor=2)
    read_s = time.perf_counter() - started
    reconstruction = pipeline.reconstruct(volume, options)
    started = time.perf_counter()
    write_outputs(out, reconstruction, input_geometry(volume, 2))
    write_s = time.perf_counter() - started
    seconds = reconstruction.summary.seconds
    stages = {
        "read": read_s,
        "prepare": seconds["prepare"],
        "retrieval": seconds["retrieval"],
        "sampling": seconds["sampling"],
        "output": seconds["output"] + write_s,
    }
    stages["total"] = sum(stages.values())
    return stages


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ct2mri")
    parser.add_argument("--weights", default=None, help="folder of presets (default: model_weights/)")
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument(
        "--steps", type=int, nargs="+", default=None, help="step counts (default: 5, the preset's, and twice it)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=ReconstructionOptions.batch_size)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", default="auto", help="the network's arithmetic: auto (bf16 where native), fp32, bf16"
    )
    parser.add_argument("--source", type=Path, help="input NIfTI (default: the demo pair's CT)")
    parser.add_argument("--reference", type=Path, help="its ground-truth T1 NIfTI (with --source)")
    args = parser.parse_args()
    if (args.source is None) != (args.reference is None):
        parser.error("--source and --reference go together")

    preset = load_preset(args.preset, args.weights)
    steps_list = args.steps or sorted({5, preset.steps, 2 * preset.steps})
    started = time.perf_counter()
    pipeline = ReBrainPipeline.from_preset(preset, device=args.device)
    load_s = time.perf_counter() - started
    base = baseline_seconds(pipeline.device)
    print(
        f"Reconstruction benchmark: preset {preset.name}, {args.slices} output slices from "
        f"{args.slices // 2 + 1} acquired (x2), "
        f"device {pipeline.device}, precision {resolve_inference_precision(args.precision, pipeline.device).value}, "
        f"batch {args.batch_size}, {args.repeats} repeats (medians); models loaded "
        f"in {load_s:.1f} s; "
        f"baseline (10 matmuls 1024^2) {base * 1e3:.1f} ms\n"
    )
    print(
        "| steps | total s | total / baseline | read s | frame+normalise s | retrieval s | sampling s | output "
        f"s (incl. writing) | PSNR dB | SSIM | under {TARGET_S:.0f} s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.source is None:
            inputs = make_demo_inputs(folder / "inputs")
            args.source, args.reference = inputs["pair_ct"], inputs["pair_t1"]
        source, reference = central_slices(args.source, args.reference, args.slices, folder)
        for steps in steps_list:
            options = ReconstructionOptions(steps=steps, batch_size=args.batch_size, precision=args.precision)
            runs = [run_once(pipeline, source, folder / "out", options) for _ in range(args.repeats)]
            median = {stage: statistics.median(run[stage] for run in runs) for stage in runs[0]}
            quality = score_volumes(folder / "out" / "mri.nii.gz", reference)
            print(
                f"| {steps} | {median['total']:.1f} | {median['total'] / base:.0f} | {median['read']:.2f} | "
                f"{median['prepare']:.2f} | {median['retrieval']:.2f} | "
                f"{median['sampling']:.1f} | {median['output']:.2f} | {quality['psnr']:.2f} | "
                f"{quality['ssim']:.3f} | {'yes' if median['total'] < TARGET_S else 'no'} |",
                flush=True,
            )
    print(f"\npeak memory: {peak_memory_mb(pipeline.device):.0f} MB")


if __name__ == "__main__":
    main()
