"""Deflated Explicit VR Little Endian files (1.2.840.10008.1.2.1.99), inflated in bounded steps.

pydicom inflates the whole dataset of such a file in one call, so a 2 MB file can become 2 GB in
memory before anything is checked. Here the stream is inflated only as far as needed: at most
`HEADER_LIMIT` bytes to find the pixel data element, then (for a full read) only up to the end of
the pixel data the element declares plus `TRAILER_SLACK`; a stream that goes on is `size-mismatch`.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pipeline.ingest.nifti import UnitError

HEADER_STEPS = (1 << 16, 1 << 20, 16 << 20)  # inflated bytes tried, in turn, to reach the pixel data element
HEADER_LIMIT = 64 << 20  # the last try: a header (everything before the pixel data) larger than this is too-large
TRAILER_SLACK = 1 << 20  # inflated bytes allowed after the pixel data (digital signatures, trailing padding)
_PIXEL_TAGS = {Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}  # PixelData, Float..., DoubleFloat...


def file_meta(path: Path) -> tuple[FileMetaDataset, int] | None:
    """The file meta information of `path` and the offset where the dataset starts; None when it has none."""
    try:
        with open(path, "rb") as fh:
            read_preamble(fh, True)  # force: a file without the 128-byte preamble is rewound, not rejected
            meta = _read_file_meta_info(fh)
            return meta, fh.tell()
    except Exception:  # no or broken meta information: dcmread gives the reason
        return None


def is_deflated(meta: tuple[FileMetaDataset, int] | None) -> bool:
    """True when the file meta information names the deflated transfer syntax."""
    return meta is not None and meta[0].get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


class _Inflater:
    """A raw deflate stream inflated on demand into `out`, never past the size asked for."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.z, self.out, self.ended = fh, zlib.decompressobj(-zlib.MAX_WBITS), bytearray(), False

    def fill(self, size: int) -> bool:
        """Inflate until `size` bytes are out or the stream ends; True when the stream has ended."""
        while len(self.out) < size and not self.ended:
            data = self.z.unconsumed_tail or self.fh.read(1 << 16)
            if not data:
                raise UnitError("truncated", f"the deflated data ends early (after {len(self.out):,} inflated bytes)")
            try:
                self.out += self.z.decompress(data, size - len(self.out))
            except zlib.error as exc:
                raise UnitError("decode-error", f"the deflated data is corrupt (zlib: {exc})") from exc
            self.ended = self.z.eof
        return self.ended


def _parse(blob: bytes, stop_at_pixels: bool) -> tuple[Dataset, tuple[BaseTag, str | None, int, int] | None]:
    """The dataset in `blob` (explicit VR little endian) and, when it stopped there, the pixel element.

    Returns:
        (dataset, (tag, VR, value length, value offset in `blob`) of the top-level pixel data element, or None).
    """
    found: list[tuple[BaseTag, str | None, int]] = []

    def at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
        if stop_at_pixels and tag in _PIXEL_TAGS:
            found.append((tag, vr, length))
            return True
        return False

    fp = DicomBytesIO(blob)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    ds = read_dataset(fp, False, True, stop_when=at_pixels)  # type: ignore[arg-type]
    if not found:
        return ds, None
    tag, vr, length = found[0]
    return ds, (tag, vr, length, fp.tell() + 12)  # explicit VR OB/OW/OF/OD: tag, VR, 2 reserved, 4-byte length


def _header(stream: _Inflater) -> tuple[Dataset, tuple[BaseTag, str | None, int, int] | None]:
    """Inflate in growing steps until the dataset before the pixel data parses whole (or the stream ends).

    A step that cuts the header short is retried with more data; only the warnings of the parse that
    counts are passed on (read_dataset turns truncation warnings into a quarantine reason).
    """
    for step in (*HEADER_STEPS, HEADER_LIMIT):
        ended = stream.fill(step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds, pixel = _parse(bytes(stream.out), stop_at_pixels=True)
            except Exception:
                if ended:
                    raise
                continue
        if pixel is not None or ended:
            for w in caught:
                warnings.warn(w.message, w.category, stacklevel=2)
            return ds, pixel
    raise UnitError("too-large", f"the header inflates past {HEADER_LIMIT >> 20} MiB before any pixel data")


def read_deflated(path: Path, meta: tuple[FileMetaDataset, int], header_only: bool) -> Dataset:
    """Read a deflated file without inflating more than its header declares.

    Args:
        path: The file.
        meta: Its `file_meta(path)`.
        header_only: Stop at the pixel data: the dataset then holds a placeholder pixel element
            (value None, as pydicom's deferred reads) whose length is the declared one.

    Raises:
        UnitError: too-large (header over HEADER_LIMIT inflated bytes), size-mismatch (inflates past
            the declared pixel data), truncated or decode-error (broken stream).
    """
    file_meta_ds, start = meta
    with open(path, "rb") as fh:
        fh.seek(start)
        stream = _Inflater(fh)
        ds, pixel = _header(stream)
        if pixel is not None and header_only:
            tag, vr, length, offset = pixel
            ds[tag] = RawDataElement(tag, vr, length, None, offset, False, True)  # type: ignore[assignment]
        elif pixel is not None:
            _, _, length, offset = pixel
            if length == 0xFFFFFFFF:
                raise UnitError("size-mismatch", "deflated pixel data of undefined length (only native data can be)")
            end = offset + length + TRAILER_SLACK
            if not stream.fill(end + 1):
                raise UnitError(
                    "size-mismatch",
                    f"the deflated data goes on past the end of the {length:,}-byte pixel data element "
                    f"(more than {end:,} inflated bytes)",
                )
            if len(stream.out) < offset + length:
                raise UnitError("truncated", f"the deflated data ends inside the {length:,}-byte pixel data")
            blob = bytes(stream.out)
            stream.out.clear()
            ds, _ = _parse(blob, stop_at_pixels=False)
    ds.file_meta = file_meta_ds
    return ds
