"""Quality evaluation: generated tasks run through the engine for every policy x budget.

``tasks`` builds deterministic samples (niah, vt, coref, ppl) in the model's own tokens,
``harness`` runs them through ``Engine`` and scores them (``scoring``), and ``report`` writes
``results.json``, ``report.md`` and ``plot.png``. ``tbrun eval`` is the command-line face.
"""

from .harness import EvalConfig, RunPoint, evaluate, run_eval, run_points
from .tasks import TASKS, Sample, make_samples

__all__ = ["EvalConfig", "RunPoint", "Sample", "TASKS", "evaluate", "make_samples", "run_eval", "run_points"]
