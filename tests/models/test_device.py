"""Devices and mixed precision: the device word, the precision option and its autocast context."""

from __future__ import annotations

import pytest
import torch

from lib.models.device import (
    Precision,
    autocast_context,
    inference_memory_format,
    resolve_device,
    resolve_inference_precision,
    resolve_precision,
    supports_bf16,
)

CPU = torch.device("cpu")


def test_device_words():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU") as error:
            resolve_device("cuda")
        assert "--" not in str(error.value)  # the library names no command-line flag


def test_auto_trains_in_bf16_where_the_cpu_computes_it_natively():
    """Issue 19 measured bf16 training on the CPU (same validation as fp32, 1.6x faster per step)."""
    native = supports_bf16(CPU)
    assert resolve_precision("auto", CPU) is (Precision.BF16 if native else Precision.FP32)
    assert resolve_precision(Precision.FP32, CPU) is Precision.FP32
    with autocast_context(CPU, "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    with autocast_context(CPU, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"precision must be one of \['auto', 'fp32', 'bf16'\]"):
        resolve_precision("fp16", CPU)


def test_bf16_on_the_cpu_computes_in_bfloat16_where_supported():
    if supports_bf16(CPU):
        assert resolve_precision("bf16", CPU) is Precision.BF16
        with autocast_context(CPU, "bf16"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    else:
        with pytest.warns(UserWarning, match="no native bfloat16"):
            assert resolve_precision("bf16", CPU) is Precision.FP32


def test_auto_samples_in_bf16_wherever_it_is_native():
    """Issue 19: sampling's auto takes bf16 on a CPU with AVX512-BF16 or AMX too."""
    expected = Precision.BF16 if supports_bf16(CPU) else Precision.FP32
    assert resolve_inference_precision("auto", CPU) is expected
    assert resolve_inference_precision("fp32", CPU) is Precision.FP32
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_inference_precision("half", CPU)
    # oneDNN's convolutions are fastest in channels_last, in either precision; CUDA stays contiguous.
    assert inference_memory_format(CPU) == torch.channels_last
    assert inference_memory_format(torch.device("cuda")) == torch.contiguous_format
