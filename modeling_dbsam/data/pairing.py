"""Pairing image files with their label maps: the nnU-Net / Decathlon layout or two glob patterns."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from modeling_dbsam.io import IMAGE_SUFFIXES, VOLUME_SUFFIXES, path_suffix

_CHANNEL = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class RawCase:
    """An image (file or DICOM series folder) and its label map; ``split`` is fixed for ``imagesTs``/``labelsTs``."""

    case_id: str
    image: str
    label: str
    split: str | None = None


def _is_image_entry(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    return path.is_dir() or path_suffix(path) in VOLUME_SUFFIXES + IMAGE_SUFFIXES


def _stem(path: Path) -> str:
    suffix = path_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def find_nnunet_cases(raw_dir: str | os.PathLike, channel: int = 0) -> tuple[list[RawCase], list[str]]:
    """Pair ``imagesTr/<case>[_0000].<ext>`` with ``labelsTr/<case>.<ext>`` (and ``imagesTs``/``labelsTs``).

    Images with a channel suffix other than ``channel`` are ignored. Returns the cases and a
    list of unpaired files.
    """
    raw_dir = Path(raw_dir)
    cases, problems = [], []
    for images_name, labels_name, split in (("imagesTr", "labelsTr", None), ("imagesTs", "labelsTs", "test")):
        images_dir, labels_dir = raw_dir / images_name, raw_dir / labels_name
        if not (images_dir.is_dir() and labels_dir.is_dir()):
            continue
        images = {}
        for path in sorted(filter(_is_image_entry, images_dir.iterdir())):
            match = _CHANNEL.fullmatch(_stem(path))
            if match and int(match["channel"]) != channel:
                continue
            images[match["case"] if match else _stem(path)] = path
        labels = {_stem(p): p for p in sorted(labels_dir.iterdir()) if _is_image_entry(p) and p.is_file()}
        problems += [f"{images[c]}: no label map {labels_dir}/{c}.*" for c in sorted(set(images) - set(labels))]
        problems += [
            f"{labels[c]}: no image {images_dir}/{c}[_{channel:04d}].*" for c in sorted(set(labels) - set(images))
        ]
        cases += [RawCase(c, str(images[c]), str(labels[c]), split) for c in sorted(set(images) & set(labels))]
    if not cases and not problems:
        raise FileNotFoundError(
            f"{raw_dir}: no imagesTr/ + labelsTr/ (nnU-Net / Decathlon layout) found; pass --images and --label-maps globs"
        )
    return cases, problems


def _glob_regex(pattern: str) -> re.Pattern:
    """A regex whose groups capture what each wildcard of a glob pattern matched."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:(.*)/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append("(.*)")
            i += 2
        elif pattern[i] == "*":
            parts.append("([^/]*)")
            i += 1
        elif pattern[i] == "?":
            parts.append("([^/])")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            parts.append("(" + pattern[i : end + 1].replace("[!", "[^") + ")")
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


def _glob_keyed(raw_dir: Path, pattern: str) -> dict[tuple[str, ...], Path]:
    base = Path(pattern).is_absolute()
    regex = _glob_regex(pattern.rstrip("/"))
    keyed: dict[tuple[str, ...], Path] = {}
    for found in sorted(glob.glob(pattern if base else str(raw_dir / pattern), recursive=True)):
        path = Path(found)
        relative = path.as_posix() if base else path.relative_to(raw_dir).as_posix()
        match = regex.fullmatch(relative.rstrip("/"))
        if match is None or not _is_image_entry(path):
            continue
        key = tuple(g or "" for g in match.groups())
        if key in keyed:
            raise ValueError(f"glob {pattern!r} matches {keyed[key]} and {path} with the same wildcard parts {key}")
        keyed[key] = path
    return keyed


def find_glob_cases(raw_dir: str | os.PathLike, images: str, label_maps: str) -> tuple[list[RawCase], list[str]]:
    """Pair the files two glob patterns match by what their wildcards matched.

    ``images="scans/*/ct.nii.gz"`` and ``label_maps="scans/*/seg.nii.gz"`` pair ``scans/p1/ct.nii.gz``
    with ``scans/p1/seg.nii.gz``: both wildcards matched ``p1``, which becomes the case id.
    Patterns are relative to ``raw_dir`` unless absolute; ``**`` spans folders.
    """
    raw_dir = Path(raw_dir)
    found_images, found_labels = _glob_keyed(raw_dir, images), _glob_keyed(raw_dir, label_maps)
    if not found_images:
        raise FileNotFoundError(f"{raw_dir}: --images {images!r} matches no image file or folder")
    if not found_labels:
        raise FileNotFoundError(f"{raw_dir}: --label-maps {label_maps!r} matches no file")
    problems = [
        f"{found_images[k]}: no label map matches {label_maps!r}"
        for k in sorted(set(found_images) - set(found_labels))
    ]
    problems += [
        f"{found_labels[k]}: no image matches {images!r}" for k in sorted(set(found_labels) - set(found_images))
    ]
    paired = sorted(set(found_images) & set(found_labels))
    cases = [
        RawCase("_".join(k) or _stem(found_images[k]), str(found_images[k]), str(found_labels[k])) for k in paired
    ]
    return cases, problems
