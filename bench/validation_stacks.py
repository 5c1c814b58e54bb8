"""Whole brain stacks of a prepared split translated by BBDMs: how good is each model, per subject?

``python -m bench.validation_stacks PREPARED MODEL.pt [MODEL.pt ...] [--split val] [--steps 2 5] [--flip]
[--precision fp32]``

Every slice of each subject with some brain (not the in-loop validation's 16 slices, which
swing with the subjects' brightness) is translated from its prepared FLAIR or CT (the model's
own 2.5-D neighbours) and scored as a volume inside the brain mask: brain PSNR, the PSNR with
the subject's mean brain offset removed (an oracle column: how much of the error is one
brightness shift per subject, which no slice model can see), SSIM and I-SSIM (the truth's own
beside it). ``--flip`` adds the left-right flipped input (flipped back) and the mean of the two,
a test-time augmentation. Prints a Markdown table; the last rows are the means over subjects.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lib.data.dataset import PreparedSlices
from lib.diffusion.sampler import translate_slices
from lib.metrics import issim, psnr, ssim_2d
from lib.models.denoiser import load_bbdm
from lib.models.device import Precision, inference_memory_format, resolve_inference_precision
from lib.train.bbdm import slices_as_unit_volume

MIN_BRAIN_FRACTION = 0.02


def _translate(
    model: torch.nn.Module, spec, condition: torch.Tensor, steps: int, batch: int, precision: Precision
) -> torch.Tensor:
    """(N, 1, S, S) translated slices in [-1, 1], ``batch`` slices per network call."""
    parts = [
        translate_slices(model, spec, condition[i : i + batch], steps=steps, precision=precision)
        for i in range(0, len(condition), batch)
    ]
    return torch.cat(parts)


def score(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Brain PSNR, offset-removed PSNR, SSIM and I-SSIM of one subject's (H, W, N) volumes in [0, 1]."""
    offset = float(truth[mask].mean() - prediction[mask].mean())
    return {
        "psnr": psnr(prediction, truth, mask),
        "psnr_offset_removed": psnr(np.clip(prediction + offset, 0, 1), truth, mask),
        "ssim": ssim_2d(prediction, truth, mask),
        "issim": issim(prediction, mask),
    }


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="prepared dataset folder")
    parser.add_argument("models", nargs="+", help="BBDM model.pt files (fp32 or halved)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--steps", type=int, nargs="+", default=[2])
    parser.add_argument("--flip", action="store_true", help="also the flipped input and the mean of the two")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--precision", type=Precision.parse, default=Precision.AUTO, help="auto (bf16 where native), fp32, bf16"
    )
    args = parser.parse_args()
    cpu = torch.device("cpu")
    precision = resolve_inference_precision(args.precision, cpu)
    print(f"Sampling in {precision.value}.\n")
    print("| model | steps | input | subject | brain PSNR | offset removed | SSIM | I-SSIM (truth) |")
    print("|---|---|---|---|---|---|---|---|")
    for model_path in args.models:
        model, spec = load_bbdm(model_path)
        model.eval()
        model.to(memory_format=inference_memory_format(cpu))
        dataset = PreparedSlices(args.data, args.split, MIN_BRAIN_FRACTION, spec.neighbours)
        subjects = sorted(set(dataset.table["subject"]))
        for steps in args.steps:
            totals: dict[str, list[dict[str, float]]] = {}
            for subject in subjects:
                items = [dataset[i] for i in dataset.table.index[dataset.table["subject"] == subject]]
                condition = torch.stack([item["source"] for item in items])
                truth = slices_as_unit_volume(torch.stack([item["target"] for item in items]))
                mask = slices_as_unit_volume(torch.stack([item["mask"] for item in items])) > 0.5
                truth_issim = issim(truth, mask)
                outputs = {"plain": _translate(model, spec, condition, steps, args.batch_size, precision)}
                if args.flip:
                    outputs["flipped"] = _translate(
                        model, spec, condition.flip(-1), steps, args.batch_size, precision
                    ).flip(-1)
                    outputs["mean of both"] = (outputs["plain"] + outputs["flipped"]) / 2
                for name, output in outputs.items():
                    row = score(slices_as_unit_volume(output), truth, mask)
                    totals.setdefault(name, []).append(row)
                    print(
                        f"| {model_path} | {steps} | {name} | {subject} | {row['psnr']:.2f} | "
                        f"{row['psnr_offset_removed']:.2f} | {row['ssim']:.3f} | {row['issim']:.3f} "
                        f"({truth_issim:.3f}) |",
                        flush=True,
                    )
            for name, rows in totals.items():
                mean = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
                print(
                    f"| {model_path} | {steps} | {name} | **mean** | {mean['psnr']:.2f} | "
                    f"{mean['psnr_offset_removed']:.2f} | {mean['ssim']:.3f} | {mean['issim']:.3f} |"
                )


if __name__ == "__main__":
    main()
