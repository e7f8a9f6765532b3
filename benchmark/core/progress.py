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


#: How a run's bar reads: epochs done of the whole grid, then cells and the ETA in its postfix.
EPOCH_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs [{elapsed}{postfix}]"


def eta_seconds(remaining: list[float], queued: float, epoch_s: float | None, workers: int) -> float | None:
    """Seconds until a run ends: ``remaining`` epochs of each cell in flight and ``queued`` epochs
    of cells not started, at ``epoch_s`` seconds per epoch of one worker (measured in this run) on
    ``workers`` workers. The longest cell in flight bounds it from below, so near the end it is the
    time its last epochs take, not the whole grid's rate. None before any epoch was measured."""
    if epoch_s is None:
        return None
    total = sum(remaining) + queued
    return max(max(remaining, default=0.0), total / max(workers, 1)) * epoch_s


def duration(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class EpochProgress:
    """A run's progress in epochs: each cell weighs its estimated epochs (at least 1); a cell in
    flight counts the epochs its worker reported, a cell that ended its whole weight."""

    def __init__(self, weights: dict[str, int], workers: int, bar):
        self.weights = {cell: max(1, int(w)) for cell, w in weights.items()}
        self.workers = max(1, workers)
        self.bar = bar
        self.over: set[str] = set()
        self.reported: dict[str, int] = {}
        self.epoch_times: dict[str, float] = {}

    @property
    def total(self) -> int:
        return sum(self.weights.values())

    def done_epochs(self) -> int:
        in_flight = sum(min(self.reported.get(c, 0), w) for c, w in self.weights.items() if c not in self.over)
        return sum(self.weights[c] for c in self.over) + in_flight

    def cell_over(self, cell: str) -> None:
        self.over.add(cell)
        self.reported.pop(cell, None)

    def report(self, cell: str, epochs: int, epoch_s: float | None) -> None:
        if cell in self.over or cell not in self.weights:
            return
        self.reported[cell] = epochs
        if epoch_s:
            self.epoch_times[cell] = epoch_s

    def epoch_seconds(self) -> float | None:
        times = list(self.epoch_times.values())
        return sum(times) / len(times) if times else None

    def eta(self, in_flight: list[str]) -> float | None:
        remaining = [max(0, self.weights[c] - min(self.reported.get(c, 0), self.weights[c]))
                     for c in in_flight if c in self.weights and c not in self.over]
        started = set(in_flight) | self.over
        queued = sum(w for c, w in self.weights.items() if c not in started)
        return eta_seconds(remaining, queued, self.epoch_seconds(), self.workers)

    def show(self, in_flight: list[str], **postfix) -> None:
        """Move the bar to the epochs done, with cells done and the ETA beside it."""
        self.bar.n = self.done_epochs()
        self.bar.set_postfix(cells=f"{len(self.over)}/{len(self.weights)}", **postfix,
                             eta=duration(self.eta(in_flight)), refresh=False)
        refresh = getattr(self.bar, "refresh", None)
        if refresh is not None:
            refresh()
