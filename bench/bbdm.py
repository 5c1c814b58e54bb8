"""Benchmark of the default BBDM denoiser: forward time, FLOPs, whole-volume sampling, memory.

Run with ``make bench-bbdm`` (or ``python -m bench.bbdm --help``). Prints a Markdown table.
Times are medians of repeated runs; each is also given as a ratio to a fixed matrix-multiply
baseline timed in the same process, which is steadier than seconds on a shared machine.
Sampling a whole volume at many steps is long on a CPU: step counts whose estimated time
exceeds ``--budget-s`` are reported as estimates (steps x measured time per step), marked so.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lib.diffusion.sampler import translate_slices
from lib.diffusion.scheduler import BridgeSchedulerConfig
from lib.models.denoiser import BBDMConfig, BBDMSpec, build_denoiser
from lib.models.device import resolve_device


def _median_seconds(function, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def baseline_seconds(device: torch.device, repeats: int = 5) -> float:
    """Median time of a fixed workload (ten 1024x1024 float32 matmuls): the yardstick."""
    a = torch.randn(1024, 1024, device=device)
    return _median_seconds(lambda: [a @ a for _ in range(10)], repeats, device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(
    config: BBDMConfig,
    device: torch.device,
    slices: int,
    steps_list: list[int],
    batch: int,
    repeats: int,
    budget_s: float,
) -> list[tuple[str, str, str]]:
    """Measure and return table rows (what, value, ratio to baseline)."""
    torch.manual_seed(0)
    model = build_denoiser(config).to(device).eval()
    parameters = sum(p.numel() for p in model.parameters())
    size = config.image_size
    rows = [("parameters", f"{parameters / 1e6:.2f} M", "")]
    base = baseline_seconds(device)
    rows.append(("baseline (10 matmuls 1024^2)", f"{base * 1e3:.1f} ms", "1.00"))

    single = torch.randn(1, 1 + config.condition_channels, size, size, device=device)
    t_single = torch.tensor([500], device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(single, t_single)
    rows.append(("FLOPs per slice forward", f"{counter.get_total_flops() / 1e9:.2f} GFLOP", ""))
    with torch.no_grad():
        model(single, t_single)  # warm-up
        forward_1 = _median_seconds(lambda: model(single, t_single), repeats, device)
        rows.append(("forward, batch 1", f"{forward_1 * 1e3:.1f} ms", f"{forward_1 / base:.2f}"))
        batched = torch.randn(batch, 1 + config.condition_channels, size, size, device=device)
        t_batched = torch.full((batch,), 500, device=device)
        forward_b = _median_seconds(lambda: model(batched, t_batched), repeats, device)
        rows.append(
            (
                f"forward, per slice (batch {batch})",
                f"{forward_b / batch * 1e3:.1f} ms",
                f"{forward_b / batch / base:.3f}",
            )
        )

    condition = torch.rand(slices, config.condition_channels, size, size, device=device) * 2 - 1
    spec = BBDMSpec(config, BridgeSchedulerConfig())

    def sample(steps: int) -> None:
        # Batched over slices in chunks of `batch`, as the pipeline does.
        for start in range(0, slices, batch):
            translate_slices(model, spec, condition[start : start + batch], steps=steps)

    per_step = _median_seconds(lambda: sample(2), max(1, repeats // 2), device) / 2
    rows.append((f"one sampling step, {slices} slices", f"{per_step:.2f} s", f"{per_step / base:.1f}"))
    for steps in steps_list:
        estimate = per_step * steps
        if estimate <= budget_s:
            seconds = _median_seconds(lambda steps=steps: sample(steps), 1, device)
            rows.append(
                (f"sample {slices} slices, {steps} steps", f"{seconds:.1f} s (measured)", f"{seconds / base:.1f}")
            )
        else:
            rows.append(
                (
                    f"sample {slices} slices, {steps} steps",
                    f"{estimate:.0f} s (estimated: {steps} x step)",
                    f"{estimate / base:.1f}",
                )
            )
    rows.append(
        (
            "peak memory",
            f"{peak_memory_mb(device):.0f} MB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})",
            "",
        )
    )
    return rows


def main() -> None:
    """Parse arguments, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=BBDMConfig.image_size)
    parser.add_argument("--channels", type=int, nargs="+", default=list(BBDMConfig.channels))
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--batch", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget-s", type=float, default=300.0, help="measure a step count only if its estimate is below this"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    channels = tuple(args.channels)
    config = BBDMConfig.for_channels(args.image_size, channels)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"BBDM denoiser benchmark: {args.image_size}x{args.image_size}, channels {channels}, attention at the "
        f"last level; {label}; torch {torch.__version__}\n"
    )
    print("| measure | value | ratio to baseline |\n|---|---|---|")
    for what, value, ratio in run(config, device, args.slices, args.steps, args.batch, args.repeats, args.budget_s):
        print(f"| {what} | {value} | {ratio} |")


if __name__ == "__main__":
    main()
