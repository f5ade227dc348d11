"""A pool of worker processes for independent runs (controls, seeds, study variants).

Each worker is a fresh process with its share of the cores as torch threads: on a
small CPU two single-thread processes do more steps per second than one process
with two threads (benchmarks/README.md). A job is one ordinary physlm run, so it
is resumable and reusable like any other: a finished run is skipped by the
trainer, an interrupted one resumes from its checkpoint.

    jobs = [TrainJob(config, "runs/a"), TrainJob(control, "runs/a/control", fork="runs/a")]
    run_jobs(jobs, workers=2)

A job with `fork` starts at the end of that run's warmup when the warmups would be
identical (physlm.runs.RunDirectory.fork_from) and trains from scratch otherwise; it
waits until the job that produces that run has finished.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from physlm.config import Config


@dataclass(frozen=True)
class TrainJob:
    config: Config
    run_dir: str | Path
    fork: str | Path | None = None      # a run whose warmup this one may start from
    until_epoch: int | None = None      # stop early (e.g. at the end of the warmup)

    @property
    def label(self) -> str:
        return str(self.run_dir)


def _init_worker(threads: int) -> None:
    import physlm

    physlm.passive_openmp()   # a fresh process: before torch
    import torch

    torch.set_num_threads(threads)


def run_job(job: TrainJob) -> tuple[str, int, bool]:
    """One job, in this process: fork if possible, then train (or resume, or skip a finished
    run); returns (run_dir, epochs, forked). What a worker of any engine calls (README)."""
    from physlm.runs import RunDirectory
    from physlm.trainer import train

    run = RunDirectory(job.run_dir)
    forked = job.fork is not None and run.fork_from(RunDirectory(job.fork), job.config)
    epochs = len(train(job.config, job.run_dir, until_epoch=job.until_epoch))
    return str(job.run_dir), epochs, forked


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def process_executor(workers: int) -> ProcessPoolExecutor:
    """`workers` fresh processes (spawned: no torch state shared with the parent), each with
    its share of the cores as torch threads."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads_per_worker(workers),))


def run_jobs(jobs: list[TrainJob], workers: int = 1) -> list[tuple[str, int, bool]]:
    """Run the jobs in the pool, in order, each as soon as a worker is free; a job that
    forks from another job's run waits for that job. A failing job does not stop the
    others (nor those forking from it, which train from scratch); the first error is
    raised at the end."""
    results: list[tuple[str, int, bool]] = []
    waiting, errors = list(jobs), []
    producers = {Path(job.run_dir).resolve() for job in jobs}
    done: set[Path] = set()
    start = time.perf_counter()
    with process_executor(workers) as pool:
        running: dict[Future, TrainJob] = {}
        while waiting or running:
            for job in [j for j in waiting if _ready(j, producers, done)]:
                if len(running) >= workers:   # the rest waits: forks may become ready first
                    break
                waiting.remove(job)
                running[pool.submit(run_job, job)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                done.add(Path(job.run_dir).resolve())
                elapsed = f"after {time.perf_counter() - start:.0f}s"
                if future.exception() is not None:
                    errors.append(future.exception())
                    print(f"pool: {job.label} FAILED {elapsed}: {future.exception()}",
                          flush=True)
                    continue
                run_dir, epochs, forked = future.result()
                results.append((run_dir, epochs, forked))
                print(f"pool: {job.label} done ({epochs} epochs"
                      f"{', forked from ' + str(job.fork) if forked else ''}) {elapsed}",
                      flush=True)
    if errors:
        raise errors[0]
    return results


def _ready(job: TrainJob, producers: set[Path], done: set[Path]) -> bool:
    """A job may start unless it forks from a run that another job is still producing."""
    source = None if job.fork is None else Path(job.fork).resolve()
    return source is None or source not in producers or source in done
