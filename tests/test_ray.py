"""physlm on Ray (physlm.executor): the smoke study on a local cluster and on a two-node
cluster, a worker killed mid-run, a run's own error reported once and never retried, the
recipe search's trials as Ray tasks.

Each test starts Ray (seconds, half a minute on a loaded 2-core machine), so all are
`slow`. Where Ray cannot start they are skipped, saying why; CI installs ray (it is one of
physlm's dependencies), so CI is not such a place.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from physlm import search, study, variants
from physlm.__main__ import main
from physlm.config import from_flat
from physlm.errors import RunBusyError
from physlm.executor import (
    ClusterError,
    RayExecutor,
    TrainJob,
    connect,
    run_job,
    run_jobs,
    threads_per_worker,
)
from physlm.files import read_jsonl
from physlm.runs import RunDirectory
from physlm.values import ConfigError

from .conftest import REPO_ROOT, stable

ray = pytest.importorskip("ray", reason="ray is not installed (it is a dependency of physlm)")
pytestmark = pytest.mark.slow

SMOKE = "params/study_smoke.yaml"
# The smoke study cut to one seed and two epochs: a control, a run that forks from it and a
# baseline of another architecture.
TRIM = {"seeds": [0], "variants": ["control", "physics_reference", "lstm"], "ablation": {},
        "epochs": 2}
THREADS = threads_per_worker(2)   # what the pool gave each of the smoke study's 2 workers


def study_arguments(root: Path, **changes) -> list[str]:
    settings = {**TRIM, "run_dir": str(root / "runs"), "report_dir": str(root / "reports"),
                **changes}
    return ["study", "--params", SMOKE] + [a for k, v in settings.items()
                                           for a in ("--set", f"{k}={json.dumps(v)}")]


def trimmed_options(root: Path) -> study.StudyOptions:
    return study.load_study(SMOKE, {**TRIM, "run_dir": str(root / "runs")})


def train_here(jobs: list[TrainJob], threads: int) -> None:
    """The jobs one after the other in this process, as a pool worker ran each of them."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for job in jobs:
            run_job(job)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> study.StudyOptions:
    """The trimmed smoke study trained without Ray, each run with the threads the pool gave."""
    options = trimmed_options(tmp_path_factory.mktemp("reference"))
    train_here(study.plan(options), THREADS)
    return options


def assert_same_runs(root: Path, reference: study.StudyOptions) -> None:
    """Every run of the trimmed study in `root` has the reference's steps and epochs."""
    options = trimmed_options(root)
    for variant in options.variants:
        for seed in options.seeds:
            got = RunDirectory(study.run_path(options, variant, seed))
            expected = RunDirectory(study.run_path(reference, variant, seed))
            for name in ("steps", "epochs"):
                assert stable(read_jsonl(getattr(got, name))) == \
                    stable(read_jsonl(getattr(expected, name))), f"{variant}/s{seed} {name}"


