"""What the executors ask for on a GPU, checked on the CPU: the Ray task options, and the local
executor's one process per run (each of which would open the same GPU)."""

import sys
import types

import pytest

from pflbench.errors import UserError
from pflbench.experiments import executors
from pflbench.experiments.config import RunConfig
from pflbench.experiments.executors import Cell, RayExecutor, ray_task_options
from pflbench.experiments.records import RunRecord


def test_ray_asks_for_a_gpu_share_only_on_cuda():
    assert ray_task_options("cpu", 4) == {"num_cpus": 1}
    assert ray_task_options("cuda", 4) == {"num_cpus": 1, "num_gpus": 0.25}
    assert ray_task_options("cuda:0", 2, gpus_per_run=1.0) == {"num_cpus": 1, "num_gpus": 1.0}
    with pytest.raises(UserError, match="--gpus-per-run"):
        ray_task_options("cuda", 2, gpus_per_run=1.5)


def test_auto_asks_for_a_gpu_where_one_is_visible(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ray_task_options("auto", 3)["num_gpus"] == pytest.approx(1 / 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "num_gpus" not in ray_task_options("auto", 3)


class FakeRay(types.ModuleType):
    """Just enough of Ray to see what the executor asks for; tasks run inline."""

    def __init__(self):
        super().__init__("ray")
        self.remote_options, self.init_kwargs = None, None

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.init_kwargs = kwargs

    def shutdown(self):
        pass

    def remote(self, **options):
        self.remote_options = options

        def wrap(fn):
            return types.SimpleNamespace(remote=lambda cell: fn(cell))
        return wrap

    def wait(self, pending, num_returns=1):
        return pending[:1], pending[1:]

    def get(self, value):
        return value


@pytest.mark.parametrize("device, gpus, expected", [("cuda", None, 0.5), ("cuda", 0.1, 0.1), ("cpu", None, None)])
def test_ray_executor_passes_the_gpu_share_to_ray(monkeypatch, device, gpus, expected):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    ran = []

    def fake_run_cell(cell):
        ran.append(cell)
        return RunRecord(config=cell.config, hyperparams={}, device=cell.device, summary={})

    monkeypatch.setattr(executors, "run_cell", fake_run_cell)
    cells = [Cell(config=RunConfig(seed=s), data_root="d", device=device, plugins=(), cache_dir="c") for s in (0, 1)]
    records = list(RayExecutor(workers=2, address=None, gpus_per_run=gpus, threads=1).run(cells))
    assert len(records) == 2 and len(ran) == 2
    assert fake.remote_options.get("num_gpus") == expected and fake.remote_options["num_cpus"] == 1
    assert fake.init_kwargs["num_cpus"] == 2


@pytest.mark.parametrize("address, threads, cpus_per_task, ray_cpus", [
    (None, 3, 3, 6),  # a local Ray holds the CPUs of both workers' threads
    ("ray://head:10001", None, 1, None),  # a remote node's CPUs are unknown here: one thread a task
    ("ray://head:10001", 4, 4, None),
])
def test_a_ray_task_reserves_the_cpus_its_threads_use(monkeypatch, address, threads, cpus_per_task, ray_cpus):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    ran = []
    monkeypatch.setattr(executors, "run_cell", lambda cell: ran.append(cell.threads) or
                        RunRecord(config=cell.config, hyperparams={}, device=cell.device, summary={}))
    cells = [Cell(config=RunConfig(seed=s), data_root="d", device="cpu", plugins=(), cache_dir="c") for s in (0, 1)]
    list(RayExecutor(workers=2, address=address, threads=threads).run(cells))
    assert ran == [cpus_per_task] * 2 and fake.remote_options["num_cpus"] == cpus_per_task
    assert fake.init_kwargs.get("num_cpus") == ray_cpus
