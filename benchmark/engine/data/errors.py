"""What goes wrong with a dataset, as exceptions whose messages say what to do.

The ``data`` command, ``doctor`` and the runner tell these apart: a missing dataset blocks a cell
(with the command that fetches it), a corrupt file names itself, a failed download says why.
"""

from __future__ import annotations

#: The fix every DatasetCorrupt message ends with.
REFETCH = "delete it and fetch the dataset again"


class DatasetMissing(FileNotFoundError):
    """The dataset's files were found nowhere; the message lists the places and the fix."""


class DatasetCorrupt(ValueError):
    """A dataset file exists but cannot be decoded; the message names the file."""


class FetchFailed(RuntimeError):
    """An explicit download did not work; the message says why (often: no internet)."""
