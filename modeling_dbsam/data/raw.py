"""Import of raw image volumes and label maps (NIfTI, NRRD, MHA, DICOM series; PNG/JPG for 2D) into the Arrow schema.

MedSAM's rules, applied slice by slice (the volume is read once; no converted or resized copy of it
is ever held):

- intensities: :func:`modeling_dbsam.intensity.fit_intensity_rule` on the whole volume (CT window:
  the ``window`` argument, else the task's preset, else 40/400; other modalities: 0.5/99.5
  percentiles of the non-zero voxels), then uint8;
- slices along the array's first axis (the file's third axis, axial for most CT/MR), resized to
  ``size`` x ``size`` (bicubic for images, nearest for labels; ``None`` keeps the native size; the
  stored ``spacing`` is that of the resized grid);
- MedSAM's small-object rules at the native resolution, before any resizing, per label value: in a
  volume, 3D connected components under ``min_volume`` voxels (26-connectivity) are removed, then on
  every slice 2D components under ``min_size`` pixels (8-connectivity); each removed component is
  counted, and the masks come from the cleaned label map;
- one example per object: each label value (or, with ``components=True``, each connected component
  of it, labelled ``value * 1000 + k``) on each slice; slices without foreground are dropped and
  counted;
- case-level splits, seeded: a case (one image file or DICOM series) never spans two splits.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from modeling_dbsam.data.card import dataset_card, write_card
from modeling_dbsam.data.pairing import RawCase, find_glob_cases, find_nnunet_cases
from modeling_dbsam.data.save import atomic_folder, check_output_folder
from modeling_dbsam.data.schema import encode_image, generate_dataset, label_values, make_example
from modeling_dbsam.data.splits import assign_splits, parse_split
from modeling_dbsam.data.tasks import UNKNOWN_TASK, resolve_task
from modeling_dbsam.intensity import IntensityRule, fit_intensity_rule
from modeling_dbsam.io import MedicalImage, path_suffix, read_image

COMPONENT_BASE = 1000
"""With ``components=True`` the k-th connected component of label value v gets label ``v * 1000 + k``."""
_NO_GEOMETRY = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class ImportReport:
    """What an import wrote and what it left out, and why."""

    out_dir: str = ""
    task: str = ""
    examples: Counter = field(default_factory=Counter)
    cases: Counter = field(default_factory=Counter)
    small_components_dropped_3d: int = 0
    small_components_dropped_2d: int = 0
    objects_lost_in_resize: int = 0
    empty_slices_dropped: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.out_dir} (task: {self.task})"]
        lines += [f"  {split}: {self.cases[split]} cases, {self.examples[split]} examples" for split in self.examples]
        lines.append(
            f"  dropped: {self.small_components_dropped_3d} 3D components under the minimum volume, "
            f"{self.small_components_dropped_2d} 2D components under the minimum size (native resolution), "
            f"{self.objects_lost_in_resize} objects that vanished in resizing, "
            f"{self.empty_slices_dropped} slices without foreground"
        )
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} files or cases:")
            lines += [f"    {reason}" for reason in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class ImportSettings:
    task: str
    modality: str
    window: tuple[float, float] | str | None
    labels: tuple[int, ...] | None
    size: int | None
    min_size: int
    components: bool
    min_volume: int = 1000


def _check_geometry(image: MedicalImage, label: MedicalImage) -> None:
    """Label maps must lie on their image's grid: same size, and for volumes same spacing, origin, direction."""
    image_shape = image.array.shape[: label.array.ndim] if not image.is_volume else image.array.shape
    if image.is_volume and image.reference.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"{image.path}: multi-channel volumes are not supported; pass one channel")
    if label.array.shape[: len(image_shape)] != image_shape or image.is_volume != label.is_volume:
        raise ValueError(
            f"{label.path}: label map shape {label.array.shape} differs from image {image.path} shape {image.array.shape}"
        )
    if not image.is_volume:
        return
    checks = (
        ("spacing", image.reference.GetSpacing(), label.reference.GetSpacing(), 1e-4),
        ("origin", image.reference.GetOrigin(), label.reference.GetOrigin(), 1e-3),
        ("direction", image.reference.GetDirection(), label.reference.GetDirection(), 1e-4),
    )
    for name, expected, actual, tolerance in checks:
        if not np.allclose(expected, actual, rtol=tolerance, atol=tolerance):
            raise ValueError(
                f"{label.path}: label map {name} {tuple(round(v, 4) for v in actual)} differs from image "
                f"{image.path} {name} {tuple(round(v, 4) for v in expected)}; resample the labels onto the image grid"
            )


