"""``make gpu-check`` (``python -m benchmark.speed.gpu_check``): every CUDA path of this suite, checked and
timed on one GPU machine in under 8 minutes, in one summary file.

It runs on a lent GPU machine as it is: that machine's own python with a CUDA torch (>= 2.4),
torchvision, numpy, pandas, matplotlib, seaborn, joblib, scipy and pytest, from the repository root,
no virtual environment, no network, no installs:

    python -m benchmark.speed.gpu_check --out gpu-check --budget 450

It needs no dataset (it writes random, class-patterned images in Fashion-MNIST's IDX format and in
CIFAR-10's format into a temporary folder and points ``$BENCHMARK_DATA`` / ``--data-dir`` there),
and the parts that need a missing optional package (torch-pruning for the structured methods) are
reported "not run (why)", never as passed.

Parts, in this order, each a command of its own under its own timeout (``TIMEOUTS``, which add up
to at most ``DEFAULT_BUDGET_S``; a part that fails or runs out of time is recorded and the check
goes on; the whole check keeps to ``--budget``). Correctness first:

1. ``env``: torch, CUDA, cuDNN and the GPUs;
2. ``cuda-tests``: the tests marked ``cuda`` (tests/test_cuda.py: bf16 autocast, channels_last,
   factorized layers under autocast, exact resume, ``--jobs-per-gpu`` workers, ``--compile``, packed
   training, augmentation on the GPU);
3. ``cells``: one short real cell of each method family through ``run --device auto
   --jobs-per-gpu 1`` (a worker that owns its GPU); every record must be ok, on ``cuda:N``, naming
   the GPU;
4. ``doctor``: ``python -m benchmark doctor``;

then timings:

5. ``perf-step``: ``perf step`` for LeNet-300-100 and VGG-16, dense against DWF D=2/3/4, and
   VGG-16's training step as a share of the GPU's peak in the dtype it trains in (bf16 from
   compute capability 8.0, float32 before);
6. ``perf-pack``: ``perf pack``, packed against one model at a time;
7. ``epoch-lenet300`` and ``epoch-vgg16``: one epoch of LeNet-300-100 on Fashion-MNIST-shaped data
   and of VGG-16 on CIFAR-10-shaped data;
8. ``grid-*``: cells per hour of a 16-cell LeNet-300-100 grid with ``--jobs-per-gpu`` 1 and 2, and
   packed (``--pack 16`` and ``--pack auto``).

Writes ``OUT/summary.md`` and, per part, ``OUT/<part>.log`` (and the perf CSVs). Exit 0 when every
part that ran passed, 1 when one failed or timed out, 2 when no GPU is visible (``--cpu-dry-run``
then runs every part on the CPU with tiny settings, to check the plumbing: its numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
#: Dense tensor-core peaks (TFLOP/s) by GPU name, per training dtype, for the VGG-16 share; GPUs
#: before compute capability 8.0 (V100, T4) have no bf16 and train in float32, so their float32
#: peak is the one to compare with. --peak-tflops overrides.
PEAK_TFLOPS = {
    "bfloat16": {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0},
    "float32": {"V100": 15.7, "T4": 8.1},
}
VGG_PEAK_TARGET = 0.25
PACK_VS_ONE_TARGET = 10.0
PACK_VS_BEST_TARGET = 3.0
DEFAULT_BUDGET_S = 450
#: Each part's timeout (seconds): together at most DEFAULT_BUDGET_S, so that the whole check,
#: writing its data and summary included, ends within 8 minutes. A --cpu-dry-run gives each
#: DRY_RUN_SLACK times as long (a CPU is slower at everything) under its own --budget.
#: Sized from the first run on an H200 (2026-12-04): cuda-tests took 60 s, cells 19, perf-step 16,
#: perf-pack 19; 16 one-epoch cells one after another (grid-1) and pack auto's calibration overran 25 s.
TIMEOUTS = {"cuda-tests": 90, "cells": 40, "doctor": 25, "perf-step": 35, "perf-pack": 30, "epoch-lenet300": 25,
            "epoch-vgg16": 40, "grid-1": 60, "grid-2": 30, "grid-3": 30, "grid-4": 45}
DRY_RUN_SLACK = 3
GRID_TOML = """description = "gpu-check: {cells} LeNet-300-100 cells (DWF D=3, a lambda grid, two seeds)"
seeds = [0, 1]
{subset}
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = {{ epochs = {epochs}, batch_size = 128 }}
[[experiment.methods.dwf]]
depth = 3
lam = [{lams}]
"""
#: One short cell of each method family (the structured one only where torch-pruning is installed).
FAMILY_CELLS = {
    "at-init": "[experiment.methods.snip]\ntarget_cr = 10.0",
    "reference": "[experiment.methods.dense]",
    "regularization": "[experiment.methods.dwf]\ndepth = 3\nlam = 1e-4",
    "lottery": "[experiment.methods.lottery]\ntarget_cr = 2.0\nprune_fraction = 0.5",
    "after-training": "[experiment.methods.magnitude]\ntarget_cr = 10.0",
    "during-training": "[experiment.methods.rigl]\ntarget_cr = 10.0",
    "structured": "[experiment.methods.structured-magnitude]\nfinetune_epochs = 1\nlatency_repeats = 2",
}
CELLS_TOML = """description = "gpu-check: one short cell of each method family"
seeds = [0]
subset = {subset}
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = {{ epochs = 1, batch_size = 128 }}
{methods}
"""
#: Optional packages and the parts (method families) that need them.
OPTIONAL = {"structured": ("torch_pruning", "torch-pruning")}


@dataclass
class Outcome:
    name: str
    status: str = "not run"  # passed / failed / timed out / not run
    seconds: float = 0.0
    result: str = ""
    details: list[str] = field(default_factory=list)


class Check:
    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.out = out
        self.began = time.monotonic()
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.outcomes: list[Outcome] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.data = self.scratch / "data"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.began)

    def env(self) -> dict:
        """Every part's environment: the check's own data first, this checkout importable from
        anywhere, speed measurements cached in the scratch folder."""
        path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        return {**os.environ, "BENCHMARK_DATA": str(self.data), "PYTHONPATH": path,
                "BENCHMARK_CACHE_DIR": str(self.scratch / "speed-cache")}

    def not_run(self, name: str, why: str) -> Outcome:
        outcome = Outcome(name, "not run", 0.0, f"not run ({why})")
        self.outcomes.append(outcome)
        return outcome

    def run(self, name: str, command: list[str], timeout: float) -> tuple[Outcome, str]:
        """Run one part's command (from the repository root); its output goes to OUT/<name>.log."""
        limit = min(timeout * (DRY_RUN_SLACK if self.dry_run else 1), self.left() - 5)
        if limit < 10:
            return self.not_run(name, "the check's time budget is spent"), ""
        outcome = Outcome(name)
        self.outcomes.append(outcome)
        began = time.monotonic()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=limit, env=self.env(), cwd=ROOT)
            text = proc.stdout + proc.stderr
            outcome.status = "passed" if proc.returncode == 0 else "failed"
            if proc.returncode != 0:
                outcome.result = f"exit {proc.returncode}: {_last_line(text)}"
        except subprocess.TimeoutExpired as exc:
            text = _text(exc.stdout) + _text(exc.stderr)
            outcome.status = "timed out"
            outcome.result = f"stopped after {limit:.0f} s"
        outcome.seconds = time.monotonic() - began
        (self.out / f"{name}.log").write_text(f"$ {' '.join(command)}\n\n{text}")
        return outcome, text

    def write_summary(self, header: list[str]) -> Path:
        lines = ["# GPU check", "", *header, "", "| part | status | seconds | result |", "| --- | --- | ---: | --- |"]
        for o in self.outcomes:
            lines.append(f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.result.replace('|', '/')} |")
        for o in self.outcomes:
            if o.details:
                lines += ["", f"## {o.name}", "", *o.details]
        lines += ["", f"Total {time.monotonic() - self.began:.0f} s of a {self.budget_s:.0f} s budget. Raw output: "
                      f"`<part>.log` beside this file."]
        path = self.out / "summary.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def benchmark_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark", *args]


