"""``run --backend slurm`` on a real single-node SLURM started here (Debian's slurm-wlm and munge).

munged, slurmctld and slurmd run from a temporary folder (key, config, state, sockets, logs), every
service bound to 127.0.0.1; real sbatch submits the Dask worker jobs. The smoke grid goes through
SLURM (stopped once by SIGTERM and resumed) and through the local backend, and the records must be
the same to the last bit; squeue must list no job after each run. Where the daemons are not
installed or cannot start (they need root), the cluster tests skip and say why; the option checks
at the end run everywhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.execution import slurm
from benchmark.__main__ import build_parser, main

from test_fault_injection import comparable
from procs import assert_every_cell_once, cli, events, no_traceback, nothing_trained, start, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # slow: left out of make test-fast

DAEMONS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
INSTALL = "apt-get install slurm-wlm munge (as root; `make test` does it where apt-get is there)"

#: Two one-core worker jobs: the node has at least two CPUs, and --jobs 2 locally gives each cell
#: one thread too, so both runs sum floats in the same order.
SLURM_ARGS = ("--backend", "slurm", "--slurm-jobs", "2", "--slurm-cores", "1", "--slurm-memory", "3GB",
              "--slurm-walltime", "15", "--slurm-interface", "lo")
RUN_ARGS = ("run", "--grid", "smoke", "--no-progress", "--pack", "off")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _listening(ports) -> dict[int, str]:
    """{port: IPv4 address listened on} for the given TCP ports (Linux /proc/net/tcp)."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.split(":")
        if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
            found[int(port, 16)] = socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return found


#: The private node's size, whatever this machine has (slurmd takes it from the config: config_overrides):
#: smaller than a worker job's defaults (4 cores, 16GB), as on a cluster of small nodes.
NODE_CPUS, NODE_MEMORY_MB = 2, 6000


