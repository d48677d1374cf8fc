"""Small CT series written by the tests from pydicom's bundled ``CT_small.dcm`` (a real 128 x 128 CT slice)."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def ct_small() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def ct_series_volume(slices: int) -> np.ndarray:
    """``slices`` shifted copies of CT_small's pixels, so neighbouring slices differ like a real scan's."""
    pixels = ct_small().pixel_array
    return np.stack([np.roll(pixels, 2 * z, axis=1) for z in range(slices)]).astype(np.int16)


def write_ct_series(folder, slices: int = 6, volume: np.ndarray | None = None) -> list[Path]:
    """One file per slice, CT_small's header with a new series, positions 5 mm apart; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = ct_small()
    volume = ct_series_volume(slices) if volume is None else volume
    series_uid, frame_of_reference = generate_uid(), generate_uid()
    x, y, z0 = (float(v) for v in template.ImagePositionPatient)
    files = []
    for z, pixels in enumerate(volume):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [x, y, z0 + 5.0 * z]
        ds.SliceLocation = z0 + 5.0 * z
        ds.SliceThickness = 5.0
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.int16)).tobytes()
        # Files named in reverse so that readers must order by position, not by name.
        path = folder / f"im{len(volume) - z:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def write_two_series_zip(path, small: int = 3, large: int = 5) -> None:
    """A zip holding two CT series of ``small`` and ``large`` slices, in subfolders."""
    folder = Path(path).parent / (Path(path).stem + "-files")
    write_ct_series(folder / "a", small)
    write_ct_series(folder / "b", large)
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.rglob("*.dcm")):
            archive.write(file, file.relative_to(folder))
