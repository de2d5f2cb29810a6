"""The one round loop every algorithm runs in.

Sample clients, let each start from the state its algorithm gives it, train locally, upload,
aggregate, and evaluate every `eval_every` rounds and after the last. Uploads are aggregated as
they arrive, so a round holds one model, not one per sampled client, unless the algorithm needs
the whole list (it overrides `Algorithm.aggregate`). Client sampling is drawn once per seed, so
every algorithm sees the same clients in the same rounds. With `precision = bf16`, local training
and evaluation (test-time adaptation included) run under bf16 autocast; the server's work stays
in float32. The engine knows no file formats and no CLI: it returns a :class:`RunResult` in memory.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pflbench.core.algorithm import Algorithm, Context, Upload
from pflbench.experiments.config import RunConfig
from pflbench.core.data import Dataset
from pflbench.errors import UserError
from pflbench.core.metrics import evaluation_figures
from pflbench.core.models import build_model
from pflbench.core.partition import ClientSplit, holdout_clients
from pflbench.core.state import State, get_state, nbytes, set_state, subset
from pflbench.core.training import ClientData, Trainer, TrainStats, precision_context

ProgressFn = Callable[[int, dict[str, float] | None], None]


@dataclass
class RunResult:
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def client_schedule(seed: int, num_clients: int, per_round: int, rounds: int,
                    holdout: tuple[int, ...] = ()) -> list[list[int]]:
    """The sampled clients of every round, drawn from one seeded stream independent of the
    algorithm, among the clients that train (holdout clients are never sampled)."""
    held = set(holdout)
    pool = np.array([c for c in range(num_clients) if c not in held])
    if per_round >= len(pool):
        return [pool.tolist() for _ in range(rounds)]
    rng = np.random.default_rng([seed, 0x5A3D])
    return [sorted(pool[rng.choice(len(pool), per_round, replace=False)].tolist()) for _ in range(rounds)]


def resolve_device(name: str) -> torch.device:
    """`auto` takes a GPU when there is one; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device(name)


