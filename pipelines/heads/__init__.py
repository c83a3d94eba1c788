"""Heads on feature tables: fit, save, rank and score.

* :mod:`~pipelines.heads.fit`: ``featurestore fit-heads`` (Optuna search, refit, held-out report);
* :mod:`~pipelines.heads.models`: saved heads with the lineage of their features;
* :mod:`~pipelines.heads.model_folder`: a model folder written as a unit, checked before use;
* :mod:`~pipelines.heads.leaderboard`: every head on every table, compared;
* :mod:`~pipelines.heads.predictions`: the out-of-fold and held-out predictions saved with a head;
* :mod:`~pipelines.heads.shared`: one search shared by several workers, one refit;
* :mod:`~pipelines.heads.predict`: ``featurestore predict``, new images through a saved head.
"""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "FitHeadsConfig": "fit",
    "run_fit_heads": "fit",
    "PredictConfig": "predict",
    "run_predict": "predict",
    "load_model": "models",
    "resolve_model_name": "models",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
