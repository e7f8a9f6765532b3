"""One result file per cell, written atomically by the driver only, and collection to tidy CSVs.

Layout under ``<results-dir>/<grid>/``::

    cells/<cell_id>.json    the cell's config, status and records (temporary file + rename)
    cells/damaged/          result files that did not parse or held impossible values, set aside
                            (kept for inspection) so that their cells run again
    claims/<cell_id>.claim  held while a driver runs the cell (created whole with link(2), which
                            fails if it exists), so two drivers never train one cell twice; the
                            driver touches its claims every minute, and a claim whose process is
                            gone (same host: pid and process start time) or that has not been
                            touched for ``claim_timeout`` seconds (another host) is taken over,
                            one driver at a time (a lock file in claims/)
    work/<cell_id>/         per-epoch checkpoints of unfinished cells (removed by the driver once
                            the cell's result is written)
    events.jsonl            one line per start / finish / failure, appended by every driver
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
import dataclasses
import errno
import json
import math
import os
import re
import socket
import time
import uuid
import warnings
from pathlib import Path

import pandas as pd

from benchmark.core.errors import StorageError
from benchmark.core.method import all_methods
from benchmark.core.files import atomic_write_text, file_lock, pid_alive, process_start, temporary_name, writer_gone
from benchmark.engine.train import OPT_IN_DEFAULTS
from benchmark.execution import tuning

#: How often a running driver touches its claims, and how old another host's claim may get
#: before it counts as abandoned (ten missed heartbeats: generous for clock skew on shared disks).
HEARTBEAT_S = 60.0
CLAIM_TIMEOUT_S = 600.0

#: Record keys that are not CSV columns (nested or bulky); layers go to layers.csv.
NESTED_KEYS = ("history", "layers", "config", "traceback", "pruning_log")

#: The columns results.csv always has, in this order; other record keys follow.
CSV_COLUMNS = [
    "grid", "cell_id", "method", "variant", "family", "arch", "dataset", "seed", "depth", "lam",
    "target_cr", "level", "test_acc", "cr", "cr_total", "cr_effective", "speedup", "sparsity",
    "epochs", "wall_s", "device", "status", "error",
]


#: The CSVs ``collect`` writes into a grid's folder.
CSV_NAMES = ("results.csv", "layers.csv", "history.csv")
#: Which grid ``run`` ran last in a results folder.
LAST_RUN = "last-run.json"

#: Columns of history.csv before the per-epoch metrics (one row per record x epoch).
HISTORY_KEYS = ["cell_id", "level", "variant", "method", "arch", "dataset", "seed", "depth", "lam", "target_cr"]


def training_cost(record: dict) -> float | None:
    """The training behind a record in dense trainings of its schedule: its epochs (every phase: a
    pruned model's dense training, fine-tuning, each lottery level) over the schedule's. Every method
    here computes with dense kernels (a mask or D factors skip no arithmetic), so this is its share of
    training FLOPs too, up to the masks' and factors' elementwise work and scoring passes (docs/recipes.md)."""
    epochs, schedule = record.get("epochs"), record.get("epochs_schedule")
    if not isinstance(epochs, (int, float)) or not isinstance(schedule, (int, float)) or not schedule > 0:
        return None
    return float(epochs) / float(schedule)


def curve_settings(record: dict) -> dict:
    """What makes a record's curve: its method's parameters (with their defaults) except the ones a
    curve sweeps (``tuning.SWEEP_PARAMETERS``), and its schedule."""
    method = all_methods().get(str(record.get("method")))
    names = [f.name for f in dataclasses.fields(method.Params)] if method is not None else []
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    params = config.get("params") if isinstance(config.get("params"), dict) else {}
    defaults = {f.name: f.default for f in dataclasses.fields(method.Params)} if method is not None else {}
    settings = {name: params.get(name, defaults.get(name)) for name in names if name not in tuning.SWEEP_PARAMETERS}
    schedule = config.get("schedule") if isinstance(config.get("schedule"), dict) else {}
    settings |= {f"schedule.{k}": v for k, v in ({**OPT_IN_DEFAULTS, **schedule}).items()}
    return settings


def distinguish_curves(rows: list[dict], records: list[dict]) -> dict[tuple, str]:
    """Give records of one label but different settings labels of their own, in place: each row's
    ``variant`` gets the settings that differ within its (arch, dataset, variant), e.g. ``gmp
    scope=global``, so that no table or figure averages two settings as one curve. Returns the new
    label of each renamed (cell_id, level)."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for row, record in zip(rows, records):
        groups.setdefault((row.get("arch"), row.get("dataset"), row.get("variant")), []).append((row, record))
    renamed = {}
    for pairs in groups.values():
        members = [row for row, _ in pairs]
        settings = [curve_settings(record) for _, record in pairs]
        keys = sorted({k for s in settings for k in s})
        varying = [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]
        if not varying:
            continue
        for row, own in zip(members, settings):
            row["variant"] = f"{row['variant']} " + " ".join(f"{k}={_short(own.get(k))}" for k in varying)
            renamed[(row.get("cell_id"), row.get("level"))] = row["variant"]
    return renamed


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def variant_label(record: dict) -> str:
    """The curve a record (or CSV row) belongs to, as its method labels it (``Method.curve_label``:
    ``dwf D=3``, ``magnitude +FT``, ``lottery LRR rewind=500it``); a method that is not installed
    here is labelled by its name."""
    method = str(record.get("method"))
    known = all_methods()
    return known[method].curve_label(record) if method in known else method


#: Record values that are ratios of counts (>= 1; +inf when nothing is kept, a real outcome): these
#: keys, and every key that starts with ``cr_`` or ends with ``_cr``.
RATIO_KEYS = ("cr", "cr_total", "cr_effective", "speedup")
#: Record values that are fractions.
FRACTION_KEYS = ("test_acc", "train_acc", "sparsity", "dense_test_acc")
#: Diagnostics that are nan when undefined (balance of factors that are all zero).
MAY_BE_UNDEFINED = ("balance_error",)
RESULT_STATUSES = ("ok", "failed", "blocked")


def _is_ratio(key: str) -> bool:
    return key in RATIO_KEYS or key.startswith("cr_") or key.endswith("_cr")


def record_problems(record) -> list[str]:
    """What makes a result record impossible: accuracy or sparsity outside [0, 1], a compression
    ratio below 1, a number that is nan or infinite (except +inf for a ratio with nothing kept, and
    nan for the diagnostics in MAY_BE_UNDEFINED)."""
    if not isinstance(record, dict):
        return [f"a record is not a table: {record!r:.80}"]
    problems = []
    if record.get("status") not in RESULT_STATUSES:
        problems.append(f"record status={record.get('status')!r} is not one of {list(RESULT_STATUSES)}")
    if record.get("status") == "ok" and (isinstance(record.get("test_acc"), bool)
                                         or not isinstance(record.get("test_acc"), (int, float))):
        problems.append("an ok record has no test_acc")
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isnan(value):
            if key not in MAY_BE_UNDEFINED:
                problems.append(f"{key}=nan is not a number")
        elif _is_ratio(key):
            if not value >= 1:
                problems.append(f"{key}={value!r} is below 1 (a compression ratio is total / kept >= 1)")
        elif math.isinf(value):
            problems.append(f"{key}={value!r} is not a finite number")
        elif key in FRACTION_KEYS and not 0 <= value <= 1:
            problems.append(f"{key}={value!r} is outside [0, 1]")
    return problems


def result_problems(result, cell_id: str | None = None) -> list[str]:
    """Why a parsed result file cannot be used (missing fields, wrong cell, impossible values)."""
    if not isinstance(result, dict):
        return [f"it holds {type(result).__name__}, not a result table"]
    problems = []
    missing = [k for k in ("cell_id", "status", "config", "records") if k not in result]
    if missing:
        problems.append(f"fields {missing} are missing")
    if "status" in result and result["status"] not in RESULT_STATUSES:
        problems.append(f"status={result['status']!r} is not one of {list(RESULT_STATUSES)}")
    if cell_id is not None and "cell_id" in result and result["cell_id"] != cell_id:
        problems.append(f"cell_id={result['cell_id']!r} does not match its file name")
    if "config" in result and not isinstance(result["config"], dict):
        problems.append("config is not a table")
    records = result.get("records")
    if "records" in result and (not isinstance(records, list) or not records):
        problems.append("records is not a non-empty list")
    elif isinstance(records, list):
        for i, record in enumerate(records):
            problems += [f"record {i}: {p}" for p in record_problems(record)]
    return problems


class DamagedResult(ValueError):
    """A result file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DamagedResults(ValueError):
    """Several damaged result files (collect lists them all)."""


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
        self.claim_timeout = claim_timeout
        self.grid = grid
        self.cells_dir = self.root / "cells"
        self.claims_dir = self.root / "claims"
        self.work_dir = self.root / "work"

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
        """The cell's result, None if it has none; DamagedResult if its file is torn, lacks fields
        or holds impossible values."""
        path = self.path(cell_id)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise DamagedResult(path, f"cannot be read ({exc})") from None
        return self._parse(path, text, cell_id)

    @staticmethod
    def _parse(path: Path, text: str, cell_id: str | None) -> dict:
        try:
            result = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DamagedResult(path, f"is not valid JSON ({exc}; torn by a crash or edited by hand)") from None
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
        statuses = {r["status"] for r in records}
        status = "ok" if statuses == {"ok"} else ("blocked" if "blocked" in statuses else "failed")
        result = {"cell_id": cell_id, "grid": self.grid, "status": status, "config": config, "run_id": run_id,
                  "finished_at": time.time(), "records": records}
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(cell_id), json.dumps(result))
        return result

    def results(self, skip_damaged: bool = False) -> list[dict]:
        """Every result file, parsed and checked. A damaged one (torn, fields missing, impossible
        values) raises DamagedResults naming every such file, unless ``skip_damaged``."""
        out, damaged = [], []
        if not self.cells_dir.is_dir():
            return out
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                out.append(self._parse(path, path.read_text(), path.stem))
            except DamagedResult as exc:
                damaged.append(exc)
            except (OSError, UnicodeDecodeError) as exc:
                damaged.append(DamagedResult(path, f"cannot be read ({exc})"))
        if damaged and not skip_damaged:
            raise DamagedResults(
                f"{len(damaged)} result file(s) cannot be collected:\n  " + "\n  ".join(map(str, damaged))
                + f"\n'python -m benchmark run' on this grid sets them aside (kept in {self.cells_dir / 'damaged'}) "
                  f"and runs their cells again; or move them away yourself")
        return out

    # ---- claims ---------------------------------------------------------------------------
    def _claim_path(self, cell_id: str) -> Path:
        return self.claims_dir / f"{cell_id}.claim"

    def _claim_payload(self, run_id: str) -> str:
        pid = os.getpid()
        return json.dumps({"host": socket.gethostname(), "pid": pid, "start": process_start(pid),
                           "run_id": run_id, "at": time.time()})

    def claim(self, cell_id: str, run_id: str) -> bool:
        """Take the cell for this run; False if a live driver holds it (or it is finished)."""
        path = self._claim_path(cell_id)
        tmp = temporary_name(self.claims_dir / cell_id, ".new")  # linked into place, not renamed
        try:
            self.claims_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as fh:
                fh.write(self._claim_payload(run_id))
            try:  # link(2) creates the claim whole or fails if one exists: never an empty claim
                os.link(tmp, path)
            except FileExistsError:
                if not self._take_over(path, tmp):
                    return False
        except OSError as exc:
            raise StorageError.from_os_error(exc, path) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        # a finished file may have appeared between listing and claiming
        if self.status(cell_id) == "ok":
            self.release(cell_id, run_id)
            return False
        return True

    def _takeover_lock(self):
        """One driver at a time decides about and replaces stale claims (flock: released by the
        kernel when its holder dies, so a killed driver cannot leave it held)."""
        return file_lock(self.claims_dir / ".takeover.lock")

    def _take_over(self, path: Path, tmp: Path) -> bool:
        """Replace ``path`` by our claim ``tmp`` if the claim there is stale. Under the takeover lock
        the claim is read again, so two drivers that both saw a dead driver's claim cannot both
        take it: the second finds the first one's fresh claim."""
        with self._takeover_lock():
            if not path.exists():
                try:
                    os.link(tmp, path)
                    return True
                except FileExistsError:
                    pass
            if not self._stale(path):
                return False
            os.replace(tmp, path)  # atomic: readers see the dead claim or ours
            return True

    def _stale(self, path: Path) -> bool:
        try:
            info = json.loads(path.read_text() or "{}")
            if not isinstance(info, dict):
                raise ValueError(info)
        except FileNotFoundError:
            return True
        except (ValueError, OSError):
            # torn (claims are now written whole; older versions could leave an empty one): stale if old
            try:
                return time.time() - path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        if info.get("host") == socket.gethostname():
            try:
                pid = int(info.get("pid", 0))
            except (TypeError, ValueError):
                return True
            if not pid_alive(pid):
                return True
            started = info.get("start")  # a live pid that started at another time is a reused pid
            return started is not None and process_start(pid) not in (None, started)
        try:  # another machine's claim: alive as long as its driver keeps touching it
            return time.time() - path.stat().st_mtime > self.claim_timeout
        except FileNotFoundError:
            return True

    def holder(self, cell_id: str) -> str | None:
        """The run id holding the cell's claim (None if unclaimed or unreadable)."""
        try:
            return json.loads(self._claim_path(cell_id).read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            return None

    def release(self, cell_id: str, run_id: str | None = None) -> None:
        """Drop the cell's claim; with ``run_id`` only if that run still holds it (a claim taken
        over by another driver is left alone)."""
        path = self._claim_path(cell_id)
        try:
            if run_id is not None and self.holder(cell_id) != run_id:
                return
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError.from_os_error(exc, path) from None

    def _claims_of(self, run_id: str) -> list[Path]:
        """The claim files ``run_id`` holds (unreadable or vanished ones are skipped)."""
        held = []
        if not self.claims_dir.is_dir():
            return held
        for path in self.claims_dir.glob("*.claim"):
            try:
                if json.loads(path.read_text()).get("run_id") == run_id:
                    held.append(path)
            except (OSError, ValueError, AttributeError):
                pass
        return held

    def release_run(self, run_id: str) -> int:
        """Drop every claim still held by ``run_id`` (cells that were in flight when it stopped);
        returns how many. Never raises (it runs while a run is stopping for whatever reason)."""
        released = 0
        for path in self._claims_of(run_id):
            with contextlib.suppress(OSError):
                path.unlink()
                released += 1
        return released

    def refresh_run(self, run_id: str) -> int:
        """Touch every claim ``run_id`` holds (the heartbeat other hosts read); returns how many."""
        touched = 0
        for path in self._claims_of(run_id):
            try:
                os.utime(path)
                touched += 1
            except OSError:  # released between listing and touching, or the disk refuses
                pass
        return touched

    def claimed(self) -> set[str]:
        return {p.stem for p in self.claims_dir.glob("*.claim") if not self._stale(p)} if self.claims_dir.is_dir() else set()

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
        if self.claims_dir.is_dir():  # claims of dead drivers, also on cells no run will reach soon
            for path in self.claims_dir.glob("*.claim"):
                with contextlib.suppress(OSError), self._takeover_lock():
                    if self._stale(path):
                        path.unlink(missing_ok=True)
                        removed += 1
        return removed

    def remove_work(self, cell_id: str) -> None:
        """Remove the cell's checkpoints (after its result is written)."""
        import shutil

        shutil.rmtree(self.work_dir / cell_id, ignore_errors=True)

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

    # ---- collection -----------------------------------------------------------------------
    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """(results, layers, history) as tidy DataFrames: one row per record, per record x layer, and
        per record x training epoch (the per-epoch trajectory: test accuracy, and CR where the
        method tracks it)."""
        rows, layer_rows, history_rows, sources = [], [], [], []
        picks = self.picks()
        for result in self.results():
            for record in result["records"]:
                row = {k: v for k, v in record.items() if k not in NESTED_KEYS}
                row["grid"] = self.grid
                row.setdefault("cell_id", result["cell_id"])
                row["variant"] = variant_label(record)
                row.update(picks.get(row["cell_id"], {}))
                row["train_cost"] = training_cost(record)
                rows.append(row)
                sources.append(record)
                keys = {k: row.get(k) for k in HISTORY_KEYS}
                history_rows += [keys | {"step": i + 1} | epoch for i, epoch in enumerate(record.get("history") or [])]
                for index, layer in enumerate(record.get("layers") or []):
                    layer_rows.append({"cell_id": row["cell_id"], "level": record.get("level"), "layer": layer["name"],
                                       "layer_index": index, "kind": layer.get("kind"), "numel": layer["numel"],
                                       "nonzero": layer["nonzero"], "effective": layer.get("effective"),
                                       "sparsity": layer.get("sparsity")})
        renamed = distinguish_curves(rows, sources)
        for entry in history_rows:
            entry["variant"] = renamed.get((entry["cell_id"], entry["level"]), entry["variant"])
        results = pd.DataFrame(rows)
        for col in CSV_COLUMNS:
            if col not in results:
                results[col] = None
        results = results[CSV_COLUMNS + sorted(c for c in results.columns if c not in CSV_COLUMNS)]
        if len(results):
            results = results.sort_values(["arch", "dataset", "variant", "seed", "cr"], na_position="last",
                                          kind="stable").reset_index(drop=True)
        layers = pd.DataFrame(layer_rows, columns=["cell_id", "level", "layer", "layer_index", "kind", "numel",
                                                   "nonzero", "effective", "sparsity"])
        history = pd.DataFrame(history_rows)
        if len(history):
            history = history[HISTORY_KEYS + ["step"] + [c for c in history.columns if c not in HISTORY_KEYS + ["step"]]]
        return results, layers, history

    def write_picks(self, rows: list[dict]) -> Path:
        """The grid's tuning table (``tuning.TABLE``), rewritten from the tuning records on each run."""
        path = self.root / tuning.TABLE
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))
        return path

    def picks(self) -> dict[str, dict]:
        """Per final cell id, the pick columns its rows get from the tuning table (none without one).
        The table is derived data that the next run rewrites: a damaged one is named and ignored."""
        path = self.root / tuning.TABLE
        if not path.is_file():
            return {}
        try:
            table = pd.read_csv(path)
            return tuning.pick_columns(table)
        except Exception as exc:  # noqa: BLE001 - any parse or content problem: say which file, go on
            warnings.warn(f"{path} could not be read ({type(exc).__name__}: {exc}); results.csv has no tuning "
                          f"columns until the next run rewrites it")
            return {}

    def newest_record_ns(self) -> int | None:
        """When a result file last appeared, changed or went (the folder's own time covers files
        renamed in or set aside); None without result files."""
        try:
            entries = [e for e in os.scandir(self.cells_dir) if e.name.endswith(".json") and not e.name.startswith(".")]
            if not entries:
                return None
            return max(self.cells_dir.stat().st_mtime_ns, *(e.stat().st_mtime_ns for e in entries))
        except FileNotFoundError:
            return None

    def stale_csvs(self) -> str | None:
        """Why the CSVs need collecting (one is missing, or older than the newest result file); None
        when they are current or there are no result files to collect (a CSV written by hand)."""
        newest = self.newest_record_ns()
        if newest is None:
            return None
        for name in CSV_NAMES:
            try:
                if (self.root / name).stat().st_mtime_ns < newest:
                    return f"{name} was older than the newest result file"
            except FileNotFoundError:
                return f"{name} was missing"
        return None

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
            record = json.loads((self.root / "grid.json").read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def collect(self) -> tuple[Path, Path, pd.DataFrame]:
        results, layers, history = self.tables()  # DamagedResults if any record is impossible
        self.root.mkdir(parents=True, exist_ok=True)
        csv_path, layers_path = self.root / "results.csv", self.root / "layers.csv"
        atomic_write_text(csv_path, results.to_csv(index=False))
        atomic_write_text(layers_path, layers.to_csv(index=False))
        atomic_write_text(self.root / "history.csv", history.to_csv(index=False))
        return csv_path, layers_path, results


def last_run(results_dir) -> dict | None:
    """What ``record_grid`` wrote last into ``results_dir`` (None if no run has)."""
    try:
        record = json.loads((Path(results_dir) / LAST_RUN).read_text())
    except (OSError, ValueError):
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
