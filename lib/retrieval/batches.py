"""Batches for the retrieval encoder: runs of adjacent slices of a few subjects.

The contrastive and perceptual terms need, for an anchor slice p, its positives p+1 .. p+K of
the same subject in the same batch. Uniformly drawn slices almost never bring them along, so
each batch is built from ``subjects_per_batch`` distinct subjects with one run of
``run_length`` consecutive slices each: every slice of a run but the last ``K`` has all its K
positives, and the other subjects supply the negatives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.data.dataset import PreparedDataset, select_slices


class AdjacentRunSampler:
    """Endless random batches of row labels of a slice table, reproducible and resumable.

    Args:
        table: a slice table with columns subject, split, slice, brain_fraction (e.g.
            ``PreparedDataset.slices``).
        split: keep only this split (``train``, ``val``, ``test``), or None for all.
        min_brain_fraction: a run may only contain slices with at least this brain fraction.
        subjects_per_batch: distinct subjects per batch.
        run_length: consecutive slices per subject and batch (at least K + 1 for the loss's
            K positives to be present).
        seed: seed of the sampler's own generator.

    Raises:
        ValueError: invalid counts, or fewer subjects with a fitting run than requested.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        split: str | None,
        min_brain_fraction: float,
        subjects_per_batch: int,
        run_length: int,
        seed: int = 0,
    ) -> None:
        if subjects_per_batch < 1:
            raise ValueError(f"subjects_per_batch must be >= 1, got {subjects_per_batch}")
        if run_length < 2:
            raise ValueError(f"run_length must be >= 2 (a run of 1 slice has no positive), got {run_length}")
        self.subjects_per_batch = subjects_per_batch
        self.run_length = run_length
        rows = select_slices(table, split, min_brain_fraction)
        # Per subject: the row labels of every run, (runs, run_length), in slice order.
        self._runs: list[np.ndarray] = []
        self.subjects: list[str] = []
        for subject, group in sorted(rows.groupby("subject"), key=lambda item: str(item[0])):
            group = group.sort_values("slice")
            slices, labels = group["slice"].to_numpy(), group.index.to_numpy()
            if len(slices) < run_length:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(np.arange(len(slices)), run_length)
            # A window is a run when its slice indices are consecutive (no filtered-out gap).
            fitting = windows[slices[windows[:, -1]] - slices[windows[:, 0]] == run_length - 1]
            if len(fitting):
                self.subjects.append(str(subject))
                self._runs.append(labels[fitting])
        if len(self.subjects) < subjects_per_batch:
            raise ValueError(
                f"split {split!r} has {len(self.subjects)} subjects with a run of {run_length} adjacent slices "
                f"with brain fraction >= {min_brain_fraction}, fewer than subjects_per_batch = {subjects_per_batch}"
            )
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def batch_size(self) -> int:
        """Slices per batch."""
        return self.subjects_per_batch * self.run_length

    def next_batch(self) -> np.ndarray:
        """Row labels of the next batch: ``subjects_per_batch`` runs, one after the other."""
        chosen = torch.randperm(len(self.subjects), generator=self.generator)[: self.subjects_per_batch].tolist()
        runs = [self._runs[s][int(torch.randint(len(self._runs[s]), (1,), generator=self.generator))] for s in chosen]
        return np.concatenate(runs)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def _layout(self) -> dict[str, Any]:
        """What a saved state must agree with to continue the same sequence of batches."""
        return {
            "seed": self.seed,
            "subjects_per_batch": self.subjects_per_batch,
            "run_length": self.run_length,
            "subjects": list(self.subjects),
            "runs": [len(runs) for runs in self._runs],
        }

    def state_dict(self) -> dict[str, Any]:
        """The generator state and sampler layout, for checkpoints (plain values and a tensor)."""
        return {"generator": self.generator.get_state(), **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the sampler that wrote ``state`` stopped.

        Raises:
            ValueError: ``state`` was written by a sampler over other data or settings.
        """
        saved = {key: state.get(key) for key in self._layout()}
        if saved != self._layout():
            different = sorted(key for key, value in self._layout().items() if saved[key] != value)
            raise ValueError(f"sampler state does not match this sampler (differs in {different})")
        self.generator.set_state(state["generator"])


@dataclass
class RunBatch:
    """One batch of CT slices with what the loss needs to find positives.

    Attributes:
        source: (B, 1, S, S) float32 source (CT) slices in [-1, 1].
        subjects: subject key per item.
        slices: (B,) int64 slice index per item.
        positions: (B,) float32 normalised axial position per item.
    """

    source: torch.Tensor
    subjects: list[str]
    slices: torch.Tensor
    positions: torch.Tensor


def load_run_batch(dataset: PreparedDataset, rows: Sequence[int] | np.ndarray) -> RunBatch:
    """Read the rows of ``dataset.slices`` named by a sampler batch.

    Args:
        dataset: the prepared dataset whose ``slices`` table the sampler was built on.
        rows: row labels of that table.
    """
    table = dataset.slices.loc[np.asarray(rows)]
    subjects = [str(s) for s in table["subject"]]
    slices = np.array(table["slice"], dtype=np.int64)
    source = np.stack([dataset.array(subject, "source")[index] for subject, index in zip(subjects, slices)]).astype(
        np.float32
    )
    return RunBatch(
        source=torch.from_numpy(source[:, None]),
        subjects=subjects,
        slices=torch.from_numpy(slices),
        positions=torch.from_numpy(np.array(table["position"], dtype=np.float32)),
    )
