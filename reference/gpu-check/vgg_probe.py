"""Why VGG-16's step misses its share of the GPU's peak: the step eager and under torch.compile at
batch 128 and 512, and the share of the eager step's wall time the GPU spends in kernels.

Not part of the suite (it needs CUDA); run from the repository root on a GPU machine:
``PYTHONPATH=. python reference/gpu-check/vgg_probe.py``. Its output of 2026-12-04 (H200) is
``h200-2026-12-04/vgg-probe.txt``."""
import time

import torch

from benchmark.speed.perf.step import make_step
from benchmark.speed import gpu_check
dev = torch.device("cuda")
def timed(step, n=20):
    for _ in range(3): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): step()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
for batch in (128, 512):
    for compiled in (False, True):
        t0 = time.perf_counter()
        try:
            step = make_step("vgg16", None, dev, batch, compiled=compiled)
            s = timed(step)
        except Exception as e:
            print(f"batch {batch} compiled={compiled}: failed {type(e).__name__}: {e}"[:300], flush=True); continue
        print(f"batch {batch} compiled={compiled}: step {s*1e3:.2f} ms (setup+warm {time.perf_counter()-t0-20*s:.0f} s); "
              + gpu_check.vgg_share_of_peak(step_s=s, batch=batch, peak_tflops=989.0), flush=True)
        if batch == 128 and not compiled:
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10): step()
                torch.cuda.synchronize()
            ev = prof.key_averages()
            gpu = sum(e.self_device_time_total for e in ev) / 10 / 1e3
            print(f"  eager b128: GPU kernels {gpu:.2f} ms per step of {s*1e3:.2f} ms wall ({gpu/(s*1e3):.0%} busy)")
            print(ev.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))
