"""Everything of the ReBrain Slicer module that needs no ``slicer`` import, so it is testable
with pytest: the HTTP client of the ReBrain MONAI Label server, the background job that runs a
request off the GUI thread, volume geometry conversions, the provenance overlays and the status line."""

from .client import ReBrainClient, ReconstructionResult, ServerError
from .job import Cancelled, JobState, ReconstructionJob
from .overlays import (
    STATUS_COLOURS,
    legend_text,
    provenance_rows,
    similarity_colour_table,
    slice_overlays,
    status_text,
)

__all__ = [
    "Cancelled",
    "JobState",
    "ReBrainClient",
    "ReconstructionJob",
    "ReconstructionResult",
    "STATUS_COLOURS",
    "ServerError",
    "legend_text",
    "provenance_rows",
    "similarity_colour_table",
    "slice_overlays",
    "status_text",
]
