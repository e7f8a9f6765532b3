"""``run --backend slurm``: SLURM jobs that host the run's Dask workers, from options to scancel."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from benchmark.core.errors import RunStopped
from benchmark.execution.pools import DaskPool
from benchmark.execution.slurm_nodes import DEFAULT_CORES, DEFAULT_MEMORY, fitted, read_partition

#: What installs dask-jobqueue (the version range pyproject.toml's ``cluster`` extra pins).
INSTALL = "pip install 'dask-jobqueue>=0.9,<0.10'  (or pip install -e '.[cluster]')"
#: Seconds a starting worker tries to reach its scheduler (this driver) before giving up, ending its
#: job. A connected worker stops as soon as it loses the driver; together they bound how long jobs
#: outlive a driver killed with SIGKILL, which cannot cancel them.
DEATH_TIMEOUT_S = 60
#: How long teardown waits for cancelled jobs to leave squeue (they pass through "completing").
LEAVE_QUEUE_S = 60.0
#: How often, while no worker has connected, the driver says what its jobs are waiting for.
SAY_PENDING_EVERY_S = 60.0

#: SLURM's time formats: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS[:MINUTES[:SECONDS]].
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """One SLURM job = one allocation running ``processes`` Dask worker processes; each process
    runs one cell at a time (Dask starts workers with one CPU thread each)."""

    partition: str | None = None
    account: str | None = None
    jobs: int = 2
    cores: int | None = None  # None: DEFAULT_CORES, or fewer where the partition's nodes have fewer
    memory: str | None = None  # None: DEFAULT_MEMORY, or less where the partition's nodes have less
    gpus: int = 0
    processes: int | None = None  # None: one per core, or one with a GPU (its cells share the GPU)
    walltime: str = "12:00:00"
    sbatch: tuple[str, ...] = ()
    prologue: tuple[str, ...] = ()
    interface: str | None = None
    log_dir: str | None = None  # None: RESULTS_DIR/GRID/slurm-logs

    @property
    def worker_processes(self) -> int:
        return self.processes or (1 if self.gpus else self.cores or DEFAULT_CORES)


#: (field, flag's metavar, help, what "not set" means where the default is None). The TOML file takes
#: the same names (``log_dir`` also as ``log-dir``). ``--help`` appends each default.
FIELDS = [
    ("partition", "NAME", "partition for the worker jobs (sbatch -p)", "the cluster's default partition"),
    ("account", "NAME", "account to charge (sbatch -A)", "your default account"),
    ("jobs", "N", "SLURM jobs kept running, each hosting Dask workers; one that ends (walltime, node failure) "
                  "is replaced", None),
    ("cores", "N", "CPU cores per job (sbatch --cpus-per-task)",
     f"{DEFAULT_CORES}, or what the partition's smallest node has (sinfo)"),
    ("memory", "SIZE", "memory per job, e.g. 16GB or 500MB (sbatch --mem)",
     f"{DEFAULT_MEMORY}, or what the partition's smallest node has (sinfo)"),
    ("gpus", "0|1", "GPUs per job (sbatch --gres=gpu:N); its workers train on it", None),
    ("processes", "N", "Dask worker processes per job, each running one cell at a time on one thread",
     "one per core, or 1 with a GPU (its cells then share it)"),
    ("walltime", "TIME", "time limit per job, e.g. 12:00:00 or 2-00:00:00 (sbatch -t)", None),
    ("sbatch", "DIRECTIVE", "extra sbatch directive for the worker jobs, written with '=' as it starts with '-': "
                            "--slurm-sbatch=--constraint=a100; repeatable", "none"),
    ("prologue", "LINE", "shell line run in each job before its workers start, e.g. 'module load cuda'; "
                         "repeatable", "none"),
    ("interface", "NAME", "network interface the scheduler (in this process) and the workers talk over, e.g. "
                          "ib0 or lo", "Dask's choice"),
    ("log_dir", "DIR", "where the worker jobs write their output; must be writable on the nodes",
     "RESULTS_DIR/GRID/slurm-logs"),
]
_REPEATABLE = {"sbatch", "prologue"}
_INTS = {"jobs", "cores", "gpus", "processes"}


def add_arguments(parser) -> None:
    """The ``--slurm-*`` flags of ``run``; each defaults to None so that a flag given wins over
    --slurm-config and one not given does not."""
    group = parser.add_argument_group("--backend slurm (flags win over --slurm-config)")
    group.add_argument("--slurm-config", metavar="FILE",
                       help="TOML file with any of the options below as keys (partition = \"gpu\", jobs = 8, "
                            "sbatch = [\"--qos=long\"], ...)")
    defaults = SlurmOptions()
    for name, metavar, text, unset in FIELDS:
        flag = "--slurm-" + name.replace("_", "-")
        text = f"{text} (default: {unset or getattr(defaults, name)})"
        if name in _REPEATABLE:
            group.add_argument(flag, action="append", metavar=metavar, help=text)
        else:
            group.add_argument(flag, type=int if name in _INTS else str, metavar=metavar, help=text)


def given_flags(args) -> list[str]:
    flags = ["--slurm-config"] if getattr(args, "slurm_config", None) else []
    return flags + ["--slurm-" + name.replace("_", "-") for name, *_ in FIELDS
                    if getattr(args, "slurm_" + name, None) is not None]


def options_from_args(args, installed: bool = True) -> SlurmOptions:
    """The options of ``--slurm-config`` overridden by the flags given, checked (ValueError naming
    the value and the fix), and with ``installed`` a check that sbatch and dask-jobqueue are here."""
    values: dict = {}
    if getattr(args, "slurm_config", None):
        values.update(read_config(args.slurm_config))
        try:
            check(values, where="")
        except ValueError as exc:
            raise ValueError(f"--slurm-config {args.slurm_config}: {exc}") from None
    for name, *_ in FIELDS:
        given = getattr(args, "slurm_" + name, None)
        if given is not None:
            values[name] = given
    options = check(values, where="--slurm-")
    if installed:
        check_installed()
    return options


def read_config(path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    file = Path(path).expanduser()
    try:
        values = tomllib.loads(file.read_text())
    except OSError as exc:
        raise ValueError(f"--slurm-config {path}: cannot read it ({exc.strerror}); give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--slurm-config {path}: not valid TOML ({exc}); see docs/scaling.md, 'Scaling out'") from None
    known = {name for name, *_ in FIELDS}
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"--slurm-config {path}: unknown key {key!r}; the keys are {', '.join(sorted(known))}")
        if name in _REPEATABLE and isinstance(value, str):
            value = [value]
        out[name] = value
    return out


def check(values: dict, where: str = "--slurm-") -> SlurmOptions:
    """SlurmOptions from raw values, or a ValueError naming the option (``where`` + its name: the
    flag, or with "" the config file's key), the value and the fix."""
    def flag(name):
        return where + name.replace("_", "-")

    clean: dict = {}
    for name, value in values.items():
        if name in _INTS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{flag(name)} {value!r}: must be a whole number")
            low = 0 if name == "gpus" else 1
            if value < low:
                raise ValueError(f"{flag(name)} {value}: must be >= {low}")
            clean[name] = value
        elif name in _REPEATABLE:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{flag(name)} {value!r}: must be a list of strings")
            clean[name] = tuple(v.strip() for v in value)
        else:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{flag(name)} {value!r}: must be a non-empty string")
            clean[name] = value.strip()
    options = SlurmOptions(**clean)
    if options.gpus > 1:
        raise ValueError(f"{flag('gpus')} {options.gpus}: a job's workers train on its first GPU only; use "
                         f"{flag('gpus')} 1 and more {flag('jobs')} (several cells per GPU: {flag('processes')} K)")
    if options.processes and options.cores and options.processes > options.cores:
        raise ValueError(f"{flag('processes')} {options.processes}: more worker processes than the job's "
                         f"{options.cores} core(s); raise {flag('cores')} or lower {flag('processes')}")
    for name in ("partition", "account", "interface"):
        value = getattr(options, name)
        if value is not None and not re.fullmatch(r"[\w.,@:+-]+", value):
            raise ValueError(f"{flag(name)} {value!r}: not a SLURM {name} name (letters, digits, -_.,); "
                             f"check the spelling ('sinfo -s' lists partitions)")
    if not _WALLTIME.match(options.walltime):
        raise ValueError(f"{flag('walltime')} {options.walltime!r}: not a SLURM time; use MINUTES, HH:MM:SS or "
                         f"DAYS-HH:MM:SS, e.g. 12:00:00")
    try:
        from dask.utils import parse_bytes
    except ImportError:
        raise ValueError(f"--backend slurm needs dask, distributed and dask-jobqueue, which are not installed "
                         f"here: {INSTALL}") from None
    try:
        size = parse_bytes(options.memory) if options.memory is not None else 2**30
    except (ValueError, TypeError):
        size = None
    if not size or size < 2**20:
        raise ValueError(f"{flag('memory')} {options.memory!r}: not a memory size of at least 1MB; use e.g. 16GB "
                         f"or 500MB")
    for directive in options.sbatch:
        if not directive.startswith("-"):
            raise ValueError(f"{flag('sbatch')} {directive!r}: an sbatch option starts with '-', e.g. "
                             f"--constraint=a100 (without '#SBATCH')")
    return options


def check_installed() -> None:
    try:
        import dask_jobqueue  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        raise ValueError(f"--backend slurm needs dask-jobqueue, which is not installed: {INSTALL}") from None
    for command in ("sbatch", "squeue", "scancel", "sinfo"):
        if shutil.which(command) is None:
            raise ValueError(f"--backend slurm: {command} is not on PATH; run on a machine that submits SLURM jobs "
                             f"(a login node), or use --backend local")


def job_name() -> str:
    """Unique per run, so that teardown can find (and squeue show) exactly this run's jobs."""
    return f"dwf-bench-{uuid.uuid4().hex[:8]}"


#: Dask's memory management is for Dask's own data, which cells do not keep: a worker near its
#: memory limit would pause (take no more cells: a run that waits forever) or spill nothing useful.
#: Off; the nanny still restarts a worker past 95% of its memory (the cell is then requeued, as for
#: any worker that dies).
WORKER_ENV = ("export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False",
              "export DASK_DISTRIBUTED__WORKER__MEMORY__SPILL=False",
              "export DASK_DISTRIBUTED__WORKER__MEMORY__TARGET=False")


#: distributed's loggers in this process (the scheduler's) show errors only, for the rest of the run:
#: ``silence_logs`` holds only until the cluster has closed, and a worker's comm that closes after
#: that logged an INFO line with a traceback into an orderly stop's output (SIGTERM while jobs start).
DISTRIBUTED_LOG_LEVEL = logging.ERROR


def make_cluster(options: SlurmOptions, name: str, log_dir: Path):
    """dask-jobqueue's SLURMCluster for ``options``; its scheduler runs in this process."""
    from dask_jobqueue import SLURMCluster

    logging.getLogger("distributed").setLevel(DISTRIBUTED_LOG_LEVEL)

    directives = list(options.sbatch) + ([f"--gres=gpu:{options.gpus}"] if options.gpus else [])
    processes = options.worker_processes
    kwargs = dict(
        cores=processes, processes=processes,  # one thread per worker process: one cell at a time each
        job_cpu=options.cores, memory=options.memory, walltime=options.walltime, queue=options.partition,
        account=options.account, job_extra_directives=directives, job_script_prologue=[*WORKER_ENV, *options.prologue],
        job_name=name, log_directory=str(log_dir), python=sys.executable, death_timeout=DEATH_TIMEOUT_S,
        scheduler_options={"dashboard_address": None}, silence_logs="error",
    )
    if options.interface:
        kwargs["interface"] = options.interface
    return SLURMCluster(**kwargs)


#: (words in SLURM's refusal, the options that can cause it): where SLURM does not name the option.
REFUSAL_FLAGS = ((("partition",), ("partition",)), (("account", "association"), ("account", "sbatch")),
                 (("time limit", "walltime"), ("walltime",)), (("qos",), ("sbatch", "account")),
                 (("node configuration", "memory", "cpu", "gres", "feature", "constraint"),
                  ("cores", "memory", "processes", "gpus", "sbatch", "partition")))


def refusal_flags(said: str) -> list[str]:
    """The --slurm-* flags that can fix what SLURM said (all of them when its words are not known)."""
    text = said.lower()
    names = [name for words, names in REFUSAL_FLAGS if any(w in text for w in words) for name in names]
    names = names or ["partition", "account", "cores", "memory", "gpus", "walltime", "sbatch"]
    return ["--slurm-" + name for name in dict.fromkeys(names)]


def test_submission(cluster, options: "SlurmOptions", partition=None) -> None:
    """``sbatch --test-only`` on the very job script: a bad partition, account, walltime or
    directive is reported by SLURM here, as one line, before anything is queued, with the
    partition's node sizes (``partition``, from sinfo, where known) and the flags to change."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(cluster.job_script())
    try:
        done = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ValueError("--backend slurm: 'sbatch --test-only' did not answer within 60 s; is slurmctld up "
                         "('sinfo' tells)?") from None
    finally:
        Path(f.name).unlink(missing_ok=True)
    if done.returncode != 0:
        said = " ".join(line.strip() for line in done.stderr.splitlines() if line.strip()) or f"exit {done.returncode}"
        asked = (f"{options.cores} core(s), {options.memory}{f', {options.gpus} GPU' if options.gpus else ''}, "
                 f"walltime {options.walltime}, partition {options.partition or '(the default)'}")
        nodes = f"; {partition.describe()}" if partition is not None else ""
        raise ValueError(f"--backend slurm: SLURM refuses the worker job ({asked}): {said}{nodes}; change "
                         f"{', '.join(refusal_flags(said))} (or their keys in --slurm-config)")


def queued(name: str) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of the jobs named ``name`` that squeue still lists."""
    done = subprocess.run(["squeue", "--noheader", "--name", name, "--format", "%i %T %r"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise OSError(f"squeue failed: {done.stderr.strip()}")
    return [tuple((line.split(None, 2) + ["", ""])[:3]) for line in done.stdout.splitlines() if line.strip()]


def cancel(name: str, say, wait_s: float = LEAVE_QUEUE_S) -> list[str]:
    """scancel every job named ``name`` and wait until squeue lists none; returns those still there."""
    deadline = time.monotonic() + wait_s
    left: list = []
    while True:
        try:
            left = queued(name)
        except (OSError, subprocess.TimeoutExpired) as exc:
            say(f"warning: cannot list the SLURM jobs named {name} ({exc}); check with: squeue --name {name}")
            return [name]
        active = [job for job in left if job[1] not in ("COMPLETING",)]
        if active:
            subprocess.run(["scancel", "--name", name], capture_output=True, text=True, timeout=60)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if left:
        say(f"warning: SLURM job(s) {', '.join(j[0] for j in left)} ({name}) still listed by squeue after scancel; "
            f"check with: squeue --name {name}")
    return [j[0] for j in left]


@contextlib.contextmanager
def _signals_held(say):
    """While jobs are being cancelled a stop signal is noted and ignored: a second Ctrl-C must not
    leave jobs queued."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list = []
    names = [s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None]
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in names}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if got:
            say("(a stop signal arrived while the SLURM jobs were being cancelled; they are cancelled first)")


class SlurmPool(DaskPool):
    """``DaskPool`` whose scheduler is a SLURMCluster's that this run starts (in this process); its
    ``stop`` also ends the jobs. Everything else is the Dask backend's."""

    def __init__(self, signals, options: SlurmOptions, jobs: int | None, timeout: float, default_log_dir: Path, say):
        self.name = job_name()
        self.cluster = None
        self.submitting = False
        self.say = say
        self.log_dir = Path(options.log_dir).expanduser() if options.log_dir else default_log_dir
        try:
            with signals.interruptible():  # a stop signal while jobs start ends the run in order
                self.log_dir.mkdir(parents=True, exist_ok=True)
                partition = read_partition(options.partition)
                cores, memory, decided = fitted(options.cores, options.memory, options.processes, partition)
                options = dataclasses.replace(options, cores=cores, memory=memory)
                if decided:
                    say(f"SLURM: {decided}")
                self.cluster = make_cluster(options, self.name, self.log_dir)
                test_submission(self.cluster, options, partition)
                self.cluster.adapt(minimum_jobs=options.jobs, maximum_jobs=options.jobs)
                self.submitting = True
                say(f"SLURM: {options.jobs} job(s) named {self.name} submitted, {options.worker_processes} worker "
                    f"process(es) each ({options.cores} core(s), {options.memory}"
                    f"{f', {options.gpus} GPU' if options.gpus else ''}, walltime {options.walltime}"
                    f"{f', partition {options.partition}' if options.partition else ''}); "
                    f"worker logs in {self.log_dir}")
                super().__init__(signals, self.cluster.scheduler_address, jobs, timeout)
                self._wait_for_a_worker()
        except BaseException:
            if getattr(self, "client", None) is not None:
                with contextlib.suppress(Exception):
                    self.client.close(timeout=5)
            self._teardown()
            raise

    def _wait_for_a_worker(self) -> None:
        """Until one worker connects (a queue may hold the jobs for long): say what they wait for,
        and stop if every job ended without a worker (their logs say why)."""
        said = time.monotonic()
        while not self._workers():
            time.sleep(1.0)
            try:
                jobs = queued(self.name)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if self._submitted() and not jobs and not self._workers():
                time.sleep(5)  # a replacement may be on its way; a second look decides
                if not queued(self.name) and not self._workers():
                    raise RunStopped(f"the SLURM jobs {self.name} ended before a Dask worker connected; their "
                                     f"output is in {self.log_dir} (is this Python, {sys.executable}, there on the "
                                     f"nodes, and is --slurm-interface right?)")
            if time.monotonic() - said > SAY_PENDING_EVERY_S:
                said = time.monotonic()
                states = ", ".join(f"{j} {state}{f' ({reason})' if reason and reason != 'None' else ''}"
                                   for j, state, reason in jobs) or "none listed yet"
                self.say(f"SLURM: waiting for a worker; jobs: {states}")

    def _workers(self) -> dict:
        return self.client.scheduler_info(n_workers=-1).get("workers") or {}

    def _submitted(self) -> bool:
        """sbatch accepted at least one of the jobs (dask-jobqueue notes its id)."""
        return any(getattr(job, "job_id", None) for job in list(self.cluster.workers.values()))

    def stop(self, kill: bool = True) -> None:
        try:
            super().stop(kill)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        with _signals_held(self.say):
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    self.cluster.close(timeout=30)  # scancel of the jobs it knows
                self.cluster = None
            left = cancel(self.name, self.say)  # and of any it lost track of
            if not left and self.submitting:
                self.say(f"SLURM: jobs {self.name} cancelled; none left in squeue")
