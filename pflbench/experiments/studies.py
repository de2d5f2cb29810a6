"""Optuna's SQLite storage of the tuning studies, and the tables read back from it.

`pflbench tune` (:mod:`pflbench.experiments.tuning`) decides what to tune and runs the trials;
this module owns where studies live and how they are read: the storage under
`<results>/tuning/studies.db`, the sampler seeded per (study, trial number) so a resumed study
draws what an unbroken one would, study creation with the defaults as trial 0, and
`tuning/chosen.csv` / `tuning/trials.csv`, which the report reads without importing Optuna.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pflbench.atomic import write_text
from pflbench.core.training import stream_seed
from pflbench.errors import UserError

if TYPE_CHECKING:
    from pflbench.experiments.tuning import StudySpec

TUNING = "tuning"
DATABASE = "studies.db"
STARTUP_TRIALS = 4


def import_optuna() -> Any:
    """Optuna, with its and SQLAlchemy's logging down to warnings (a declared dependency)."""
    try:
        import optuna
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("tuning needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    return optuna


def storage_path(results: Path) -> Path:
    return Path(results) / TUNING / DATABASE


def open_storage(results: Path, create: bool = True) -> Any:
    optuna = import_optuna()
    path = storage_path(results)
    if not create and not path.exists():
        raise UserError(f"no tuning studies in {path.parent}; run `pflbench tune` first (same --results)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")


def sampler_for(study_name: str, number: int) -> Any:
    """TPE seeded by (study, trial number): a trial's draw depends only on the trials before it."""
    optuna = import_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(seed=stream_seed("tune", study_name, number) % 2**32,
                                          n_startup_trials=STARTUP_TRIALS)


def load_study(storage: Any, spec: StudySpec, budget: int) -> Any:
    """The spec's study, created (with the defaults enqueued as trial 0) where new; its recorded
    budget is the largest asked for so far."""
    optuna = import_optuna()
    study = optuna.create_study(storage=storage, study_name=spec.name, direction="maximize", load_if_exists=True)
    if not study.user_attrs:
        for key, value in spec.attrs().items():
            study.set_user_attr(key, value)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(spec.default_params(), user_attrs={"default": True})
    if budget > study.user_attrs.get("budget", 0):
        study.set_user_attr("budget", budget)
    return study


def finished(trials: list[Any]) -> list[Any]:
    """The trials that count against the budget, in order: complete or failed."""
    from optuna.trial import TrialState

    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]


def study_rows(storage: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per study: its choice; one row per trial) for every study in the storage."""
    optuna = import_optuna()
    from optuna.trial import TrialState

    chosen, trials_out = [], []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        attrs = study.user_attrs
        budget = int(attrs.get("budget", 0))
        done = finished(study.get_trials(deepcopy=False))
        counted = done[:budget]
        key = {"study": summary.study_name, "algo": attrs.get("algo"), "dataset": attrs.get("dataset"),
               "partition": attrs.get("partition"), "alpha": attrs.get("alpha")}
        for t in done:
            trials_out.append({**key, "trial": t.number, "state": t.state.name, "objective": t.value,
                               "default": bool(t.user_attrs.get("default", False)), "counted": t in counted,
                               "values": json.dumps(t.user_attrs.get("values", {}), sort_keys=True),
                               "error": t.user_attrs.get("error", "")})
        complete = [t for t in counted if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: t.value, default=None)  # max keeps the earliest of equals
        default = next((t for t in counted if t.user_attrs.get("default")), None)
        chosen.append({**key, "protocol": attrs.get("protocol"), "budget": budget, "finished": len(counted),
                       "failed": sum(t.state == TrialState.FAIL for t in counted),
                       "tune_seeds": json.dumps(attrs.get("tune_seeds", [])), "val_ratio": attrs.get("val_ratio"),
                       "objective": best.value if best else None,
                       "default_objective": default.value if default else None,
                       "chosen": json.dumps(best.user_attrs.get("values", {}), sort_keys=True) if best else "",
                       "best_trial": best.number if best else None,
                       "spaces": json.dumps(attrs.get("spaces", {}), sort_keys=True)})
    return chosen, trials_out


def write_tables(results: Path) -> pd.DataFrame:
    """`tuning/chosen.csv` and `tuning/trials.csv`, readable without Optuna (the report's input)."""
    chosen, trials = study_rows(open_storage(results, create=False))
    chosen_df = pd.DataFrame(chosen).sort_values(["dataset", "alpha", "algo"]) if chosen else pd.DataFrame()
    root = Path(results) / TUNING
    write_text(root / "chosen.csv", chosen_df.to_csv(index=False, float_format="%.6g"))
    write_text(root / "trials.csv", pd.DataFrame(trials).to_csv(index=False, float_format="%.6g"))
    return chosen_df


def optuna_attrs(storage: Any, study_name: str) -> dict[str, Any]:
    return import_optuna().load_study(study_name=study_name, storage=storage).user_attrs
