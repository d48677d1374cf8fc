"""Reading medical images with their geometry and writing masks back atomically.

Every reader in the project (dataset import, volume inference, the CLI) goes through
:func:`read_image` so that axis order and spacing conventions live in one place:
arrays are ``(z, y, x)`` for volumes and ``(y, x)`` or ``(y, x, c)`` for 2D images, and
spacing is reported in the same order as the array axes.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modeling_dbsam.integrity import check_complete

if TYPE_CHECKING:
    import SimpleITK as sitk  # imported where used, so that `dbsam --help` stays fast

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


def path_suffix(path: str | os.PathLike) -> str:
    """The file type suffix, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@dataclass
class MedicalImage:
    """An image array with the SimpleITK image that carries its geometry.

    ``array`` is ``(z, y, x)`` for volumes, ``(y, x)`` or ``(y, x, c)`` for 2D images.
    ``spacing`` is in array axis order, in mm.
    """

    array: np.ndarray
    reference: sitk.Image
    path: str

    @property
    def is_volume(self) -> bool:
        return self.reference.GetDimension() == 3 and self.reference.GetSize()[2] > 1

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in reversed(self.reference.GetSpacing()))


def _slice_size(path: str) -> tuple[int, int]:
    """A DICOM file's in-plane size from its header alone, without decoding pixels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetSize()[:2]


def _read_dicom_series(directory: Path) -> sitk.Image:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(directory))
    if not series_ids:
        raise ValueError(f"{directory}: no DICOM series found in this folder")
    if len(series_ids) > 1:
        raise ValueError(
            f"{directory}: holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); pass one series"
        )
    files = reader.GetGDCMSeriesFileNames(str(directory), series_ids[0])
    sizes = {_slice_size(f) for f in files}
    if len(sizes) > 1:
        raise ValueError(f"{directory}: DICOM series mixes slice sizes {sorted(sizes)}")
    reader.SetFileNames(files)
    return reader.Execute()


def read_image(path: str | os.PathLike) -> MedicalImage:
    """Read a volume (NIfTI, NRRD, MHA, DICOM series folder) or a 2D image (PNG, JPG, DICOM file).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the file for
    anything unreadable, truncated or ambiguous.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        check_complete(path)  # SimpleITK would fill a short NIfTI with zeros
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:  # SimpleITK reports unreadable files as RuntimeError
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise ValueError(f"{path}: cannot be read as an image ({first_line})") from error
    if image.GetDimension() > 3:
        raise ValueError(f"{path}: {image.GetDimension()}D images are not supported (size {image.GetSize()})")
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 3 and image.GetSize()[2] == 1 and image.GetNumberOfComponentsPerPixel() == 1:
        # A single-slice volume (common for 2D DICOM files) is a 2D image.
        array = array[0]
    return MedicalImage(array=array, reference=image, path=str(path))


def check_output_path(
    path: str | os.PathLike,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike, ...] = (),
    folder: bool = False,
) -> Path:
    """Refuse, before any work is done: an existing output unless told to, a folder where a file is wanted (or
    the reverse, with ``folder=True``), and any of ``inputs`` (even with ``overwrite``: replacing the scan with
    its mask loses the scan)."""
    path = Path(path)
    for source in inputs:
        if _same_file(path, Path(source)):
            raise ValueError(f"{path}: is the input {source}; refusing to replace the input, even with overwrite")
    if path.is_dir() and not folder:
        raise ValueError(f"{path}: is a folder; give a file name for the output")
    if path.exists() and folder and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a folder")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if not path.parent.exists():
        raise FileNotFoundError(f"{path.parent}: output folder does not exist")
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, through symbolic links, hard links and relative paths."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def atomic_write(path: str | os.PathLike, write_to, overwrite: bool = False) -> Path:
    """Call ``write_to(tmp_path)`` then rename onto ``path``, so a crash never leaves half a file.

    The temporary file keeps the destination's suffix because writers such as SimpleITK
    choose the format from it.
    """
    path = check_output_path(path, overwrite)
    suffix = path_suffix(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write_to(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_STAGING = re.compile(r"\.(partial|old)-(\d+)@([^-]*)-")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def staging_folder(out_dir: str | os.PathLike, kind: str = "partial") -> Path:
    """A hidden folder beside ``out_dir`` to build it in, named ``.NAME.KIND-PID@HOST-XXXX`` so that a later run
    can tell a killed run's leftovers from a running one's; those leftovers are dealt with first
    (:func:`clean_stale_staging`)."""
    out_dir = Path(out_dir)
    clean_stale_staging(out_dir)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-{os.getpid()}@{_host()}-", dir=out_dir.parent))


def clean_stale_staging(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.partial-*`` folders that killed runs left beside ``out_dir``; name on stderr the ones
    that may hold data (a previous output being replaced, or a run of unknown state). Returns what remains."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    remaining = []
    for candidate in sorted(out_dir.parent.glob(f".{glob_escape(out_dir.name)}.*-*")):
        if not candidate.is_dir() or not candidate.name.startswith(f".{out_dir.name}."):
            continue
        tail = candidate.name[len(out_dir.name) + 1 :]
        if not tail.startswith((".partial-", ".old-")):
            continue
        match = _STAGING.match(tail)
        dead = match is not None and match[3] == _host() and not _process_alive(int(match[2]))
        holds_old_output = match is None or match[1] == "old" or (candidate / "replaced").exists()
        if dead and not holds_old_output:
            shutil.rmtree(candidate, ignore_errors=True)
            print(f"removed {candidate}: left by a killed run (process {match[2]})", file=sys.stderr)
            continue
        why = "may hold a previous output" if holds_old_output else "in use by a running process"
        print(f"note: {candidate}: left beside {out_dir} by another run ({why}); delete it when no run uses it",
              file=sys.stderr)  # fmt: skip
        remaining.append(candidate)
    return remaining


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_mask(path: str | os.PathLike, mask: np.ndarray, reference: sitk.Image, overwrite: bool = False) -> Path:
    """Write a label mask with exactly the reference image's size, spacing, origin and direction."""
    import SimpleITK as sitk

    expected = tuple(reversed(reference.GetSize()))
    if reference.GetDimension() == 3 and reference.GetSize()[2] == 1 and mask.ndim == 2:
        mask = mask[None]
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} does not match the image's (z, y, x) shape {expected}")
    out = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8)))
    out.CopyInformation(reference)
    return atomic_write(path, lambda tmp: sitk.WriteImage(out, tmp, useCompression=True), overwrite)