def missing_package(module: str) -> str | None:
    """Why ``module`` cannot be imported here (None when it can)."""
    try:
        __import__(module)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------------------------
# Data: the check brings its own
# ------------------------------------------------------------------------------------------------

def _images(rng, labels: np.ndarray, pixels: int) -> np.ndarray:
    """uint8 images, each its class's fixed random pattern plus noise (a model can learn them)."""
    patterns = rng.integers(0, 256, (10, pixels))
    noise = rng.integers(-48, 49, (len(labels), pixels))
    return np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)


def write_fashion_mnist_shaped(folder: Path, n_train: int, n_test: int) -> None:
    """Random class-patterned 28x28 images in Fashion-MNIST's IDX files (what discovery looks for)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = _images(rng, labels, 28 * 28)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def write_cifar10_shaped(folder: Path, n_train: int, n_test: int) -> None:
    """Random class-patterned images in CIFAR-10's python format (5 training batches, one test batch)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for name, n in [*[(f"data_batch_{i}", per) for i in range(1, 6)], ("test_batch", n_test)]:
        labels = rng.integers(0, 10, n)
        batch = {b"labels": labels.tolist(), b"data": _images(rng, labels, 3072)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------

def part_env(check: Check) -> list[str]:
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}, python {sys.version.split()[0]} "
             f"({sys.executable})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"- cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
                         f" ({'bf16 autocast' if p.major >= 8 else 'float32: no native bf16'})")
    else:
        lines.append("- no CUDA GPU visible" + (" (--cpu-dry-run: the parts run on the CPU with tiny settings; "
                                               "their numbers mean nothing)" if check.dry_run else ""))
    for part, (module, package) in OPTIONAL.items():
        why = missing_package(module)
        lines.append(f"- {package}: " + ("installed" if why is None else f"not installed, so the {part} part is not run"))
    smi = shutil.which("nvidia-smi")
    if smi:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True)
        lines.append(f"- nvidia-smi: {proc.stdout.strip() or proc.stderr.strip()}")
    check.outcomes.append(Outcome("env", "passed", 0.0, lines[1].lstrip("- ")))
    return lines


