"""EKG's greedy sub-network search (method doc, phases 1 and 2), one module per concept:

* :mod:`.config` — :class:`SearchConfig` and the allowed choices (``IMPORTANCES``, ``REWARDS``, ...);
* :mod:`.steps` — the method doc's step rules: :func:`step_size`, :func:`step_cost`, the
  candidate filter :func:`trimmed_otsu_threshold`, the fine landing :func:`land_rate`;
* :mod:`.ensemble` — :func:`objective` ``J = CE(labels, z) + CE(softmax(K), z)`` and
  :func:`update_ensemble` ``K ← (K·t + z)/(t + 1)``;
* :mod:`.release` — the TF release's effective rules for ``compat = "release"``;
* :mod:`.scores` — channel importance: Taylor scores of J, l1, fpgm, random;
* :mod:`.evaluator` — :class:`CandidateEvaluator`, straightforward or fast (cached activations);
* :mod:`.searcher` — :class:`Searcher` (phase 2) and :class:`SearchState`;
* :mod:`.adaptation` — :func:`adapt` (phase 1);
* :mod:`.sets` — the search sets D_val and D_sub: :func:`carve_search_sets`, :func:`fit_search_sets`.

Every name is re-exported here: ``from ekg.search import X`` works for all of them. To replace a
function the search calls (a test's monkeypatch), patch it in the module that *uses* it
(e.g. ``ekg.search.searcher.taylor_scores``), not here.
"""

from .adaptation import adapt
from .config import BUDGETS, COMPATS, IMPORTANCES, METHODS, REWARDS, SearchConfig, with_keep
from .ensemble import objective, update_ensemble
from .evaluator import CandidateEvaluator, Evaluation, _base_module, _tail_module, free_memory
from .release import RELEASE_ADAPT_DIVISOR, land_rate_release, release_gate_order, release_step_cost
from .scores import taylor_scores, weight_scores
from .searcher import SearchState, Searcher, check_reachable, floor_ratio, pack_masks
from .sets import MIN_PER_CLASS, SearchSetSizes, carve_search_sets, fit_search_sets
from .steps import land_rate, step_cost, step_size, trimmed_otsu_threshold

__all__ = [
    "BUDGETS", "COMPATS", "IMPORTANCES", "METHODS", "REWARDS", "RELEASE_ADAPT_DIVISOR",
    "CandidateEvaluator", "Evaluation", "SearchConfig", "SearchState", "Searcher",
    "adapt", "check_reachable", "floor_ratio", "with_keep", "carve_search_sets", "fit_search_sets", "SearchSetSizes", "MIN_PER_CLASS", "free_memory", "land_rate", "land_rate_release", "objective", "pack_masks",
    "release_gate_order", "release_step_cost", "step_cost", "step_size", "taylor_scores",
    "trimmed_otsu_threshold", "update_ensemble", "weight_scores",
    "_base_module", "_tail_module",
]
