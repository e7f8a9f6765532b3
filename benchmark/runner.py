"""Run a grid: expand it into cells, skip finished ones, dispatch the rest through joblib.

Workers only compute: each runs ``run_cell`` and returns its records, and the driver writes one
result file per cell as results arrive (so a cluster needs no shared disk for results, and a
killed run loses only the cells in flight, whose per-epoch checkpoints survive for the next run).
Local dispatch uses joblib's process pool; ``--backend dask`` sends the same tasks to an existing
Dask cluster through joblib's dask backend. A failed cell is recorded and the grid goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmark import grids as grids_mod
from benchmark.cell import Cell
from benchmark.store import HEARTBEAT_S, Store

log = logging.getLogger("benchmark.run")

# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------

_DATA_CACHE: dict = {}


def _cached_data(cell: Cell, data_dir, device):
    """Workers are reused across cells: keep the last dataset on its device instead of reloading."""
    from benchmark import data as data_mod

    key = (cell.dataset, str(data_dir), str(device), cell.subset)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = data_mod.load(cell.dataset, data_dir, device, limit=cell.subset)
    return _DATA_CACHE[key]


def execute(config: dict, *, data_dir, device, work_root, cache_dir, threads: int | None, gpu_slots=None,
            compiled: bool = False) -> list[dict]:
    """Run one cell in a worker process and return its records (never raises for the cell)."""
    import torch

    from benchmark import data as data_mod
    from benchmark.cell import run_cell
    from benchmark.train import pick_device

    if threads:
        torch.set_num_threads(threads)
    cell = Cell.from_config(config)
    slot = gpu_slots.get() if gpu_slots is not None else None
    try:
        dev = pick_device(f"cuda:{slot}" if slot is not None else device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        try:
            data = _cached_data(cell, data_dir, dev)
        except data_mod.DatasetMissing:
            data = None  # run_cell reports the cell as blocked
        return run_cell(cell, data_dir=data_dir, device=dev, work_root=work_root, cache_dir=cache_dir,
                        progress=False, data=data, compiled=compiled)
    finally:
        if slot is not None:
            gpu_slots.put(slot)


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    finished: int = 0
    failed: int = 0
    blocked: int = 0
    skipped: int = 0
    busy: int = 0  # claimed by another live driver
    log: Path | None = None


def priority(cell: Cell) -> int:
    """Dense trainings first (they feed the shared cache), post-training methods last."""
    from methods import get_method

    method = get_method(cell.method)
    if cell.method == "dense":
        return 0
    return 2 if method.needs_dense else 1


def pending_cells(store: Store, cells: list[Cell], retry_failed: bool) -> tuple[list[Cell], int]:
    todo, skipped = [], 0
    for cell in cells:
        status = store.status(cell.id)
        if status == "ok" or (status == "failed" and not retry_failed):
            skipped += 1
        else:
            todo.append(cell)
    return sorted(todo, key=priority), skipped


def estimate_epochs(cell: Cell) -> int:
    """Training epochs a cell costs (post-training methods reuse the cached dense training)."""
    from methods import get_method
    from methods.lottery import level_keep_counts

    p = cell.method_params
    if cell.method == "lottery":
        # The method's own schedule decides how many levels there are (their number does not depend
        # on how many weights there are, so one weight stands in for the network).
        levels = len(level_keep_counts(1, p.target_cr, p.prune_fraction))
        return levels * (cell.schedule.epochs - p.rewind)  # each level trains from the rewind epoch on
    if get_method(cell.method).needs_dense and cell.method != "dense":
        return int(getattr(p, "finetune_epochs", 0) or 0)
    return cell.schedule.epochs


def _threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def _setup_logging(store: Store, run_id: str) -> Path:
    """One log file per run, beside the results: logs/<start time>-<run id>.log."""
    path = store.root / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return path


def run_grid(grid: grids_mod.Grid, cells: list[Cell], *, results_dir="results", jobs: int | None = None,
             jobs_per_gpu: int | None = None, backend: str = "local", scheduler: str | None = None,
             data_dir=None, device: str = "auto", retry_failed: bool = False, progress: bool | None = None,
             compiled: bool = False) -> RunSummary:
    """Run every unfinished cell; returns counts. Safe to kill and rerun at any point."""
    import joblib
    from tqdm.auto import tqdm

    store = Store(results_dir, grid.name)
    store.ensure()
    run_id = uuid.uuid4().hex[:12]
    log_path = _setup_logging(store, run_id)
    todo, skipped = pending_cells(store, cells, retry_failed)
    summary = RunSummary(skipped=skipped, log=log_path)
    log.info("run %s: grid %s (%s), %d cells, %d to run, %d already done, backend=%s",
             run_id, grid.name, grid.source, len(cells), len(todo), skipped, backend)
    if not todo:
        return summary

    gpu_slots, n_jobs, threads = None, jobs or 1, _threads_per_job(jobs or 1)
    manager = None
    parallel_kwargs: dict = {}
    if backend == "dask":
        if not scheduler:
            raise ValueError("--backend dask needs --scheduler ADDRESS (e.g. tcp://10.0.0.5:8786)")
        from dask.distributed import Client

        client = Client(scheduler)
        n_jobs, threads = jobs or -1, None  # -1: as many cells at once as the cluster has worker threads
        parallel_kwargs["backend"] = "dask"
    elif backend == "local":
        client = None
        n_gpus = _visible_gpus() if device in ("auto", "cuda") else 0
        if jobs_per_gpu and not n_gpus:
            raise ValueError(f"--jobs-per-gpu {jobs_per_gpu}: no CUDA GPU is visible here (device {device!r}); "
                             f"use --jobs N for CPU worker processes")
        if jobs_per_gpu and jobs:
            raise ValueError("give either --jobs (CPU processes) or --jobs-per-gpu (GPU slots), not both")
        if jobs_per_gpu:
            import multiprocessing

            manager = multiprocessing.Manager()
            gpu_slots = manager.Queue()
            for _ in range(jobs_per_gpu):
                for gpu in range(n_gpus):
                    gpu_slots.put(gpu)
            n_jobs = n_gpus * jobs_per_gpu
    else:
        raise ValueError(f"unknown backend {backend!r}; use local or dask")

    common = {"data_dir": data_dir, "device": device, "work_root": str(store.work_dir),
              "cache_dir": str(Path(results_dir) / "cache"), "threads": threads, "gpu_slots": gpu_slots,
              "compiled": compiled}
    by_id = {c.id: c for c in todo}

    def tasks():
        for cell in todo:
            if store.status(cell.id) == "ok":
                summary.skipped += 1
                bar.update(1)
                continue
            if not store.claim(cell.id, run_id):
                summary.busy += 1
                bar.update(1)
                continue
            store.event("start", cell.id, run_id, label=cell.label())
            yield joblib.delayed(_execute_tagged)(cell.id, cell.config(), common)

    bar = tqdm(total=len(todo), desc=f"grid {grid.name}", unit="cell", disable=_no_bar(progress), dynamic_ncols=True)
    began = time.perf_counter()
    stop_heartbeat = start_heartbeat(store, run_id)
    try:
        with joblib.parallel_config(**parallel_kwargs):
            parallel = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered", pre_dispatch="n_jobs")
            for cell_id, records in parallel(tasks()):
                cell = by_id[cell_id]
                result = store.write(cell_id, cell.config(), records, run_id)
                store.release(cell_id)
                status = result["status"]
                store.event("finish" if status == "ok" else status, cell_id, run_id,
                            wall_s=sum(r.get("wall_s", 0) for r in records[:1]))
                if status == "ok":
                    summary.finished += 1
                    log.info("finished %s %s", cell_id, cell.label())
                else:
                    summary.failed += status == "failed"
                    summary.blocked += status == "blocked"
                    log.warning("%s %s %s: %s", status, cell_id, cell.label(), records[0].get("error"))
                    tqdm.write(f"{status}: {cell.label()}: {str(records[0].get('error')).splitlines()[0]}", file=sys.stderr)
                bar.update(1)
                bar.set_postfix(done=summary.finished, failed=summary.failed, blocked=summary.blocked,
                                left=bar.total - bar.n)
    finally:
        bar.close()
        stop_heartbeat()
        store.release_run(run_id)  # cells in flight when interrupted: free them for the next run
        if client is not None:
            client.close()
        if manager is not None:
            manager.shutdown()
        log.info("run %s ended after %.0f s: %s", run_id, time.perf_counter() - began, summary)
    return summary


def start_heartbeat(store: Store, run_id: str, every: float = HEARTBEAT_S):
    """Touch this run's claims every ``every`` seconds from a daemon thread, so drivers on other
    hosts sharing the results folder see them as alive; returns the function that stops it."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            store.refresh_run(run_id)

    thread = threading.Thread(target=beat, name=f"claims-heartbeat-{run_id}", daemon=True)
    thread.start()

    def halt():
        stop.set()
        thread.join()

    return halt


