"""What a method's ``run(ctx)`` may use of the harness, written down as a typed protocol.

The harness builds the context a layer above the methods (``benchmark.execution.cell.Context``,
docs/design.md, Layers); this protocol names exactly the members the methods use, so a method
written against it (a built-in one or a plugin, docs/extending.md) needs nothing else, and
``tests/test_plugins.py`` checks that the execution context provides every one of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # for the annotations only: the core layer imports no torch at run time
    import torch
    from torch import nn


@runtime_checkable
class MethodContext(Protocol):
    """The harness as a method sees it: data, models, the shared training loop and the metrics."""

    cell: Any
    """The cell being run (``benchmark.execution.cell.Cell``): its seed, arch, dataset and parameters."""
    data: Any
    """The cell's dataset split (``benchmark.engine.data.Data``): ``train``, ``val``, ``test``, ``spec``."""
    device: torch.device
    """Where the cell trains."""
    channels_last: bool
    """Whether models train in the channels-last memory layout (convolutional nets on a GPU)."""

    @property
    def schedule(self) -> Any:
        """The cell's training schedule (``benchmark.engine.schedule.Schedule``)."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one input example, channels first."""

    def new_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialized model of the cell's arch (the cell's seed unless one is given)."""

    def train(self, model: nn.Module, hooks: Any = None, phase: str = "train", schedule: Any = None,
              snapshot_epochs: tuple[int, ...] = (), first_epoch: int = 0, first_batch: int = 0,
              constant_lr: bool = False) -> tuple[Any, dict]:
        """Train ``model`` with the shared loop and ``hooks`` (a ``TrainHooks``); (history, snapshots)."""

    def steps_per_epoch(self, schedule: Any = None) -> int:
        """Optimizer steps in one epoch of ``schedule`` (the cell's by default)."""

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(test accuracy, test loss) of ``model`` as it stands."""

    def dense(self, snapshot: int | str | None = None) -> Any:
        """The shared dense training of this cell (``DenseModel``), with the snapshot to rewind to."""

    def measure(self, model: nn.Module, threshold: float = 0.0, history: Any = None, **extra: Any) -> dict:
        """One result record of ``model``: every shared metric, ``history`` and ``extra`` as columns."""


#: The members a method may use (what ``MethodContext`` declares), for checks that a context has them all.
MEMBERS: frozenset[str] = frozenset(MethodContext.__annotations__) | {
    name for name, value in vars(MethodContext).items()
    if not name.startswith("_") and (callable(value) or isinstance(value, property))}
