"""Where a dataset's files are, and the explicit step that downloads them.

Discovery order: ``--data-dir``, then ``$BENCHMARK_DATA`` (each either holding the files directly
or torchvision's layout below it), the project's ``./data`` folder, then known system locations
such as Debian's ``/usr/share/datasets/fashion-mnist``. Downloading is a separate, explicit step
(``python -m benchmark data fetch NAME``), never done inside a training worker.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from benchmark.engine.data.errors import DatasetMissing, FetchFailed
from benchmark.engine.data.registry import DatasetSpec, get_spec

ENV_VAR = "BENCHMARK_DATA"
DEFAULT_DATA_DIR = Path("data")


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Data roots searched, in order: the explicit one, $BENCHMARK_DATA, ./data (absolute, so the
    messages say exactly where)."""
    roots: list[Path] = []
    for candidate in (data_dir, os.environ.get(ENV_VAR), DEFAULT_DATA_DIR):
        if candidate:
            path = Path(candidate).expanduser().absolute()
            if path not in roots:
                roots.append(path)
    return roots


def _folders_under(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / sub if sub else root for sub in spec.folder_names]


def candidate_folders(name: str, data_dir=None) -> list[Path]:
    spec = get_spec(name)
    folders = [f for root in search_roots(data_dir) for f in _folders_under(spec, root)]
    return folders + [Path(d) for d in spec.system_dirs]


def _default_target(data_dir=None) -> Path:
    return Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR).expanduser()


def fetch_command(name: str, data_dir=None) -> str:
    return f"python -m benchmark data fetch {name} --data-dir {shlex.quote(str(_default_target(data_dir)))}"


def locate(name: str, data_dir=None) -> Path:
    """The folder that holds ``name``'s files, or DatasetMissing naming every place searched."""
    spec = get_spec(name)
    folders = candidate_folders(name, data_dir)
    lines = []
    for folder in folders:
        if not folder.is_dir():
            lines.append(f"{folder}  (no such folder)")
            continue
        lacking = spec.missing(folder)
        if not lacking:
            return folder
        lines.append(f"{folder}  ({'; '.join(lacking) if len(lacking) < 4 else f'no {name} files'})")
    hints = [f"Fetch it with:  {fetch_command(name, data_dir)}"]
    if spec.system_package:
        hints.append(f"or install it:  apt-get install {spec.system_package}")
    hints.append(f"or point --data-dir / ${ENV_VAR} at a folder that holds the files (directly or in "
                 f"torchvision's layout below it).")
    searched = "\n  ".join(lines)
    raise DatasetMissing(f"dataset {name!r} not found. Searched, in order:\n  {searched}\n" + "\n".join(hints))


def _looks_offline(exc: BaseException) -> bool:
    import socket
    import urllib.error

    seen = exc
    while seen is not None:
        if isinstance(seen, (urllib.error.URLError, socket.gaierror, ConnectionError, TimeoutError)):
            return True
        if "urlopen error" in str(seen) or "Name or service not known" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fetch(name: str, data_dir=None) -> Path:
    """Download ``name`` into ``data_dir`` ($BENCHMARK_DATA, ./data) unless discovery finds it already."""
    spec = get_spec(name)
    root = _default_target(data_dir)
    try:
        return locate(name, data_dir)
    except DatasetMissing:
        pass
    try:
        root.mkdir(parents=True, exist_ok=True)
        spec.fetch(root)
    except Exception as exc:  # noqa: BLE001 - downloads fail in many ways; say which plainly
        if _looks_offline(exc):
            why = "could not reach the download server (this machine looks offline)"
        else:
            why = f"{type(exc).__name__}: {exc}"
        alternatives = [f"fetch it on a machine with internet ({fetch_command(name, data_dir)}), copy the "
                        f"folder here and point --data-dir / ${ENV_VAR} at it"]
        if spec.system_package:
            alternatives.insert(0, f"apt-get install {spec.system_package}")
        raise FetchFailed(f"downloading {name} failed: {why}.\nInstead: " + "; or ".join(alternatives)) from exc
    found = next((f for f in _folders_under(spec, root.absolute()) if spec.holds(f)), None)
    if found is None:
        raise FetchFailed(f"downloading {name} finished but its files are not under {root}")
    return found
