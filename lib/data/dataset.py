"""Reading a prepared dataset: its manifest, its slice table, and a torch Dataset of slices."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lib.data.prepare import PREPARED_FORMAT_VERSION

# Slices used for training or for a knowledge base need an input with signal over at least this
# share of the brain (prepare's ``input_coverage``). Normal FLAIR/T1 pairs are at 0.74..1.0 per
# slice (dark CSF in FLAIR can sit at the normalised floor); Brats18_2013_20_1, whose FLAIR misses
# a third of the brain, is at 0.56..0.70 on nearly every slice.
MIN_INPUT_COVERAGE = 0.8


def select_slices(
    table: pd.DataFrame, split: str | None, min_brain_fraction: float = 0.0, min_input_coverage: float = 0.0
) -> pd.DataFrame:
    """The rows of a slice table (``PreparedDataset.slices``) in ``split`` (None: all) with at
    least ``min_brain_fraction`` brain and ``min_input_coverage`` input coverage (0: no limit)."""
    if split is not None:
        table = table[table["split"] == split]
    if min_brain_fraction > 0:
        table = table[table["brain_fraction"] >= min_brain_fraction]
    if min_input_coverage > 0:
        table = table[table["input_coverage"] >= min_input_coverage]
    return table


class PreparedDataset:
    """A prepared dataset folder (see :mod:`lib.data.prepare`).

    Raises:
        ValueError: if the folder is not a complete prepared dataset of a known format.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise ValueError(f"{self.root}: not a prepared dataset (no manifest.json); run `python main.py prepare`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != PREPARED_FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: format version {self.manifest.get('format_version')}, expected "
                f"{PREPARED_FORMAT_VERSION}"
            )
        self.slices = pd.read_csv(self.root / "slices.csv")
        if "input_coverage" not in self.slices:  # prepared before the column existed
            self.slices["input_coverage"] = 1.0
        missing = [
            s["key"]
            for s in self.manifest["subjects"]
            if not (self.root / "subjects" / s["key"] / "target.npy").is_file()
        ]
        if missing:
            raise ValueError(f"{self.root}: incomplete prepared dataset, missing arrays of {missing}")

    def subjects(self, split: str | None = None) -> list[str]:
        """Subject keys, optionally of one split."""
        return [s["key"] for s in self.manifest["subjects"] if split is None or s["split"] == split]

    # A PreparedDataset lives for the whole run; the shared 64-entry LRU bounds the open memory maps.
    @lru_cache(maxsize=64)  # noqa: B019
    def array(self, subject: str, name: str) -> np.ndarray:
        """A subject's ``source``, ``target`` or ``mask`` array (Z, S, S), memory-mapped."""
        return np.load(self.root / "subjects" / subject / f"{name}.npy", mmap_mode="r")


class PreparedSlices(Dataset):
    """2-D slices of a prepared dataset as tensors, for training and evaluation.

    Each item is a dict: ``source`` (C, S, S) with C = 1 + 2 * ``neighbours`` (the slice and
    its neighbours below and above, edge-clamped, for 2.5-D input), ``target`` (1, S, S),
    ``mask`` (1, S, S) brain mask as 0/1 floats,
    ``subject`` (key), ``slice`` (index), ``position`` (normalised axial position).

    Args:
        dataset: a :class:`PreparedDataset` or its folder.
        split: ``train``, ``val``, ``test`` or None for all.
        min_brain_fraction: skip slices with less brain than this (0 keeps all).
        neighbours: neighbouring slices on each side added as source channels.
        min_input_coverage: skip slices whose source has signal over less of the brain than this.
    """

    def __init__(
        self,
        dataset: PreparedDataset | str | os.PathLike[str],
        split: str | None = "train",
        min_brain_fraction: float = 0.0,
        neighbours: int = 0,
        min_input_coverage: float = 0.0,
    ) -> None:
        self.dataset = dataset if isinstance(dataset, PreparedDataset) else PreparedDataset(dataset)
        table = select_slices(self.dataset.slices, split, min_brain_fraction, min_input_coverage)
        if table.empty:
            raise ValueError(
                f"{self.dataset.root}: no slices in split {split!r} with brain fraction >= {min_brain_fraction}"
                f" and input coverage >= {min_input_coverage}"
            )
        self.table = table.reset_index(drop=True)
        self.neighbours = neighbours

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        row = self.table.iloc[index]
        subject, slice_index = str(row["subject"]), int(row["slice"])
        source = self.dataset.array(subject, "source")
        picks = np.clip(
            np.arange(slice_index - self.neighbours, slice_index + self.neighbours + 1), 0, source.shape[0] - 1
        )
        return {
            "source": torch.from_numpy(np.array(source[picks], dtype=np.float32)),
            "target": torch.from_numpy(
                np.array(self.dataset.array(subject, "target")[slice_index : slice_index + 1], dtype=np.float32)
            ),
            "mask": torch.from_numpy(
                np.array(self.dataset.array(subject, "mask")[slice_index : slice_index + 1], dtype=np.float32)
            ),
            "subject": subject,
            "slice": slice_index,
            "position": float(row["position"]),
        }
