"""One result file per cell, written atomically by the driver only, and collection to tidy CSVs.

Layout under ``<results-dir>/<grid>/``::

    cells/<cell_id>.json    the cell's config, status and records (temporary file + rename)
    claims/<cell_id>.claim  held while a driver runs the cell (O_EXCL), so two drivers never
                            train one cell twice; the driver touches its claims every minute, and
                            a claim whose process is gone (same host) or that has not been
                            touched for ``claim_timeout`` seconds (another host) is taken over
    work/<cell_id>/         per-epoch checkpoints of unfinished cells
    events.jsonl            one line per start / finish / failure, appended by every driver
    logs/<time>-<run>.log   human-readable log of each run
    results.csv, layers.csv, history.csv   written by ``collect``
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pandas as pd

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


#: Columns of history.csv before the per-epoch metrics (one row per record x epoch).
HISTORY_KEYS = ["cell_id", "level", "variant", "method", "arch", "dataset", "seed", "depth", "lam", "target_cr"]


def variant_label(record: dict) -> str:
    """The curve a record belongs to: the method, with the depth for DWF, and ``+FT`` for a pruned
    dense model that was fine-tuned (the paper's magnitude baselines are not)."""
    if record.get("method") == "dwf" and record.get("depth") is not None:
        return f"dwf D={int(record['depth'])}"
    if record.get("family") == "after-training" and (record.get("finetune_epochs") or 0) > 0:
        return f"{record.get('method')} +FT"
    return str(record.get("method"))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, results_dir: str | os.PathLike, grid: str, claim_timeout: float = CLAIM_TIMEOUT_S):
        self.root = Path(results_dir) / grid
        self.claim_timeout = claim_timeout
        self.grid = grid
        self.cells_dir = self.root / "cells"
        self.claims_dir = self.root / "claims"
        self.work_dir = self.root / "work"

    def ensure(self) -> None:
        for d in (self.cells_dir, self.claims_dir, self.work_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ---- result files -------------------------------------------------------------------
    def path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def read(self, cell_id: str) -> dict | None:
        try:
            return json.loads(self.path(cell_id).read_text())
        except FileNotFoundError:
            return None

    def status(self, cell_id: str) -> str:
        result = self.read(cell_id)
        return result["status"] if result else "todo"

    def write(self, cell_id: str, config: dict, records: list[dict], run_id: str) -> dict:
        statuses = {r["status"] for r in records}
        status = "ok" if statuses == {"ok"} else ("blocked" if "blocked" in statuses else "failed")
        result = {"cell_id": cell_id, "grid": self.grid, "status": status, "config": config, "run_id": run_id,
                  "finished_at": time.time(), "records": records}
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.path(cell_id), json.dumps(result))
        return result

    def results(self) -> list[dict]:
        out = []
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); delete it and run the grid again") from None
        return out

    # ---- claims ---------------------------------------------------------------------------
    def claim(self, cell_id: str, run_id: str) -> bool:
        """Take the cell for this process; False if a live process holds it."""
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        path = self.claims_dir / f"{cell_id}.claim"
        payload = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, "at": time.time()})
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale(path):
                    return False
                try:  # take over a dead process's claim: rename is atomic, only one driver wins
                    os.rename(path, path.with_name(f".{path.name}.stale{os.getpid()}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(payload)
            # a finished file may have appeared between listing and claiming
            if self.status(cell_id) == "ok":
                path.unlink(missing_ok=True)
                return False
            return True
        return False

    def _stale(self, path: Path) -> bool:
        try:
            info = json.loads(path.read_text() or "{}")
        except (FileNotFoundError, json.JSONDecodeError):
            # being written right now, or torn by a kill: stale only if old
            try:
                return time.time() - path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        if info.get("host") == socket.gethostname():
            return not _pid_alive(int(info.get("pid", 0)))
        try:  # another machine's claim: alive as long as its driver keeps touching it
            return time.time() - path.stat().st_mtime > self.claim_timeout
        except FileNotFoundError:
            return True

    def release(self, cell_id: str) -> None:
        (self.claims_dir / f"{cell_id}.claim").unlink(missing_ok=True)

    def _claims_of(self, run_id: str) -> list[Path]:
        """The claim files ``run_id`` holds (unreadable or vanished ones are skipped)."""
        held = []
        for path in self.claims_dir.glob("*.claim"):
            try:
                if json.loads(path.read_text()).get("run_id") == run_id:
                    held.append(path)
            except (OSError, json.JSONDecodeError):
                pass
        return held

    def release_run(self, run_id: str) -> None:
        """Drop every claim still held by ``run_id`` (cells that were in flight when it stopped)."""
        for path in self._claims_of(run_id):
            path.unlink(missing_ok=True)

    def refresh_run(self, run_id: str) -> int:
        """Touch every claim ``run_id`` holds (the heartbeat other hosts read); returns how many."""
        touched = 0
        for path in self._claims_of(run_id):
            try:
                os.utime(path)
                touched += 1
            except FileNotFoundError:  # released between listing and touching
                pass
        return touched

    def claimed(self) -> set[str]:
        return {p.stem for p in self.claims_dir.glob("*.claim") if not self._stale(p)} if self.claims_dir.is_dir() else set()

    # ---- events ---------------------------------------------------------------------------
    def event(self, kind: str, cell_id: str, run_id: str, **extra) -> None:
        """Append one JSON line (O_APPEND keeps concurrent drivers' lines whole)."""
        line = json.dumps({"t": time.time(), "event": kind, "cell_id": cell_id, "run_id": run_id, **extra}) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "events.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    # ---- collection -----------------------------------------------------------------------
    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """(results, layers, history) as tidy DataFrames: one row per record, per record x layer, and
        per record x training epoch (the per-epoch trajectory: test accuracy, and CR where the
        method tracks it)."""
        rows, layer_rows, history_rows = [], [], []
        for result in self.results():
            for record in result["records"]:
                row = {k: v for k, v in record.items() if k not in NESTED_KEYS}
                row["grid"] = self.grid
                row.setdefault("cell_id", result["cell_id"])
                row["variant"] = variant_label(record)
                rows.append(row)
                keys = {k: row.get(k) for k in HISTORY_KEYS}
                history_rows += [keys | {"step": i + 1} | epoch for i, epoch in enumerate(record.get("history") or [])]
                for index, layer in enumerate(record.get("layers") or []):
                    layer_rows.append({"cell_id": row["cell_id"], "level": record.get("level"), "layer": layer["name"],
                                       "layer_index": index, "kind": layer.get("kind"), "numel": layer["numel"],
                                       "nonzero": layer["nonzero"], "effective": layer.get("effective"),
                                       "sparsity": layer.get("sparsity")})
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

    def collect(self) -> tuple[Path, Path, pd.DataFrame]:
        results, layers, history = self.tables()
        self.root.mkdir(parents=True, exist_ok=True)
        csv_path, layers_path = self.root / "results.csv", self.root / "layers.csv"
        _atomic_write_text(csv_path, results.to_csv(index=False))
        _atomic_write_text(layers_path, layers.to_csv(index=False))
        _atomic_write_text(self.root / "history.csv", history.to_csv(index=False))
        return csv_path, layers_path, results
