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

#: Registry of formats by the name the CLI and API accept.
FORMATS: dict[str, TableFormat] = {f.name: f for f in (HDF5Format(), ParquetFormat())}


def get_format(name: str) -> TableFormat:
    """The format registered as ``name``; unknown names list the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise FeatureStoreError(
            f"Unknown table format {name!r}. Available: {', '.join(FORMATS)}.") from None


__all__ = ["FORMATS", "get_format", "Segment", "TableFormat"]
