"""Quality evaluation: generated tasks run through the engine for every policy x budget.

``tasks`` builds deterministic samples (niah, vt, coref, ppl) in the model's own tokens,
``harness`` runs them through ``Engine`` and scores them (``scoring``), and ``report`` writes
``results.json``, ``report.md`` and ``plot.png``. ``tbrun eval`` is the command-line face.
The names below are imported when first used, so that the task list (``tasks``) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "EvalConfig": "harness", "RunPoint": "harness", "evaluate": "harness", "run_eval": "harness",
    "run_points": "harness", "TASKS": "tasks", "Sample": "tasks", "make_samples": "tasks",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .harness import EvalConfig, RunPoint, evaluate, run_eval, run_points
    from .tasks import TASKS, Sample, make_samples

__getattr__ = lazy_exports(__name__, _EXPORTS)
