"""The results folder of one grid: its layout, its result files (one per cell, written atomically by
the driver that owns the cell's claim, docs/design.md "Resumable, whatever stops it"), its events, and
the handle through which ``run``, ``status`` and ``collect`` reach claims (``claims``) and the CSVs
(``collection``).

Layout under ``<results-dir>/<grid>/``::

    cells/<cell_id>.json    the cell's config, status and records (temporary file + rename)
    cells/damaged/          result files that did not load or did not pass ``records.result_problems``,
                            set aside (kept for inspection) so that their cells run again
    claims/<cell_id>.claim  held while a driver runs the cell (``claims``)
    work/<cell_id>/         per-epoch checkpoints of unfinished cells (removed by the driver once
                            the cell's result is written)
    events.jsonl            one line per start / finish / failure, appended by every driver; an
                            audit trail, not the truth: a driver killed between writing a result
                            file and its line leaves the cell done without a ``finish`` line
    logs/<time>-<run>.log   human-readable log of each run
    results.csv, layers.csv, history.csv   written by ``run`` when it ends and by ``collect``;
                            ``plot`` and ``report`` collect again when they are missing or older
                            than the newest result file
    grid.json               the grid as ``run`` last ran it: its TOML, description and command
    report.html             the results page ``report`` writes

and ``<results-dir>/last-run.json`` names the grid of the last ``run`` there (``plot`` and
``report`` read that grid when no ``--grid`` is given).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import pandas as pd

from benchmark.core.errors import StorageError
from benchmark.core.files import atomic_write_text, writer_gone
from benchmark.core.untrusted import DamagedFile, parse_json, read_text
from benchmark.execution import collection
from benchmark.execution.claims import CLAIM_TIMEOUT_S, ClaimFiles, parse_claim
from benchmark.execution.records import DamagedResult, DamagedResults, result_problems

#: Which grid ``run`` ran last in a results folder.
LAST_RUN = "last-run.json"
#: What ``Store.write`` returns as the status of a result it did not write: the cell's claim was no
#: longer this run's when the file was about to be renamed into place.
CLAIM_LOST = "claim-lost"
#: What a grid's results folder may be called: one plain folder name, so that every path the tool
#: writes or deletes stays inside the results folder whatever a grid file or last-run.json says.
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Store:
    def __init__(self, results_dir: str | os.PathLike, grid: str, claim_timeout: float = CLAIM_TIMEOUT_S):
        if not isinstance(grid, str) or not FOLDER_NAME.fullmatch(grid) or ".." in grid:
            raise ValueError(f"grid name {grid!r} cannot name a results folder (it would put files outside "
                             f"{results_dir}): a grid's name is its file name without .toml, and must be letters, "
                             f"digits, '.', '_' and '-', starting with a letter or digit; rename the grid file")
        self.root = Path(results_dir) / grid
        self.grid = grid
        self.cells_dir = self.root / "cells"
        self.claims_dir = self.root / "claims"
        self.work_dir = self.root / "work"
        self.claims = ClaimFiles(self.claims_dir, claim_timeout)

    def ensure(self) -> None:
        if self.root.parent.exists() and not self.root.parent.is_dir():
            raise ValueError(f"--results-dir {self.root.parent} is a file, not a folder; give a folder "
                             f"(it is created if missing)")
        try:
            for d in (self.cells_dir, self.claims_dir, self.work_dir):
                d.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise ValueError(f"{exc.filename} is a file where a results folder should be; move it away "
                             f"or choose another --results-dir") from None
        except NotADirectoryError as exc:
            raise ValueError(f"cannot make {exc.filename}: a part of that path is a file, not a folder; "
                             f"choose another --results-dir") from None
        except OSError as exc:
            raise StorageError.from_os_error(exc, exc.filename) from None

    def check_writable(self) -> None:
        """Create, write and delete a file in each folder a run writes to, so a read-only or full
        results folder stops the run before anything trains (StorageError naming the folder)."""
        self.ensure()
        for folder in (self.root, self.cells_dir, self.claims_dir, self.work_dir):
            probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            try:
                with open(probe, "w") as fh:
                    fh.write("probe\n" * 64)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise StorageError.from_os_error(exc, folder) from None
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink()

    # ---- result files -------------------------------------------------------------------
    def path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def read(self, cell_id: str) -> dict | None:
        """The cell's result, None if it has none; DamagedResult if its file is not a regular file,
        is torn, lacks fields or holds records that ``records.result_problems`` refuses."""
        return self._load(self.path(cell_id), cell_id)

    def read_or_none(self, cell_id: str) -> dict | None:
        """``read`` that takes a damaged result file for a missing one: for readers that only ask
        whether a cell is done (picks, matching, status), since ``run`` sets such a file aside and
        trains the cell again."""
        try:
            return self.read(cell_id)
        except DamagedResult:
            return None

    @staticmethod
    def _load(path: Path, cell_id: str | None) -> dict | None:
        """The one loader of result files (``read`` and ``results``)."""
        try:
            text = read_text(path)
            if text is None:
                return None
            result = parse_json(path, text)
        except DamagedFile as exc:
            raise DamagedResult(path, exc.reason) from None
        problems = result_problems(result, cell_id)
        if problems:
            raise DamagedResult(path, "; ".join(problems))
        return result

    def status(self, cell_id: str) -> str:
        """ok / failed / blocked, 'todo' without a result, 'damaged' for a file that cannot be used."""
        try:
            result = self.read(cell_id)
        except DamagedResult:
            return "damaged"
        return result["status"] if result else "todo"

    def finished_ids(self) -> set[str]:
        """Ids of cells that have a result file (of any status, damaged or not): one listing of the
        folder instead of one lookup per cell."""
        try:
            return {name[:-5] for name in os.listdir(self.cells_dir) if name.endswith(".json") and not name.startswith(".")}
        except FileNotFoundError:
            return set()

    def set_aside(self, cell_id: str, reason: str) -> Path | None:
        """Move a damaged result file to cells/damaged/ (kept, with the reason beside it) so its
        cell runs again; returns where it went (None if it was gone already)."""
        src = self.path(cell_id)
        dest_dir = self.cells_dir / "damaged"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = dest_dir / f"{cell_id}.{stamp}-{uuid.uuid4().hex[:6]}.json"
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            os.rename(src, dest)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError.from_os_error(exc, dest) from None
        atomic_write_text(dest.with_suffix(".reason.txt"), reason + "\n")
        return dest

    def write(self, cell_id: str, config: dict, records: list[dict], run_id: str) -> dict:
        """Write the cell's result atomically, if ``run_id`` still owns the cell at the moment of the
        rename (``lost_claim``); returns the result. When it does not, nothing is written, an event
        ``claim-lost`` is recorded and a warning says so, and the result returned has status
        ``CLAIM_LOST`` (a driver frozen past its claim's expiry must not write a cell that another
        driver took over)."""
        statuses = {r["status"] for r in records}
        status = "ok" if statuses == {"ok"} else ("blocked" if "blocked" in statuses else "failed")
        result = {"cell_id": cell_id, "grid": self.grid, "status": status, "config": config, "run_id": run_id,
                  "finished_at": time.time(), "records": records}
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        lost = None

        def still_owned() -> bool:
            nonlocal lost
            lost = self.lost_claim(cell_id, run_id)
            return lost is None

        with self.claims.deciding():  # no takeover on this host between the check and the rename
            atomic_write_text(self.path(cell_id), json.dumps(result), commit_if=still_owned)
        if lost is None:
            return result
        self.event(CLAIM_LOST, cell_id, run_id, reason=lost)
        warnings.warn(f"cell {cell_id}: not written by run {run_id}, whose claim on it was lost ({lost}; "
                      f"was this run paused past the claim's expiry?)", RuntimeWarning, stacklevel=2)
        return result | {"status": CLAIM_LOST}

    def lost_claim(self, cell_id: str, run_id: str) -> str | None:
        """Why ``run_id`` may no longer write the cell (None when it may): another run's claim holds
        it, its claim is damaged, or its claim is gone and another run wrote the cell meanwhile. Reads
        only, so it can run under the takeover lock."""
        try:
            claim = parse_claim(self.claims.path(cell_id))
        except DamagedFile as exc:
            return f"its claim file is damaged: {exc.reason}"
        if claim is not None:
            return None if claim.run_id == run_id else f"run {claim.run_id} holds its claim now"
        try:
            previous = self.read(cell_id)
        except DamagedResult:
            return None
        if previous is not None and previous.get("run_id") not in (None, run_id):
            return f"run {previous['run_id']} wrote it meanwhile"
        return None

    def results(self, skip_damaged: bool = False) -> list[dict]:
        """Every result file, parsed and checked. A damaged one (torn, fields missing, impossible
        values, records collection cannot read) raises DamagedResults naming every such file, unless
        ``skip_damaged``. Something that is not a regular file (a FIFO would block the reader) is
        not a result: it is named in a warning and skipped (``run`` sets it aside)."""
        out, damaged = [], []
        if not self.cells_dir.is_dir():
            return out
        for path in sorted(self.cells_dir.glob("*.json")):
            if not path.is_file():
                warnings.warn(f"{path} is not a regular file; not collected ('python -m benchmark run' on this grid "
                              f"sets it aside and runs its cell again)", RuntimeWarning, stacklevel=2)
                continue
            try:
                result = self._load(path, path.stem)
            except DamagedResult as exc:
                damaged.append(exc)
                continue
            if result is not None:
                out.append(result)
        if damaged and not skip_damaged:
            raise DamagedResults(
                f"{len(damaged)} result file(s) cannot be collected:\n  " + "\n  ".join(map(str, damaged))
                + f"\n'python -m benchmark run' on this grid sets them aside (kept in {self.cells_dir / 'damaged'}) "
                  f"and runs their cells again; or move them away yourself")
        return out

    def remove_work(self, cell_id: str) -> None:
        """Remove the cell's checkpoints (after its result is written)."""
        shutil.rmtree(self.work_dir / cell_id, ignore_errors=True)

    # ---- claims (benchmark.execution.claims) ----------------------------------------------
    def claim(self, cell_id: str, run_id: str) -> bool:
        """Take the cell for this run; False if a live driver holds it (or it is finished)."""
        if not self.claims.take(cell_id, run_id):
            return False
        if self.status(cell_id) == "ok":  # a finished file may have appeared between listing and claiming
            self.claims.release(cell_id, run_id)
            return False
        return True

    def holder(self, cell_id: str) -> str | None:
        """The run id holding the cell's claim (None if unclaimed or damaged)."""
        return self.claims.holder(cell_id)

    def release(self, cell_id: str, run_id: str | None = None) -> None:
        """Drop the cell's claim; with ``run_id`` only if that run still holds it."""
        self.claims.release(cell_id, run_id)

    def release_run(self, run_id: str) -> int:
        """Drop every claim ``run_id`` still holds; returns how many (never raises)."""
        return self.claims.release_run(run_id)

    def refresh_run(self, run_id: str) -> int:
        """Touch every claim ``run_id`` holds (the heartbeat); returns how many."""
        return self.claims.refresh_run(run_id)

    def claimed(self) -> set[str]:
        """Ids of the cells a live driver holds."""
        return self.claims.live()

    def sweep_leftovers(self, older_than: float = 3600.0) -> int:
        """Remove temporary files a killed process left mid-write (a result's ``.*.tmp*``, a
        claim's ``.*.new``): at once when this host wrote it and the writer is dead, otherwise (another
        host's, an older name) once it is older than any write takes; and stale claims (their driver
        is dead, or on another host stopped touching them); returns how many."""
        removed = 0
        now = time.time()
        for folder, pattern in ((self.cells_dir, ".*.tmp*"), (self.root, ".*.tmp*"), (self.claims_dir, ".*.new")):
            if not folder.is_dir():
                continue
            for path in folder.glob(pattern):
                try:
                    if writer_gone(path) or now - path.stat().st_mtime > older_than:
                        path.unlink()
                        removed += 1
                except OSError:
                    pass
        return removed + self.claims.sweep_stale()

    # ---- events ---------------------------------------------------------------------------
    def event(self, kind: str, cell_id: str, run_id: str, **extra) -> None:
        """Append one JSON line (O_APPEND keeps concurrent drivers' lines whole)."""
        line = json.dumps({"t": time.time(), "event": kind, "cell_id": cell_id, "run_id": run_id, **extra}) + "\n"
        path = self.root / "events.jsonl"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                space = os.fstatvfs(fd)
                if space.f_bavail * space.f_frsize < len(line) + 65536:  # no room for a whole line: none
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written = os.write(fd, line.encode())
                if written != len(line.encode()):  # a short write on a full disk: end the torn line
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError.from_os_error(exc, path) from None

    # ---- CSVs (benchmark.execution.collection) ---------------------------------------------
    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """(results, layers, history) of every usable result file (``collection.tables``)."""
        return collection.tables(self.grid, self.results(), self.picks())

    def collect(self) -> tuple[Path, Path, pd.DataFrame]:
        """Write results.csv, layers.csv and history.csv; returns the first two paths and the results.
        DamagedResults (nothing written) if a result file is damaged."""
        frames = self.tables()
        csv_path, layers_path = collection.write_csvs(self.root, frames)
        return csv_path, layers_path, frames[0]

    def write_picks(self, rows: list[dict]) -> Path:
        return collection.write_picks(self.root, rows)

    def picks(self) -> dict[str, dict]:
        return collection.read_picks(self.root)

    def newest_record_ns(self) -> int | None:
        return collection.newest_record_ns(self.cells_dir)

    def stale_csvs(self) -> str | None:
        return collection.stale_csvs(self.root, self.cells_dir)

    # ---- the grid as it ran ---------------------------------------------------------------
    def record_grid(self, grid_arg: str, source: str, description: str, toml: str, command: str) -> None:
        """Remember the grid as this run runs it (grid.json in its folder) and that it ran last
        (last-run.json beside the grids' folders), so results can be read and rerun without retyping it."""
        self.root.mkdir(parents=True, exist_ok=True)
        at = time.time()
        atomic_write_text(self.root / "grid.json", json.dumps(
            {"grid": self.grid, "grid_arg": grid_arg, "source": source, "description": description,
             "command": command, "at": at, "toml": toml}, indent=1))
        atomic_write_text(self.root.parent / LAST_RUN, json.dumps(
            {"grid": self.grid, "grid_arg": grid_arg, "command": command, "at": at}, indent=1))

    def grid_record(self) -> dict:
        """What ``record_grid`` wrote ({} where no run recorded it)."""
        try:
            record = parse_json(self.root / "grid.json", read_text(self.root / "grid.json") or "{}")
        except DamagedFile:
            return {}
        return record if isinstance(record, dict) else {}


