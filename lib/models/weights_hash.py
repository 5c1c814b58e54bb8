"""One content hash for model weights, shared by every checkpoint that names another."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def state_dict_hash(state_dict: Mapping[str, torch.Tensor], prefix: bytes = b"") -> str:
    """SHA-256 over ``prefix``, then a state dict's names (sorted), dtypes, shapes and tensor bytes.

    Independent of device, memory layout and how the dict was saved and loaded, so equal hashes
    mean identical weights. ``prefix`` folds in what else decides the outputs (e.g. a config).
    """
    digest = hashlib.sha256(prefix)
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # Raw bytes through a uint8 view: exact for every dtype, bfloat16 included.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