def _label_array(label: MedicalImage) -> np.ndarray:
    array = label.array
    if array.ndim == 3 and not label.is_volume:  # 2D label image stored with colour channels
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[2])):
            raise ValueError(
                f"{label.path}: label image has {array.shape[2]} different channels; expected one label per pixel"
            )
        array = array[..., 0]
    return array


def _connected_components(label_map: np.ndarray, values: np.ndarray, source: str) -> np.ndarray:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(label_map.ndim, label_map.ndim)
    components = np.zeros(label_map.shape, dtype=np.int32)
    for value in values:
        numbered, count = ndimage.label(label_map == value, structure=structure)
        if count >= COMPONENT_BASE:
            raise ValueError(
                f"{source}: label {value} has {count} connected components; at most {COMPONENT_BASE - 1} can be numbered"
            )
        inside = numbered > 0
        components[inside] = value * COMPONENT_BASE + numbered[inside]
    return components


def _remove_small_components(label_map: np.ndarray, values: np.ndarray, structure: np.ndarray, minimum: int) -> int:
    """Set to background, in place, every connected component of each label value under ``minimum`` elements."""
    from scipy import ndimage

    removed = 0
    for value in values:
        numbered, count = ndimage.label(label_map == value, structure=structure)
        small = np.flatnonzero(np.bincount(numbered.ravel(), minlength=count + 1)[1:] < minimum) + 1
        if small.size:
            label_map[np.isin(numbered, small)] = 0
            removed += int(small.size)
    return removed


def remove_dust(
    labels: np.ndarray, values: np.ndarray, *, min_volume: int, min_size: int, volume: bool
) -> tuple[np.ndarray, int, int]:
    """MedSAM's small-object rules on a (slices, H, W) label map at native resolution; returns a cleaned copy.

    Per label value: in a volume, 3D components under ``min_volume`` voxels (26-connectivity) go first;
    then, on every slice, 2D components under ``min_size`` pixels (8-connectivity). Also returns the numbers
    of 3D and 2D components removed. A threshold of 0 switches its rule off.
    """
    cleaned = np.array(labels, copy=True)
    removed_3d = removed_2d = 0
    if volume and min_volume > 0:
        removed_3d = _remove_small_components(cleaned, values, np.ones((3, 3, 3), bool), min_volume)
    if min_size > 0:
        in_plane = np.zeros((3, 3, 3), bool)
        in_plane[1] = True  # 8-connectivity within a slice, never across slices
        removed_2d = _remove_small_components(cleaned, values, in_plane, min_size)
    return cleaned, removed_3d, removed_2d


def resize_image(image: np.ndarray, size: int | None) -> np.ndarray:
    """Bicubic resize of a uint8 slice (H x W or H x W x 3) to ``size`` x ``size``."""
    if size is None or image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def resize_labels(label_map: np.ndarray, size: int | None) -> np.ndarray:
    """Nearest-neighbour resize of a label slice to ``size`` x ``size`` (pixel centres, any integer dtype)."""
    if size is None or label_map.shape == (size, size):
        return label_map
    rows = np.minimum(((np.arange(size) + 0.5) * label_map.shape[0] / size).astype(np.int64), label_map.shape[0] - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * label_map.shape[1] / size).astype(np.int64), label_map.shape[1] - 1)
    return label_map[np.ix_(rows, cols)]


@dataclass(frozen=True)
class OpenCase:
    """A case read and checked, ready to be sliced: ``images``/``labels`` are (slices, H, W[, 3])."""

    case: RawCase
    images: np.ndarray
    labels: np.ndarray
    selected: np.ndarray | None  # label values to keep; None: all
    rule: IntensityRule
    dimension: str
    spacing: tuple[float, ...] | None
    dust_removed: tuple[int, int] = (0, 0)  # 3D and 2D components under the minimum sizes, removed


