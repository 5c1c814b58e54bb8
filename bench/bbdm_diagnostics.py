"""How well a trained BBDM recovers x0 in one step at each time step t (a diagnostic table).

``python -m bench.bbdm_diagnostics RUN/model.pt PREPARED [--split val] [--slices 16]``

For held-out slices, x_t is drawn from the true forward marginal q(x_t | x0, y) and the
model's one-step x0 estimate is scored (PSNR, data range 1 on [0, 1]). This separates the
network's accuracy at each t from the sampler: with the directional objective the estimate
degrades sharply towards t = T, where the closed-form recovery divides by 1 - m_t.
"""

from __future__ import annotations

import argparse

import torch

from lib.data.dataset import PreparedSlices
from lib.diffusion.scheduler import BridgeScheduler
from lib.metrics import psnr
from lib.models.denoiser import denoise, load_bbdm
from lib.train.bbdm import VALIDATION_MIN_BRAIN_FRACTION, slices_as_unit_volume, validation_indices


def main() -> None:
    """Print PSNR of the one-step x0 estimate against t."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--split", default="val")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 300, 500, 700, 900, 990])
    args = parser.parse_args()
    model, spec = load_bbdm(args.model)
    scheduler = BridgeScheduler(spec.scheduler)
    dataset = PreparedSlices(args.data, args.split, VALIDATION_MIN_BRAIN_FRACTION, spec.neighbours)
    items = [dataset[i] for i in validation_indices(dataset, args.slices)]
    condition = torch.stack([item["source"] for item in items])
    x0 = torch.stack([item["target"] for item in items])
    y = condition[:, spec.neighbours : spec.neighbours + 1]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    print(
        f"{args.model} ({spec.scheduler.objective.value}); identity PSNR "
        f"{psnr(slices_as_unit_volume(y), slices_as_unit_volume(x0)):.2f} dB\n"
    )
    print("| t | m_t | one-step x0 PSNR (dB) |\n|---|---|---|")
    with torch.no_grad():
        for step in args.steps:
            t = torch.full((len(items),), step)
            x_t = scheduler.q_sample(x0, y, t, noise)
            estimate = scheduler.predict_x0(denoise(model, x_t, t, condition), x_t, y, t)
            print(
                f"| {step} | {scheduler.m[step]:.3f} | "
                f"{psnr(slices_as_unit_volume(estimate), slices_as_unit_volume(x0)):.2f} |"
            )


if __name__ == "__main__":
    main()
