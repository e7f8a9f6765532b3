"""The node sizes of a SLURM partition (``sinfo``) and a worker job's request that fits them: the
defaults of ``--slurm-cores`` / ``--slurm-memory`` when none is given, and a refusal naming the
node sizes and the flags when a request cannot fit (docs/scaling.md, "Scaling out")."""

from __future__ import annotations

import dataclasses
import math
import subprocess

#: A job's size when the partition allows it (and when no partition can be asked).
DEFAULT_CORES = 4
DEFAULT_MEMORY = "16GB"
#: ``sinfo`` fields: partition (the default one marked ``*``), CPUs and memory (MB) per node, nodes.
SINFO_FORMAT = "%P|%c|%m|%D"


@dataclasses.dataclass(frozen=True)
class NodeGroup:
    """Nodes of one size in a partition."""

    cpus: int
    memory_mb: int
    count: int

    def __str__(self) -> str:
        return f"{self.count} node(s) of {self.cpus} CPU(s) and {self.memory_mb} MB"


@dataclasses.dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[NodeGroup, ...]

    def describe(self) -> str:
        return f"partition {self.name} has " + ", ".join(map(str, self.nodes))


def parse_sinfo(text: str, partition: str | None) -> Partition | None:
    """The partition named (or the default one, marked ``*``) in ``sinfo -h -e -o SINFO_FORMAT``
    output; None when sinfo lists no node of it. Lines it cannot read are skipped."""
    groups: dict[str, list[NodeGroup]] = {}
    default = None
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, cpus, memory, count = (f.strip().rstrip("+") for f in fields)
        if name.endswith("*"):
            name = default = name[:-1]
        try:
            group = NodeGroup(int(cpus), int(memory), int(count))
        except ValueError:
            continue
        groups.setdefault(name, []).append(group)
    wanted = partition or default
    if wanted not in groups:
        return None
    return Partition(wanted, tuple(sorted(set(groups[wanted]), key=lambda g: (g.cpus, g.memory_mb))))


def read_partition(partition: str | None) -> Partition | None:
    """``parse_sinfo`` of this cluster's sinfo; None when sinfo cannot answer (the request is then
    left to ``sbatch --test-only``)."""
    try:
        done = subprocess.run(["sinfo", "-h", "-e", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return parse_sinfo(done.stdout, partition)


def slurm_megabytes(size: str) -> int:
    """The MB that ``sbatch --mem`` gets for ``size``: dask-jobqueue rounds up to whole GiB from 1 GiB
    on, else to whole MiB (so "16GB", 14.9 GiB, asks 15 GiB = 15360 MB)."""
    from dask.utils import parse_bytes

    n = parse_bytes(size)
    return math.ceil(n / 2**30) * 1024 if n >= 2**30 else math.ceil(n / 2**20)


def memory_that_fits(node_mb: int) -> str:
    """The largest size at most ``DEFAULT_MEMORY`` whose --mem fits a node of ``node_mb`` MB."""
    default_mb = slurm_megabytes(DEFAULT_MEMORY)
    if node_mb >= default_mb:
        return DEFAULT_MEMORY
    return f"{node_mb // 1024}GiB" if node_mb >= 1024 else f"{node_mb}MiB"


def fitted(cores: int | None, memory: str | None, processes: int | None,
           partition: Partition | None) -> tuple[int, str, str]:
    """(cores, memory, what was decided, in words) for a worker job. Values given are kept, but
    one that no node of the partition has is a ValueError naming the node sizes and the flags to
    change; values not given are the defaults, cut down to what every node of the partition has."""
    if partition is None:
        return cores or max(DEFAULT_CORES, processes or 0), memory or DEFAULT_MEMORY, ""
    largest_cpus = max(g.cpus for g in partition.nodes)
    largest_mb = max(g.memory_mb for g in partition.nodes)
    fix = "or choose another --slurm-partition (sinfo -s lists them)"
    if cores is not None and cores > largest_cpus:
        raise ValueError(f"--slurm-cores {cores}: {partition.describe()}; use --slurm-cores {largest_cpus} or less "
                         f"(--slurm-processes at most as many), {fix}")
    if memory is not None and slurm_megabytes(memory) > largest_mb:
        raise ValueError(f"--slurm-memory {memory}: asks {slurm_megabytes(memory)} MB but {partition.describe()}; use "
                         f"--slurm-memory {memory_that_fits(largest_mb)} or less, {fix}")
    if processes is not None and processes > (cores or largest_cpus):
        raise ValueError(f"--slurm-processes {processes}: more worker processes than the job's "
                         f"{cores or largest_cpus} core(s) ({partition.describe()}); lower --slurm-processes, {fix}")
    decided = []
    if cores is None:
        smallest = min(g.cpus for g in partition.nodes)
        cores = max(min(DEFAULT_CORES, smallest), processes or 0)
        decided.append(f"{cores} core(s)")
    if memory is None:
        fitting = [g.memory_mb for g in partition.nodes if g.cpus >= cores]
        memory = memory_that_fits(min(fitting))
        decided.append(memory)
    said = ""
    if decided:
        said = (f"{partition.describe()}: each job asks {' and '.join(decided)} (fits its nodes; "
                f"--slurm-cores / --slurm-memory set them)")
    return cores, memory, said