def open_case(case: RawCase, settings: ImportSettings) -> OpenCase:
    """Read a case and check it, so that a bad case fails before any of its slices is written."""
    image, label = read_image(case.image), read_image(case.label)
    _check_geometry(image, label)
    label_map = _label_array(label)
    selected = label_values(label_map, case.label)
    if settings.labels is not None:
        selected = selected[np.isin(selected, settings.labels)]
    volume = image.is_volume
    labels, *dust_removed = remove_dust(
        label_map if volume else label_map[None],
        selected,
        min_volume=settings.min_volume,
        min_size=settings.min_size,
        volume=volume,
    )
    if settings.components:
        labels = _connected_components(labels, selected, case.label)
        selected = None  # every component of a selected value is wanted
    rule = fit_intensity_rule(image.array, settings.modality, settings.window)
    images = image.array if volume else image.array[None]
    height, width = images.shape[1:3]
    out_height, out_width = (settings.size, settings.size) if settings.size else (height, width)
    if volume:
        z, y, x = image.spacing
        spacing = (z, y * height / out_height, x * width / out_width)
    elif path_suffix(case.image) in _NO_GEOMETRY:
        spacing = None
    else:
        y, x = image.spacing[-2:]
        spacing = (y * height / out_height, x * width / out_width)
    return OpenCase(case, images, labels, selected, rule, "3D" if volume else "2D", spacing, tuple(dust_removed))


def case_examples(opened: OpenCase, settings: ImportSettings, report: ImportReport) -> Iterator[dict]:
    """Yield a case's examples slice by slice, counting what the rules drop into ``report``."""
    case = opened.case
    report.small_components_dropped_3d += opened.dust_removed[0]
    report.small_components_dropped_2d += opened.dust_removed[1]
    for index in range(len(opened.images)):
        values = label_values(opened.labels[index], case.label)
        if opened.selected is not None:
            values = values[np.isin(values, opened.selected)]
        if values.size == 0:
            report.empty_slices_dropped += 1
            continue
        source = f"{case.image} (slice {index})"
        slice_labels = resize_labels(opened.labels[index], settings.size)
        slice_image = resize_image(opened.rule(opened.images[index]), settings.size)
        encoded = None
        for value in values:
            mask = slice_labels == value
            if not mask.any():  # a tiny object that nearest-neighbour downsampling missed
                report.objects_lost_in_resize += 1
                continue
            encoded = encoded or encode_image(slice_image, source)
            yield make_example(
                encoded,
                mask,
                task=settings.task,
                modality=settings.modality,
                dimension=opened.dimension,
                case_id=case.case_id,
                slice_index=index,
                label=int(value),
                spacing=opened.spacing,
                source=source,
            )


def _generate(
    cases: list[RawCase], split: str, settings: ImportSettings, report: ImportReport, progress
) -> Iterator[dict]:
    """The generator behind ``Dataset.from_generator``: a case that cannot be read or checked is skipped and reported."""
    for case in cases:
        try:
            opened = open_case(case, settings)
        except (ValueError, FileNotFoundError) as error:
            report.skipped.append(str(error))
        else:
            count = 0
            for example in case_examples(opened, settings, report):
                count += 1
                yield example
            report.cases[split] += 1
            report.examples[split] += count
        progress.update(1)


def _settings(raw_dir: Path, modality, task, window, labels, size, min_size, components, min_volume) -> ImportSettings:
    named = resolve_task(task) if task else resolve_task(f"{modality or ''} {raw_dir.name}")
    if modality is None:
        if named is None:
            raise ValueError("pass the modality (e.g. --modality CT) or a task of the 30 (e.g. --task 'CT Liver')")
        modality = named.modality
    same_family = named is not None and named.modality.split("-")[0] == modality.split("-")[0]
    if task is None:
        task = named.name if same_family else UNKNOWN_TASK
    elif named is not None:
        if not same_family:
            raise ValueError(f"task {named.name!r} is {named.modality}, but the modality given is {modality!r}")
        task = named.name
    if window is None and modality.upper() == "CT" and named is not None and named.ct_window:
        window = named.ct_window
    fit_intensity_rule(np.zeros(1, np.float32), modality, window)  # reject a bad window before reading anything
    if (size is not None and size < 1) or min_size < 0 or min_volume < 0:
        raise ValueError(
            f"size must be positive (or None to keep), min_size and min_volume >= 0; got {size}, {min_size}, {min_volume}"
        )
    return ImportSettings(
        task, modality, window, tuple(labels) if labels else None, size, min_size, components, min_volume
    )