class Engine:
    """Runs one federated training run of `algorithm_cls` on a partitioned dataset."""

    def __init__(self, config: RunConfig, data: Dataset, splits: list[ClientSplit],
                 algorithm_cls: type[Algorithm], hyperparams: Any, device: torch.device):
        self.config = config
        self.device = device
        torch.manual_seed(config.seed)
        model = build_model(config.model, data.input_shape, data.num_classes,
                            needs=algorithm_cls.model_needs).to(device)
        if model.channels_last:
            model = model.to(memory_format=torch.channels_last)
            data = Dataset(data.name, data.x.to(device, memory_format=torch.channels_last),
                           data.y.to(device), data.num_classes)
        else:
            data = Dataset(data.name, data.x.to(device), data.y.to(device), data.num_classes)
        self.model = model
        self.clients = [ClientData(torch.as_tensor(s.train, device=device), torch.as_tensor(s.test, device=device),
                                   torch.as_tensor(s.val, device=device) if len(s.val) else None)
                        for s in splits]
        self.trainer = Trainer(data, self.clients, config.seed, config.batch_size, config.lr,
                               config.momentum, config.weight_decay)
        self.holdout = holdout_clients(config.holdout_clients, len(splits), config.seed)
        participants = tuple(sorted(set(range(len(splits))) - set(self.holdout)))
        ctx = Context(config=config, model=model, trainer=self.trainer, clients=self.clients,
                      device=device, num_classes=data.num_classes, participants=participants)
        self.algo = algorithm_cls(ctx, hyperparams)
        self.global_state = get_state(model)
        self.schedule = client_schedule(config.seed, len(splits), config.clients_per_round, config.rounds,
                                        self.holdout)
        self.timers = {"client_s": 0.0, "server_s": 0.0, "eval_s": 0.0}
        self.comm = ctx.comm
        self.grad_evals = {"grad_evals": 0, "eval_grad_evals": 0}

    def _counted(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` and add the sample-gradients it computed to `grad_evals[key]` (training or
        evaluation: test-time adaptation is counted apart from the rounds' local work)."""
        before = self.trainer.grad_evals
        out = fn(*args)
        self.grad_evals[key] += self.trainer.grad_evals - before
        return out

    def _timed(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        self.timers[key] += time.perf_counter() - start
        return out

    def train_round(self, round_: int) -> TrainStats:
        """One round: every sampled client trains from its start state and uploads; each upload
        is handed to the aggregation as soon as it is made (see `_aggregation`)."""
        stats = TrainStats()
        sampled = self.schedule[round_ - 1]
        self._timed("server_s", self.algo.begin_round, round_, sampled)
        receive, finish = self._aggregation(sampled)
        for cid in sampled:
            self.comm["down"] += nbytes(subset(self.global_state, self.algo.download_keys(cid)))
            start = self._timed("server_s", self.algo.client_start, cid, self.global_state)
            set_state(self.model, start)
            with precision_context(self.config.precision, self.device):  # client-side work only
                stats += self._timed("client_s", self.algo.local_train, cid, self.model, round_)
            payload = self._timed("server_s", self.algo.upload, cid, get_state(self.model))
            self.comm["up"] += nbytes(payload)
            receive(Upload(cid, self.clients[cid].n_train, payload))
            del start, payload  # nothing of this client's stays alive but what the algorithm keeps
        self.global_state = self._timed("server_s", finish)
        return stats

    def _aggregation(self, sampled: list[int]) -> tuple[Callable[[Upload], None], Callable[[], State]]:
        """How a round's uploads reach the algorithm: `receive` takes each upload, `finish` gives
        the next global state. Streamed into the algorithm's accumulator as they arrive (memory:
        one model plus what the algorithm keeps), unless the algorithm overrides `aggregate`,
        which needs every upload: then the list is collected and handed over at the end."""
        algo, global_state = self.algo, self.global_state
        if not algo.streams_aggregation():
            uploads: list[Upload] = []
            return uploads.append, lambda: algo.aggregate(uploads, global_state)
        expected = {cid: self.clients[cid].n_train for cid in sampled}
        acc = self._timed("server_s", algo.begin_aggregation, global_state, expected)

        def receive(upload: Upload) -> None:
            self._timed("server_s", algo.accumulate, acc, upload)

        return receive, lambda: algo.finish_aggregation(acc, global_state)

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        """One row per client, with the model that client would use (and fine-tuned, if asked).
        Where the client has a validation set, the same model is scored on it too (`_val`). A
        holdout client (it never trained) is scored with what the algorithm gives a newcomer
        (`Algorithm.newcomer_model`), and its row says `holdout`."""
        rows = []
        ft_epochs = self.config.finetune_epochs
        for cid in range(len(self.clients)):
            newcomer = cid in self.holdout
            if newcomer:
                model = self.algo.newcomer_model(cid, self.global_state)
            else:
                model = self.algo.eval_model(cid, self.global_state)
            res = self.trainer.evaluate(model, cid)
            row = {"client": cid, "round": round_, "n_test": res.n, "correct": res.correct,
                   "acc": 100.0 * res.correct / res.n, "loss": res.loss_sum / res.n}
            if self.holdout:
                row["holdout"] = newcomer
            if self.clients[cid].n_val:
                val = self.trainer.evaluate(model, cid, split="val")
                row.update(n_val=val.n, correct_val=val.correct, acc_val=100.0 * val.correct / val.n,
                           loss_val=val.loss_sum / val.n)
            if ft_epochs:
                tuned = model if model is self.model else copy.deepcopy(model)
                self.trainer.sgd(tuned, cid, ft_epochs, round_, purpose="finetune")
                ft = self.trainer.evaluate(tuned, cid)
                row.update(correct_ft=ft.correct, acc_ft=100.0 * ft.correct / ft.n, loss_ft=ft.loss_sum / ft.n)
            rows.append(row)
        return rows

    def run(self, progress: ProgressFn | None = None) -> RunResult:
        result = RunResult()
        started = time.perf_counter()
        for round_ in range(1, self.config.rounds + 1):
            stats = self._counted("grad_evals", self.train_round, round_)
            train_loss = stats.loss_sum / stats.samples if stats.samples else float("nan")
            if not np.isfinite(train_loss) and stats.samples:
                raise FloatingPointError(f"training loss is {train_loss} in round {round_}; lower --lr")
            figures = None
            if round_ % self.config.eval_every == 0 or round_ == self.config.rounds:
                with precision_context(self.config.precision, self.device):
                    rows = self._counted("eval_grad_evals", self._timed, "eval_s", self.evaluate, round_)
                result.clients.extend(rows)
                figures = evaluation_figures(rows)
                result.rounds.append({"round": round_, **figures, "train_loss": train_loss,
                                      "comm_up_bytes": self.comm["up"], "comm_down_bytes": self.comm["down"],
                                      "grad_evals": self.grad_evals["grad_evals"],
                                      "elapsed_s": time.perf_counter() - started})
            if progress:
                progress(round_, figures)
        result.summary = self._summary(result, time.perf_counter() - started)
        return result

    def _summary(self, result: RunResult, wall_s: float) -> dict[str, Any]:
        final = {k: v for k, v in result.rounds[-1].items() if k not in ("round", "elapsed_s")}
        c = self.config
        return {
            "algo": c.algo, "dataset": c.dataset, "partition": c.partition, "alpha": c.alpha,
            "seed": c.seed, "rounds": c.rounds, "clients": c.clients, **final,
            "best_acc": max(r["acc"] for r in result.rounds),
            "best_round": max(result.rounds, key=lambda r: r["acc"])["round"],
            **selected_by_validation(result.rounds),
            "wall_s": wall_s, **self.timers, **self.grad_evals,
            "eval_adapt": self.algo.eval_adaptation(),
            **self.algo.summary(),
        }


def selected_by_validation(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """`acc_at_best_val`: the test accuracy of the evaluation with the best validation accuracy
    (the earliest, on a tie), the honest counterpart of `best_acc`, which selects on test data.
    Empty when the run has no validation set."""
    if not rounds or "val_acc" not in rounds[0]:
        return {}
    best = max(rounds, key=lambda r: r["val_acc"])  # max keeps the first of equals
    return {"best_val_acc": best["val_acc"], "best_val_round": best["round"], "acc_at_best_val": best["acc"]}


def run_experiment(config: RunConfig, data: Dataset, splits: list[ClientSplit],
                   algorithm_cls: type[Algorithm], hyperparams: Any, device: torch.device,
                   progress: ProgressFn | None = None) -> RunResult:
    return Engine(config, data, splits, algorithm_cls, hyperparams, device).run(progress)

