"""Where the runs of a sweep execute: here, in worker processes, or as Ray tasks.

Every executor takes cells and yields their :class:`RunRecord` as each finishes; only the caller
writes to the results folder, so a remote Ray worker needs no access to it. A cell that raises
yields a failed record with its error instead of stopping the sweep.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pflbench.experiments.config import RunConfig
from pflbench.errors import UserError
from pflbench.experiments.records import RunRecord, failed_record


@dataclass(frozen=True)
class Cell:
    config: RunConfig
    data_root: str
    device: str
    plugins: tuple[str, ...]
    cache_dir: str
    threads: int = 1


def run_cell(cell: Cell) -> RunRecord:
    """Train one cell; any exception becomes a failed record."""
    import torch

    from pflbench.experiments.runner import compute_run

    torch.set_num_threads(cell.threads)
    try:
        return compute_run(cell.config, Path(cell.data_root), cell.device, cell.plugins,
                           cache_dir=Path(cell.cache_dir))
    except Exception as exc:  # a diverging or broken run is a result, not the end of the sweep
        return failed_record(cell.config, exc)


def default_workers() -> int:
    """Half the CPUs (at least one): each run then gets two threads for its own kernels."""
    return max(1, (os.cpu_count() or 1) // 2)


def check_workers(workers: int) -> None:
    """Every executor runs at least one cell at a time; the CLI calls this before anything starts."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1 (got {workers}); leave it out for half the CPUs")


def threads_per_run(workers: int, threads: int | None = None) -> int:
    """Torch threads each run gets: `threads` where given (`--threads`), else the CPUs shared out
    among the workers. Give it when something else needs cores too: by default a single worker
    takes every CPU, and two sweeps side by side then oversubscribe the machine."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1 (got {threads}); leave it out for CPUs / workers")
        return threads
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class LocalExecutor:
    """Runs in this process (one worker) or in `workers` spawned processes."""

    def __init__(self, workers: int, threads: int | None = None):
        check_workers(workers)
        self.workers = workers
        self.threads = threads_per_run(workers, threads)

    def run(self, cells: Iterable[Cell]) -> Iterator[RunRecord]:
        threads = self.threads
        cells = [Cell(**{**c.__dict__, "threads": threads}) for c in cells]
        if self.workers == 1:
            yield from map(run_cell, cells)
            return
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context) as pool:
            futures = [pool.submit(run_cell, c) for c in cells]
            try:
                for future in concurrent.futures.as_completed(futures):
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()


def uses_cuda(device: str) -> bool:
    """Whether runs on `device` take a GPU (`auto` does where this machine sees one)."""
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def ray_task_options(device: str, workers: int, gpus_per_run: float | None = None,
                     threads: int = 1) -> dict[str, float]:
    """What each Ray task asks for: the CPUs its torch threads use, and on CUDA a share of a GPU
    (`gpus_per_run`, by default 1 / workers, so `workers` runs share one GPU as the local
    executor's processes do)."""
    if gpus_per_run is not None and not 0 < gpus_per_run <= 1:
        raise UserError(f"--gpus-per-run must be in (0, 1] (got {gpus_per_run}); e.g. 0.25 puts 4 runs on a GPU")
    options: dict[str, float] = {"num_cpus": threads}
    if uses_cuda(device):
        options["num_gpus"] = gpus_per_run if gpus_per_run is not None else 1.0 / workers
    return options


class RayExecutor:
    """Each cell is a Ray task (its threads' CPUs, and a GPU share on CUDA) on the cluster at
    `address`, or on a local Ray started here.

    A task reserves as many CPUs as it runs torch threads. On a local Ray that is this machine's
    CPUs shared out among the workers, as the local executor does; a remote cluster's nodes are not
    this machine, so there a task uses one thread unless `--threads` says otherwise."""

    def __init__(self, workers: int, address: str | None, gpus_per_run: float | None = None,
                 threads: int | None = None):
        check_workers(workers)
        self.threads = threads_per_run(workers, 1 if threads is None and address else threads)
        ray_task_options("cpu", workers, gpus_per_run)  # a bad share fails before Ray starts
        self.gpus_per_run = gpus_per_run
        try:
            import ray  # noqa: F401  (only checks that Ray is installed)
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'pflbench[ray]'") from None
        self.workers = workers
        self.address = address

    def run(self, cells: Iterable[Cell]) -> Iterator[RunRecord]:
        import ray

        cells = list(cells)
        if not cells:
            return
        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers * self.threads, include_dashboard=False, log_to_driver=False,
                         object_store_memory=200 * 1024 * 1024)
        try:
            options = ray_task_options(cells[0].device, self.workers, self.gpus_per_run, self.threads)
            remote = ray.remote(**options)(run_cell)
            pending = [remote.remote(Cell(**{**c.__dict__, "threads": self.threads})) for c in cells]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            if started_here:
                ray.shutdown()


def make_executor(kind: str, workers: int, ray_address: str | None = None,
                  gpus_per_run: float | None = None, threads: int | None = None) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(workers, threads)
    if kind == "ray":
        return RayExecutor(workers, ray_address, gpus_per_run, threads)
    raise UserError(f"unknown executor '{kind}'; use local or ray")
