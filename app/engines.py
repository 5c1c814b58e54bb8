"""The batch engines (a light module: the command line builds its parser without importing torch)."""

from __future__ import annotations

from enum import StrEnum


class BatchEngine(StrEnum):
    """Where ``batch`` reconstructs the series."""

    LOCAL = "local"  # one after another, in this process (app/batch.py)
    RAY = "ray"  # on the long-lived workers of a Ray cluster (app/batch_ray.py)
