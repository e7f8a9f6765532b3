"""``make gpu-check`` (``python -m benchmark.speed.gpu_check``): every CUDA path of this suite, checked and
timed on one GPU in under 8 minutes, in one summary file.

Parts, in this order, each a command of its own under its own timeout (a part that fails or runs
out of time is recorded and the check goes on; the whole check keeps to ``--budget-s``):

1. ``env``: torch, CUDA and the GPU;
2. ``cuda-tests``: the tests marked ``cuda`` (bf16 autocast, channels_last, factorized layers under
   autocast, exact resume, ``--jobs-per-gpu`` slots, ``--compile``, packed training);
3. ``doctor``: ``python -m benchmark doctor``;
4. ``perf-step``: ``perf step`` for LeNet-300-100, LeNet-5, VGG-16 and ResNet-18, dense against DWF
   D=2/3/4, and VGG-16's training step as a share of the GPU's bf16 peak;
5. ``perf-pack``: ``perf pack``, packed against one model at a time;
6. ``epoch-lenet300`` and ``epoch-vgg16``: one real epoch of LeNet-300-100 on Fashion-MNIST, and of
   VGG-16 on CIFAR-10-shaped random data written in CIFAR-10's own format;
7. ``grid-*``: cells per hour of a 16-cell LeNet-300-100 grid with ``--jobs-per-gpu`` 1, 2 and 4,
   and packed (``--pack 16`` and ``--pack auto``).

Writes ``OUT/summary.md`` and, per part, ``OUT/<part>.log`` (and the perf CSVs). Exit 0 when every
part passed, 1 when one failed, 2 when no GPU is visible (``--cpu-dry-run`` then runs every part
on the CPU with tiny settings, to check the plumbing: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Dense bf16 tensor-core peaks (TFLOP/s) by GPU name, for the VGG-16 share; --peak-tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0,
                    "RTX 4090": 165.0}
VGG_PEAK_TARGET = 0.25
PACK_VS_ONE_TARGET = 10.0
PACK_VS_BEST_TARGET = 3.0
DEFAULT_BUDGET_S = 450
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


@dataclass
class Outcome:
    name: str
    status: str = "skipped"  # passed / failed / timed out / skipped
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

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.began)

    def run(self, name: str, command: list[str], timeout: float, env: dict | None = None) -> tuple[Outcome, str]:
        """Run one part's command; its output goes to OUT/<name>.log."""
        outcome = Outcome(name)
        self.outcomes.append(outcome)
        limit = min(timeout, self.left() - 5)
        if limit < 10:
            outcome.result = "not run: the check's time budget is spent"
            return outcome, ""
        began = time.monotonic()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                                  env={**os.environ, **(env or {})})
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


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------

def part_env(check: Check) -> list[str]:
    import torch

    lines = [f"- torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"- cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
    else:
        lines.append("- no CUDA GPU visible" + (" (--cpu-dry-run: the parts run on the CPU with tiny settings; "
                                               "their numbers mean nothing)" if check.dry_run else ""))
    smi = shutil.which("nvidia-smi")
    if smi:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True)
        lines.append(f"- nvidia-smi: {proc.stdout.strip() or proc.stderr.strip()}")
    check.outcomes.append(Outcome("env", "passed", 0.0, lines[1].lstrip("- ")))
    return lines


def part_tests(check: Check) -> None:
    outcome, text = check.run("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                                             "-m", "cuda", "tests/test_cuda.py"], 240)
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected).*?) in [\d.]+s", text, re.M)
    if summary:
        outcome.result = (outcome.result + "; " if outcome.result else "") + summary[-1]
    failures = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    outcome.details = failures


def part_doctor(check: Check) -> None:
    outcome, text = check.run("doctor", benchmark_command("doctor", "--results-dir", str(check.scratch / "doctor")), 90)
    if outcome.status == "passed":
        outcome.result = _last_line(text)


