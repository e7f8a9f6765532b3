"""``python -m benchmark perf``: the speed claims of this project, measured as ratios on this machine.

- ``data``: one LeNet-300-100 / Fashion-MNIST epoch through ``benchmark.engine.train.train`` (tensor-resident
  batches) against a plain torchvision ``DataLoader`` loop training the same model with the same
  optimizer. Target on CPU: ours >= 8x faster.
- ``step``: one training step (forward, backward, optimizer; batch 128) of DWF depth 2, 3, 4 against
  the dense model, for every architecture, through the real code path (``models.build``,
  ``methods.dwf.factorize``, ``FactorHooks`` groups, ``train.make_optimizer``). Targets on CPU:
  <= 1.15x for VGG-16 and ResNet-18, <= 1.6x for LeNet-300-100 at depth 4.
- ``grid``: cells per hour of a small grid through ``benchmark.execution.runner.run_grid`` with 1 and 2 jobs,
  and the peak resident memory of each worker.
- ``pack``: packed training (``run --pack``) against one model at a time, per pack size (1, 8, 16,
  64), for dense and DWF D=3 LeNet-300-100 and SynFlow (masked) LeNet-5: one training step of the
  pack against the same steps of each model alone, through the code ``--pack auto`` calibrates with
  (``benchmark.execution.pack_plan.measure``). Printed as one ``N.NNx`` per line (cells per hour packed / one
  at a time, as far as training steps decide it).
- ``grid-pack`` (not part of ``all``: it runs a whole grid twice per round: the ``quick`` grid took 33
  minutes on 2 cores): cells per hour of a grid with ``run --pack auto`` against ``--pack off``, same
  ``--jobs``, each in a fresh results folder so ``auto`` pays its calibration, plus the largest
  accuracy and CR differences between the two runs' records. Target on CPU: auto >= off (1.00x).

The machines this runs on are often shared, so absolute times mean little on their own: every
comparison alternates its contenders round by round in one process (reversing the order every other
round), reports median times, and takes each ratio as the median of the ratios within a round, so
load that comes and goes hits all contenders alike. Targets are checked here, on ratios, never in
unit tests. CPU runs tune glibc's allocator first, as every CPU training run does
(``benchmark.engine.train.tune_cpu_allocator``; BENCHMARK_NO_MALLOC_TUNING=1 measures without it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from benchmark.core.files import atomic_write_text
from benchmark.engine import data as data_mod
from benchmark.engine import models
from methods import structures
from benchmark.engine.sparsity import layer_macs, prunable_layers
from benchmark.engine.timing import interleave, paired_ratio, sync
from benchmark.engine.train import (TrainHooks, check_compile, default_schedule, make_optimizer, pick_device, prepare_input,
                             train, training_dtype, training_step, tune_cpu_allocator)

WHATS = ("data", "step", "grid", "pack")
STEP_ARCHS = {"lenet300": ((1, 28, 28), 10), "lenet5": ((1, 28, 28), 10),
              "vgg16": ((3, 32, 32), 10), "resnet18": ((3, 32, 32), 10)}
DEPTHS = (2, 3, 4)
DWF_LAM = 1e-4  # only sets the weight decay on the factors; the step's cost does not depend on it

#: Targets from the speed issue; they are stated for CPU and only judged there.
DATA_TARGET = 8.0  # ours at least this many times faster than the DataLoader loop
STEP_TARGETS = {("vgg16", d): 1.15 for d in DEPTHS} | {("resnet18", d): 1.15 for d in DEPTHS} | {("lenet300", 4): 1.6}

#: Rounds (interleaved repetitions) per benchmark unless --repeats says otherwise.
DEFAULT_ROUNDS = {"data": 3, "step_small": 30, "step_large": 5, "grid": 1, "pack": 5, "grid-pack": 1}
SMALL_STEP_BLOCK = 10  # LeNet steps take milliseconds: time blocks of steps, not single steps
QUICK_LIMIT = 2000  # --quick: examples per Fashion-MNIST split in ``data``
QUICK_GRID = """description = "perf --quick: three one-epoch cells on 200 images"
seeds = [0]
subset = 200
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, batch_size = 64 }
[experiment.methods.dense]
[experiment.methods.dwf]
depth = 3
[experiment.methods.l1]
"""


@dataclass
class Row:
    """One contender of one comparison; ``ratio`` is defined by ``ratio_of`` within its ``case``."""

    bench: str
    case: str
    variant: str
    unit: str
    median_s: float
    min_s: float
    max_s: float
    rounds: int
    ratio: float | None = None
    ratio_of: str = ""
    target: str = ""
    met: str = ""
    cells_per_hour: float | None = None
    peak_rss_mb: float | None = None  # per worker, shared library pages included
    own_rss_mb: float | None = None  # per worker, anonymous pages only (its tensors and heap)
    device: str = ""
    threads: int = 0
    note: str = ""


COLUMNS = [f.name for f in fields(Row)]


def _row(bench: str, case: str, variant: str, unit: str, samples: list[float], per: int = 1, **extra) -> Row:
    """A row from timed samples, each covering ``per`` units (a block of steps)."""
    values = [s / per for s in samples]
    return Row(bench, case, variant, unit, statistics.median(values), min(values), max(values), len(values), **extra)


def _judge(ratio: float, target: float | None, at_least: bool, device: torch.device) -> tuple[str, str]:
    if target is None or device.type != "cpu":
        return "", ""
    met = ratio >= target if at_least else ratio <= target
    return (f">= {target:g}" if at_least else f"<= {target:g}"), ("yes" if met else "no")


# ------------------------------------------------------------------------------------------------
# data: our epoch vs a plain torchvision DataLoader epoch
# ------------------------------------------------------------------------------------------------

_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def torchvision_copy(source: Path, root: Path) -> Path:
    """torchvision's FashionMNIST reads uncompressed files under ROOT/FashionMNIST/raw/ and would
    try to download otherwise; lay out such a copy of the files our loader found (gunzipped)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in _IDX_STEMS:
        if (source / stem).is_file():
            shutil.copyfile(source / stem, raw / stem)
        else:
            with gzip.open(source / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return root


def plain_epoch(model: nn.Module, train_loader, test_loader, optimizer, device: torch.device) -> float:
    """The loop a torchvision tutorial would write: per-sample transforms, collated batches, a test
    pass; returns the test accuracy so the work cannot be skipped."""
    model.train()
    running = 0.0
    for x, y in train_loader:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item() * len(y)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
    return correct / max(1, len(test_loader.dataset))


def bench_data(device: torch.device, rounds: int, quick: bool) -> list[Row]:
    import torchvision
    from torchvision import transforms

    limit = QUICK_LIMIT if quick else None
    began = time.perf_counter()
    data = data_mod.load("fashion-mnist", device=device, limit=limit)
    ours_setup = time.perf_counter() - began
    spec = data.spec
    schedule = default_schedule("lenet300").replace(epochs=1)
    batch = schedule.batch_size
    with tempfile.TemporaryDirectory(prefix="perf-data-") as tmp:
        root = torchvision_copy(data.source, Path(tmp))
        began = time.perf_counter()
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
        tv_train = torchvision.datasets.FashionMNIST(str(root), train=True, transform=transform, download=False)
        tv_test = torchvision.datasets.FashionMNIST(str(root), train=False, transform=transform, download=False)
        if limit:
            tv_train = torch.utils.data.Subset(tv_train, range(min(limit, len(tv_train))))
            tv_test = torch.utils.data.Subset(tv_test, range(min(limit, len(tv_test))))
        tv_setup = time.perf_counter() - began

        def new_model() -> nn.Module:
            return models.build("lenet300", spec.shape, spec.num_classes, seed=0).to(device)

        def ours():
            train(new_model(), data, schedule, seed=0, progress=False)

        def plain():
            model = new_model()
            loader = torch.utils.data.DataLoader(tv_train, batch_size=batch, shuffle=True, num_workers=0)
            test_loader = torch.utils.data.DataLoader(tv_test, batch_size=1000, shuffle=False, num_workers=0)
            plain_epoch(model, loader, test_loader, make_optimizer(model, schedule), device)

        seconds = interleave({"plain": plain, "ours": ours}, rounds, device)
    case = f"lenet300/fashion-mnist, {len(data.train)} train + {len(data.test)} test, batch {batch}"
    speedup = paired_ratio(seconds["plain"], seconds["ours"])
    target, met = _judge(speedup, None if quick else DATA_TARGET, True, device)
    common = {"device": str(device), "threads": torch.get_num_threads()}
    return [
        _row("data", case, "torchvision DataLoader (ToTensor+Normalize, shuffle, num_workers=0)", "s/epoch",
             seconds["plain"], ratio=1.0, ratio_of="DataLoader / this", note=f"dataset setup {tv_setup:.2f} s", **common),
        _row("data", case, "ours (benchmark.engine.train.train, tensor-resident)", "s/epoch", seconds["ours"],
             ratio=speedup, ratio_of="DataLoader / this", target=target, met=met,
             note=f"load + normalize once {ours_setup:.2f} s; epoch includes the test pass on both sides", **common),
    ]


# ------------------------------------------------------------------------------------------------
# step: DWF depth 2/3/4 vs dense, per architecture
# ------------------------------------------------------------------------------------------------

def build_training(arch: str, depth: int | None, device: torch.device, batch: int, compiled: bool = False,
                   masked: bool = False, shape: tuple[tuple[int, int, int], int] | None = None):
    """(model, hooks, optimizer, step): ``arch`` (dense when ``depth`` is None) built as a cell builds
    it, channels_last on CUDA before factorizing, FactorHooks groups, the shared optimizer, bf16
    autocast, and ``step`` one training step on a fixed batch. ``masked`` puts an all-ones mask on
    every weight (what a pruned model trains with); ``shape`` is (input shape, classes), default
    the architecture's in STEP_ARCHS."""
    from methods.dwf import FactorHooks, factorize
    from methods.masks import apply_masks

    in_shape, classes = shape or STEP_ARCHS[arch]
    channels_last = device.type == "cuda" and arch in models.CONV_MODELS
    model = models.build(arch, in_shape, classes, seed=0).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    hooks: TrainHooks = TrainHooks() if depth is None else FactorHooks(DWF_LAM, depth, "decay")
    if depth is not None:
        factorize(model, depth, seed=0)
    if masked:
        apply_masks(model, {name: torch.ones_like(module.weight) for name, module in prunable_layers(model)})
    optimizer = make_optimizer(model, default_schedule(arch), hooks)
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(0)
    x = prepare_input(torch.randn(batch, *in_shape, generator=gen).to(device), channels_last)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    model.train()

    def step():
        training_step(model, x, y, optimizer, hooks, device, forward)

    return model, hooks, optimizer, step


def make_step(arch: str, depth: int | None, device: torch.device, batch: int, compiled: bool = False) -> Callable[[], None]:
    """One training step of ``arch`` (dense when ``depth`` is None) as a DWF cell builds it."""
    return build_training(arch, depth, device, batch, compiled)[3]


def bench_step(device: torch.device, rounds: int | None, quick: bool, archs: list[str], compiled: bool) -> list[Row]:
    """Per architecture, all variants stay built so that their steps can alternate; LeNet steps are
    timed in blocks (milliseconds each), VGG/ResNet steps one at a time (seconds each on a CPU)."""
    if device.type == "cpu":
        tune_cpu_allocator()  # what train() does in every CPU run
    rows: list[Row] = []
    for arch in archs:
        small = arch.startswith("lenet")
        batch = 128 if small or not quick else 8
        block = (2 if quick else SMALL_STEP_BLOCK) if small else 1
        n_rounds = rounds or (1 if quick else DEFAULT_ROUNDS["step_small" if small else "step_large"])
        variants = {"dense": None} | {f"dwf D={d}": d for d in DEPTHS}
        modes = [False, True] if compiled else [False]
        contenders: dict[str, Callable[[], None]] = {}
        warmup_s: dict[str, float] = {}
        for mode in modes:
            for name, depth in variants.items():
                key = name + (" compiled" if mode else "")
                step = make_step(arch, depth, device, batch, compiled=mode)
                began = time.perf_counter()
                step()  # first-call costs (allocation, kernel selection, compilation) stay out
                step()
                sync(device)
                warmup_s[key] = time.perf_counter() - began

                def block_of(step=step):
                    for _ in range(block):
                        step()

                contenders[key] = block_of
        seconds = interleave(contenders, n_rounds, device)
        case = f"{arch} {'x'.join(map(str, STEP_ARCHS[arch][0]))}, batch {batch}"
        for mode in modes:
            suffix = " compiled" if mode else ""
            for name, depth in variants.items():
                key = name + suffix
                ratio = paired_ratio(seconds[key], seconds["dense" + suffix])
                target, met = _judge(ratio, STEP_TARGETS.get((arch, depth)) if not quick else None, False, device)
                note = f"block of {block} steps" if block > 1 else ""
                if mode:
                    eager = paired_ratio(seconds[name], seconds[key])
                    vs_dense = paired_ratio(seconds[key], seconds["dense"])
                    note = (f"{note}; eager/compiled {eager:.2f}x; this / eager dense {vs_dense:.2f}; "
                            f"compile + 2 warm-up steps {warmup_s[key]:.1f} s").lstrip("; ")
                rows.append(_row("step", case, key, "s/step", seconds[key], per=block, ratio=ratio,
                                 ratio_of=f"this / dense{suffix}", target=target, met=met, device=str(device),
                                 threads=torch.get_num_threads(), note=note))
        del contenders
    return rows


# ------------------------------------------------------------------------------------------------
# grid: cells per hour with 1 and 2 jobs, peak memory per worker
# ------------------------------------------------------------------------------------------------

def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children_of(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _memory_kb(pid: int) -> tuple[int, int] | None:
    """(peak resident, current anonymous resident) of a process in kB (Linux), None when unknown.

    The peak (VmHWM) counts the pages of shared libraries too: a CUDA build of torch alone maps
    ~0.7 GB that every worker shares. The anonymous part is the worker's own memory (tensors)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (values["VmHWM"], values["RssAnon"]) if len(values) == 2 else None


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "python" in cmdline and "resource_tracker" not in cmdline and "semaphore_tracker" not in cmdline


def run_grid_child(grid: str, jobs: int, device: str, pack: str = "off") -> dict:
    """Run the grid through ``run_grid`` in a fresh process and a fresh results folder, and watch the
    peak resident memory of that process (the worker when jobs=1) and of each worker it starts.
    ``records`` maps each cell to its records' (test accuracy, CR, pack size)."""
    with tempfile.TemporaryDirectory(prefix="perf-grid-") as tmp:
        code = ("import json, sys, time; from benchmark.execution import grids, runner; "
                "from benchmark.execution.store import Store; "
                "g = grids.load_grid(sys.argv[1]); "
                "t = time.perf_counter(); s = runner.run_grid(g, g.cells, results_dir=sys.argv[2], jobs=int(sys.argv[3]), "
                "device=sys.argv[4], progress=False, pack=sys.argv[5]); seconds = time.perf_counter() - t; "
                "store = Store(sys.argv[2], g.name); "
                "records = {c.id: [(r.get('test_acc'), r.get('cr'), r.get('pack_size', 1)) "
                "for r in (store.read(c.id) or {}).get('records', [])] for c in g.cells}; "
                "print(json.dumps({'seconds': seconds, 'cells': len(g.cells), 'finished': s.finished, "
                "'failed': s.failed, 'blocked': s.blocked, 'records': records}))")
        proc = subprocess.Popen([sys.executable, "-c", code, grid, tmp, str(jobs), device, pack],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peaks: dict[int, tuple[int, int]] = {}  # pid -> (peak resident, largest anonymous seen), kB
        watch = Path("/proc").is_dir()
        while proc.poll() is None:
            if watch:
                for pid in [proc.pid] + _descendants(proc.pid):
                    memory = _memory_kb(pid) if pid == proc.pid or _is_worker(pid) else None
                    if memory is not None:
                        old = peaks.get(pid, (0, 0))
                        peaks[pid] = (max(old[0], memory[0]), max(old[1], memory[1]))
            time.sleep(0.1)
        out, err = proc.communicate()
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"grid run with --jobs {jobs} failed (exit {proc.returncode}):\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    driver = peaks.pop(proc.pid, None)
    workers = list(peaks.values()) if jobs > 1 else ([driver] if driver else [])
    result["worker_peak_mb"] = max(w[0] for w in workers) / 1024 if workers else math.nan
    result["worker_anon_mb"] = max(w[1] for w in workers) / 1024 if workers else math.nan
    result["driver_peak_mb"] = driver[0] / 1024 if driver else math.nan
    result["workers_seen"] = len(workers)
    return result


@contextlib.contextmanager
def _grid_to_run(grid: str | None, quick: bool, default: str):
    """(grid argument, loaded grid): the one asked for, else the built-in three-cell grid under
    --quick (written to a temporary file for the child runs), else ``default``."""
    from benchmark.execution import grids

    with tempfile.TemporaryDirectory(prefix="perf-gridfile-") as tmp:
        if grid is None and quick:
            grid = str(Path(tmp) / "perf-quick.toml")
            Path(grid).write_text(QUICK_GRID)
        grid = grid or default
        yield grid, grids.load_grid(grid)


def bench_grid(device: torch.device, rounds: int, quick: bool, grid: str | None) -> list[Row]:
    with _grid_to_run(grid, quick, "smoke") as (grid, loaded):
        results: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(rounds):
            for jobs in (1, 2) if r % 2 == 0 else (2, 1):
                results[jobs].append(run_grid_child(grid, jobs, str(device)))
    case = f"grid {loaded.name}, {len(loaded.cells)} cells"
    rows = []
    per_cell = {jobs: [run["seconds"] / max(1, run["cells"]) for run in runs] for jobs, runs in results.items()}
    for jobs in (1, 2):
        runs = results[jobs]
        rate = 3600 / statistics.median(per_cell[jobs])
        bad = sum(run["failed"] + run["blocked"] for run in runs)
        note = f"{bad} failed/blocked cell runs; " if bad else ""
        if jobs > 1:
            note += f"driver peak {statistics.median(run['driver_peak_mb'] for run in runs):.0f} MB; "
        note += f"{'each worker' if jobs > 1 else 'one process'} gets {max(1, (os.cpu_count() or 1) // jobs)} threads"
        rows.append(_row("grid", case, f"--jobs {jobs}", "s/cell", per_cell[jobs],
                         ratio=paired_ratio(per_cell[1], per_cell[jobs]),
                         ratio_of="cells per hour / --jobs 1", cells_per_hour=rate,
                         peak_rss_mb=max(run["worker_peak_mb"] for run in runs),
                         own_rss_mb=max(run["worker_anon_mb"] for run in runs), device=str(device),
                         threads=max(1, (os.cpu_count() or 1) // jobs), note=note))
    return rows


# ------------------------------------------------------------------------------------------------
# grid-pack: a whole grid with --pack auto against --pack off
# ------------------------------------------------------------------------------------------------

GRID_PACK_TARGET = 1.0  # issue 15 on CPU: auto is never slower than off on the quick grid


def _largest_differences(off: dict, auto: dict) -> tuple[float, float, int]:
    """Largest |test accuracy difference| (points) and |relative CR difference| between the two runs'
    records of each cell, and how many records were compared (float32 packs sum in another order)."""
    acc, cr, compared = 0.0, 0.0, 0
    for cell_id, records in off.items():
        for (acc_off, cr_off, _), (acc_auto, cr_auto, _) in zip(records, auto.get(cell_id, [])):
            if None in (acc_off, acc_auto, cr_off, cr_auto):
                continue
            compared += 1
            acc = max(acc, abs(acc_off - acc_auto) * 100)
            if math.isfinite(cr_off) and math.isfinite(cr_auto) and cr_off > 0:
                cr = max(cr, abs(cr_auto - cr_off) / cr_off)
    return acc, cr, compared


def bench_grid_pack(device: torch.device, rounds: int, quick: bool, grid: str | None, jobs: int) -> list[Row]:
    """The whole grid, each round once with ``--pack off`` and once with ``--pack auto`` (order
    reversed every other round), each in a fresh results folder so ``auto`` pays its calibration.
    The ratio is cells per hour auto / off: what packing buys a user on this device, all costs in."""
    with _grid_to_run(grid, quick, "quick") as (grid, loaded):
        runs: dict[str, list[dict]] = {"off": [], "auto": []}
        for r in range(rounds):
            for mode in ("off", "auto") if r % 2 == 0 else ("auto", "off"):
                result = run_grid_child(grid, jobs, str(device), pack=mode)
                runs[mode].append(result)
                print(f"grid {loaded.name}, --jobs {jobs} --pack {mode}: {result['seconds']:.0f} s for "
                      f"{result['cells']} cells", flush=True)
    per_cell = {mode: [run["seconds"] / max(1, run["cells"]) for run in done] for mode, done in runs.items()}
    ratio = paired_ratio(per_cell["off"], per_cell["auto"])
    target, met = _judge(ratio, None if quick else GRID_PACK_TARGET, True, device)
    acc, cr, compared = _largest_differences(runs["off"][-1]["records"], runs["auto"][-1]["records"])
    packed = sorted({size for records in runs["auto"][-1]["records"].values() for *_, size in records})
    rows = []
    for mode in ("off", "auto"):
        bad = sum(run["failed"] + run["blocked"] for run in runs[mode])
        note = f"{bad} failed/blocked cell runs; " if bad else ""
        if mode == "auto":
            note += (f"pack sizes {packed}; against off, {compared} records: test accuracy within {acc:.2f} "
                     f"points, CR within {cr:.2%}")
        rows.append(_row("grid-pack", f"grid {loaded.name}, {len(loaded.cells)} cells, --jobs {jobs}",
                         f"--pack {mode}", "s/cell", per_cell[mode],
                         ratio=paired_ratio(per_cell["off"], per_cell[mode]), ratio_of="cells per hour / --pack off",
                         cells_per_hour=3600 / statistics.median(per_cell[mode]), device=str(device),
                         threads=max(1, (os.cpu_count() or 1) // jobs),
                         target=target if mode == "auto" else "", met=met if mode == "auto" else "", note=note))
    print(f"grid {loaded.name}: --pack auto / --pack off: {ratio:.2f}x", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# pack: packed training against one model at a time
# ------------------------------------------------------------------------------------------------

#: (what is printed, architecture, input shape, classes, structure of methods.structures): the issue's cases.
PACK_CASES = [("dense LeNet-300-100", "lenet300", (1, 28, 28), 10, structures.DENSE),
              ("DWF D=3 LeNet-300-100", "lenet300", (1, 28, 28), 10, structures.factorized(3)),
              ("SynFlow LeNet-5", "lenet5", (1, 28, 28), 10, structures.MASKED)]
PACK_SIZES = (1, 8, 16, 64)


def step_flops(arch: str, shape, classes: int, batch: int) -> int:
    """Floating-point operations of one training step in its weight layers: forward, input gradient
    and weight gradient, each 2 per multiply-add (activations, pooling and the update not counted)."""
    model = models.build(arch, shape, classes)
    positions = layer_macs(model, shape)
    return 6 * batch * sum(m.weight.numel() * positions[name] for name, m in prunable_layers(model))


def matmul_rate(device: torch.device, rounds: int = 10) -> float:
    """The device's FLOP/s on large square matrix products (best of ``rounds`` at two sizes), in the
    dtype training computes in there (``training_dtype``: bf16 on GPUs with native bf16, under
    autocast; float32 elsewhere): the rate no packing of small products can beat."""
    dtype = training_dtype(device)
    best = 0.0
    for n in ((4096, 8192) if device.type == "cuda" else (512, 1024)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(rounds + 1):
            sync(device)
            began = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - began))
    return best


def bench_pack(device: torch.device, rounds: int, quick: bool, sizes: tuple[int, ...]) -> list[Row]:
    """Per case and pack size, one step of the pack against the same steps one model at a time,
    alternating rounds (``pack_plan.measure``); prints one ratio per line as it goes. Per case it
    also prints the hardware's limit: one model's step against its weight layers' FLOPs at the
    device's large-matmul rate. Packing only removes what a step spends beyond that arithmetic
    (per-op launches, small-kernel inefficiency), so no pack can be faster than the limit."""
    from benchmark.execution.packing.calibration import measure

    rows = []
    batch = 16 if quick else 128
    rate = matmul_rate(device)
    for label, arch, shape, classes, kind in PACK_CASES:
        flops = step_flops(arch, shape, classes, batch)
        case_rows, step_seconds = [], []
        for size in sizes:
            result = measure(arch, shape, classes, kind, size, batch, device, rounds)
            print(f"{label}, pack of {size}: {result['ratio']:.2f}x", flush=True)
            case_rows.append(_row("pack", f"{label}, batch {batch}", f"pack of {size}", "s/step", result["packed_rounds"],
                                  ratio=result["ratio"], ratio_of="one at a time / packed, same steps",
                                  device=str(device), threads=torch.get_num_threads(),
                                  note=f"one at a time {result['sequential_s'] * 1e3:.1f} ms per {size} steps"))
            step_seconds.append(result["sequential_s"] / size)
        step_s = statistics.median(step_seconds)
        limit = step_s / (flops / rate)
        print(f"{label}: one step {step_s * 1e3:.2f} ms, its {flops / 1e6:.0f} MFLOP take {flops / rate * 1e3:.2f} ms "
              f"at {device.type}'s best matmul rate, {rate / 1e9:.0f} GFLOP/s: packing can gain at most about {limit:.2f}x "
              f"(hardware limit)", flush=True)
        for row in case_rows:
            row.note += f"; hardware limit {limit:.2f}x ({flops / 1e6:.0f} MFLOP per step at {rate / 1e9:.0f} GFLOP/s)"
        rows += case_rows
    return rows


# ------------------------------------------------------------------------------------------------
# output and CLI
# ------------------------------------------------------------------------------------------------

def format_table(rows: list[Row]) -> str:
    def fmt_time(seconds: float) -> str:
        return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"

    header = ["bench", "case", "variant", "median", "min..max", "n", "ratio", "target", "met", "extra"]
    lines = []
    for r in rows:
        extra = []
        if r.cells_per_hour is not None:
            extra.append(f"{r.cells_per_hour:.0f} cells/h")
        if r.peak_rss_mb is not None:
            extra.append(f"peak RSS/worker {r.peak_rss_mb:.0f} MB (own {r.own_rss_mb:.0f} MB)")
        if r.note:
            extra.append(r.note)
        lines.append([r.bench, r.case, r.variant, f"{fmt_time(r.median_s)} ({r.unit.split('/')[1]})",
                      f"{fmt_time(r.min_s)}..{fmt_time(r.max_s)}", str(r.rounds),
                      "" if r.ratio is None else f"{r.ratio:.3f} ({r.ratio_of})", r.target, r.met, "; ".join(extra)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    atomic_write_text(path, text.getvalue())


def add_commands(sub) -> None:
    p = sub.add_parser(
        "perf", help="measure the data path, DWF's step overhead and grid throughput (ratios vs targets)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("what", nargs="?", default="all", choices=[*WHATS, "grid-pack", "all"],
                   help="data: our epoch vs a torchvision DataLoader epoch; step: DWF D=2/3/4 vs dense step time "
                        "per architecture; grid: cells per hour with --jobs 1 and 2 and peak memory per worker; "
                        "pack: packed training vs one model at a time per pack size; all: the four (default); "
                        "grid-pack: a whole grid with --pack auto vs --pack off (long: not part of all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (cuda > mps > cpu); default auto")
    p.add_argument("--out", type=Path,
                   help="CSV file for the table (default results/perf/perf-<what>.csv)")
    p.add_argument("--repeats", type=int,
                   help=f"interleaved rounds per comparison (default: data {DEFAULT_ROUNDS['data']}, step "
                        f"{DEFAULT_ROUNDS['step_small']} blocks of {SMALL_STEP_BLOCK} steps for LeNets and "
                        f"{DEFAULT_ROUNDS['step_large']} single steps for VGG/ResNet, grid and grid-pack {DEFAULT_ROUNDS['grid']})")
    p.add_argument("--compile", action="store_true",
                   help="step: also time torch.compile'd models (ratio to the compiled dense model and the "
                        "eager/compiled speedup); compiling VGG/ResNet takes minutes on a small CPU")
    p.add_argument("--archs", default=",".join(STEP_ARCHS),
                   help=f"step: comma-separated architectures (default {','.join(STEP_ARCHS)})")
    p.add_argument("--grid", help="grid, grid-pack: preset name or TOML file to run (default: smoke for grid, "
                                  "quick for grid-pack; with --quick, a built-in three-cell grid)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="grid-pack: worker processes of both runs, as 'run --jobs' (default: 2, or 1 on one core)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads for data and step (default: torch's choice, usually the core "
                        "count); grid workers always get cores/jobs each, as 'run' gives them")
    p.add_argument("--sizes", help=f"pack: comma-separated pack sizes (default {','.join(map(str, PACK_SIZES))}; "
                                   f"with --quick 2)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings to check that everything runs (tests): 2000 examples, one round, batch 8 "
                        "for VGG/ResNet, a three-cell grid; ratios are not meaningful and targets are not judged")
    p.set_defaults(handler=perf_command)


def perf_command(args) -> int:
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: must be >= 1")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in STEP_ARCHS]
    if unknown or not archs:
        raise ValueError(f"--archs: unknown {unknown}; choose from {', '.join(STEP_ARCHS)}")
    sizes = (2,) if args.quick else PACK_SIZES
    if args.sizes is not None:
        try:
            sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--sizes {args.sizes!r}: give comma-separated pack sizes >= 1, e.g. 1,8,16")
    device = pick_device(args.device)
    if args.compile and args.what in ("step", "all"):
        check_compile(device)
    whats = list(WHATS) if args.what == "all" else [args.what]
    out = args.out or Path("results") / "perf" / f"perf-{args.what}.csv"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    cores = os.cpu_count() or 1
    print(f"perf {args.what} on {device}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{cores} cores, load average {load:.1f}")
    if load > cores:
        print(f"note: this machine is busy (load {load:.1f} on {cores} cores); times are inflated, and contenders "
              f"are interleaved so that the ratios stay comparable", file=sys.stderr)
    rows: list[Row] = []
    for what in whats:
        began = time.perf_counter()
        if what == "data":
            rows += bench_data(device, args.repeats or (1 if args.quick else DEFAULT_ROUNDS["data"]), args.quick)
        elif what == "step":
            rows += bench_step(device, args.repeats, args.quick, archs, args.compile)
        elif what == "pack":
            rows += bench_pack(device, args.repeats or (1 if args.quick else DEFAULT_ROUNDS["pack"]), args.quick, sizes)
        elif what == "grid-pack":
            rows += bench_grid_pack(device, args.repeats or DEFAULT_ROUNDS["grid-pack"], args.quick, args.grid, args.jobs)
        else:
            rows += bench_grid(device, args.repeats or DEFAULT_ROUNDS["grid"], args.quick, args.grid)
        print(f"[{what}: {time.perf_counter() - began:.0f} s]", file=sys.stderr)
    print(format_table(rows))
    write_csv(rows, out)
    print(f"table written to {out}")
    misses = [r for r in rows if r.met == "no"]
    if misses:
        print("targets missed: " + "; ".join(f"{r.case} {r.variant} {r.ratio:.2f} ({r.target})" for r in misses))
    return 0