def _execute_tagged(cell_id: str, config: dict, common: dict) -> tuple[str, list[dict]]:
    return cell_id, execute(config, **common)


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def _no_bar(progress: bool | None) -> bool:
    return not (sys.stderr.isatty() if progress is None else progress)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _grid_args(p) -> None:
    p.add_argument("--grid", default="quick",
                   help="preset name (see 'list') or path to a grid TOML file (default: quick)")
    p.add_argument("--results-dir", default="results", help="where result files go (default: results)")


def _selection_args(p) -> None:
    p.add_argument("--only", action="append", metavar="KEY=VALUE[,VALUE]",
                   help="keep cells whose method/arch/dataset/seed/parameter matches; repeatable (all must match)")
    p.add_argument("--seeds", help="comma-separated seeds replacing the grid's, e.g. 0,1,2")


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run every unfinished cell of a grid (rerun to resume)",
                       description="Expand the grid into cells, skip finished ones, and run the rest. Each finished "
                                   "cell is written at once to RESULTS_DIR/GRID/cells/; killing the run loses only "
                                   "the cells in flight, and running the same command again resumes.")
    _grid_args(p)
    _selection_args(p)
    p.add_argument("--jobs", type=int,
                   help="cells at once: local worker processes (default 1; on CPU each gets cores/jobs threads), "
                        "or with --backend dask the most cells in flight (default: all worker threads)")
    p.add_argument("--jobs-per-gpu", type=int,
                   help="with GPUs: run at most K cells per GPU at a time, each pinned to its GPU (jobs = GPUs x K)")
    p.add_argument("--backend", choices=["local", "dask"], default="local",
                   help="local processes (default) or an existing Dask cluster (needs --scheduler)")
    p.add_argument("--scheduler", help="Dask scheduler address for --backend dask, e.g. tcp://host:8786")
    p.add_argument("--data-dir", help="dataset folder (default: $BENCHMARK_DATA, ./data, system locations)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default auto: cuda > mps > cpu)")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again (blocked cells are always retried)")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (a speed option: results carry compiled=True, cell ids do not "
                        "change; worth it on GPUs and for conv nets, costs seconds to minutes of compiling per cell)")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would run and an estimate, run nothing")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run_command)

    s = sub.add_parser("status", help="finished / failed / blocked / running / to do, per method",
                       description="Count the grid's cells by state, per method, from the result files.")
    _grid_args(s)
    _selection_args(s)
    s.add_argument("--errors", action="store_true", help="also print the error of every failed or blocked cell")
    s.set_defaults(handler=status_command)

    c = sub.add_parser("collect", help="write RESULTS_DIR/GRID/results.csv and layers.csv from the result files",
                       description="One row per result record in results.csv (failed and blocked cells included, "
                                   "with their status) and one row per record x layer in layers.csv.")
    _grid_args(c)
    c.set_defaults(handler=collect_command)

    ls = sub.add_parser("list", help="grids, methods (with parameters), architectures and datasets",
                        description="List what can be named in grids and on the command line.")
    ls.set_defaults(handler=list_command)


