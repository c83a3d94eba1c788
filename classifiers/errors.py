"""The classifiers package's own error type.

``classifiers`` knows nothing of the store, so it does not raise the store's
:class:`~featurestore.FeatureStoreError`. The CLI commands that fit, tune,
audit or load heads turn :class:`ClassifierError` into a one-line ``Error:``
just as they do store errors.
"""

from __future__ import annotations


class ClassifierError(Exception):
    """A head, its parameters, its saved files or a tuning run cannot be used as asked."""