def last_run(results_dir) -> dict | None:
    """What ``record_grid`` wrote last into ``results_dir`` (None if no run has)."""
    try:
        record = parse_json(Path(results_dir) / LAST_RUN, read_text(Path(results_dir) / LAST_RUN) or "null")
    except DamagedFile:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("grid"), str) else None


def grid_to_read(grid_arg: str | None, results_dir) -> tuple[str, list[str]]:
    """The grid folder ``plot`` and ``report`` read, with what to tell the user: the folder ``--grid``
    names (``grids.grid_folder``: a preset, a grid file, or an earlier run's folder), else the last run's grid in
    ``results_dir``. Its CSVs are collected first when they are missing or out of date."""
    from benchmark.execution.grids import grid_folder

    said = []
    if grid_arg:
        grid = grid_folder(grid_arg, reading=True)
    else:
        last = last_run(results_dir)
        if last is None:
            folders = sorted(p.name for p in Path(results_dir).iterdir() if (p / "cells").is_dir()
                             or (p / "results.csv").is_file()) if Path(results_dir).is_dir() else []
            raise ValueError(f"no --grid given and {Path(results_dir) / LAST_RUN} does not say which grid ran last "
                             f"there; " + (f"name one with --grid ({', '.join(folders)})" if folders else
                                           "run one first, e.g. python -m benchmark run --grid quick"))
        grid = last["grid"]
        said.append(f"grid {grid}: the last run in {results_dir} (from {Path(results_dir) / LAST_RUN}; "
                    f"--grid NAME reads another)")
    store = Store(results_dir, grid)
    why = store.stale_csvs()
    if why:
        try:
            csv_path, _, table = store.collect()
        except StorageError as exc:
            if not (store.root / "results.csv").is_file():
                raise
            said.append(f"warning: {why}, but collecting failed ({exc}); reading the CSV as it is")
        else:
            said.append(f"collected {csv_path} ({len(table)} rows): {why}")
    return grid, said
