"""The engine of independent runs (study variants x seeds, the search's trials): Ray tasks.

    jobs = [TrainJob(config, "runs/a"), TrainJob(control, "runs/a/control", fork="runs/a")]
    run_jobs(jobs, workers=2)                         # a Ray cluster on this machine's cores
    run_jobs(jobs, workers=2, address="head:6379")    # an existing Ray cluster

A job is one ordinary physlm run (`run_job`), so it is resumable and reusable like any
other: a finished run is skipped by the trainer, an interrupted one resumes from its
checkpoint. A job with `fork` starts at the end of that run's warmup when the warmups would
be identical (physlm.runs.RunDirectory.fork_from); it is submitted when the job producing
that run is done (the driver holds the dependency: a failed producer's forks still train,
from scratch, where a Ray argument dependency would fail them with it). While a run
trains, this process reads its epochs.jsonl and says one line per epoch (physlm.progress:
in the terminal, and in a notebook's output when the study runs in one).

The cluster: without an address (nor RAY_ADDRESS) `ray.init` starts one inside this
command on this machine and stops it at the end; with one it joins that cluster. Every
task declares its resources: one GPU where the cluster has GPUs (so a 4-GPU machine runs
4 runs at once), else `workers` runs per machine, and the machine's cores shared among
them as torch threads (on a small CPU two single-thread runs do more steps per second
than one with two threads: benchmarks/README.md).

Faults: a task whose worker process or node dies is retried by Ray (MAX_RETRIES) and
resumes from the run's last checkpoint, which makes the result exact (physlm.trainer). An
error of the run's own (ConfigError, TrainingError, ...) is not retried: it is reported
once, the other runs go on, and the first error is raised at the end. `run_job` holds the
run directory's lock (physlm.lock): the dead attempt's lock died with its process, and a
retry that meets a straggler still writing (a node cut off, not dead) fails with
RunBusyError instead of writing beside it.

Where the code runs: the workers import physlm as this process does (Ray puts the
driver's current directory on their sys.path) and every task works in the driver's
current directory, so on a cluster every node needs the same checkout and environment at
the same path, run directories included: a shared file system (README, "On a cluster").
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from physlm.config import Config
from physlm.errors import ClusterError

MAX_RETRIES = 3                   # for a dead worker process or node only
OBJECT_STORE_BYTES = 256 * 2**20  # a local cluster's shared memory: jobs and results are small


@dataclass(frozen=True)
class TrainJob:
    config: Config
    run_dir: str | Path
    fork: str | Path | None = None      # a run whose warmup this one may start from
    until_epoch: int | None = None      # stop early (e.g. at the end of the warmup)

    @property
    def label(self) -> str:
        return short_name(self.run_dir)


def short_name(run_dir: str | Path) -> str:
    """A run's name in progress lines: its directory's last two parts (control/s0)."""
    return "/".join(Path(run_dir).parts[-2:])


class JobResult(NamedTuple):
    run_dir: str
    epochs: int
    forked: bool
    node: str | None    # the Ray node it ran on (its last attempt)


def run_job(job: TrainJob) -> tuple[str, int, bool]:
    """One job, in this process, holding its run directory: fork if possible, then train
    (or resume, or skip a finished run); returns (run_dir, epochs, forked)."""
    from physlm.runs import RunDirectory
    from physlm.trainer import train

    run = RunDirectory(job.run_dir)
    with run.lock():
        forked = job.fork is not None and run.fork_from(RunDirectory(job.fork), job.config)
        epochs = len(train(job.config, job.run_dir, until_epoch=job.until_epoch))
    return str(job.run_dir), epochs, forked


def threads_per_worker(workers: int) -> int:
    """This machine's cores shared among `workers` processes."""
    return max(1, (os.cpu_count() or 1) // workers)


def connect(address: str | None = None, local_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address` (default RAY_ADDRESS), or start one on this machine
    with `local_cpus` CPUs (default: its cores). True if this call connected (the caller
    disconnects, which stops a cluster it started); False if Ray was connected already."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    silent = address and _silent(address)
    if silent:  # Ray would retry for many minutes
        raise ClusterError(f"cannot join the Ray cluster at {address}: nothing answers there "
                           f"({silent}); start its head (ray start --head) or check the address")
    local = {} if address else dict(num_cpus=local_cpus or os.cpu_count() or 1,
                                     object_store_memory=OBJECT_STORE_BYTES,
                                     include_dashboard=False)
    try:
        ray.init(address=address, logging_level=logging.WARNING, **local)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"join the Ray cluster at {address}" if address else "start Ray on this machine"
        hint = ("; a cluster with token authentication (Ray's default) also needs "
                "RAY_AUTH_MODE=token and its token here (README: On a cluster)"
                if address and not os.environ.get("RAY_AUTH_MODE") else "")
        raise ClusterError(f"cannot {where}: {error}{hint}") from error
    return True


def _silent(address: str) -> str | None:
    """Why nothing accepts a connection at a "host:port" address; None if something does
    (or the address is another of Ray's forms, for Ray to judge)."""
    host, _, port = address.rpartition(":")
    if not host or "/" in host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        return error.strerror or str(error)
    return None


def _task(fn, cwd: str, threads: int, args: tuple, kwargs: dict) -> tuple[str, Any]:
    """What a Ray worker runs: `fn` in the driver's directory with `threads` torch threads;
    returns (this node's id, fn's result)."""
    import physlm

    physlm.passive_openmp()   # a fresh process: before torch
    import ray
    import torch

    if not os.path.isdir(cwd):
        raise ClusterError(f"node {socket.gethostname()} has no {cwd} (the driver's directory):"
                           " physlm on a cluster needs the same checkout at the same path on "
                           "every node (a shared file system)")
    torch.set_num_threads(threads)
    with contextlib.chdir(cwd):
        result = fn(*args, **kwargs)
    return ray.get_runtime_context().get_node_id(), result


class TaskFuture(Future):
    """A Future of a Ray task, knowing the node it ran on once it is done."""

    node: str | None = None


class RayExecutor(concurrent.futures.Executor):
    """`concurrent.futures.Executor` whose `submit(fn, *args)` runs `fn(*args)` as a Ray task
    shaped like one training run (see the module docstring): `threads` CPUs and torch
    threads, one GPU if `gpu`, retried MAX_RETRIES times if its process or node dies, never
    for an exception of its own, which its future raises as it was raised. `slots`: how
    many such tasks the cluster runs at once.

        with RayExecutor(workers=2) as executor:
            future = executor.submit(physlm_function, argument)

    `fn` and its arguments are pickled: a function of the physlm package goes by name, so
    the workers must import physlm (see the module docstring). Joins `address` or starts a
    local cluster as `connect` does; disconnects at shutdown if it connected."""

    def __init__(self, address: str | None = None, workers: int = 1,
                 gpu: bool | None = None) -> None:
        import ray

        self._connected = connect(address, max(os.cpu_count() or 1, workers))
        try:
            self.threads, self.gpus, self.slots = task_shape(workers, gpu)
        except BaseException:
            self._disconnect()
            raise
        self._remote = ray.remote(_task)
        self._resources = dict(num_cpus=self.threads, num_gpus=self.gpus,
                               max_retries=MAX_RETRIES, retry_exceptions=False)
        self._cwd = os.getcwd()
        self._pending: dict[Any, TaskFuture] = {}   # ObjectRef -> its future
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> TaskFuture:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        name = getattr(fn, "__name__", "task")  # Ray's prefix of the task's output lines
        ref = self._remote.options(name=name, **self._resources).remote(
            fn, self._cwd, self.threads, args, kwargs)
        future = TaskFuture()
        future.set_running_or_notify_cancel()
        self._pending[ref] = future
        ref.future().add_done_callback(lambda done: self._settle(ref, done))
        return future

    def _settle(self, ref, done: Future) -> None:
        future = self._pending.pop(ref)
        error = done.exception()
        if error is None:
            future.node, result = done.result()
            future.set_result(result)
        else:  # the task's own exception, not Ray's wrapper of it
            cause = getattr(error, "cause", None)
            if isinstance(cause, Exception):
                cause.add_note(f"raised in a Ray task: {error}")  # the worker's traceback
                error = cause
            future.set_exception(error)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Wait for the tasks (`wait`), or stop them, running ones too (`cancel_futures`);
        then disconnect if this executor connected."""
        import ray

        if self._closed:
            return
        self._closed = True
        if cancel_futures:
            for ref in list(self._pending):
                ray.cancel(ref, force=True)
        if wait:
            concurrent.futures.wait(list(self._pending.values()))
        self._disconnect()

    def __exit__(self, kind, error, traceback) -> bool:
        self.shutdown(wait=kind is None, cancel_futures=kind is not None)  # Ctrl-C: stop now
        return False

    def _disconnect(self) -> None:
        import ray

        if self._connected:
            ray.shutdown()


def task_shape(workers: int, gpu: bool | None = None) -> tuple[int, int, int]:
    """(CPUs, GPUs, slots) of one run's task on the connected cluster. With GPUs (`gpu`
    None: where the cluster has any) each run takes one, and a machine's cores are shared
    among its GPUs; without, among `workers` runs per machine. `slots`: how many such
    tasks fit the cluster at once."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes()
             if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    gpu_nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
    gpus = int(bool(gpu_nodes) if gpu is None else gpu)
    nodes = gpu_nodes if gpus else nodes
    if not nodes:
        raise ClusterError("the Ray cluster has no node with a CPU" + (" and a GPU" * gpus))
    runs_per_node = min(int(r["GPU"]) for r in nodes) if gpus else workers
    threads = max(1, min(int(r["CPU"]) for r in nodes) // runs_per_node)
    slots = sum(min(int(r["CPU"]) // threads, int(r["GPU"]) if gpus else workers)
                for r in nodes)
    return threads, gpus, max(1, slots)


def run_jobs(jobs: list[TrainJob], workers: int = 1,
             address: str | None = None) -> list[JobResult]:
    """Run the jobs as Ray tasks, in order, each as soon as a slot is free; a job that
    forks from another job's run waits for that job. A failing job does not stop the
    others (nor those forking from it, which train from scratch); the first error is
    raised at the end. Says one line per epoch of every run (read from its epochs.jsonl,
    physlm.progress) and one per finished run."""
    if not jobs:  # nothing to do: no cluster to start
        return []
    import ray

    from physlm.progress import EpochTail, say

    gpu = None if any(job.config.train.device != "cpu" for job in jobs) else False
    results: list[JobResult] = []
    errors: list[BaseException] = []
    waiting = list(jobs)
    producers = {Path(job.run_dir).resolve() for job in jobs}
    done: set[Path] = set()
    start = time.perf_counter()
    with RayExecutor(address, workers, gpu) as executor:
        several_nodes = sum(node["Alive"] for node in ray.nodes()) > 1  # then say where
        running: dict[TaskFuture, tuple[TrainJob, EpochTail]] = {}
        try:
            while waiting or running:
                for job in [j for j in waiting if _ready(j, producers, done)]:
                    if len(running) >= executor.slots:  # the rest waits: forks may be ready
                        break
                    waiting.remove(job)
                    epochs = job.config.train.epochs
                    tail = EpochTail(job.run_dir, job.label, epochs, job.until_epoch or epochs)
                    running[executor.submit(run_job, job)] = job, tail.start()
                if not running:
                    raise ValueError("jobs fork from each other in a cycle: "
                                     + ", ".join(job.label for job in waiting))
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job, tail = running.pop(future)
                    tail.stop()
                    done.add(Path(job.run_dir).resolve())
                    elapsed = f"after {time.perf_counter() - start:.0f}s"
                    if future.exception() is not None:
                        errors.append(future.exception())
                        say(f"{job.label} FAILED {elapsed}: {future.exception()}")
                        continue
                    results.append(JobResult(*future.result(), node=future.node))
                    say(f"{job.label} done ({results[-1].epochs} epochs"
                        f"{', forked from ' + short_name(job.fork) if results[-1].forked else ''}"
                        f") {elapsed}{' on node ' + future.node[:8] if several_nodes else ''}")
        finally:
            for _, tail in running.values():
                tail.stop()
    if errors:
        raise errors[0]
    return results


def _ready(job: TrainJob, producers: set[Path], done: set[Path]) -> bool:
    """A job may start unless it forks from a run that another job is still producing."""
    source = None if job.fork is None else Path(job.fork).resolve()
    return source is None or source not in producers or source in done
