"""An uploaded scan, read from the request stream with its limits checked on the way.

FastAPI's ``UploadFile`` spools the whole body before the endpoint runs, and
body-size settings have been found ignored, so the body is parsed here chunk
by chunk (python-multipart's streaming parser): the upload stops at the first
byte past the limit. The file part goes to a temporary file in the store's
``ingested/`` folder under a name of our own; the client's file name is kept
for display only. The type is decided from the bytes by Pillow, and the
image is fully decoded once (truncated files and pixel bombs are refused)
before anything is stored.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

#: Name prefix of an upload being received (a killed server's are removed at start).
PARTIAL_PREFIX = ".upload-"
#: Longest value accepted for a text field of the form (``label``).
MAX_FIELD_BYTES = 256


class UploadRejected(Exception):
    """The upload is refused; ``status`` is the HTTP status and ``str(err)`` the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass
class Upload:
    """A received file part and the form's text fields."""

    file: Path
    name: str
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.file.unlink(missing_ok=True)


class _FormReader:
    """Callbacks of python-multipart's parser: the ``file`` part to disk, fields in memory."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fields: dict[str, str] = {}
        self.file: Path | None = None
        self.name = ""
        self._out = None
        self._header, self._value, self._part = b"", b"", {}
        self._field: bytearray | None = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data,
                "on_part_end": self._end}

    def _begin(self):
        self._part, self._header, self._value = {}, b"", b""

    def _header_field(self, data, start, end):
        self._header += data[start:end]

    def _header_value(self, data, start, end):
        self._value += data[start:end]

    def _header_end(self):
        self._part[self._header.lower()] = self._value
        self._header, self._value = b"", b""

    def _headers_done(self):
        _, options = parse_options_header(self._part.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file" and self.file is None:
            self.name = options.get(b"filename", b"upload").decode("utf-8", "replace")
            fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, dir=self.folder)
            self.file, self._out = Path(tmp), os.fdopen(fd, "wb")
        else:
            self._field = bytearray()
            self._field_name = name

    def _data(self, data, start, end):
        if self._out is not None:
            self._out.write(data[start:end])
        elif self._field is not None:
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                raise UploadRejected(422, f"form field {self._field_name!r} is longer than "
                                          f"{MAX_FIELD_BYTES} bytes")

    def _end(self):
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._field is not None:
            self.fields[self._field_name] = self._field.decode("utf-8", "replace")
            self._field = None

    def abort(self):
        if self._out is not None:
            self._out.close()
        if self.file is not None:
            self.file.unlink(missing_ok=True)


async def receive_upload(request, folder: Path, max_bytes: int) -> Upload:
    """Parse the multipart body of ``request`` into ``folder``; refuses past ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UploadRejected(413, f"the upload is {int(declared)} bytes; the limit is "
                                  f"{max_bytes} bytes")
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise UploadRejected(422, "send the scan as multipart/form-data with a 'file' part")
    folder.mkdir(parents=True, exist_ok=True)
    reader = _FormReader(folder)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise UploadRejected(413, f"the upload is larger than the limit of {max_bytes} "
                                          f"bytes")
            parser.write(chunk)
        parser.finalize()
    except BaseException:
        reader.abort()
        raise
    if reader.file is None:
        raise UploadRejected(422, "the form has no 'file' part")
    return Upload(reader.file, reader.name, reader.fields)


def check_image(path: Path, max_pixels: int) -> None:
    """Refuse what is not an image (415), a truncated one or a pixel bomb (422): the type
    comes from the bytes, and the pixels are decoded once to prove they are all there."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    raise UploadRejected(422, f"the image has {image.width}x{image.height} "
                                              f"pixels; the limit is {max_pixels} pixels")
                image.load()
        except UnidentifiedImageError:
            raise UploadRejected(415, "the bytes are not an image that Pillow can read") \
                from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise UploadRejected(422, f"pixel bomb: {err}") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise UploadRejected(422, f"the image cannot be decoded (truncated?): {err}") \
                from None
