"""pflbench: a benchmark harness for personalized federated learning.

The package is laid out by the stage of the data flow:

- `pflbench.core`: the training core (datasets, partitions, models, the algorithm hooks, the one
  round loop, local training);
- `pflbench.experiments`: run settings, run records, sweeps and their executors;
- `pflbench.analysis`: leaderboards, statistics, published numbers and reports from the records;
- `pflbench.cli`: the command line over all three.

An algorithm plugin needs only `from pflbench import Algorithm, register_algorithm`. The Python
API (:mod:`pflbench.api`) is importable from the top: `pflbench.run`, `pflbench.sweep`,
`pflbench.tune`, `pflbench.leaderboard`, `pflbench.compare`, `pflbench.report`; a mistake raises
`pflbench.UserError` with the CLI's one-line message.
"""

__version__ = "0.1.0"

from pflbench.api import RunResult, compare, leaderboard, report, run, sweep, tune  # noqa: E402
from pflbench.core.algorithm import Algorithm, Upload  # noqa: E402
from pflbench.core.registry import register_algorithm  # noqa: E402
from pflbench.core.search import Choice, Integer, NearOne, Real, tunable  # noqa: E402
from pflbench.errors import UserError  # noqa: E402

__all__ = ["Algorithm", "Upload", "register_algorithm", "tunable", "Real", "Integer", "NearOne", "Choice",
           "run", "sweep", "tune", "leaderboard", "compare", "report", "RunResult", "UserError", "__version__"]
