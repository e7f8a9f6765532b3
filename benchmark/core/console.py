"""Saying things to the user from any layer."""

from __future__ import annotations

import sys


def say(text: str, file=None) -> None:
    """Print (to stderr unless ``file``), surviving a terminal that is gone (SIGHUP) or a closed pipe."""
    try:
        print(text, file=file or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
