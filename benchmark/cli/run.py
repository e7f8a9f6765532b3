"""``python -m benchmark run | status | collect | list``: flags in, one call into the grid runner, a summary out."""

from __future__ import annotations

import os
import shlex
import sys
from collections import Counter
from pathlib import Path

from benchmark.core import cell_progress
from benchmark.core.errors import RunStopped, StorageError
from benchmark.execution import grids as grids_mod
from benchmark.execution import slurm, tuning
from benchmark.execution.cell import Cell
from benchmark.core.console import say
from benchmark.execution.run_options import DASK_CONNECT_TIMEOUT_S, DEFAULT_PACK, PACK_ENV, RunOptions
from benchmark.execution.runner import run_grid
from benchmark.execution.stop_signals import signal_name
from benchmark.execution.records import DamagedResult, diverged, state
from benchmark.execution.store import Store
from benchmark.execution.todo import estimate_epochs, pending_cells, trainings


def _grid_args(p, reading: bool = False) -> None:
    """--grid and --results-dir. ``run`` defaults to the quick grid; the commands that read a grid's
    results (``reading``) default, as plot and report do, to the last grid run in --results-dir."""
    if reading:
        p.add_argument("--grid", default=None,
                       help="preset name, grid TOML file or results folder name (default: the last grid run in "
                            "--results-dir, named in the output)")
    else:
        p.add_argument("--grid", default="quick",
                       help="preset name (see 'list') or path to a grid TOML file (default: quick)")
    p.add_argument("--results-dir", default="results", help="where result files go (default: results)")


def _last_grid(args) -> None:
    """Fill in ``args.grid`` with the last grid run in --results-dir when none is given, and say so."""
    if args.grid is not None:
        return
    from benchmark.execution.store import LAST_RUN, last_run

    last = last_run(args.results_dir)
    if last is None:
        raise ValueError(f"no --grid given and {Path(args.results_dir) / LAST_RUN} does not say which grid ran last "
                         f"there; name one with --grid, or run one first (python -m benchmark run --grid quick)")
    args.grid = last.get("grid_arg") if isinstance(last.get("grid_arg"), str) else last["grid"]
    say(f"grid {args.grid}: the last run in {args.results_dir} (--grid NAME reads another)")


def _selection_args(p) -> None:
    p.add_argument("--only", action="append", metavar="KEY=VALUE[,VALUE]",
                   help="keep cells whose method/arch/dataset/seed/parameter matches; repeatable (all must match)")
    p.add_argument("--seeds", help="comma-separated seeds replacing the grid's, e.g. 0,1,2")