def _select(args) -> tuple[grids_mod.Grid, list[Cell]]:
    grid = grids_mod.load_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",")] if getattr(args, "seeds", None) else None
    cells = grids_mod.filter_cells(grids_mod.with_seeds(grid.cells, seeds), getattr(args, "only", None))
    return grid, cells


def run_command(args) -> int:
    grid, cells = _select(args)
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be >= 1")
    if args.jobs_per_gpu is not None and args.jobs_per_gpu < 1:
        raise ValueError(f"--jobs-per-gpu {args.jobs_per_gpu}: must be >= 1")
    store = Store(args.results_dir, grid.name)
    if args.dry_run:
        return dry_run(store, cells, args.retry_failed)
    if args.compile and args.backend == "local":  # on Dask the workers' machines matter, not this one
        from benchmark.train import check_compile, pick_device

        check_compile(pick_device(args.device))
    summary = run_grid(grid, cells, results_dir=args.results_dir, jobs=args.jobs, jobs_per_gpu=args.jobs_per_gpu,
                       backend=args.backend, scheduler=args.scheduler, data_dir=args.data_dir, device=args.device,
                       retry_failed=args.retry_failed, progress=False if args.no_progress else None,
                       compiled=args.compile)
    print(f"grid {grid.name}: {summary.finished} finished now, {summary.skipped} already done, "
          f"{summary.failed} failed, {summary.blocked} blocked, {summary.busy} running in another process")
    print(f"results: {store.cells_dir}  (log: {summary.log})")
    print(f"next: python -m benchmark collect --grid {args.grid} --results-dir {args.results_dir}")
    return 1 if summary.failed or summary.blocked else 0


