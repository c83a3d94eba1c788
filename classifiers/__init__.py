"""Classifier heads, their search spaces, cross-validation and metrics.

Knows nothing of files or images: everything here takes ``(X, y, groups)``
arrays. ``registry`` holds the heads (``create_head``, ``list_heads``),
``cv`` the grouped folds and out-of-fold predictions, ``metrics`` the
objectives and the recall-floor threshold, ``tuning`` the Optuna study.
Errors are :class:`~classifiers.errors.ClassifierError`; nothing here imports
the store.
"""

from classifiers.errors import ClassifierError
from classifiers.registry import (HeadSpec, UnknownHeadError, create_head, get_head_spec,
                                  heads_table, list_heads, register_head)

__all__ = ["ClassifierError", "HeadSpec", "UnknownHeadError", "create_head", "get_head_spec",
           "heads_table", "list_heads", "register_head"]