def add_commands(sub) -> None:
    from benchmark.speed.estimate import FORMAT_HELP

    p = sub.add_parser("run", help="run every unfinished cell of a grid (rerun to resume)",
                       description="Expand the grid into cells, skip finished ones, and run the rest. Each finished "
                                   "cell is written at once to RESULTS_DIR/GRID/cells/; killing the run loses only "
                                   "the cells in flight, and running the same command again resumes.")
    _grid_args(p)
    _selection_args(p)
    p.add_argument("--jobs", type=int,
                   help="cells at once: local worker processes (default 1; on CPU each gets cores/jobs threads), "
                        "or with --backend dask the most cells in flight (default: all worker threads)")
    p.add_argument("--stall-timeout", type=float, default=cell_progress.DEFAULT_STALL_S, metavar="SECONDS",
                   help=f"a worker whose cell makes no training progress this long (and ten times its own longest "
                        f"pause between progress reports) counts as frozen: it is killed and its cell runs again "
                        f"(default {cell_progress.DEFAULT_STALL_S:g}); also how long "
                        f"a cell waits on a frozen holder of a dense-model lock")
    p.add_argument("--jobs-per-gpu", type=int,
                   help="with GPUs: run at most K cells per GPU at a time, each pinned to its GPU (jobs = GPUs x K)")
    p.add_argument("--backend", choices=["local", "dask", "slurm"], default="local",
                   help="local processes (default), an existing Dask cluster (needs --scheduler), or Dask workers "
                        "in SLURM jobs this run starts and cancels (--slurm-* below)")
    p.add_argument("--scheduler", help="Dask scheduler address for --backend dask, e.g. tcp://host:8786")
    p.add_argument("--connect-timeout", type=float, default=DASK_CONNECT_TIMEOUT_S, metavar="SECONDS",
                   help=f"with --backend dask: how long to try reaching the scheduler (default {DASK_CONNECT_TIMEOUT_S:g})")
    p.add_argument("--data-dir", help="dataset folder (default: $BENCHMARK_DATA, ./data, system locations)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default auto: cuda > mps > cpu)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run failed cells again, except those whose training diverged (blocked cells are always retried)")
    p.add_argument("--retry-diverged", action="store_true",
                   help="run cells whose training diverged (loss nan or inf) again. A divergence is a result of the "
                        "cell's settings: the same machine repeats it, a curve ends there and a tuning rule reads it, "
                        "so rerun them only after a change that should make them train (another machine may not "
                        "repeat them, and the records would then mix machines)")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (a speed option: results carry compiled=True, cell ids do not "
                        "change; worth it on GPUs and for conv nets, costs seconds to minutes of compiling per cell)")
    p.add_argument("--deterministic", action="store_true",
                   help="GPU-only: cuDNN and cuBLAS use reproducible kernels (torch.use_deterministic_algorithms, "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8), so a GPU run repeats bit for bit, somewhat slower; records "
                        "say deterministic=true. No effect on a CPU (its training is deterministic already); "
                        "cell ids do not change")
    p.add_argument("--pack", default=os.environ.get(PACK_ENV, DEFAULT_PACK), metavar="auto|off|N",
                   help="train cells of one structure (architecture, dataset, schedule, method family) as one "
                        "stacked model in one process: N = up to N cells per pack, off = one cell per task, auto "
                        f"= pack where a short calibration measured packing faster on this device (default: "
                        f"${PACK_ENV} or {DEFAULT_PACK}: records of one cell per process are bit-reproducible, "
                        f"while a packed float32 run sums in another order and moves accuracies by ~0.05 points; "
                        f"--pack auto packs where it measures faster). Records gain pack_size; see "
                        f"docs/scaling.md, 'Packed training'")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells that would run, their training epochs and the hours they take per "
                        "architecture, one at a time and with --jobs / --jobs-per-gpu; run nothing. Answers in "
                        "seconds: kinds of cells the grid has finished on this machine go at the pace their "
                        "records kept; speeds measured earlier here (cached in $BENCHMARK_CACHE_DIR or "
                        "~/.cache/dwf-bench) are used, the others are ROUGH, from each model's FLOPs and this "
                        "device's matrix-product rate (the output says which)")
    p.add_argument("--measure-speeds", action="store_true",
                   help="with --dry-run: time the models the speed cache lacks on --device (a few training steps, "
                        "an evaluation pass, setup and final measurement per architecture, batch and variant: seconds "
                        "for LeNets, minutes for VGG/ResNet; once per machine, torch version and thread count, then "
                        "cached) instead of the rough estimate from FLOPs")
    p.add_argument("--no-estimate", action="store_true",
                   help="with --dry-run: count cells and epochs only, measure and estimate nothing")
    p.add_argument("--speeds", metavar="FILE|MACHINE",
                   help="with --dry-run: estimate for a device that is not here, from " + FORMAT_HELP
                        + "; or from the speeds measured earlier on a machine whose name contains MACHINE (in the "
                          "cache, e.g. a shared home)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    slurm.add_arguments(p)
    p.set_defaults(handler=run_command)

    s = sub.add_parser("status", help="finished / failed / blocked / running / to do, per method",
                       description="Count the grid's cells by state, per method, from the result files.")
    _grid_args(s, reading=True)
    _selection_args(s)
    s.add_argument("--errors", action="store_true", help="also print the error of every failed or blocked cell")
    s.set_defaults(handler=status_command)

    c = sub.add_parser("collect", help="write RESULTS_DIR/GRID/results.csv and layers.csv from the result files",
                       description="One row per result record in results.csv (failed and blocked cells included, "
                                   "with their status) and one row per record x layer in layers.csv.")
    _grid_args(c, reading=True)
    c.set_defaults(handler=collect_command)

    ls = sub.add_parser("list", help="grids, methods (with parameters), architectures and datasets",
                        description="List what can be named in grids and on the command line.")
    ls.set_defaults(handler=list_command)


def _parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    from benchmark.execution.cell import check_seed

    seeds = []
    for item in text.split(","):
        try:
            seeds.append(check_seed(item.strip(), "--seeds"))
        except ValueError as exc:
            raise ValueError(f"{exc} (--seeds takes comma-separated integers, e.g. 0,1,2)") from None
    return seeds


def _check_results_dir(results_dir) -> None:
    path = Path(results_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--results-dir {results_dir} is a file, not a folder; give a folder (it is created if missing)")


def _select(args) -> tuple[grids_mod.Grid, list[Cell], list[tuning.TuneGroup]]:
    """The grid, its fixed cells and its tuned curves, as --seeds and --only select them (the
    filters see a tuned curve's cells as the grid wrote them; its tuning cells come with it)."""
    grid = grids_mod.load_grid(args.grid)
    seeds = _parse_seeds(getattr(args, "seeds", None))
    only = getattr(args, "only", None)
    cells = grids_mod.with_seeds(grid.cells, seeds)
    if not grid.tune_groups:
        return grid, grids_mod.filter_cells(cells, only), []
    kept = {c.id for c in grids_mod.filter_cells(cells + grids_mod.with_seeds(grid.final_templates(), seeds), only)}
    groups = []
    for group in grid.tune_groups:
        finals = [c for c in grids_mod.with_seeds(group.finals, seeds) if c.id in kept]
        if finals:
            groups.append(tuning.TuneGroup(group.spec, group.target, finals, group.tuning, group.finals))
    return grid, [c for c in cells if c.id in kept], groups


def _picks(grid: grids_mod.Grid, groups: list[tuning.TuneGroup], results_dir) -> tuple[list[Cell], list[str]]:
    """The final cells of the selected tuned curves whose tuning is complete, and lines that say
    what was picked and what waits. Rewrites the grid's tuning table from every tuned curve."""
    tuning_store, store = Store(results_dir, tuning.folder(grid.name)), Store(results_dir, grid.name)
    read, read_final = tuning_store.read_or_none, store.read_or_none
    every, _ = tuning.resolve(grid.tune_groups, read, read_final)
    if every:
        store.write_picks(tuning.table_rows(every))
    picks, waiting = tuning.resolve(groups, read, read_final)
    finals = tuning.picked_finals(picks)
    lines = [f"tuning: {len(picks)} of {len(groups)} tuned curve(s) have their pick "
             f"({', '.join(f'{p.group.label}: {p.group.spec.parameter}={p.value}' for p in picks[:6])}"
             f"{', ...' if len(picks) > 6 else ''}); table: {Store(results_dir, grid.name).root / tuning.TABLE}"]
    for chosen in picks:
        note = tuning.edge_note(list(chosen.group.spec.candidates), chosen.value, chosen.scores,
                                chosen.group.spec.validation * len(chosen.group.spec.seeds))
        if note:
            lines.append(f"  note: {chosen.group.label}: {chosen.group.spec.parameter}={chosen.value} is {note}")
        if chosen.dropped:
            lines.append(f"  note: {chosen.group.label}: {tuning.dropped_note(chosen.group.spec.parameter, chosen.dropped)}"
                         + ("" if chosen.value is not None else "; no candidate is left, so the curve has no final cells"))
    for group, done, total in waiting:
        lines.append(f"  waiting: {group.label} has {done} of {total} tuning cells done; its {len(group.finals)} "
                     f"final cell(s) run once all are (run the same command again)")
    return finals, lines


def run_options(args) -> RunOptions:
    """The run's options from its flags, checked once (``RunOptions``: every bad value named with
    its fix). The --slurm-* flags are read here, as they are flags about flags; that sbatch and
    dask-jobqueue are installed is checked last, and not for a dry run."""
    slurm_options = None
    if args.backend == "slurm":
        slurm_options = slurm.options_from_args(args, installed=False)
    elif slurm.given_flags(args):
        raise ValueError(f"{slurm.given_flags(args)[0]} is for --backend slurm; add --backend slurm or leave it out")
    options = RunOptions(results_dir=args.results_dir, jobs=args.jobs, jobs_per_gpu=args.jobs_per_gpu,
                         backend=args.backend, scheduler=args.scheduler, data_dir=args.data_dir, device=args.device,
                         retry_failed=args.retry_failed, retry_diverged=args.retry_diverged,
                         progress=False if args.no_progress else None,
                         compiled=args.compile, scheduler_timeout=args.connect_timeout, pack=args.pack,
                         slurm=slurm_options, deterministic=args.deterministic, stall_timeout=args.stall_timeout)
    if args.backend == "slurm" and not getattr(args, "dry_run", False):
        slurm.check_installed()
    return options


def _resume_command(args) -> str:
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
    return "python -m benchmark " + shlex.join(argv)


def run_command(args) -> int:
    options = run_options(args)
    grid, cells, groups = _select(args)
    store = Store(args.results_dir, grid.name)
    if args.dry_run:
        return dry_run(store, cells, args, grid, groups)
    if args.no_estimate or args.speeds or args.measure_speeds:
        flag = "--no-estimate" if args.no_estimate else "--speeds" if args.speeds else "--measure-speeds"
        raise ValueError(f"{flag} is for --dry-run; add --dry-run to see the estimate, or leave it out to run")
    if args.compile and args.backend == "local":  # on Dask the workers' machines matter, not this one
        from benchmark.engine.devices import check_compile, pick_device

        check_compile(pick_device(args.device))
    resume = _resume_command(args)
    try:
        store.check_writable()
        _, toml, _ = grids_mod.grid_source(args.grid)
        store.record_grid(args.grid, grid.source, grid.description, toml, resume)
        tuning_lines: list[str] = []
        summary = None
        if groups:  # first the tuning cells, in their own folder; then the picks' final cells
            cells_to_tune = tuning.tuning_cells(groups)
            tuning_grid = grids_mod.Grid(tuning.folder(grid.name), f"tuning cells of {grid.name}", cells_to_tune,
                                         grid.source)
            say(f"tuning {len(groups)} curve(s) on the validation split: {len(cells_to_tune)} tuning cell(s) in "
                 f"{Store(args.results_dir, tuning_grid.name).root}")
            first = run_grid(tuning_grid, cells_to_tune, options)
            if first.stopped_by is not None:
                summary = first
            else:
                finals, tuning_lines = _picks(grid, groups, args.results_dir)
                tuning_lines.insert(0, f"tuning cells: {first.finished} finished now, {first.skipped} already done, "
                                       f"{first.failed} failed (a failed candidate scores as chance), "
                                       f"{first.blocked} blocked")
                cells = cells + finals
        if summary is None:
            summary = run_grid(grid, cells, options)
    except (StorageError, RunStopped) as exc:
        say(f"error: {exc}")
        if isinstance(exc, RunStopped):  # the disk is fine: the CSVs can show what finished
            say(collect_after_run(store))
        say(f"the run stopped; cells finished before this were recorded. Once that is fixed, resume with: {resume}")
        return 2
    if summary.stopped_by is not None:
        name = signal_name(summary.stopped_by)
        say(f"stopped by {name}: {summary.finished} cell(s) finished and recorded in this run, "
             f"{summary.stopped_in_flight} in flight stopped and released (their per-epoch checkpoints are kept), "
             f"{summary.not_started} not started.")
        if summary.finished_labels:
            shown = summary.finished_labels[:10]
            more = f" (and {len(summary.finished_labels) - 10} more, see the log)" if len(summary.finished_labels) > 10 else ""
            say("finished in this run: " + "; ".join(shown) + more)
        say(collect_after_run(store))
        say(f"log: {summary.log}")
        say(f"resume with: {resume}")
        return 128 + int(summary.stopped_by)
    out = tuning_lines + [f"grid {grid.name}: {summary.finished} finished now, {summary.skipped} already done, "
           f"{summary.failed} failed, {summary.blocked} blocked, {summary.busy} running in another process"]
    if summary.worker_deaths:
        out.append(f"{summary.worker_deaths} time(s) a worker process died under a cell; "
                   f"{summary.requeued} cell(s) were run again")
    if summary.set_aside:
        out.append(f"{len(summary.set_aside)} damaged result file(s) set aside to {store.cells_dir / 'damaged'} "
                   f"and their cells run again")
    out.append(f"results: {store.cells_dir}  (log: {summary.log})")
    out.append(collect_after_run(store))
    from benchmark.analysis.diagnostics import warning_lines

    out += warning_lines(store.root / "results.csv")
    where = "" if args.results_dir == "results" else f" --results-dir {shlex.quote(str(args.results_dir))}"
    out.append(f"next: python -m benchmark plot{where}; python -m benchmark report{where}  (both read grid "
               f"{grid.name}, the last run there; report also writes {store.root / 'report.html'})")
    out += unfinished_lines(store, cells, args.grid, where)
    for line in out:
        say(line, sys.stdout)
    return 1 if summary.failed or summary.blocked else 0


def unfinished_lines(store: Store, cells: list[Cell], grid_arg: str, where: str, most: int = 10) -> list[str]:
    """The run's last words when cells of it failed or are blocked: each one named with the first
    line of its error, and the commands that show all errors and rerun them. None when all is well."""
    bad, written = [], store.finished_ids()
    for cell in cells:
        result = store.read_or_none(cell.id) if cell.id in written else None
        if result and result.get("status") in ("failed", "blocked"):
            error = str((result.get("records") or [{}])[0].get("error") or "").strip().splitlines()
            bad.append((result["status"], cell.label(), error[0][:200] if error else "", diverged(result)))
    if not bad:
        return []
    counts = Counter(status for status, *_ in bad)
    went = sum(1 for *_, gone in bad if gone)
    lines = [f"NOT ALL CELLS FINISHED: {counts['failed']} failed, {counts['blocked']} blocked "
             f"(the CSVs and tables leave them out{f'; {went} of the failed diverged' if went else ''}):"]
    lines += [f"  {status}: {label}: {error}" for status, label, error, _ in bad[:most]]
    if len(bad) > most:
        lines.append(f"  ... and {len(bad) - most} more")
    lines.append(f"all errors: python -m benchmark status --grid {shlex.quote(grid_arg)}{where} --errors; "
                 + rerun_hint(f"python -m benchmark run --grid {shlex.quote(grid_arg)}{where}",
                              counts["failed"] - went, went, counts["blocked"]))
    return lines


def rerun_hint(command: str, failed: int, went: int, blocked: int) -> str:
    """How to rerun what did not finish: failed cells with --retry-failed, blocked ones by running
    again; cells whose training diverged are results (``records.diverged``), so their flag comes with
    a warning."""
    parts = []
    if failed:
        parts.append(f"rerun the failed ones: {command} --retry-failed")
    if blocked:
        parts.append("blocked ones run again with the same command once what they lack is there")
    if went:
        parts.append(f"{went} diverged (loss nan or inf): a result of their settings, not an error (the same machine "
                     f"repeats it); after a change that should make them train: {command} --retry-diverged")
    return "; ".join(parts)


def collect_after_run(store: Store) -> str:
    """Write the grid's CSVs from every result file, as ``collect`` does; returns the line that says
    where, or why not. Never raises: what the run did stands either way."""
    if store.newest_record_ns() is None:
        return f"no result files in {store.cells_dir} yet, so no CSV"
    try:
        csv_path, _, table = store.collect()
    except (ValueError, OSError) as exc:  # a damaged result file, a disk that refuses the write
        return f"warning: the CSVs were not written: {exc}"
    counts = ", ".join(f"{v} {k}" for k, v in table["status"].value_counts().items())
    return f"CSV: {csv_path} ({len(table)} rows: {counts}), layers.csv and history.csv beside it"


def dry_run(store: Store, cells: list[Cell], args, grid: grids_mod.Grid | None = None,
            groups: list[tuning.TuneGroup] = ()) -> int:
    """List what a run would do and estimate how long it takes; reads the result files (and the
    speed cache) but changes nothing of the grid's. Tuned curves: their tuning cells, and the final
    cells of those whose pick is known."""
    if groups:
        tuning_store = Store(args.results_dir, tuning.folder(grid.name))
        tuning_todo, _ = pending_cells(tuning_store, tuning.tuning_cells(groups), args.retry_failed,
                                       retry_diverged=args.retry_diverged)
        picks, waiting = tuning.resolve(groups, tuning_store.read_or_none, store.read_or_none)
        cells = tuning_todo + cells + tuning.picked_finals(picks)
        print(f"tuning: {len(tuning_todo)} tuning cell(s) to run (in {tuning_store.root}); {len(picks)} of "
              f"{len(groups)} tuned curve(s) have their pick; the final cells of {len(waiting)} "
              f"({sum(len(g.finals) for g, _, _ in waiting)} cells) wait for it and are not listed")
    todo, skipped = pending_cells(store, cells, args.retry_failed, retry_diverged=args.retry_diverged)
    total_epochs = 0
    planned = []
    lines = []
    for cell in todo:
        epochs = estimate_epochs(cell)
        total_epochs += epochs
        planned.append((cell, epochs, trainings(cell)))
        lines.append(f"{cell.id}  {cell.label()}  ~{epochs} epochs")
        if len(lines) >= 10_000:
            sys.stdout.write("\n".join(lines) + "\n")
            lines = []
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    from benchmark.speed import estimate, recorded, wall_time

    plan = estimate.plan(planned, Path(args.results_dir) / "cache")
    shared = (f" and {plan.dense_epochs} in {plan.dense_trainings} dense training(s) that post-training methods share"
              if plan.dense_trainings else "")
    print(f"{len(todo)} cell(s) to run, {skipped} done or failed; ~{total_epochs} training epochs in the cells{shared}",
          flush=True)
    if plan.trainings and not args.no_estimate:
        found = []
        if not args.speeds:  # the grid's finished cells: the pace they kept here (benchmark.speed.recorded)
            pending = {cell.id for cell in todo}
            finished = [(cell, store.read_or_none) for cell in cells if cell.id not in pending]
            if groups:
                finished = [(cell, tuning_store.read_or_none) for cell in tuning.tuning_cells(groups)] + finished
            found = recorded.paces(finished, {estimate.unit_key(t.arch, t.dataset, t.variant, t.batch)
                                              for t in plan.trainings})
        lines = wall_time.estimate_lines(plan, device_name=args.device, jobs=args.jobs,
                                         backend="dask" if args.backend == "slurm" else args.backend,
                                         jobs_per_gpu=args.jobs_per_gpu, speeds_arg=args.speeds,
                                         measure=args.measure_speeds, say=lambda text: say(text), found=found)
        print("\n".join(lines))
    return 0


def status_command(args) -> int:
    _check_results_dir(args.results_dir)
    _last_grid(args)
    grid, cells, groups = _select(args)
    if groups:
        tuning_store, store = Store(args.results_dir, tuning.folder(grid.name)), Store(args.results_dir, grid.name)
        picks, waiting = tuning.resolve(groups, tuning_store.read_or_none, store.read_or_none)
        states = Counter(state(tuning_store.read_or_none(c.id)) for c in tuning.tuning_cells(groups))
        print(f"tuning ({tuning_store.root}): {states['ok']} finished, {states['diverged']} diverged, "
              f"{states['failed']} failed, {states['blocked']} blocked, {states['todo']} to do; "
              f"{len(picks)} of {len(groups)} tuned curve(s) "
              f"picked, {len(waiting)} waiting (their final cells are not counted below until then)")
        cells = cells + tuning.picked_finals(picks)
    store = Store(args.results_dir, grid.name)
    running = store.claimed()
    table: dict[str, Counter] = {}
    errors, damaged = [], []
    existing = store.finished_ids()
    for cell in cells:
        result = None
        if cell.id in existing:
            try:
                result = store.read(cell.id)
            except DamagedResult as exc:
                damaged.append(exc)
        status = state(result)
        column = {"ok": "finished", "todo": "running" if cell.id in running else "todo"}.get(status, status)
        table.setdefault(cell.method, Counter())[column] += 1
        if column in ("diverged", "failed", "blocked"):
            errors.append((cell, (result["records"] or [{}])[0].get("error", "")))
    states = ["finished", "diverged", "failed", "blocked", "running", "todo"]
    print(f"grid {grid.name} ({len(cells)} cells) in {store.root}")
    print(f"{'method':22s}" + "".join(f"{s:>10s}" for s in states))
    for method, counts in sorted(table.items()):
        print(f"{method:22s}" + "".join(f"{counts[s]:>10d}" for s in states))
    totals = sum(table.values(), Counter())
    print(f"{'total':22s}" + "".join(f"{totals[s]:>10d}" for s in states))
    if damaged:
        print(f"\n{len(damaged)} damaged result file(s), counted as to do ('run' sets them aside and reruns their cells):")
        for exc in damaged:
            print(f"  {exc}")
    if args.errors:
        for cell, error in errors:
            print(f"\n{cell.id} {cell.label()}:\n  {error}")
    elif errors:
        where = "" if str(args.results_dir) == "results" else f" --results-dir {shlex.quote(str(args.results_dir))}"
        print(f"\n{len(errors)} cell(s) diverged, failed or blocked; see them with --errors; "
              + rerun_hint(f"python -m benchmark run --grid {shlex.quote(args.grid)}{where}", totals["failed"],
                           totals["diverged"], totals["blocked"]))
    return 0


def collect_command(args) -> int:
    _check_results_dir(args.results_dir)
    _last_grid(args)
    store = Store(args.results_dir, grids_mod.grid_folder(args.grid, reading=True))
    if not store.cells_dir.is_dir() or not any(store.cells_dir.glob("*.json")):
        raise FileNotFoundError(f"no result files in {store.cells_dir}; run 'python -m benchmark run --grid {args.grid}' first")
    csv_path, layers_path, results = store.collect()
    counts = results["status"].value_counts().to_dict()
    print(f"{csv_path}: {len(results)} rows ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    print(f"{layers_path}")
    return 0


def list_command(args) -> int:
    import dataclasses

    from benchmark.engine import data as data_mod
    from benchmark.engine import models
    from benchmark.core.method import all_methods

    print("grids:")
    for name in grids_mod.preset_names():
        grid = grids_mod.load_grid(name)
        print(f"  {name:8s} {len(grid.cells):5d} cells  {grid.description}")
    print("methods (parameters with defaults):")
    for name, method in sorted(all_methods().items()):
        params = ", ".join(f"{f.name}={f.metadata.get('shown_default', repr(f.default))}"  # a default said in words
                           for f in dataclasses.fields(method.Params))
        print(f"  {name:22s} [{method.family}] {method.describe()}\n  {'':22s} {params or '-'}")
        if method.columns:
            print(f"  {'':22s} adds columns: {', '.join(method.columns)}")
    print("architectures: " + ", ".join(models.MODELS))
    print("datasets:")
    for name in data_mod.DATASETS:
        try:
            where = str(data_mod.locate(name))
        except data_mod.DatasetMissing:
            where = f"missing ({data_mod.fetch_command(name)})"
        print(f"  {name:14s} {where}")
    return 0
