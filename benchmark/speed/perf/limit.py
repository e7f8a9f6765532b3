"""``perf limit``: each model's training step against its arithmetic limit on this device, per
precision and memory layout, with the machine named; where a target is missed, the profile that says why.

The limit of a step is its weight layers' FLOPs (``step_flops``: forward, input and weight gradient)
at the device's large-matmul rate (``matmul_rate``): no kernel does a layer's arithmetic faster than
a large square product does. ``rows.limit_ratio`` is the one helper that states it, here and in
``perf pack``. The CPU targets (docs/scaling.md, "CPU speed") are on the float32 limit.
"""

from __future__ import annotations

import platform
import types

import torch

from benchmark.core.provenance import cpu_model
from benchmark.engine import precision
from benchmark.engine.precision import CONV_MODELS, cpu_precision
from benchmark.engine.timing import interleave, paired_ratio, sync
from benchmark.engine.devices import tune_cpu_allocator
from benchmark.speed.arithmetic import matmul_rate, step_flops
from benchmark.speed.perf.rows import DEFAULT_ROUNDS, Row, judge, limit_ratio, make_row
from benchmark.speed.perf.step import STEP_ARCHS, build_training

#: Step / float32 limit a CPU should reach (the CPU-speed issue): LeNet-5 within 3x, LeNet-300-100 1.5x.
LIMIT_TARGETS = {"lenet5": 3.0, "lenet300": 1.5}
LIMIT_ARCHS = ("lenet300", "lenet5")
LIMIT_BATCH = 128
LIMIT_BLOCK = 10  # steps per timed block (LeNet steps take milliseconds)
PROFILE_STEPS = 10
PROFILE_TOP = 8
#: LeNet-5 as usually written (ReLU before each max-pool), timed beside ours on a CPU: the speed-up of
#: pooling first, which gives the same bits (models.LeNet5), measured in the same run.
TEXTBOOK_ORDER = "float32 channels_last, ReLU before pooling (textbook order)"


def machine_name(device: torch.device) -> str:
    """The device as a reader would look it up: the CPU model (and its bf16 matmul, if any) or the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = "/".join(precision.cpu_bf16_features()) or "no bf16 matmul"
    return f"{cpu_model()} ({platform.machine()}, {bf16})"


def variants(device: torch.device, arch: str) -> dict[str, tuple[str | None, str | None]]:
    """The (dtype, memory format) settings to time: on a CPU float32 in each layout of a conv net,
    and bf16 where the CPU multiplies it natively; elsewhere what training uses there."""
    if device.type != "cpu":
        return {"as trained": (None, None)}
    found = {"float32 contiguous": ("float32", "contiguous")}
    if arch in CONV_MODELS:
        found["float32 channels_last"] = ("float32", "channels_last")
    if precision.cpu_bf16_features():
        found["bf16 " + ("channels_last" if arch in CONV_MODELS else "contiguous")] = ("bf16", "channels_last")
    return found


def _relu_before_pooling(model: torch.nn.Module) -> None:
    """Make this LeNet-5 instance run ReLU before each max-pool (the textbook order)."""
    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))
    model.forward = types.MethodType(forward, model)


def profile_top_ops(step, steps: int = PROFILE_STEPS, top: int = PROFILE_TOP) -> str:
    """torch.profiler's table of the ``top`` operators by their own CPU time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    step()  # first-call costs (allocation, kernel selection) stay out
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def bench_limit(device: torch.device, rounds: int | None, quick: bool, archs: list[str]) -> list[Row]:
    """Per architecture (dense, batch 128), every variant's step timed in alternating blocks, each
    against the float32 limit and its own precision's; a missed CPU target prints the profile of
    the fastest float32 variant."""
    if device.type == "cpu":
        tune_cpu_allocator()
    batch = 16 if quick else LIMIT_BATCH
    block = 2 if quick else LIMIT_BLOCK
    n_rounds = rounds or (1 if quick else DEFAULT_ROUNDS["step_small"])
    print(f"machine: {machine_name(device)}, {torch.get_num_threads()} threads", flush=True)
    with cpu_precision(dtype="float32"):
        fp32_rate = matmul_rate(device)
    rates = {"float32": fp32_rate}
    if device.type == "cpu" and precision.cpu_bf16_features():
        with cpu_precision(dtype="bf16"):
            rates["bf16"] = matmul_rate(device)
    print("large-matmul rate: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()), flush=True)
    rows: list[Row] = []
    for arch in archs:
        shape, classes = STEP_ARCHS[arch]
        flops = step_flops(arch, shape, classes, batch)
        steps, settings = {}, variants(device, arch)
        if device.type == "cpu" and arch == "lenet5":
            settings[TEXTBOOK_ORDER] = ("float32", "channels_last")
        for name, (dtype, layout) in settings.items():
            with cpu_precision(dtype, layout):
                model, _, _, step = build_training(arch, None, device, batch)
                if name == TEXTBOOK_ORDER:
                    _relu_before_pooling(model)
                step()
                step()
                sync(device)

            def block_of(step=step, dtype=dtype, layout=layout):
                with cpu_precision(dtype, layout):
                    for _ in range(block):
                        step()

            steps[name] = block_of
        seconds = interleave(steps, n_rounds, device)
        case = f"{arch} dense, batch {batch}"
        best_fp32 = None
        for name, (dtype, _) in settings.items():
            row = make_row("limit", case, name, "s/step", seconds[name], per=block, device=str(device),
                           threads=torch.get_num_threads())
            ratio, sentence = limit_ratio(row.median_s, flops, fp32_rate)
            row.ratio, row.ratio_of = ratio, "step / float32 limit"
            judged = not (quick or dtype == "bf16" or name == TEXTBOOK_ORDER)
            row.target, row.met = judge(ratio, LIMIT_TARGETS.get(arch) if judged else None, False, device)
            row.note = f"{flops / 1e6:.0f} MFLOP per step"
            if dtype == "bf16" and "bf16" in rates:
                row.note += f"; {limit_ratio(row.median_s, flops, rates['bf16'])[0]:.2f}x the bf16 limit"
            print(f"{arch} {name}: {sentence}", flush=True)
            if judged and (best_fp32 is None or row.median_s < best_fp32[1].median_s):
                best_fp32 = (name, row)
            rows.append(row)
        if TEXTBOOK_ORDER in settings:
            ours = seconds["float32 channels_last"]
            print(f"{arch}: pooling before ReLU (ours, same bits) is "
                  f"{paired_ratio(seconds[TEXTBOOK_ORDER], ours):.2f}x faster than the textbook order", flush=True)
        if best_fp32 is not None and best_fp32[1].met == "no":
            name, _ = best_fp32
            dtype, layout = settings[name]
            print(f"{arch} {name} misses {best_fp32[1].target} of the float32 limit; where its step goes "
                  f"({PROFILE_STEPS} steps):", flush=True)
            with cpu_precision(dtype, layout):
                print(profile_top_ops(build_training(arch, None, device, batch)[3]), flush=True)
    return rows