def test_the_study_starts_a_local_ray_cluster_and_gives_the_pools_metrics(
        tmp_path, reference, capsys, monkeypatch):
    """`python -m physlm study` with no address and no RAY_ADDRESS: a Ray cluster inside the
    command, stopped at its end; every epoch and every finished run said; the metrics of
    the same runs trained the pool's way."""
    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(study_arguments(tmp_path))
    out, err = capsys.readouterr()
    if code != 0 and "cannot start Ray" in err:
        pytest.skip(f"Ray cannot start here: {err.strip()}")
    assert code == 0, err
    assert not ray.is_initialized()
    for line in ("control/s0: epoch 1/2", "control/s0: epoch 2/2", "lstm/s0: epoch 2/2",
                 "physics_reference/s0: epoch 2/2", "control/s0 done (2 epochs)",
                 "physics_reference/s0 done (2 epochs, forked from control/s0)"):
        assert line in out, f"{line!r} not in the output:\n{out}"
    assert out.index("control/s0 done") < out.index("physics_reference/s0: epoch")
    assert_same_runs(tmp_path, reference)
    assert (tmp_path / "reports" / "study_smoke.md").is_file()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for this module's in-process tests: runs with workers=2
    get one thread each, whatever the machine."""
    try:
        connect(local_cpus=2)
    except ClusterError as error:
        pytest.skip(f"Ray cannot start here: {error}")
    yield
    ray.shutdown()


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_a_worker_killed_mid_run_is_retried_and_resumes_to_the_same_run(tmp_path, local_ray):
    """SIGKILL the worker process that holds a run (its pid from the run's lock holder file)
    after its first checkpoint: Ray retries the task, the retry resumes from the checkpoint
    (the steps before it keep their timings) and the run equals one never disturbed."""
    control = study.run_config(trimmed_options(tmp_path), variants.CONTROL, 0)
    config = from_flat({"epochs": 3, "checkpoint_every": 5}, base=control)
    train_here([TrainJob(config, tmp_path / "undisturbed")], threads=1)
    job, run = TrainJob(config, tmp_path / "killed"), RunDirectory(tmp_path / "killed")
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(
        results=run_jobs([job], workers=2)))
    driver.start()
    deadline = time.monotonic() + 300
    while _lines(run.steps) < 8:  # past the checkpoint at step 5, before step 15's
        assert driver.is_alive() and time.monotonic() < deadline, "the run never reached step 8"
        time.sleep(0.002)
    pid = int((run.root / ".lock.holder").read_text().split()[0])
    timings = {r["step"]: r["time_s"] for r in read_jsonl(run.steps) if r["step"] <= 5}
    os.kill(pid, signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive()
    [result] = outcome["results"]
    assert result.epochs == 3 and result.run_dir == str(job.run_dir)
    assert {r["step"]: r["time_s"] for r in read_jsonl(run.steps) if r["step"] <= 5} == timings
    for name in ("steps", "epochs"):
        assert stable(read_jsonl(getattr(run, name))) == \
            stable(read_jsonl(getattr(RunDirectory(tmp_path / "undisturbed"), name)))


def fail_and_count(tally: str) -> None:
    """A task whose run is bad: it leaves a mark per attempt, then fails."""
    with open(tally, "a") as marks:
        marks.write("attempt\n")
    raise ConfigError("this run's settings are bad")


def test_a_runs_own_error_is_raised_as_it_was_and_never_retried(tmp_path, local_ray):
    with RayExecutor(workers=2) as executor:
        future = executor.submit(fail_and_count, str(tmp_path / "tally"))
        error = future.exception(timeout=120)
    assert type(error) is ConfigError and str(error) == "this run's settings are bad"
    assert (tmp_path / "tally").read_text() == "attempt\n"
    assert ray.is_initialized()   # the executor left the module's cluster connected


def test_a_run_held_by_another_writer_fails_once_and_the_others_go_on(
        tmp_path, local_ray, capsys):
    """A retried task meeting a straggler that still writes its run (here: this process
    holding the lock) fails cleanly with RunBusyError, reported once; other runs finish."""
    config = study.run_config(trimmed_options(tmp_path), "lstm", 0)
    busy, free = TrainJob(config, tmp_path / "busy"), TrainJob(config, tmp_path / "free")
    with RunDirectory(busy.run_dir).lock("the straggler"), \
            pytest.raises(RunBusyError, match="in use by process .*the straggler"):
        run_jobs([busy, free], workers=2)
    out = capsys.readouterr().out
    assert out.count("busy FAILED") == 1 and "free done (2 epochs)" in out
    assert not RunDirectory(busy.run_dir).holds_run


# --- two nodes on one machine ------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class RayNode:
    """One `ray start --block` process of a test cluster, in its own process group."""

    def __init__(self, arguments: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *arguments],
                env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in self.log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                said = [line for line in self.log.read_text(errors="replace").splitlines()
                        if line.strip(" ^~")]   # the error's line, not its carets
                pytest.skip(f"Ray cannot start a node here: {said[-1] if said else 'no output'}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to `ray start`, which stops its node's processes; whatever is left of its
        process group is killed."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def two_node_cluster(request):
    """A head node and a second node on this machine, 1 run's CPUs each: its address and the
    environment that joins it (the cluster's own token, none of ~/.ray's)."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths are short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    nodes: list[RayNode] = []

    def tear_down() -> None:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp, ignore_errors=True)

    request.addfinalizer(tear_down)
    head_port, client, *ports = _free_ports(14)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(THREADS), "--temp-dir",
              str(temp), "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]

    def own_ports(first: int) -> list[str]:
        names = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port")
        return [a for name, port in zip(names, ports[first:first + 6], strict=True)
                for a in (name, str(port))]

    # With ray[client]'s packages the head also serves Ray Client, on 10001 unless told.
    client_server = (["--ray-client-server-port", str(client)]
                     if importlib.util.find_spec("grpc") else [])
    nodes.append(RayNode(["--head", "--port", str(head_port), *client_server,
                          "--include-dashboard", "false", *common, *own_ports(0)],
                         env, temp / "head.log"))
    nodes[0].wait_started()
    address = f"127.0.0.1:{head_port}"
    nodes.append(RayNode(["--address", address, "--resources", '{"second_node": 1}', *common,
                          *own_ports(6)], env, temp / "second.log"))
    nodes[1].wait_started()
    return address, env


def test_the_study_with_address_runs_on_both_nodes_of_a_cluster(
        tmp_path, two_node_cluster, reference):
    """`python -m physlm study --address` on a two-node cluster: runs land on both nodes
    (each 'done' line names its node) and give the same metrics as without Ray."""
    address, env = two_node_cluster
    command = [sys.executable, "-m", "physlm", *study_arguments(tmp_path, workers=1),
               "--address", address]
    child = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    nodes = {line.rsplit(" on node ", 1)[1] for line in child.stdout.splitlines()
             if " done (" in line}
    assert len(nodes) == 2, child.stdout
    assert_same_runs(tmp_path, reference)


def test_the_search_runs_its_trials_as_ray_tasks_with_the_results_of_one_by_one(
        tmp_path, local_ray):
    """The recipe search on Ray, two trials at once (one thread each): every trial draws the
    recipe and reaches the held-out losses and state it does when the trials run one after
    the other in this process (the driver alone writes the storage in both)."""
    from .test_search import InlineExecutor, write_search

    def trials(study_: object) -> dict[int, tuple]:
        return {t.number: (t.params, t.intermediate_values, t.state) for t in study_.trials}

    with RayExecutor(workers=2) as executor:
        on_ray = search.run_search(search.load_search(
            write_search(tmp_path / "ray", startup_trials=3, workers=2)), executor)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_by_one = search.run_search(search.load_search(
            write_search(tmp_path / "inline", startup_trials=3)), InlineExecutor())
    finally:
        torch.set_num_threads(before)
    assert len(on_ray.trials) == 3 and trials(on_ray) == trials(one_by_one)
