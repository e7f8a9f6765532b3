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
  (``benchmark.execution.packing.calibration.measure``). Printed as one ``N.NNx`` per line (cells per hour packed / one
  at a time, as far as training steps decide it).
- ``limit``: each model's dense training step (batch 128) against its arithmetic limit on this
  device (weight-layer FLOPs at the large-matmul rate), in float32 in each memory layout and in
  bf16 where the CPU multiplies it natively, with the machine named. Targets on CPU: LeNet-5 within
  3x of the float32 limit, LeNet-300-100 within 1.5x; a missed one prints torch.profiler's top
  operators.
- ``grid-pack`` (not part of ``all``: it runs a whole grid twice per round: the ``quick`` grid took 33
  minutes on 2 cores): cells per hour of a grid with ``run --pack auto`` against ``--pack off``, same
  ``--jobs``, each in a fresh results folder so ``auto`` pays its calibration, plus the largest
  accuracy and CR differences between the two runs' records. Target on CPU: auto >= off (1.00x).

The machines this runs on are often shared, so absolute times mean little on their own: every
comparison alternates its contenders round by round in one process (reversing the order every other
round), reports median times, and takes each ratio as the median of the ratios within a round, so
load that comes and goes hits all contenders alike. Targets are checked here, on ratios, never in
unit tests. CPU runs tune glibc's allocator first, as every CPU training run does
(``benchmark.engine.devices.tune_cpu_allocator``; BENCHMARK_NO_MALLOC_TUNING=1 measures without it).
"""

from benchmark.speed.perf.data_loop import bench_data, plain_epoch, torchvision_copy
from benchmark.speed.perf.grid import bench_grid, run_grid_child
from benchmark.speed.perf.grid_pack import bench_grid_pack
from benchmark.speed.perf.limit import LIMIT_ARCHS, bench_limit, machine_name, profile_top_ops
from benchmark.speed.perf.pack import PACK_CASES, PACK_SIZES, bench_pack, matmul_rate, step_flops
from benchmark.speed.perf.rows import COLUMNS, DEFAULT_ROUNDS, Row, format_table, write_csv
from benchmark.speed.perf.step import SMALL_STEP_BLOCK, STEP_ARCHS, bench_step, build_training, make_step

#: The benchmarks ``perf all`` runs, in order (``grid-pack`` runs a whole grid twice per round: only by name).
WHATS = ("data", "step", "grid", "pack", "limit")

__all__ = ["COLUMNS", "DEFAULT_ROUNDS", "LIMIT_ARCHS", "bench_limit", "machine_name", "profile_top_ops", "PACK_CASES", "PACK_SIZES", "Row", "SMALL_STEP_BLOCK", "STEP_ARCHS", "WHATS",
           "bench_data", "bench_grid", "bench_grid_pack", "bench_pack", "bench_step", "build_training",
           "format_table", "make_step", "matmul_rate", "plain_epoch", "run_grid_child", "step_flops",
           "torchvision_copy", "write_csv"]