def part_tests(check: Check) -> None:
    outcome, text = check.run("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                                             "-m", "cuda", "tests/test_cuda.py"], TIMEOUTS["cuda-tests"])
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected).*?) in [\d.]+s", text, re.M)
    if summary:
        outcome.result = (outcome.result + "; " if outcome.result else "") + summary[-1]
    if outcome.status == "passed" and summary and "passed" not in summary[-1]:
        outcome.status = "not run" if check.dry_run else "failed"  # every test skipped: nothing was checked
        outcome.result = f"not run (every test skipped: {summary[-1]})"
    outcome.details = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR", "SKIPPED"))]


def part_cells(check: Check, device: str) -> None:
    """One short cell per method family, through a grid run whose worker owns its GPU."""
    families = dict(FAMILY_CELLS)
    for part, (module, package) in OPTIONAL.items():
        if missing_package(module) is not None:
            del families[part]
            check.not_run(f"cells-{part}", f"{package} is not installed: pip install {package}")
    grid = check.scratch / "gpu-check-cells.toml"
    grid.write_text(CELLS_TOML.format(subset=256 if check.dry_run else 4096, methods="\n".join(families.values())))
    results = check.scratch / "cells"
    workers = ["--jobs", "1"] if check.dry_run else ["--jobs-per-gpu", "1"]
    outcome, text = check.run("cells", benchmark_command("run", "--grid", str(grid), "--results-dir", str(results),
                                                         "--no-progress", "--device", device, "--pack", "off", *workers),
                              TIMEOUTS["cells"])
    records = _records(results)
    bad = [r for r in records if r.get("status") != "ok"]
    if device != "cpu":
        bad += [r for r in records if r.get("status") == "ok" and not (str(r.get("device", "")).startswith("cuda:")
                                                                      and r.get("gpu"))]
    done = sorted({r.get("family") for r in records if r.get("status") == "ok"})
    if outcome.status == "passed" and (bad or set(done) != set(families)):
        outcome.status = "failed"
    outcome.result = (outcome.result + "; " if outcome.result else "") + \
        f"{len(done)}/{len(families)} families ok ({', '.join(done)}); devices {sorted({r.get('device') for r in records})}"
    outcome.details = [f"- {r.get('method')}: {r.get('status')} on {r.get('device')} "
                       f"({r.get('gpu', 'no gpu named')}): {str(r.get('error') or '').splitlines()[:1]}" for r in bad]


