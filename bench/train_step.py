"""Training throughput of the BBDM denoiser in fp32 and bf16 (issue 19): images per second.

Run with ``make bench-train`` (or ``python -m bench.train_step --help``). One training step is
the training loop's on random data: the bridge loss (:func:`lib.train.bbdm.bridge_loss`, forward
under the precision's autocast, loss in float32) and :func:`lib.train.loop.optimisation_step`
(backward, gradient clipping, AdamW, the EMA). fp32 and bf16
steps, float32 in both memory layouts (contiguous and ``channels_last``), are interleaved in one
process (the machine is shared: interleaving spreads its noise over all), and each is reported
as the median of ``--repeats`` timed steps after warm-up, with the ratio to contiguous fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim.swa_utils import AveragedModel

from bench.bbdm import settings_for
from lib.diffusion.scheduler import BridgeScheduler, BridgeSchedulerConfig
from lib.models.denoiser import BBDMConfig, build_denoiser
from lib.models.device import Precision, autocast_context, resolve_device, supports_bf16
from lib.train.bbdm import TrainConfig, bridge_loss
from lib.train.loop import optimisation_step, warmup_ema


def make_step(
    config: BBDMConfig,
    precision: Precision,
    device: torch.device,
    batch: int,
    seed: int = 0,
    memory_format: torch.memory_format = torch.contiguous_format,
):
    """A closure that runs one training step at ``precision``, weights in ``memory_format``, on fresh random data."""
    torch.manual_seed(seed)
    model = build_denoiser(config).to(device).to(memory_format=memory_format)
    defaults = TrainConfig()
    optimiser = torch.optim.AdamW(model.parameters(), lr=defaults.lr, weight_decay=defaults.weight_decay)
    ema = AveragedModel(model, multi_avg_fn=warmup_ema(defaults.ema_decay), use_buffers=True)
    scheduler = BridgeScheduler(BridgeSchedulerConfig(objective="plain"))
    autocast = autocast_context(device, precision)
    size = config.image_size
    generator = torch.Generator().manual_seed(seed)

    def step() -> float:
        condition = torch.rand((batch, config.condition_channels, size, size), generator=generator) * 2 - 1
        x0 = torch.rand((batch, 1, size, size), generator=generator) * 2 - 1
        noise = torch.randn((batch, 1, size, size), generator=generator)
        t = torch.randint(scheduler.config.timesteps, (batch,), generator=generator)
        args = [tensor.to(device) for tensor in (condition, x0, t, noise)]
        loss = bridge_loss(scheduler, model, args[0], args[1], args[2], args[3], config.neighbours, autocast)
        optimisation_step(loss, model, optimiser, defaults.grad_clip, ema)
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--neighbours", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    config = BBDMConfig.for_channels(args.image_size, tuple(args.channels), neighbours=args.neighbours)
    settings = settings_for(device)
    steps = {
        label: make_step(config, precision, device, args.batch, memory_format=layout)
        for label, precision, layout in settings
    }
    seconds: dict[str, list[float]] = {label: [] for label in steps}
    for round_index in range(args.warmup + args.repeats):
        for label, step in steps.items():
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index >= args.warmup:
                seconds[label].append(time.perf_counter() - started)
    base = statistics.median(seconds[settings[0][0]])
    print(
        f"BBDM training step: {args.image_size}x{args.image_size}, channels {tuple(args.channels)}, "
        f"neighbours {args.neighbours}, batch {args.batch}, {device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved steps after {args.warmup} warm-up"
    )
    if not supports_bf16(device):
        print(f"(bf16 not supported on {device}: fp32 only)")
    print("\n| setting | s / step | images / s | speed-up vs fp32 |\n|---|---|---|---|")
    for label, times in seconds.items():
        median = statistics.median(times)
        print(f"| {label} | {median:.2f} | {args.batch / median:.1f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
