"""The words for the arithmetic of a network's forward pass, without torch.

Apart from :mod:`lib.models.device` so that the reconstruction options (and the front ends that
check them and print their help) can name the precision without loading torch.
"""

from __future__ import annotations

import enum

from lib.options_schema import OptionWord


class Precision(OptionWord):
    """The arithmetic of the network's forward pass (parameters, loss, optimiser and sampler stay float32)."""

    option = enum.nonmember("precision")

    # What auto means is the device's and the task's (lib.models.device): training keeps float32
    # on a CPU, sampling takes bfloat16 wherever the device computes it natively.
    AUTO = "auto"
    FP32 = "fp32"  # float32 throughout
    BF16 = "bf16"  # bfloat16 autocast where the device supports it, else float32 with a warning
