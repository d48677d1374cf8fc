"""Readers of the MedSAM collection as distributed, into one Arrow ``DatasetDict`` (schema: :mod:`.schema`).

Layouts (``layout="auto"`` tells them apart):

- ``"npy"``, the authors' training folder: ``npy_images/<name>.npz`` (key ``img``, 256 x 256 x 3
  uint8) with ``npy_gts/<name>.npy`` (256 x 256 label map). ``<name>`` is ``<case>-<slice>``.
- ``"npz"``, one ``.npz`` per case, possibly inside task folders: the authors' test folder
  (``<task_dir>/<case>.npz`` with ``imgs`` (N, H, W, 3) and ``gts`` (N, H, W), no spacing) and
  MedSAM's later per-case files (``imgs`` (Z, H, W), ``gts`` (Z, H, W), ``spacing``). Single
  images (``imgs``/``img`` (H, W[, 3]) with ``gts``/``gt`` (H, W)) load too. The stored
  ``spacing`` is SimpleITK's (x, y, z) order; it is reversed to the arrays' (z, y, x).
- ``"arrow"``: a folder written by ``save_to_disk`` (e.g. by ``dbsam prepare-data``).

Every non-zero value of a label map is one object (``label`` = that value). Slices are kept as
stored: the authors' npz stacks hold only slices with foreground, so ``slice_index`` is the
position in the stored stack, not the scanner's slice number. ``case_id`` is the case file's path
inside the split folder without suffix (unique per split), or ``<case>`` of ``<case>-<slice>`` names.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from modeling_dbsam.data import schema
from modeling_dbsam.data.schema import FEATURES, encode_image, generate_dataset, label_values, make_example
from modeling_dbsam.data.tasks import UNKNOWN_TASK, guess_modality, resolve_task

LAYOUTS = ("auto", "npy", "npz", "arrow")
ON_ERROR = ("raise", "skip")
_SPLIT_WORDS = {
    "train": ("train", "training", "tr"),
    "validation": ("val", "valid", "validation"),
    "test": ("test", "testing", "ts"),
}


@dataclass(frozen=True)
class SourceFile:
    """One file to read, with its task decided before reading (so the unknown-task warning comes once, up front)."""

    path: str
    label_path: str | None
    case_id: str
    slice_index: int
    task: str
    modality: str
    dimension: str | None  # None: decided from the data (a stack is 3D, a single image 2D)
    stamp: tuple[int, int]  # (size, mtime_ns) of the file(s): part of the cache fingerprint


def split_name(folder_name: str) -> str | None:
    """``"train"``, ``"validation"`` or ``"test"`` when a folder name says so (``MedSAM-Train``, ``Ts``)."""
    words = re.split(r"[^a-z]+", folder_name.lower())
    for split, names in _SPLIT_WORDS.items():
        if any(word in names for word in words):
            return split
    return None


def detect_layout(folder: str | os.PathLike) -> str | None:
    """The layout of ``folder`` (one of :data:`LAYOUTS` but ``"auto"``), or ``None`` if it holds none."""
    folder = Path(folder)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return "arrow"
    if (folder / "npy_images").is_dir() and (folder / "npy_gts").is_dir():
        return "npy"
    if next(folder.rglob("*.npz"), None) is not None:
        return "npz"
    return None


def _stamp(*paths: Path) -> tuple[int, int]:
    stats = [p.stat() for p in paths]
    return sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)


class _TaskNamer:
    """Names each file's task from a user's ``task_map`` or the folder and file names, collecting the unknown."""

    def __init__(self, task_map: Mapping[str, str] | None):
        self.task_map = dict(task_map or {})
        self.unknown: set[str] = set()

    def __call__(self, relative: str, names: list[str], unknown_marker: str) -> tuple[str, str, str | None]:
        for pattern, name in self.task_map.items():
            if fnmatch.fnmatch(relative, pattern):
                return self._named(name, [name, *names])
        for name in names:
            task = resolve_task(name)
            if task is not None:
                return task.name, task.modality, task.dimension
        self.unknown.add(unknown_marker)
        return self._named(UNKNOWN_TASK, names)

    @staticmethod
    def _named(name: str, names: list[str]) -> tuple[str, str, str | None]:
        task = resolve_task(name)
        if task is not None:
            return task.name, task.modality, task.dimension
        modality = next((m for m in map(guess_modality, names) if m is not None), UNKNOWN_TASK)
        return name, modality, None


def _list_npy(folder: Path, namer: _TaskNamer, on_error: str, problems: list[str]) -> list[SourceFile]:
    images = {p.stem: p for p in (folder / "npy_images").glob("*.npz")}
    gts = {p.stem: p for p in (folder / "npy_gts").glob("*.npy")}
    unpaired = sorted(set(images) ^ set(gts))
    if unpaired:
        message = (
            f"{folder}: {len(unpaired)} names have an image without a label map or the reverse "
            f"(npy_images/<name>.npz needs npy_gts/<name>.npy), e.g. {unpaired[:5]}"
        )
        if on_error == "raise":
            raise ValueError(message)
        problems.append(message)
    files = []
    for name in sorted(set(images) & set(gts)):
        match = re.fullmatch(r"(?P<case>.+)-(?P<slice>\d+)", name)
        case_id, slice_index = (match["case"], int(match["slice"])) if match else (name, 0)
        marker = re.sub(r"[\d_\-.]+$", "", case_id) or case_id
        task, modality, dimension = namer(name, [case_id, folder.name], marker)
        files.append(
            SourceFile(
                str(images[name]),
                str(gts[name]),
                case_id,
                slice_index,
                task,
                modality,
                dimension,
                _stamp(images[name], gts[name]),
            )
        )
    return files


def _list_npz(folder: Path, namer: _TaskNamer) -> list[SourceFile]:
    files = []
    for path in sorted(folder.rglob("*.npz")):
        relative = path.relative_to(folder)
        parents = list(reversed(relative.parent.parts))
        marker = relative.parent.as_posix() if parents else path.stem
        task, modality, dimension = namer(relative.as_posix(), [*parents, path.stem, folder.name], marker)
        case_id = relative.with_suffix("").as_posix()
        files.append(SourceFile(str(path), None, case_id, 0, task, modality, dimension, _stamp(path)))
    return files


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an npz, with unreadable or truncated files reported as ``ValueError`` naming the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path}: cannot be read as .npz (truncated or not an npz: {error})") from error


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: cannot be read as .npy (truncated or not an npy: {error})") from error


def _pick(arrays: dict[str, np.ndarray], keys: tuple[str, ...], path: str) -> np.ndarray:
    for key in keys:
        if key in arrays:
            return arrays[key]
    raise ValueError(f"{path}: has no {' or '.join(repr(k) for k in keys)} array (keys: {sorted(arrays)})")


def _check_uint8(images: np.ndarray, path: str) -> None:
    if images.dtype != np.uint8:
        raise ValueError(
            f"{path}: images are {images.dtype}, expected uint8 as MedSAM stores them; "
            "convert raw intensities with `dbsam prepare-data`"
        )


def read_npz_case(path: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
    """``(images (N, H, W[, 3]) uint8, label maps (N, H, W), spacing in array order or None)`` of a case file."""
    arrays = _load_npz(path)
    images = _pick(arrays, ("imgs", "img"), path)
    gts = _pick(arrays, ("gts", "gt"), path)
    _check_uint8(images, path)
    if gts.ndim == 2:  # one 2D image
        images, gts = images[None], gts[None]
    rgb = images.ndim == 4 and images.shape[-1] == 3
    if gts.ndim != 3 or images.shape[: 3 if rgb else None] != gts.shape:
        raise ValueError(
            f"{path}: image shape {images.shape} does not match label shape {gts.shape} "
            "(expected (N, H, W, 3) or (N, H, W) images with (N, H, W) labels)"
        )
    spacing = None
    if "spacing" in arrays:
        stored = np.asarray(arrays["spacing"], dtype=np.float64).ravel()
        if stored.size not in (2, 3) or not np.all(stored > 0):
            raise ValueError(f"{path}: spacing must hold 2 or 3 positive values, got {stored.tolist()}")
        spacing = tuple(float(s) for s in stored[::-1])  # SimpleITK's (x, y, z) -> the arrays' (z, y, x)
    return images, gts, spacing


def _objects(image: np.ndarray, label_map: np.ndarray, source: str, **fields) -> Iterator[dict]:
    values = label_values(label_map, source)
    if values.size == 0:
        return
    encoded = encode_image(image, source)
    for value in values:
        yield make_example(encoded, label_map == value, label=int(value), source=source, **fields)


def _npz_examples(file: SourceFile) -> Iterator[dict]:
    images, gts, spacing = read_npz_case(file.path)
    dimension = file.dimension or ("3D" if len(images) > 1 or (spacing and len(spacing) == 3) else "2D")
    for index, (image, label_map) in enumerate(zip(images, gts)):
        # A stack of 2D images (the 2D tasks) holds one case per image.
        case_id = f"{file.case_id}#{index}" if dimension == "2D" and len(images) > 1 else file.case_id
        yield from _objects(
            image,
            label_map,
            f"{file.path} (slice {index})",
            task=file.task,
            modality=file.modality,
            dimension=dimension,
            case_id=case_id,
            slice_index=0 if dimension == "2D" else index,
            spacing=spacing,
        )


def _npy_examples(file: SourceFile) -> Iterator[dict]:
    image = _pick(_load_npz(file.path), ("img", "imgs"), file.path)
    label_map = _load_npy(file.label_path)
    _check_uint8(image, file.path)
    if image.shape[:2] != label_map.shape or image.ndim not in (2, 3):
        raise ValueError(
            f"{file.path}: image shape {image.shape} does not match {file.label_path} shape {label_map.shape}"
        )
    dimension = file.dimension or ("3D" if file.modality.split("-")[0] in ("CT", "MR", "PET") else "2D")
    yield from _objects(
        image,
        label_map,
        file.path,
        task=file.task,
        modality=file.modality,
        dimension=dimension,
        case_id=file.case_id,
        slice_index=file.slice_index,
        spacing=None,
    )


def _generate(files: list[SourceFile], layout: str, on_error: str) -> Iterator[dict]:
    """The generator behind ``Dataset.from_generator``: streams examples file by file."""
    read = _npy_examples if layout == "npy" else _npz_examples
    skipped, without_objects = [], 0
    for file in files:
        try:
            examples = list(read(file))  # one file's examples: a bad file yields nothing rather than half
        except ValueError as error:
            if on_error == "raise":
                raise
            skipped.append(str(error))
            continue
        without_objects += not examples
        yield from examples
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable or inconsistent files: " + "; ".join(skipped[:10]), stacklevel=2
        )
    if without_objects:
        warnings.warn(f"{without_objects} of {len(files)} files hold no object (empty label maps)", stacklevel=2)


def _fingerprint(gen_kwargs: dict) -> str:
    """The cache key of one split: its files (paths, sizes, modification times, tasks), the options, and the
    reader code itself, so that changing any of them rebuilds the Arrow files. (``datasets`` would hash
    the same by pickling every ``SourceFile``: about 35 s for MedSAM's 160k training files.)"""
    digest = hashlib.sha256()
    for module in (__file__, schema.__file__):
        digest.update(Path(module).read_bytes())
    digest.update(f"{gen_kwargs['layout']}\0{gen_kwargs['on_error']}".encode())
    for file in gen_kwargs["files"]:
        digest.update(repr(file).encode())
    return digest.hexdigest()[:32]


def _load_arrow(folder: Path, split: str) -> datasets.DatasetDict:
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({split: loaded})
    for name, dataset in loaded.items():
        missing = set(FEATURES) - set(dataset.column_names)
        if missing:
            raise ValueError(f"{folder}: split {name!r} lacks columns {sorted(missing)} of the MedSAM schema")
    return loaded


def _split_folders(path, split: str | None) -> dict[str, Path]:
    if isinstance(path, Mapping):
        folders = {str(name): Path(folder) for name, folder in path.items()}
    else:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder")
        children = {split_name(c.name): c for c in sorted(path.iterdir()) if c.is_dir() and detect_layout(c)}
        children.pop(None, None)
        if detect_layout(path) in ("arrow", "npy") or not children:
            folders = {split or split_name(path.name) or "train": path}
        else:
            folders = children
    for name, folder in folders.items():
        if not re.fullmatch(r"\w+", name):
            raise ValueError(f"split name {name!r} must be letters, digits or underscores")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (split {name!r})")
    return folders


def load_medsam_dataset(
    path: str | os.PathLike | Mapping[str, str | os.PathLike],
    layout: str = "auto",
    *,
    split: str | None = None,
    task_map: Mapping[str, str] | None = None,
    on_error: str = "raise",
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Load MedSAM-format data as an Arrow-backed ``DatasetDict`` keyed by split.

    ``path`` is one layout folder, a folder whose children are split folders (``Train``, ``Test``,
    ``MedSAM-Train``, ...), or a dict of split name to folder. A single layout folder becomes the
    split named by ``split``, else by its own name, else ``"train"``. Tasks come from folder and
    file names (:func:`modeling_dbsam.data.tasks.resolve_task`); ``task_map`` maps glob patterns of
    paths inside a split folder to task names first (``{"22-2D-Images/US_*": "Ultrasound Breast Tumor"}``).
    Names that resolve to no task load as ``"unknown"`` with one warning listing them.
    ``on_error="skip"`` skips unreadable or inconsistent files and warns with their count
    instead of raising. Examples stream through ``Dataset.from_generator`` into ``cache_dir``;
    a second call on unchanged files reuses the cache.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not isinstance(path, Mapping) and (layout == "arrow" or (layout == "auto" and detect_layout(path) == "arrow")):
        return _load_arrow(Path(path), split or "train")
    namer, problems, plans = _TaskNamer(task_map), [], {}
    for name, folder in _split_folders(path, split).items():
        folder_layout = detect_layout(folder) if layout == "auto" else layout
        if folder_layout is None:
            raise ValueError(
                f"{folder}: holds no MedSAM layout (npy_images/ + npy_gts/, .npz case files, or save_to_disk output)"
            )
        if folder_layout == "arrow":
            plans[name] = _load_arrow(folder, name)[name]
            continue
        files = _list_npy(folder, namer, on_error, problems) if folder_layout == "npy" else _list_npz(folder, namer)
        if not files:
            raise ValueError(f"{folder}: no {folder_layout} files found")
        plans[name] = (files, folder_layout)
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    if namer.unknown:
        shown = sorted(namer.unknown)
        warnings.warn(
            f"{len(shown)} folder or file names match none of the 30 tasks and load with task {UNKNOWN_TASK!r} "
            f"(pass task_map to name them): {', '.join(shown[:20])}{' ...' if len(shown) > 20 else ''}",
            stacklevel=2,
        )
    result = {}
    for name, plan in plans.items():
        if isinstance(plan, datasets.Dataset):
            result[name] = plan
            continue
        files, folder_layout = plan
        gen_kwargs = {"files": files, "layout": folder_layout, "on_error": on_error}
        result[name] = generate_dataset(
            _generate, name, gen_kwargs, cache_dir=cache_dir, num_proc=num_proc, fingerprint=_fingerprint(gen_kwargs)
        )
    return datasets.DatasetDict(result)
