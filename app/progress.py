"""The command line's progress bar: a :data:`lib.progress.ProgressFn` drawn with tqdm."""

from __future__ import annotations

from types import TracebackType

from tqdm import tqdm


class ProgressBar:
    """A tqdm bar that the library drives through its progress callback.

    Use as ``with ProgressBar("reconstruct", "step") as bar: pipeline.reconstruct(..., progress=bar)``.
    A non-empty message is printed as its own line above the bar (a validation score, a
    finished run); the bar's total follows the library's. The bar appears with the first report,
    so a command refused before any work draws none.
    """

    def __init__(self, description: str, unit: str = "it", disable: bool = False) -> None:
        self._description = description
        self._unit = unit
        self._quiet = disable
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self._description, unit=self._unit, disable=self._quiet)
        if total != self._bar.total:
            self._bar.total = total
            self._bar.refresh()
        # update() redraws at most every mininterval (0.1 s): a log file gets a few lines, not one
        # per sampling step.
        self._bar.update(done - self._bar.n)
        if message and not self._quiet:
            self._bar.write(message)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