def prepare_raw_dataset(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    modality: str | None = None,
    task: str | None = None,
    window: tuple[float, float] | str | None = None,
    labels: Sequence[int] | None = None,
    split: tuple[float, float, float] | str | None = None,
    seed: int = 0,
    size: int | None = 256,
    min_size: int = 100,
    min_volume: int = 1000,
    components: bool = False,
    images: str | None = None,
    label_maps: str | None = None,
    channel: int = 0,
    overwrite: bool = False,
    label_names: dict[int, str] | None = None,
    card_notes: str = "",
    licence: str = "other",
) -> ImportReport:
    """Convert a folder of images and label maps into an Arrow ``DatasetDict`` saved at ``out_dir``.

    Pairs ``imagesTr``/``labelsTr`` (and ``imagesTs``/``labelsTs`` as the test split), or the
    ``images``/``label_maps`` globs. MedSAM's small-object rules run at the native resolution before
    resizing: 3D components under ``min_volume`` voxels (volumes only), then 2D components under
    ``min_size`` pixels per slice (0 switches a rule off). ``task`` may be one of the 30 (any spelling
    :func:`~modeling_dbsam.data.tasks.resolve_task` accepts) or a name of your own; without it the
    task is guessed from the modality and the folder name. A case that cannot be read or whose
    label map does not fit its image is skipped and reported; ``out_dir`` appears only when complete,
    with a dataset card (README.md). ``label_names`` (label value to structure name), ``card_notes``
    (provenance) and ``licence`` (a Hub licence id) go into the card.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: no such folder")
    check_output_folder(out_dir, overwrite)
    if (images is None) != (label_maps is None):
        raise ValueError("pass both --images and --label-maps globs, or neither (nnU-Net layout)")
    settings = _settings(raw_dir, modality, task, window, labels, size, min_size, components, min_volume)
    fractions = parse_split(split) if split is not None else None
    cases, problems = find_glob_cases(raw_dir, images, label_maps) if images else find_nnunet_cases(raw_dir, channel)
    if not cases:
        raise ValueError(f"{raw_dir}: no image has a label map:\n  " + "\n  ".join(problems[:20]))
    report = ImportReport(out_dir=str(out_dir), task=settings.task, skipped=list(problems))
    progress_bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with atomic_folder(out_dir, overwrite) as work, tqdm(total=len(cases), desc="import", unit="case") as progress:
            splits = {}
            for name, members in assign_splits(cases, fractions, seed).items():
                gen_kwargs = {
                    "cases": members,
                    "split": name,
                    "settings": settings,
                    "report": report,
                    "progress": progress,
                }
                splits[name] = generate_dataset(
                    _generate, name, gen_kwargs, cache_dir=str(work / "cache"), fingerprint=uuid.uuid4().hex
                )
            splits = {name: ds for name, ds in splits.items() if len(ds)}
            if not splits:
                raise ValueError(f"{raw_dir}: no example survived the import rules\n{report.summary()}")
            result = datasets.DatasetDict(splits)
            result.save_to_disk(str(work / "result"))
            card = dataset_card(
                result,
                title=f"{settings.task} ({raw_dir.name})",
                intensity=_intensity_note(settings),
                report=report,
                label_names=label_names,
                extra=card_notes,
                licence=licence,
            )
            write_card(work / "result", card)
    finally:
        if progress_bars:
            datasets.enable_progress_bars()
    return report


def _intensity_note(settings: ImportSettings) -> str:
    if settings.modality.upper() == "CT":
        window = settings.window if settings.window is not None else "40/400 (MedSAM's default)"
        rule = f"CT window {window} (level/width in HU, or a preset of modeling_dbsam.intensity.CT_WINDOW_PRESETS)"
    else:
        rule = "clipped at the 0.5 / 99.5 percentiles of the non-zero voxels of each volume (uint8 input kept as is)"
    size = f"{settings.size} x {settings.size} (bicubic; labels nearest)" if settings.size else "native size"
    components = (
        "; each connected component is its own object (label = value * 1000 + k)" if settings.components else ""
    )
    return (
        f"Modality {settings.modality}: {rule}, scaled to uint8. Slices resized to {size}. "
        f"MedSAM's small-object rules at native resolution, before resizing: 3D connected components under "
        f"{settings.min_volume} voxels (26-connectivity, volumes only), then 2D components under "
        f"{settings.min_size} pixels per slice (8-connectivity), removed from the label map; slices without "
        f"foreground dropped{components}."
    )
