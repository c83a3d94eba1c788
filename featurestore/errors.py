"""Exceptions raised by the feature store.

Every error names the file, table or argument at fault and what was expected,
so a user can act on the message alone.
"""


class FeatureStoreError(Exception):
    """Base class of every error the feature store raises on bad input."""


class ScanError(FeatureStoreError):
    """A dataset folder cannot be scanned (missing, empty, wrong root)."""


class TableNotFoundError(FeatureStoreError, LookupError):
    """No table matches a lineage query or key."""


class AmbiguousTableError(FeatureStoreError, LookupError):
    """Several tables match a lineage query; the message lists them."""


class LineageMismatchError(FeatureStoreError, ValueError):
    """Rows or tables of different lineage were about to be combined."""


class WriterLockedError(FeatureStoreError):
    """Another writer holds the table; the message names the holder."""


class CorruptTableError(FeatureStoreError):
    """A committed table file cannot be read."""