def part_perf_step(check: Check, device: str) -> None:
    csv_path = check.out / "perf-step.csv"
    archs = "lenet300" if check.dry_run else "lenet300,lenet5,vgg16,resnet18"
    command = benchmark_command("perf", "step", "--device", device, "--archs", archs, "--out", str(csv_path))
    outcome, _ = check.run("perf-step", command + (["--quick"] if check.dry_run else []), 180)
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
    share of the GPU's dense bf16 peak."""
    import torch

    from benchmark.engine import models
    from benchmark.engine.sparsity import layer_macs, prunable_layers

    model = models.build("vgg16", (3, 32, 32), 10)
    positions = layer_macs(model, (3, 32, 32))
    macs = sum(m.weight.numel() * positions[name] for name, m in prunable_layers(model))
    achieved = 6 * macs * batch / step_s / 1e12
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        return f"VGG-16 step (batch {batch}): {achieved:.1f} TFLOP/s; no bf16 peak known for {name!r} (--peak-tflops)"
    share = achieved / peak
    verdict = "met" if share >= VGG_PEAK_TARGET else "missed"
    return (f"VGG-16 step (batch {batch}, {6 * macs * batch / 1e9:.0f} GFLOP): {achieved:.1f} TFLOP/s = {share:.1%} of "
            f"{name}'s {peak:.0f} TFLOP/s dense bf16 peak (target >= {VGG_PEAK_TARGET:.0%}: {verdict})")


def part_perf_pack(check: Check, device: str) -> None:
    csv_path = check.out / "perf-pack.csv"
    command = benchmark_command("perf", "pack", "--device", device, "--out", str(csv_path))
    outcome, text = check.run("perf-pack", command + (["--quick"] if check.dry_run else []), 150)
    found = [line.strip() for line in text.splitlines() if re.search(r"\d\.\d\dx$", line.strip())]
    limits = [line.strip() for line in text.splitlines() if line.strip().endswith("(hardware limit)")]
    outcome.details = [f"- {line}" for line in found + limits]
    if found:
        outcome.result = (outcome.result + "; " if outcome.result else "") + f"{len(found)} ratios (below)"


def write_cifar10_shaped(folder: Path, n_train: int, n_test: int) -> None:
    """Random images in CIFAR-10's python format (5 training batches, one test batch)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for name, n in [*[(f"data_batch_{i}", per) for i in range(1, 6)], ("test_batch", n_test)]:
        batch = {b"labels": rng.integers(0, 10, n).tolist(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def part_epochs(check: Check, device: str) -> None:
    tiny = ["--subset", "512"] if check.dry_run else []
    for name, args, timeout in [
        ("epoch-lenet300", ["--arch", "lenet300", "--dataset", "fashion-mnist", *tiny], 90),
        ("epoch-vgg16", ["--arch", "vgg16", "--dataset", "cifar10", "--data-dir", str(check.scratch / "data"),
                         *(["--subset", "32", "--batch-size", "16"] if check.dry_run else [])], 150),
    ]:
        if name == "epoch-vgg16" and check.left() > 20:  # 150 MB of images: only when the part will run
            write_cifar10_shaped(check.scratch / "data" / "cifar-10-batches-py", 500 if check.dry_run else 50_000,
                                 100 if check.dry_run else 10_000)
        command = benchmark_command("cell", "dense", *args, "--epochs", "1", "--device", device, "--json", "--no-progress",
                                    "--cache-dir", str(check.scratch / name / "cache"),
                                    "--work-dir", str(check.scratch / name / "work"))
        outcome, text = check.run(name, command, timeout)
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
        configs = [(f"jobs-per-gpu {k}", ["--jobs-per-gpu", str(k), "--pack", "off"]) for k in (1, 2, 4)]
        configs += [("pack 16", ["--jobs-per-gpu", "1", "--pack", "16"]), ("pack auto", ["--jobs-per-gpu", "1", "--pack", "auto"])]
    rates: dict[str, float] = {}
    for label, args in configs:
        results = check.scratch / f"grid-{label.replace(' ', '-')}"
        command = benchmark_command("run", "--grid", str(grid), "--results-dir", str(results), "--no-progress",
                                    "--device", device, *args)
        outcome, text = check.run(f"grid-{label.replace(' ', '-')}", command, 150)
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
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"time for the whole check; later parts are skipped when it is spent (default {DEFAULT_BUDGET_S})")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU needed: run every part on the CPU with tiny settings, to check the plumbing")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, where its name is not in the table")
    args = p.parse_args(argv)
    import torch

    if args.peak_tflops is not None:
        BF16_PEAK_TFLOPS.clear()
        BF16_PEAK_TFLOPS[torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"] = args.peak_tflops
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
        device = "cuda" if has_gpu else "cpu"
        for part in (part_tests, part_doctor, part_perf_step, part_perf_pack, part_epochs, part_grids):
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