def part_doctor(check: Check) -> None:
    outcome, text = check.run("doctor", benchmark_command("doctor", "--results-dir", str(check.scratch / "doctor")),
                              TIMEOUTS["doctor"])
    if outcome.status == "passed":
        outcome.result = _last_line(text)


def part_perf_step(check: Check, device: str) -> None:
    csv_path = check.out / "perf-step.csv"
    archs = "lenet300" if check.dry_run else "lenet300,vgg16"
    command = benchmark_command("perf", "step", "--device", device, "--archs", archs, "--out", str(csv_path))
    outcome, _ = check.run("perf-step", command + (["--quick"] if check.dry_run else []), TIMEOUTS["perf-step"])
    if not csv_path.is_file():
        return
    rows = list(csv.DictReader(csv_path.open()))
    ratios = [f"{r['case'].split()[0]} {r['variant']} {float(r['ratio']):.2f}x" for r in rows if r["variant"] != "dense"]
    outcome.result = (outcome.result + "; " if outcome.result else "") + "step time / dense: " + ", ".join(ratios)
    outcome.details = ["| case | variant | median step | / dense |", "| --- | --- | ---: | ---: |"]
    outcome.details += [f"| {r['case']} | {r['variant']} | {float(r['median_s']) * 1e3:.2f} ms | {float(r['ratio']):.2f} |"
                        for r in rows]
    vgg = next((r for r in rows if r["case"].startswith("vgg16") and r["variant"] == "dense"), None)
    if vgg:
        outcome.details += ["", vgg_share_of_peak(float(vgg["median_s"]), int(vgg["case"].split("batch ")[1]))]


def vgg_share_of_peak(step_s: float, batch: int, peak_tflops: float | None = None) -> str:
    """VGG-16's training step (forward + backward: 3x the forward's 2 FLOPs per multiply-add) as a
    share of the GPU's dense peak in the dtype training computes in there."""
    import torch

    from benchmark.engine import models
    from benchmark.engine.sparsity import layer_macs, prunable_layers
    from benchmark.engine.precision import training_dtype

    model = models.build("vgg16", (3, 32, 32), 10)
    positions = layer_macs(model, (3, 32, 32))
    macs = sum(m.weight.numel() * positions[name] for name, m in prunable_layers(model))
    achieved = 6 * macs * batch / step_s / 1e12
    has_gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if has_gpu else ""
    dtype = str(training_dtype(torch.device("cuda", torch.cuda.current_device()) if has_gpu else torch.device("cpu")))
    dtype = dtype.replace("torch.", "")
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.get(dtype, {}).items() if k in name), None)
    if peak is None:
        return (f"VGG-16 step (batch {batch}): {achieved:.1f} TFLOP/s; no dense {dtype} peak known for {name!r} "
                f"(--peak-tflops)")
    share = achieved / peak
    verdict = "met" if share >= VGG_PEAK_TARGET else "missed"
    return (f"VGG-16 step (batch {batch}, {6 * macs * batch / 1e9:.0f} GFLOP): {achieved:.1f} TFLOP/s = {share:.1%} of "
            f"{name}'s {peak:g} TFLOP/s dense {dtype} peak (target >= {VGG_PEAK_TARGET:.0%}: {verdict})")