def _config(folder: Path, node: str, ctld_port: int, node_port: int) -> str:
    return f"""\
ClusterName=dwftest
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
NodeName={node} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd from a temporary folder, for the session; yields the folder.
    SLURM_CONF points the client commands (and the runs the tests start) at it."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)} missing): {INSTALL}")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd and munged needs root (slurmd runs jobs as their users); run the tests as root")
    pytest.importorskip("dask_jobqueue", reason=f"dask-jobqueue missing: {slurm.INSTALL}")
    folder = tmp_path_factory.mktemp("slurm")
    folder.chmod(0o700)
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    ports = (_free_port(), _free_port())
    conf.write_text(_config(folder, "dwfnode", *ports))
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    daemons: list[subprocess.Popen] = []

    def launch(name: str, *args: str) -> None:
        log = open(folder / f"{name}.out", "w")
        daemons.append(subprocess.Popen([name, *args], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True))
        log.close()

    try:
        launch("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={folder}/munge.socket",
               f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed")
        socket_ok = wait_until(lambda: (folder / "munge.socket").exists(), 10)
        token = subprocess.run(["munge", "-n", "-S", str(folder / "munge.socket")], capture_output=True, timeout=10)
        if not socket_ok or token.returncode != 0:
            pytest.skip(f"munged did not start here: {_tail(folder / 'munged.log')} {token.stderr!r}")
        launch("slurmctld", "-D", "-f", str(conf))
        launch("slurmd", "-D", "-N", "dwfnode", "-f", str(conf))

        def idle() -> bool:
            done = subprocess.run(["sinfo", "--noheader", "-o", "%t"], capture_output=True, text=True, timeout=10)
            return done.stdout.strip() == "idle"

        if not wait_until(idle, 30, every=0.5):
            pytest.skip(f"slurmctld/slurmd did not come up here: slurmctld: {_tail(folder / 'slurmctld.log')}; "
                        f"slurmd: {_tail(folder / 'slurmd.log')}")
        assert _listening(ports) == {port: "127.0.0.1" for port in ports}  # slurmctld, slurmd: loopback only
        yield folder
    finally:
        for proc in reversed(daemons):  # slurmd, slurmctld, munged: each ours, by its pid
            proc.terminate()
        for proc in reversed(daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before


def squeue() -> list[str]:
    """Every job this private SLURM still lists (queued, running or completing)."""
    done = subprocess.run(["squeue", "--noheader", "-o", "%i %j %T"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n") if done.stdout.strip() else []


@pytest.mark.timeout(1200)
def test_smoke_grid_through_slurm_matches_the_local_backend(slurm_cluster, tmp_path):
    """Stopped by SIGTERM once a cell is recorded, then resumed: the cells equal the local run's,
    each recorded once, and no job is left in squeue after either run."""
    through_slurm, local = tmp_path / "slurm", tmp_path / "local"
    command = (*RUN_ARGS, "--results-dir", through_slurm, *SLURM_ARGS)
    began = time.monotonic()
    driver = start(*command)
    try:
        recorded = wait_until(lambda: any(e["event"] == "finish" for e in events(through_slurm, "smoke"))
                              or driver.poll() is not None, 180, every=0.2)
        assert recorded and driver.poll() is None, driver.communicate()
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "resume with:" in err and no_traceback(err), err
    assert "none left in squeue" in err
    assert squeue() == []
    stopped_s = time.monotonic() - began

    resumed = cli(*command, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "none left in squeue" in resumed.stderr and no_traceback(resumed.stderr)
    assert squeue() == []
    slurm_s = time.monotonic() - began
    # the cells ran in SLURM jobs: each wrote its worker's output where the run said
    assert list((through_slurm / "smoke" / "slurm-logs").glob("dwf-bench-*.err"))

    done = cli(*RUN_ARGS, "--results-dir", local, "--jobs", "2", timeout=600)
    assert done.returncode == 0, done.stderr
    print(f"slurm: stopped after {stopped_s:.0f} s, finished after {slurm_s:.0f} s; "
          f"local: {time.monotonic() - began - slurm_s:.0f} s")

    by_slurm = assert_every_cell_once(through_slurm, "smoke")
    by_local = assert_every_cell_once(local, "smoke")
    assert set(by_slurm) == set(by_local) and len(by_slurm) >= 14
    for cell_id, result in by_slurm.items():
        assert result["config"] == by_local[cell_id]["config"]
        assert comparable(result) == comparable(by_local[cell_id]), f"cell {cell_id} differs from the local run"


def test_a_stop_signal_while_the_jobs_start_cancels_them(slurm_cluster, tmp_path):
    """SIGTERM right after the jobs are submitted, before any cell: the same orderly stop as
    later on (exit 143, every cell counted as not started), and squeue empty."""
    driver = start(*RUN_ARGS, "--results-dir", tmp_path, *SLURM_ARGS)
    try:
        lines = []
        for line in driver.stderr:  # the run says when sbatch took the jobs
            lines.append(line)
            if line.startswith("SLURM:") and "submitted" in line:
                break
        assert lines and "submitted" in lines[-1], "".join(lines)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert "none left in squeue" in err and no_traceback(err), err
    assert "stopped by SIGTERM: 0 cell(s) finished" in err and f"{len(smoke_ids())} not started" in err, err
    assert squeue() == []


def smoke_ids() -> set[str]:
    from benchmark.execution import grids

    return {cell.id for cell in grids.load_grid("smoke").cells}


def test_a_job_slurm_refuses_is_one_line_naming_it_and_nothing_is_queued(slurm_cluster, tmp_path):
    done = cli(*RUN_ARGS, "--results-dir", tmp_path, *SLURM_ARGS, "--slurm-partition", "nosuchpartition")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nosuchpartition" in errors[0], done.stderr
    assert "SLURM refuses the worker job" in errors[0] and "change --slurm-partition" in errors[0], errors[0]
    assert no_traceback(done.stderr) and nothing_trained(tmp_path)
    assert squeue() == []


def test_sinfo_of_the_private_cluster_gives_its_node_sizes(slurm_cluster):
    from benchmark.execution.slurm_nodes import NodeGroup, Partition, read_partition

    expected = Partition("debug", (NodeGroup(NODE_CPUS, NODE_MEMORY_MB, 1),))
    assert read_partition(None) == expected  # the default partition
    assert read_partition("debug") == expected
    assert read_partition("nosuchpartition") is None


def test_without_size_flags_the_jobs_fit_the_partitions_small_nodes(slurm_cluster, tmp_path):
    """No --slurm-cores / --slurm-memory: the defaults (4 cores, 16GB) would not fit the 2-CPU,
    6000 MB node, and SLURM would refuse the job; the job asks what the node has and is queued."""
    no_sizes = [a for a in SLURM_ARGS if a not in ("--slurm-cores", "1", "--slurm-memory", "3GB")]
    assert len(no_sizes) == len(SLURM_ARGS) - 4
    driver = start(*RUN_ARGS, "--results-dir", tmp_path, *no_sizes)
    try:
        lines = []
        for line in driver.stderr:
            lines.append(line)
            if line.startswith("SLURM:") and "submitted" in line or line.startswith("error:"):
                break
        said = "".join(lines)
        assert "submitted" in lines[-1], said
        assert (f"partition debug has 1 node(s) of {NODE_CPUS} CPU(s) and {NODE_MEMORY_MB} MB: each job asks "
                f"{NODE_CPUS} core(s) and {NODE_MEMORY_MB // 1024}GiB") in said, said
        assert f"({NODE_CPUS} core(s), {NODE_MEMORY_MB // 1024}GiB" in lines[-1], said
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert "none left in squeue" in err and no_traceback(err), err
    assert squeue() == []


@pytest.mark.parametrize("flag, value, fix", [("--slurm-cores", "8", f"use --slurm-cores {NODE_CPUS} or less"),
                                              ("--slurm-memory", "64GB", "use --slurm-memory 5GiB or less")])
def test_a_request_larger_than_the_nodes_is_refused_with_their_sizes_and_the_flag(slurm_cluster, tmp_path, flag,
                                                                                   value, fix):
    args = [a for a in SLURM_ARGS if a not in ("--slurm-cores", "1", "--slurm-memory", "3GB")] + [flag, value]
    done = cli(*RUN_ARGS, "--results-dir", tmp_path, *args)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert f"{flag} {value}" in errors[0] and fix in errors[0], errors[0]
    assert f"partition debug has 1 node(s) of {NODE_CPUS} CPU(s) and {NODE_MEMORY_MB} MB" in errors[0]
    assert no_traceback(done.stderr) and nothing_trained(tmp_path)
    assert squeue() == []


def test_jobs_that_end_before_a_worker_connects_stop_the_run_with_their_logs(slurm_cluster, tmp_path):
    """A worker that cannot start (here: the job's prologue fails) ends the run with a message
    pointing at the jobs' output, instead of waiting forever; nothing stays queued."""
    done = cli(*RUN_ARGS, "--results-dir", tmp_path, *SLURM_ARGS, "--slurm-prologue", "echo no worker here >&2; exit 3",
               timeout=300)
    assert done.returncode == 2, done.stderr
    assert "ended before a Dask worker connected" in done.stderr and "slurm-logs" in done.stderr, done.stderr
    assert no_traceback(done.stderr) and nothing_trained(tmp_path)
    assert squeue() == []
    logs = list((tmp_path / "smoke" / "slurm-logs").glob("*.err"))
    assert logs and any("no worker here" in p.read_text() for p in logs)


# ------------------------------------------------------------------------------------------------
# Options: no SLURM needed
# ------------------------------------------------------------------------------------------------


def parse(*words) -> object:
    return build_parser("run").parse_args(["run", *map(str, words)])


def test_sinfo_lines_give_the_partitions_node_sizes_and_a_request_that_fits():
    from benchmark.execution.slurm_nodes import NodeGroup, fitted, parse_sinfo, slurm_megabytes

    text = "debug*|2|6000|1\ngpu|64|512000|4\ngpu|32|256000|2\nbroken line\n"
    small = parse_sinfo(text, None)
    assert small.name == "debug" and small.nodes == (NodeGroup(2, 6000, 1),)
    assert parse_sinfo(text, "gpu").nodes == (NodeGroup(32, 256000, 2), NodeGroup(64, 512000, 4))
    assert parse_sinfo(text, "none") is None
    assert fitted(None, None, None, small)[:2] == (2, "5GiB")
    assert fitted(None, None, None, parse_sinfo(text, "gpu"))[:2] == (4, "16GB")  # the defaults fit: kept
    assert fitted(None, None, None, None) == (4, "16GB", "")  # no sinfo: the defaults, SLURM decides
    assert slurm_megabytes("16GB") == 15360 and slurm_megabytes("500MB") == 477
    with pytest.raises(ValueError, match="--slurm-cores 4: partition debug has 1 node"):
        fitted(4, None, None, small)


def test_refusals_name_the_flags_that_fix_them():
    assert slurm.refusal_flags("sbatch: error: invalid partition specified: x") == ["--slurm-partition"]
    assert "--slurm-cores" in slurm.refusal_flags("Requested node configuration is not available")
    assert slurm.refusal_flags("something new")[0] == "--slurm-partition"


def test_flags_win_over_the_config_file(tmp_path):
    config = tmp_path / "slurm.toml"
    config.write_text('partition = "gpu"\njobs = 8\ncores = 8\nmemory = "32GB"\ngpus = 1\n'
                      'sbatch = ["--qos=long"]\nlog-dir = "/scratch/logs"\n')
    options = slurm.options_from_args(parse("--backend", "slurm", "--slurm-config", config, "--slurm-jobs", "3",
                                            "--slurm-sbatch=--constraint=a100"), installed=False)
    assert (options.partition, options.jobs, options.cores, options.memory, options.gpus) == ("gpu", 3, 8, "32GB", 1)
    assert options.sbatch == ("--constraint=a100",) and options.log_dir == "/scratch/logs"
    assert options.worker_processes == 1  # one process on the GPU unless --slurm-processes says more
    assert slurm.SlurmOptions(cores=6).worker_processes == 6


def test_help_prints_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = slurm.SlurmOptions()
    entries = [f"--slurm-{name.replace('_', '-')} {metavar} " for name, metavar, *_ in slurm.FIELDS]
    for (name, *_), entry, following in zip(slurm.FIELDS, entries, entries[1:] + ["\n"]):
        shown = text.split(entry)[-1].split(following)[0]  # its line in the list of options
        assert "(default:" in shown, name
        value = getattr(defaults, name)
        if value not in (None, ()):
            assert f"(default: {value})" in shown, name


@pytest.mark.parametrize("words, message", [
    (("--slurm-walltime", "25h"), "--slurm-walltime '25h': not a SLURM time; use MINUTES, HH:MM:SS"),
    (("--slurm-memory", "lots"), "--slurm-memory 'lots': not a memory size of at least 1MB; use e.g. 16GB"),
    (("--slurm-jobs", "0"), "--slurm-jobs 0: must be >= 1"),
    (("--slurm-gpus", "2"), "--slurm-gpus 2: a job's workers train on its first GPU only; use --slurm-gpus 1"),
    (("--slurm-cores", "2", "--slurm-processes", "4"), "--slurm-processes 4: more worker processes than the job's 2"),
    (("--slurm-sbatch=#SBATCH --qos=x",), "--slurm-sbatch '#SBATCH --qos=x': an sbatch option starts with '-'"),
    (("--slurm-partition", "gpu a100"), "--slurm-partition 'gpu a100': not a SLURM partition name"),
    (("--scheduler", "tcp://127.0.0.1:8786"), "--scheduler tcp://127.0.0.1:8786 is for --backend dask; "
                                              "--backend slurm starts its own scheduler"),
])
def test_bad_options_are_one_line_naming_the_value_and_the_fix(tmp_path, capsys, words, message):
    assert main(["run", "--grid", "smoke", "--results-dir", str(tmp_path), "--backend", "slurm", *words]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and no_traceback(err), err
    assert nothing_trained(tmp_path)


def test_config_file_mistakes_name_the_file_and_the_key(tmp_path, capsys):
    config = tmp_path / "slurm.toml"
    config.write_text('partitions = "gpu"\n')
    assert main(["run", "--grid", "smoke", "--results-dir", str(tmp_path), "--backend", "slurm",
                 "--slurm-config", str(config)]) == 2
    assert f"--slurm-config {config}: unknown key 'partitions'; the keys are " in capsys.readouterr().err
    config.write_text('jobs = "many"\n')
    assert main(["run", "--grid", "smoke", "--results-dir", str(tmp_path), "--backend", "slurm",
                 "--slurm-config", str(config)]) == 2
    assert f"--slurm-config {config}: jobs 'many': must be a whole number" in capsys.readouterr().err


def test_slurm_flags_without_the_slurm_backend_are_an_error_not_ignored(tmp_path, capsys):
    assert main(["run", "--grid", "smoke", "--results-dir", str(tmp_path), "--slurm-partition", "gpu"]) == 2
    assert "--slurm-partition is for --backend slurm; add --backend slurm or leave it out" in capsys.readouterr().err
    assert nothing_trained(tmp_path)


def test_without_dask_jobqueue_it_says_which_pip_command_installs_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # what Python does for a package not installed
    assert main(["run", "--grid", "smoke", "--results-dir", str(tmp_path), "--backend", "slurm"]) == 2
    assert "needs dask-jobqueue, which is not installed: pip install 'dask-jobqueue>=" in capsys.readouterr().err


def test_distributed_logs_stay_quiet_after_the_cluster_has_closed(tmp_path):
    """The scheduler runs in the run's process: a worker's comm that closes after the cluster has
    (an orderly SIGTERM while the jobs start) must not print distributed's INFO line and traceback into
    the stop's output, while errors still show. No job is submitted (the cluster is never scaled)."""
    pytest.importorskip("dask_jobqueue", reason=f"dask-jobqueue missing: {slurm.INSTALL}")
    import logging

    logger = logging.getLogger("distributed")
    before = logger.level
    try:
        logger.setLevel(logging.INFO)  # distributed's own default
        cluster = slurm.make_cluster(slurm.SlurmOptions(cores=1, memory="1GB", interface="lo"), slurm.job_name(),
                                     tmp_path)
        cluster.close()
        # the logger of that line: its level, not isEnabledFor, which is False for a logger that a
        # dictConfig in this process disabled (tests/test_runner.py calls one)
        assert logging.getLogger("distributed.batched").getEffectiveLevel() == logging.ERROR
    finally:
        logger.setLevel(before)
