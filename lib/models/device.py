"""Where models run: the torch device from a device word, and the mixed-precision context."""

from __future__ import annotations

import enum
import warnings

import torch


class Precision(enum.StrEnum):
    """The arithmetic of the network's forward pass (parameters, loss and optimiser stay float32)."""

    AUTO = "auto"  # bfloat16 on CUDA, float32 on CPU (the CPU default waits for issue 19's measurements)
    FP32 = "fp32"  # float32 throughout
    BF16 = "bf16"  # bfloat16 autocast where the device supports it, else float32 with a warning

    @classmethod
    def parse(cls, value: Precision | str) -> Precision:
        """The precision named ``value``.

        Raises:
            ValueError: naming the accepted words.
        """
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"precision must be one of {[p.value for p in cls]}, got {value!r}") from None


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
    """:attr:`Precision.FP32` or :attr:`Precision.BF16`, what ``precision`` means on ``device``.

    Raises:
        ValueError: an unknown precision word.
    """
    precision = Precision.parse(precision)
    if precision is Precision.AUTO:
        return Precision.BF16 if device.type == "cuda" and supports_bf16(device) else Precision.FP32
    if precision is Precision.BF16 and not supports_bf16(device):
        warnings.warn(f"{device} has no native bfloat16; computing in float32", stacklevel=2)
        return Precision.FP32
    return precision


def autocast_context(device: torch.device, precision: Precision | str = Precision.AUTO) -> torch.autocast:
    """The autocast context of ``precision`` on ``device`` (bfloat16, or disabled for float32)."""
    enabled = resolve_precision(precision, device) is Precision.BF16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