def part_perf_pack(check: Check, device: str) -> None:
    csv_path = check.out / "perf-pack.csv"
    command = benchmark_command("perf", "pack", "--device", device, "--out", str(csv_path))
    outcome, text = check.run("perf-pack", command + (["--quick"] if check.dry_run else []), TIMEOUTS["perf-pack"])
    found = [line.strip() for line in text.splitlines() if re.search(r"\d\.\d\dx$", line.strip())]
    limits = [line.strip() for line in text.splitlines() if line.strip().endswith("(hardware limit)")]
    outcome.details = [f"- {line}" for line in found + limits]
    if found:
        outcome.result = (outcome.result + "; " if outcome.result else "") + f"{len(found)} ratios (below)"


def part_epochs(check: Check, device: str) -> None:
    tiny = ["--subset", "512"] if check.dry_run else []
    for name, args in [
        ("epoch-lenet300", ["--arch", "lenet300", "--dataset", "fashion-mnist", *tiny]),
        ("epoch-vgg16", ["--arch", "vgg16", "--dataset", "cifar10", "--data-dir", str(check.data),
                         *(["--subset", "32", "--batch-size", "16"] if check.dry_run else [])]),
    ]:
        if name == "epoch-vgg16" and check.left() > 20:  # 150 MB of images: only when the part will run
            write_cifar10_shaped(check.data / "cifar-10-batches-py", 500 if check.dry_run else 50_000,
                                 100 if check.dry_run else 10_000)
        command = benchmark_command("cell", "dense", *args, "--epochs", "1", "--device", device, "--json", "--no-progress",
                                    "--cache-dir", str(check.scratch / name / "cache"),
                                    "--work-dir", str(check.scratch / name / "work"))
        outcome, text = check.run(name, command, TIMEOUTS[name])
        records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        if records:
            r = records[0]
            epoch = (r.get("history") or [{}])[-1]
            outcome.result = (f"{r.get('status')}: epoch {epoch.get('seconds', float('nan')):.1f} s (train + test pass), "
                              f"test acc {r.get('test_acc', float('nan')):.4f}, device {r.get('device')}")


