"""Feature store: versioned, chunked HDF5 and Parquet tables of image features.

Storage only: this package never imports TensorFlow or Keras, so analysts can
read tables with numpy and pandas alone.

>>> from featurestore import Store                                   # doctest: +SKIP
>>> X, y, ids, groups = Store("store").open("densenet121/max").to_numpy(split="train")  # doctest: +SKIP
"""

from featurestore.errors import (AmbiguousTableError, CorruptTableError, FeatureStoreError,
                                 LineageMismatchError, ScanError, TableNotFoundError,
                                 WriterLockedError)
from featurestore.lineage import Lineage, parse_query
from featurestore.reader import FeatureArrays, TableReader, concat
from featurestore.rows import Rows
from featurestore.store import Store, TableInfo, parse_shard
from featurestore.writer import DuplicateRowError, TableWriter

__all__ = [
    "AmbiguousTableError", "CorruptTableError", "DuplicateRowError", "FeatureArrays",
    "FeatureStoreError", "Lineage", "LineageMismatchError", "Rows", "ScanError", "Store",
    "TableInfo", "TableNotFoundError", "TableReader", "TableWriter", "WriterLockedError",
    "concat", "parse_query", "parse_shard",
]
