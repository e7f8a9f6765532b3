"""Training checkpoints (docs/design.md, "Resumable, whatever stops it").

``train`` and a packed run write the same ``Checkpoint`` after every epoch, so either resumes what
the other wrote. ``load_state`` reads it, and the dense cache, back as input that may be damaged.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from benchmark.core.files import save_atomic


class HookState(Protocol):
    """What a checkpoint restores of a method's hooks (``benchmark.engine.train.TrainHooks``)."""

    def load_state_dict(self, state: dict) -> None: ...


#: What a training checkpoint holds (``train`` writes it; a packed job's too), besides the hooks' state.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "history", "wall_s", "epoch", "snapshots")


@dataclass
class Checkpoint:
    """One training checkpoint, as ``train`` and a packed run (per model) write it after every
    epoch: one format, so either can resume what the other wrote."""

    model: dict
    optimizer: dict
    scheduler: dict
    history: list[dict]
    wall_s: float
    epoch: int  # epochs done
    snapshots: dict
    hooks: dict = field(default_factory=dict)  # TrainHooks.state_dict(); absent from older checkpoints
    # seconds of the whole cell when it was written (earlier runs before a resume included), so that
    # a resumed cell's wall_s is its whole training time; absent from older checkpoints and packs
    elapsed_s: float | None = None

    def save(self, path: Path) -> None:
        extra = ("hooks",) if self.elapsed_s is None else ("hooks", "elapsed_s")
        save_atomic({name: getattr(self, name) for name in CHECKPOINT_KEYS + extra}, path)

    @classmethod
    def load(cls, path: Path, map_location="cpu", mmap: bool = False) -> Checkpoint | None:
        """The checkpoint at ``path``, or None when there is none (or it was damaged: ``load_state``)."""
        state = load_state(path, keys=CHECKPOINT_KEYS, map_location=map_location, mmap=mmap)
        if state is None:
            return None
        return cls(**{name: state[name] for name in CHECKPOINT_KEYS}, hooks=state.get("hooks", {}),
                   elapsed_s=state.get("elapsed_s"))

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, hooks: HookState,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        """Put the saved weights, optimizer (and scheduler) state and hooks' state back in place."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(self.scheduler)
        hooks.load_state_dict(self.hooks)


def previous_checkpoint(checkpoint: Path) -> Path:
    """Where the checkpoint of the epoch before is kept beside ``checkpoint``: a packed run keeps it
    (docs/scaling.md, "Packed training"), and whoever removes a checkpoint removes this one too."""
    return checkpoint.with_name(checkpoint.name + ".prev")


def load_state(path: Path, *, keys: tuple[str, ...], map_location="cpu", mmap: bool = False) -> dict | None:
    """A checkpoint or cache file this tool wrote, or None when there is none. A results folder may be
    shared, so its files are input: they load with ``weights_only=True`` (tensors and plain data, no
    code runs), and one that does not load or lacks ``keys`` is named in a warning, moved aside to
    ``<name>.damaged`` and treated as absent, so its work is redone."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        missing = [k for k in keys if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"it lacks {missing}")
        return state
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways; each means the same here
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        warnings.warn(f"{path} cannot be loaded as a file of this tool ({type(exc).__name__}: {reason}); moved to "
                      f"{aside.name} beside it and its work is done again", RuntimeWarning, stacklevel=2)
        return None
