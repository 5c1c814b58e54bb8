"""Where models run: the torch device from a device word, the precision, and the mixed-precision context.

:attr:`Precision.AUTO` is bfloat16 wherever the device computes it natively (CUDA, or a CPU with
AVX512-BF16 or AMX) and float32 elsewhere, for training (:func:`resolve_precision`) and sampling
(:func:`resolve_inference_precision`) alike.
"""

from __future__ import annotations

import warnings

import torch

from lib.models.precision import Precision

__all__ = [
    "Precision",
    "autocast_context",
    "inference_memory_format",
    "resolve_device",
    "resolve_inference_precision",
    "resolve_precision",
    "supports_bf16",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error.

    Raises:
        ValueError: a CUDA device asked for on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available")
    return torch.device(name)


def supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively.

    On CPU: the AVX512-BF16 instructions or AMX tiles, which oneDNN uses for bfloat16
    convolutions and matrix products; without them bfloat16 is emulated and slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: Precision | str, device: torch.device) -> Precision:
    """:attr:`Precision.FP32` or :attr:`Precision.BF16`, what ``precision`` means for training on ``device``.

    Auto is bfloat16 wherever it is native, a CPU with AVX512-BF16 or AMX included. Measured on
    this project's CPU (issue 19): a BBDM training step 1.6x faster than float32, and bf16 and
    fp32 runs from the same seed at the same validation brain PSNR (12.147 against 12.148 dB
    at iteration 100); the shipped 128 x 128 flair2t1 weights were trained this way. The
    parameters, loss, EMA and optimiser state stay float32 either way.

    Raises:
        ValueError: an unknown precision word.
    """
    precision = Precision.parse(precision)
    if precision is Precision.AUTO:
        return Precision.BF16 if supports_bf16(device) else Precision.FP32
    if precision is Precision.BF16 and not supports_bf16(device):
        warnings.warn(f"{device} has no native bfloat16; computing in float32", stacklevel=2)
        return Precision.FP32
    return precision


def resolve_inference_precision(precision: Precision | str, device: torch.device) -> Precision:
    """:attr:`Precision.FP32` or :attr:`Precision.BF16`, what ``precision`` means for sampling on ``device``.

    The same rule as training's :func:`resolve_precision`: on a CPU with native bfloat16 it
    makes a sampling step faster and changes a reconstruction by far less than 0.1 dB (issue
    19's measurements, ``make bench-bbdm``).

    Raises:
        ValueError: an unknown precision word.
    """
    return resolve_precision(precision, device)


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """The memory layout a network's weights should have to run on ``device``, in either precision.

    ``channels_last`` on a CPU, in either precision: oneDNN's convolutions are fastest in it.
    Measured with ``make bench-bbdm`` (the 128 x 128 BBDM's forward per slice, 2 threads): on an
    AVX2-only CPU float32 177-228 ms against 200-273 ms contiguous (1.1-1.2x); on an AVX512-BF16
    CPU float32 1.14x / 1.24x / 1.54x faster at batch 4 / 8 / 16, and bfloat16 2.1-3.4x faster
    than contiguous float32. Float32 results differ from the contiguous layout's only in the last
    bits (the order of the sums). On CUDA, the contiguous layout.
    """
    if device.type == "cpu":
        return torch.channels_last
    return torch.contiguous_format


def autocast_context(device: torch.device, precision: Precision | str = Precision.AUTO) -> torch.autocast:
    """The autocast context of ``precision`` on ``device`` (bfloat16, or disabled for float32)."""
    enabled = resolve_precision(precision, device) is Precision.BF16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
