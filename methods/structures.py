"""The model structures the harness times and packs (dense, masked, factorized, L1), named here so it needs no method's name.

A method says which structure it trains (``Method.Workload.step_variant`` for time estimates,
``Method.Workload.pack_family`` for packing). The speed estimate and the pack calibration build
stand-ins of a structure through ``stand_in`` without knowing which method asked; the method
module that trains a structure provides its stand-in (``provide_stand_in``), so this module imports
no method module (docs/design.md, Layers).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from benchmark.engine.train import TrainHooks

DENSE = "dense"
MASKED = "masked"
L1 = "l1"
#: The kind of every factorized structure, whatever its depth (``factorized(depth)``).
FACTORIZED = "dwf D="

#: Makes a freshly built model into member ``index`` of a pack of a structure: (structure, model, index) -> hooks.
StandIn = Callable[[str, nn.Module, int], TrainHooks]
_STAND_INS: dict[str, StandIn] = {}


def factorized(depth: int) -> str:
    """The structure of a model whose weights are products of ``depth`` factors."""
    return f"{FACTORIZED}{depth}"


def depth_of(structure: str | None) -> int | None:
    """The factor count of a factorized structure, None for any other."""
    if structure and structure.startswith(FACTORIZED):
        return int(structure[len(FACTORIZED):])
    return None


def kind_of(structure: str) -> str:
    """The structure without its parameters (every factorized depth is ``FACTORIZED``)."""
    return FACTORIZED if depth_of(structure) is not None else structure


def provide_stand_in(kind: str, make: StandIn) -> None:
    """Declare how stand-ins of structures of ``kind`` are made (by the method module that trains them)."""
    if kind in _STAND_INS and _STAND_INS[kind] is not make:
        raise ValueError(f"two stand-ins provided for the structure {kind!r}")
    _STAND_INS[kind] = make


def stand_in(structure: str, model: nn.Module, index: int) -> TrainHooks:
    """Make a freshly built ``model`` into member ``index`` of a pack of ``structure`` (its own λ
    where the structure has one, its own random mask) and return its training hooks. A dense
    model trains as it is."""
    if structure == DENSE:
        return TrainHooks()
    try:
        make = _STAND_INS[kind_of(structure)]
    except KeyError:
        raise ValueError(f"no method provides a stand-in for the structure {structure!r}; "
                         f"known: {', '.join(sorted([DENSE, *_STAND_INS]))}") from None
    return make(structure, model, index)
