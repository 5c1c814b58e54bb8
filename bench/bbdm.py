"""Benchmark of the default BBDM denoiser: forward time, FLOPs, whole-volume sampling, memory,
and the forward pass per slice in each arithmetic setting (float32 in either memory layout, and
bfloat16 where the CPU has it natively) at several batch sizes.

Run with ``make bench-bbdm`` (or ``python -m bench.bbdm --help``). Prints Markdown tables.
Times are medians of repeated runs; each is also given as a ratio to a fixed matrix-multiply
baseline timed in the same process, which is steadier than seconds on a shared machine.
Sampling a whole volume at many steps is long on a CPU: step counts whose estimated time
exceeds ``--budget-s`` are reported as estimates (steps x measured time per step), marked so.
The first table runs the network in ``--precision`` as the pipeline does (auto: bf16 where the
device computes it natively). The second times every setting at every batch size in turn, round
after round, so that a load that comes and goes on a shared machine weighs on all alike; its
speed-ups over contiguous float32 are the numbers to read, and its fastest cell per slice says
which precision, layout and ``batch_size`` the pipeline should default to on such a CPU.
"""

from __future__ import annotations

import argparse
import copy
import functools
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lib.diffusion.sampler import translate_slices
from lib.diffusion.scheduler import BridgeSchedulerConfig
from lib.models.denoiser import BBDMConfig, BBDMSpec, build_denoiser
from lib.models.device import (
    Precision,
    autocast_context,
    inference_memory_format,
    resolve_device,
    resolve_inference_precision,
    supports_bf16,
)


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
    precision: Precision = Precision.FP32,
) -> list[tuple[str, str, str]]:
    """Measure and return table rows (what, value, ratio to baseline); ``precision`` is resolved."""
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
    model.to(memory_format=inference_memory_format(device))
    with torch.no_grad(), autocast_context(device, precision):
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
            translate_slices(model, spec, condition[start : start + batch], steps=steps, precision=precision)

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


# The arithmetic settings the per-slice table compares: (label, precision, memory layout).
SETTINGS = (
    ("fp32", Precision.FP32, torch.contiguous_format),
    ("fp32 channels_last", Precision.FP32, torch.channels_last),
    ("bf16 channels_last", Precision.BF16, torch.channels_last),
)


def settings_for(device: torch.device) -> tuple[tuple[str, Precision, torch.memory_format], ...]:
    """The settings worth timing on ``device``: bfloat16 only where it is native."""
    return tuple(setting for setting in SETTINGS if setting[1] is Precision.FP32 or supports_bf16(device))


def precision_per_slice(
    config: BBDMConfig, device: torch.device, batches: list[int], repeats: int
) -> dict[tuple[int, str], float]:
    """Seconds per slice of one network forward at each (batch size, setting label).

    Every setting runs the same weights (a copy in its memory layout), each after one warm-up
    forward at each batch size (oneDNN builds its kernels for a shape on first use). Each of
    the ``repeats`` rounds times every batch size in every setting, one forward each in turn,
    so that a load that comes and goes on a shared machine falls on all of them alike; times are
    the medians over the rounds.
    """
    torch.manual_seed(0)
    reference = build_denoiser(config).to(device).eval()
    settings = settings_for(device)
    models = {label: copy.deepcopy(reference).to(memory_format=layout) for label, _, layout in settings}
    precisions = {label: precision for label, precision, _ in settings}
    size = config.image_size
    inputs = {
        batch: (
            torch.randn(batch, 1 + config.condition_channels, size, size, device=device),
            torch.full((batch,), 500, device=device),
        )
        for batch in batches
    }

    def forward(batch: int, label: str) -> None:
        with autocast_context(device, precisions[label]):
            models[label](*inputs[batch])

    cells = [(batch, label) for batch in batches for label in models]
    seconds: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    with torch.no_grad():
        for cell in cells:
            forward(*cell)  # warm-up
        for _ in range(repeats):
            for cell in cells:
                seconds[cell].append(_median_seconds(functools.partial(forward, *cell), 1, device))
    return {cell: statistics.median(times) / cell[0] for cell, times in seconds.items()}


def main() -> None:
    """Parse arguments, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=BBDMConfig.image_size)
    parser.add_argument("--channels", type=int, nargs="+", default=list(BBDMConfig.channels))
    parser.add_argument("--neighbours", type=int, default=BBDMConfig.neighbours, help="2.5-D neighbours per side")
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--batch", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--precision",
        type=Precision.parse,
        default=Precision.AUTO,
        help="the network's arithmetic in the first table: auto (bf16 where native, as the pipeline), fp32, bf16",
    )
    parser.add_argument(
        "--precision-batches",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="batch sizes of the per-slice table",
    )
    parser.add_argument("--precision-only", action="store_true", help="print only the per-slice table")
    parser.add_argument(
        "--budget-s", type=float, default=300.0, help="measure a step count only if its estimate is below this"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    channels = tuple(args.channels)
    config = BBDMConfig.for_channels(args.image_size, channels, neighbours=args.neighbours)
    precision = resolve_inference_precision(args.precision, device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"BBDM denoiser benchmark: {args.image_size}x{args.image_size}, channels {channels}, attention at the "
        f"last level, {args.neighbours} neighbours; {label}; torch {torch.__version__}\n"
    )
    if not args.precision_only:
        print(f"Network in {precision.value}.\n\n| measure | value | ratio to baseline |\n|---|---|---|")
        rows = run(config, device, args.slices, args.steps, args.batch, args.repeats, args.budget_s, precision)
        for what, value, ratio in rows:
            print(f"| {what} | {value} | {ratio} |")
    labels = [setting[0] for setting in settings_for(device)]
    if not supports_bf16(device):
        print(f"\n{label}: no native bfloat16, so the table times float32 in both layouts only.")
    print(
        "\nms per slice of one forward; in brackets the speed-up over fp32 in the contiguous layout (the "
        "pipeline's float32 setting).\n"
    )
    print("| batch | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
    per_slice = precision_per_slice(config, device, args.precision_batches, args.repeats)
    for batch in args.precision_batches:
        base_time = per_slice[batch, labels[0]]
        cells = [f"{per_slice[batch, lab] * 1e3:.1f} ({base_time / per_slice[batch, lab]:.2f}x)" for lab in labels]
        print(f"| {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