def part_grids(check: Check, device: str) -> None:
    cells = 4 if check.dry_run else 16
    lams = [f"{1e-4 * 2 ** i:.3g}" for i in range(cells // 2)]
    grid = check.scratch / "gpu-check-grid.toml"
    grid.write_text(GRID_TOML.format(cells=cells, lams=", ".join(lams), epochs=1,
                                     subset="subset = 200" if check.dry_run else ""))
    if check.dry_run:
        configs = [("jobs 1", ["--jobs", "1", "--pack", "off"]), ("jobs 2", ["--jobs", "2", "--pack", "off"]),
                   ("pack 4", ["--jobs", "1", "--pack", "4"]), ("pack auto", ["--jobs", "1", "--pack", "auto"])]
    else:
        configs = [(f"jobs-per-gpu {k}", ["--jobs-per-gpu", str(k), "--pack", "off"]) for k in (1, 2)]
        configs += [("pack 16", ["--jobs-per-gpu", "1", "--pack", "16"]), ("pack auto", ["--jobs-per-gpu", "1", "--pack", "auto"])]
    rates: dict[str, float] = {}
    for i, (label, args) in enumerate(configs, 1):
        results = check.scratch / f"grid-{label.replace(' ', '-')}"
        command = benchmark_command("run", "--grid", str(grid), "--results-dir", str(results), "--no-progress",
                                    "--device", device, *args)
        outcome, text = check.run(f"grid-{label.replace(' ', '-')}", command, TIMEOUTS[f"grid-{i}"])
        if outcome.status == "passed":
            rates[label] = cells / outcome.seconds * 3600
            packs = sorted({r.get("pack_size", 1) for r in _records(results)})
            outcome.result = f"{cells} cells in {outcome.seconds:.0f} s = {rates[label]:.0f} cells/h; pack sizes {packs}"
            outcome.details = [f"- {line}" for line in text.splitlines() if line.startswith(("pack auto:", "pack:"))]
    if not rates:
        return
    summary = Outcome("grid-summary", "passed", 0.0, "cells per hour, whole runs (start-up and data loading included)")
    one = rates.get("jobs-per-gpu 1") or rates.get("jobs 1")
    best = max((v for k, v in rates.items() if k.startswith("jobs")), default=None)
    summary.details = ["| run | cells/h | / one cell per process | / best --jobs-per-gpu |", "| --- | ---: | ---: | ---: |"]
    for label, rate in rates.items():
        summary.details.append(f"| {label} | {rate:.0f} | {rate / one:.2f}x | {rate / best:.2f}x |" if one and best
                               else f"| {label} | {rate:.0f} | | |")
    packed = max((v for k, v in rates.items() if k.startswith("pack")), default=None)
    if packed and one and best and not check.dry_run:
        summary.details += ["", f"Targets: packed >= {PACK_VS_ONE_TARGET:g}x one cell per process "
                                f"({packed / one:.1f}x), >= {PACK_VS_BEST_TARGET:g}x the best --jobs-per-gpu "
                                f"({packed / best:.1f}x)."]
    check.outcomes.append(summary)


def _records(results: Path) -> list[dict]:
    out = []
    for path in results.glob("*/cells/*.json"):
        try:
            out += json.loads(path.read_text())["records"]
        except (OSError, ValueError, KeyError):
            pass
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.speed.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for summary.md and the logs (default gpu-check)")
    p.add_argument("--budget", "--budget-s", dest="budget_s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole check; later parts are not run once it is spent (default {DEFAULT_BUDGET_S})")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU needed: run every part on the CPU with tiny settings, to check the plumbing")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense peak in its training dtype, where its name is "
                                                     "not in the table")
    args = p.parse_args(argv)
    import torch

    if args.peak_tflops is not None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        for table in PEAK_TFLOPS.values():
            table.clear()
            table[name] = args.peak_tflops
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget_s, args.cpu_dry_run)
    header = part_env(check)
    has_gpu = torch.cuda.is_available()
    try:
        if not has_gpu and not args.cpu_dry_run:
            header.append("- nothing checked: this check is for a machine with a CUDA GPU (add --cpu-dry-run to run its "
                          "parts on the CPU, as a check of the plumbing)")
            path = check.write_summary(header)
            print(f"no CUDA GPU visible: nothing checked; {path}", file=sys.stderr)
            return 2
        write_fashion_mnist_shaped(check.data / "fashion-mnist", 2048 if check.dry_run else 60_000,
                                   512 if check.dry_run else 10_000)
        header.append(f"- data: Fashion-MNIST- and CIFAR-10-shaped random images written by the check "
                      f"($BENCHMARK_DATA={check.data}); accuracies mean nothing")
        device = "auto" if has_gpu else "cpu"
        for part in (part_tests, part_cells, part_doctor, part_perf_step, part_perf_pack, part_epochs, part_grids):
            if part in (part_tests, part_doctor):
                part(check)
            else:
                part(check, device)
            print(f"[{time.monotonic() - check.began:.0f} s] {check.outcomes[-1].name}: {check.outcomes[-1].status}",
                  file=sys.stderr, flush=True)
    finally:
        path = check.write_summary(header)
        shutil.rmtree(check.scratch, ignore_errors=True)
    print(path.read_text())
    bad = [o for o in check.outcomes if o.status in ("failed", "timed out")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
