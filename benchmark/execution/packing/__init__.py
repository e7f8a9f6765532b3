"""Packed training, opt-in (``run --pack auto|N``; the default everywhere is ``--pack off``): cells of one structure trained as one stacked model.

A newcomer can skip this package: with ``--pack off`` every cell runs alone through
``benchmark.execution.cell.run_cell`` and the one loop, ``benchmark.engine.train.train``, and
nothing here runs but the parsing of ``--pack`` (``plan.parse_pack``); the one-cell path never
imports this package (an import-linter contract in pyproject.toml). With packing on, the runner hands a list of cells to ``run.run_pack``;
each cell's method runs unchanged, and the trainings that can stack train together in one process,
each writing ``train``'s own checkpoint. Default off because a record should be one cell trained
in its own process, bit for bit reproducible; a packed float32 run sums in another order
(docs/scaling.md, "Packed training").

Modules, bottom to top: ``model`` (several models as one module), ``jobs`` (one training's
arguments, whether it packs, where it resumes), ``train`` (the shared loop over a stacked model),
``calibration`` (timing a pack against one model at a time), ``plan`` (which cells pack:
``--pack`` parsing, grouping, memory cap, ``auto``'s cached calibration), ``run`` (running a pack's
cells, each method in a thread of its own).
"""
