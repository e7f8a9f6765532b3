"""Progress bars through tqdm where it is installed, and a silent stand-in where it is not (a lent
GPU machine's own python may lack it: a run must not fail for want of a progress bar)."""

from __future__ import annotations

import sys


class SilentBar:
    """What the suite uses of a tqdm bar, drawing nothing; ``write`` still prints."""

    def __init__(self, total: int | None = None, *args, **kwargs):
        self.total = total
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(text: str, file=None) -> None:
        print(text, file=file or sys.stdout, flush=True)


def bar_class():
    """tqdm's auto bar, or ``SilentBar`` where tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return SilentBar
    return tqdm
