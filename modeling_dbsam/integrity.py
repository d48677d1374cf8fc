"""Checks that an image file holds all the data its header promises, before SimpleITK reads it.

SimpleITK reads a NIfTI file that was cut short (an interrupted copy or download) without a word and
fills the missing voxels with zeros, and reports a short MetaImage as "No such file or directory".
These checks read only headers and count data bytes (streaming through gzip/zlib, so a compressed
file's CRC and length are verified too); NRRD and DICOM readers already refuse short files.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

_CHUNK = 1 << 20

_META_TYPE_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def check_complete(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` when a NIfTI or MetaImage file is truncated or its compressed data corrupt."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path, compressed=name.endswith(".gz"))
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)


def _truncated(path: Path, found: int, expected: int, what: str = "bytes") -> ValueError:
    return ValueError(
        f"{path}: truncated: holds {found} of the {expected} {what} its header promises (an interrupted copy?)"
    )


def _decompressed_length(path: Path) -> int:
    """Bytes in a gzip file, read to the end so that a cut-short stream or a bad CRC raises."""
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: corrupt or truncated gzip data ({error})") from None
    return total


def _check_nifti(path: Path, compressed: bool) -> None:
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(540)
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({error})") from None
    expected = _nifti_expected_bytes(path, header)
    found = _decompressed_length(path) if compressed else path.stat().st_size
    if found < expected:
        raise _truncated(path, found, expected)


def _nifti_expected_bytes(path: Path, header: bytes) -> int:
    """Header offset plus the voxel data size that a NIfTI-1 or NIfTI-2 header declares."""
    if len(header) < 348:
        raise ValueError(f"{path}: too short for a NIfTI header ({len(header)} bytes)")
    for order in "<>":
        (size,) = struct.unpack(order + "i", header[:4])
        if size == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            (bitpix,) = struct.unpack(order + "h", header[72:74])
            (offset,) = struct.unpack(order + "f", header[108:112])
            break
        if size == 540 and len(header) >= 540:
            (bitpix,) = struct.unpack(order + "h", header[14:16])
            dims = struct.unpack(order + "8q", header[16:80])
            (offset,) = struct.unpack(order + "q", header[168:176])
            break
    else:
        raise ValueError(f"{path}: not a NIfTI file (header size field is neither 348 nor 540)")
    rank = dims[0]
    if not 1 <= rank <= 7 or any(d < 0 for d in dims[1 : rank + 1]) or bitpix <= 0:
        raise ValueError(f"{path}: corrupt NIfTI header (dim {dims}, bitpix {bitpix})")
    voxels = 1
    for d in dims[1 : rank + 1]:
        voxels *= max(int(d), 1)
    return int(offset) + voxels * bitpix // 8


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The ``Key = Value`` fields of a MetaImage header and the byte offset where its data starts."""
    fields, offset = {}, 0
    with open(path, "rb") as stream:
        for raw_line in stream:
            offset += len(raw_line)
            key, _, value = raw_line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
            if offset > 65536:
                raise ValueError(f"{path}: no ElementDataFile in the first 64 KiB: not a MetaImage header")
    return fields, offset


def _check_metaimage(path: Path) -> None:
    fields, offset = _metaimage_header(path)
    data_file = fields.get("ElementDataFile", "")
    if not data_file or data_file.upper() == "LIST" or "%" in data_file:
        return  # file lists and patterns: left to SimpleITK
    if data_file.upper() != "LOCAL":
        path, offset = path.parent / data_file, 0
        if not path.is_file():
            raise ValueError(f"{path}: missing (the data file named by its MetaImage header)")
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        item = _META_TYPE_SIZES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        raise ValueError(f"{path}: MetaImage header lacks a valid DimSize or ElementType") from None
    expected = item
    for d in dims:
        expected *= d
    if fields.get("CompressedData", "False").lower() != "true":
        found = path.stat().st_size - offset
    else:
        found = _zlib_length(path, offset)
    if found < expected:
        raise _truncated(path, found, expected, "bytes of voxel data")


def _zlib_length(path: Path, offset: int) -> int:
    decompressor, total = zlib.decompressobj(), 0
    with open(path, "rb") as stream:
        stream.seek(offset)
        try:
            while chunk := stream.read(_CHUNK):
                total += len(decompressor.decompress(chunk))
            total += len(decompressor.flush())
        except zlib.error as error:
            raise ValueError(f"{path}: corrupt compressed data ({error})") from None
    if not decompressor.eof:
        raise ValueError(f"{path}: truncated: its compressed data stops before the end of the stream")
    return total
