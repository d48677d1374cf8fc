"""Writing a dataset folder so that a partly written one is never mistaken for a complete one."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import datasets

from modeling_dbsam.data.card import dataset_card, write_card
from modeling_dbsam.io import staging_folder


def load_splits(folder: str | os.PathLike) -> datasets.DatasetDict:
    """A ``DatasetDict`` folder written by ``save_to_disk`` (memory-mapped), or one clear error saying what it is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise ValueError(f"{folder}: not a folder written by save_to_disk ({error})") from error
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"{folder}: holds a single Dataset; save a DatasetDict with named splits (e.g. 'test')")
    return loaded


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing ``out_dir`` unless ``overwrite``, before any work is done."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if not out_dir.parent.is_dir():
        raise FileNotFoundError(f"{out_dir.parent}: output's parent folder does not exist")
    return out_dir


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden work folder beside ``out_dir``; on success its ``result/`` is renamed onto ``out_dir``.

    Write the finished output into ``<work>/result``; anything else under ``<work>`` (caches) is
    deleted. On error, or if the process dies, ``out_dir`` is untouched (an old one is replaced
    only after the new one is complete) and only a ``.<name>.partial-*`` folder can remain, which the next
    run removes (:func:`modeling_dbsam.io.clean_stale_staging`).
    """
    out_dir = check_output_folder(out_dir, overwrite)
    work = staging_folder(out_dir)  # also removes what killed runs left
    try:
        yield work
        result = work / "result"
        if not result.is_dir():
            raise RuntimeError(f"{work}: nothing was written to {result}")
        if out_dir.exists():
            check_output_folder(out_dir, overwrite)
            os.replace(out_dir, work / "replaced")
        os.replace(result, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


MEDSAM_INTENSITY_NOTE = (
    "As preprocessed by the MedSAM authors: CT windowed, other modalities clipped at the 0.5 / 99.5 "
    "percentiles, scaled to uint8 and resized to 256 x 256 x 3."
)


def save_dataset(
    dataset_dict: datasets.DatasetDict,
    out_dir: str | os.PathLike,
    *,
    title: str = "MedSAM-format segmentation dataset",
    intensity: str = MEDSAM_INTENSITY_NOTE,
    overwrite: bool = False,
) -> Path:
    """``save_to_disk`` with a dataset card (README.md) beside it, written atomically (see :func:`atomic_folder`).

    The folder loads back with ``datasets.load_from_disk`` or ``load_medsam_dataset``.
    """
    with atomic_folder(out_dir, overwrite) as work:
        dataset_dict.save_to_disk(str(work / "result"))
        write_card(work / "result", dataset_card(dataset_dict, title=title, intensity=intensity))
    return Path(out_dir)
