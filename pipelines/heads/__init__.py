"""Heads on feature tables: fit, save, rank and score.

* :mod:`~pipelines.heads.fit`: ``featurestore fit-heads`` (Optuna search, refit, held-out report);
* :mod:`~pipelines.heads.models`: saved heads with the lineage of their features;
* :mod:`~pipelines.heads.leaderboard`: every head on every table, compared;
* :mod:`~pipelines.heads.predict`: ``featurestore predict``, new images through a saved head.
"""