def dry_run(store: Store, cells: list[Cell], retry_failed: bool) -> int:
    todo, skipped = pending_cells(store, cells, retry_failed)
    per_epoch = _seconds_per_epoch(store)
    total_epochs = 0
    for cell in todo:
        epochs = estimate_epochs(cell)
        total_epochs += epochs
        print(f"{cell.id}  {cell.label()}  ~{epochs} epochs")
    estimate = f", about {total_epochs * per_epoch / 60:.0f} min at {per_epoch:.2f} s/epoch measured so far" if per_epoch else ""
    print(f"{len(todo)} cell(s) to run, {skipped} done or failed; ~{total_epochs} training epochs "
          f"(+ shared dense trainings){estimate}")
    return 0


def _seconds_per_epoch(store: Store) -> float | None:
    rates = [r["wall_s"] / r["epochs"] for res in store.results() for r in res["records"][:1]
             if res["status"] == "ok" and r.get("epochs")]
    return sum(rates) / len(rates) if rates else None


def status_command(args) -> int:
    grid, cells = _select(args)
    store = Store(args.results_dir, grid.name)
    running = store.claimed()
    table: dict[str, Counter] = {}
    errors = []
    for cell in cells:
        status = store.status(cell.id)
        state = {"ok": "finished", "todo": "running" if cell.id in running else "todo"}.get(status, status)
        table.setdefault(cell.method, Counter())[state] += 1
        if state in ("failed", "blocked"):
            errors.append((cell, (store.read(cell.id)["records"] or [{}])[0].get("error", "")))
    states = ["finished", "failed", "blocked", "running", "todo"]
    print(f"grid {grid.name} ({len(cells)} cells) in {store.root}")
    print(f"{'method':22s}" + "".join(f"{s:>10s}" for s in states))
    for method, counts in sorted(table.items()):
        print(f"{method:22s}" + "".join(f"{counts[s]:>10d}" for s in states))
    totals = sum(table.values(), Counter())
    print(f"{'total':22s}" + "".join(f"{totals[s]:>10d}" for s in states))
    if args.errors:
        for cell, error in errors:
            print(f"\n{cell.id} {cell.label()}:\n  {error}")
    elif errors:
        print(f"\n{len(errors)} cell(s) failed or blocked; see them with --errors, rerun failed ones with "
              f"'python -m benchmark run --grid {args.grid} --retry-failed'")
    return 0


def collect_command(args) -> int:
    name = grids_mod.grid_source(args.grid)[0]
    store = Store(args.results_dir, name)
    if not store.cells_dir.is_dir() or not any(store.cells_dir.glob("*.json")):
        raise FileNotFoundError(f"no result files in {store.cells_dir}; run 'python -m benchmark run --grid {args.grid}' first")
    csv_path, layers_path, results = store.collect()
    counts = results["status"].value_counts().to_dict()
    print(f"{csv_path}: {len(results)} rows ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    print(f"{layers_path}")
    return 0


def list_command(args) -> int:
    import dataclasses

    from benchmark import data as data_mod
    from benchmark import models
    from methods import METHODS

    print("grids:")
    for name in grids_mod.preset_names():
        grid = grids_mod.load_grid(name)
        print(f"  {name:8s} {len(grid.cells):5d} cells  {grid.description}")
    print("methods (parameters with defaults):")
    for name, method in sorted(METHODS.items()):
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(method.Params))
        print(f"  {name:22s} [{method.family}] {method.describe()}\n  {'':22s} {params or '-'}")
    print("architectures: " + ", ".join(models.MODELS))
    print("datasets:")
    for name in data_mod.DATASETS:
        try:
            where = str(data_mod.locate(name))
        except data_mod.DatasetMissing:
            where = f"missing ({data_mod.fetch_command(name)})"
        print(f"  {name:14s} {where}")
    return 0
