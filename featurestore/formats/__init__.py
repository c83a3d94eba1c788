"""Physical table formats behind one API.

Each format stores a table as committed, immutable part files
``part-<seq>.<suffix>`` in its own folder of the table directory; a format may
also keep a consolidated file (HDF5 does). Readers see a table as an ordered
list of :class:`~featurestore.formats.base.Segment` objects.
"""

from featurestore.errors import FeatureStoreError
from featurestore.formats.base import Segment, TableFormat
from featurestore.formats.hdf5 import HDF5Format
from featurestore.formats.parquet import ParquetFormat

#: Registry of formats by the name the CLI and API accept, in the order a reader
#: prefers them when a table has several (HDF5's single file reads fastest in full).
FORMATS: dict[str, TableFormat] = {f.name: f for f in (HDF5Format(), ParquetFormat())}

#: What a writer writes unless told otherwise: the format readers prefer.
DEFAULT_FORMAT: str = next(iter(FORMATS))


def get_format(name: str) -> TableFormat:
    """The format registered as ``name``; unknown names list the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise FeatureStoreError(
            f"Unknown table format {name!r}. Available: {', '.join(FORMATS)}.") from None


__all__ = ["DEFAULT_FORMAT", "FORMATS", "get_format", "Segment", "TableFormat"]
