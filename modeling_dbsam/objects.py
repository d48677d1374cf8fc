"""Several named objects in one image or volume, segmented together into one label map (values 1..N).

Each object is a box: ``x0, y0, x1, y1`` on a 2D image, ``x0, y0, z0, x1, y1, z1`` on a volume (every
slice ``z0..z1`` gets the box), or ``x0, y0, x1, y1`` with a ``key_slice`` to propagate through the volume
(the conventions of :mod:`modeling_dbsam.inference`). Every slice goes through the image encoder once,
however many boxes lie on it: the boxes of a slice are decoded together on its embedding, and propagated
objects reuse the embeddings of slices already encoded.

Overlaps: a pixel claimed by several objects goes to the object whose mask on that slice has the highest
score (the model's predicted IoU for that mask); on equal scores, to the object listed first.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_dbsam.inference import (
    PROPAGATION_MARGIN,
    _SliceEncoder,
    check_key_slice_box,
    check_volume,
    check_volume_box,
    encode_slices,
    propagate_from_key_slice,
)
from modeling_dbsam.predictor import EncodedImages, Prompts, check_boxes, decode_prompts
from modeling_dbsam.processing import IntensityConfig, get_intensity_config, to_model_rgb

MAX_OBJECTS = 255
"""Label maps are written as uint8."""

OBJECT_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)
"""RGB colour of label value ``v`` is ``OBJECT_COLOURS[(v - 1) % 10]`` (in the app and in DICOM-SEG)."""

OVERLAP_RULE = "a voxel claimed by several objects goes to the one with the highest predicted IoU on its slice"


def object_colour(value: int) -> tuple[int, int, int]:
    return OBJECT_COLOURS[(value - 1) % len(OBJECT_COLOURS)]


@dataclass
class ObjectPrompt:
    """One named object: a 2D box, a 3D box, or a 2D box on ``key_slice`` to propagate."""

    name: str
    box: Sequence[float]
    key_slice: int | None = None


@dataclass
class LabelMap:
    """The label map (0 = background, ``i + 1`` = ``names[i]``) and each object's score per slice."""

    labels: np.ndarray  # uint8, the image's spatial shape
    names: list[str]
    scores: np.ndarray  # (n_objects, n_slices) float32, NaN where the object was not segmented

    def legend(self) -> dict:
        """Names, values, colours, sizes and mean scores: the sidecar JSON written next to a label map."""
        objects = []
        for index, name in enumerate(self.names):
            value = index + 1
            segmented = self.scores[index][~np.isnan(self.scores[index])]
            objects.append(
                {
                    "value": value,
                    "name": name,
                    "color": list(object_colour(value)),
                    "voxels": int((self.labels == value).sum()),
                    "mean_score": round(float(segmented.mean()), 4) if segmented.size else None,
                }
            )
        return {"background": 0, "objects": objects, "overlaps": OVERLAP_RULE}


def check_objects(objects: Sequence[ObjectPrompt], shape: tuple[int, ...], is_volume: bool) -> list[ObjectPrompt]:
    """Validate names and boxes against the image's spatial shape (``(z, y, x)`` or ``(y, x)``)."""
    if not objects:
        raise ValueError("no object given: pass at least one box")
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"{len(objects)} objects; a label map holds at most {MAX_OBJECTS}")
    names = [str(o.name).strip() for o in objects]
    if any(not name for name in names):
        raise ValueError("every object needs a non-empty name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"object names must be unique; repeated: {', '.join(duplicates)}")
    checked = []
    for name, prompt in zip(names, objects):
        box = list(np.ravel(np.asarray(prompt.box, dtype=np.float64)))
        try:
            if not is_volume:
                if prompt.key_slice is not None or len(box) != 4:
                    raise ValueError(f"a 2D image takes a box x0,y0,x1,y1 without key slice; got {box}")
                check_boxes(box, shape)
            elif prompt.key_slice is not None:
                check_key_slice_box(box, prompt.key_slice, shape)
            elif len(box) != 6:
                raise ValueError(f"a volume takes a 3D box x0,y0,z0,x1,y1,z1 or a 2D box with a key slice; got {box}")
            else:
                check_volume_box(box, shape)
        except ValueError as error:
            raise ValueError(f"object {name!r}: {error}") from None
        checked.append(ObjectPrompt(name, box, None if prompt.key_slice is None else int(prompt.key_slice)))
    return checked


def resolve_overlaps(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Label map from ``(n, [z,] y, x)`` masks and ``(n, z)`` (or ``(n, 1)`` for 2D) scores, by :data:`OVERLAP_RULE`."""
    volume_masks = masks if masks.ndim == 4 else masks[:, None]
    labels = np.zeros(volume_masks.shape[1:], dtype=np.uint8)
    ranked = np.nan_to_num(scores.astype(np.float64), nan=-np.inf)
    for z in range(labels.shape[0]):
        on_slice = volume_masks[:, z]
        if not on_slice.any():
            continue
        claims = np.where(on_slice, ranked[:, z, None, None], -np.inf)
        winner = claims.argmax(axis=0)  # first object on ties
        labels[z] = np.where(on_slice.any(axis=0), winner + 1, 0)
    return labels if masks.ndim == 4 else labels[0]


def segment_objects(
    model,
    processor,
    image: np.ndarray,
    objects: Sequence[ObjectPrompt],
    *,
    is_volume: bool,
    intensity: IntensityConfig | None = None,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    margin: float = PROPAGATION_MARGIN,
    progress: bool = False,
    embeddings: Mapping[int, EncodedImages] | None = None,
) -> LabelMap:
    """Segment every object of a 2D image (``(y, x)`` or ``(y, x, 3)``) or a ``(z, y, x)`` volume of raw values.

    Raw values become uint8 by ``intensity``, by default the rule saved with ``processor`` (a volume as
    a whole); uint8 values are taken as they are. All boxes are checked before the model runs.
    ``embeddings`` are slices encoded already (by index; 0 for a 2D image), e.g. by a viewer for the
    slice on screen (:func:`modeling_dbsam.inference.encode_slices` on the same uint8 slice): those
    slices only run the prompt decoder.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    intensity = intensity or get_intensity_config(processor)
    image = check_volume(image) if is_volume else np.asarray(image)
    shape = image.shape if is_volume else image.shape[:2]
    objects = check_objects(objects, shape, is_volume)
    names = [o.name for o in objects]
    embeddings = embeddings or {}
    if not is_volume:
        boxes = np.array([o.box for o in objects], dtype=np.float32)
        if 0 in embeddings:
            encoded = embeddings[0]
        else:
            encoded = encode_slices(model, processor, [to_model_rgb(image, intensity)], autocast_dtype)
        prediction = decode_prompts(model, processor, encoded, Prompts(boxes=boxes), False, autocast_dtype)
        masks, scores = prediction.masks[:, 0], prediction.scores[:, :1].astype(np.float32)
        return LabelMap(resolve_overlaps(masks, scores), names, scores)

    slices = intensity.to_uint8(image)
    masks = np.zeros((len(objects), *shape), dtype=bool)
    scores = np.full((len(objects), shape[0]), np.nan, dtype=np.float32)
    boxed = [(i, o) for i, o in enumerate(objects) if o.key_slice is None]
    propagated = [(i, o) for i, o in enumerate(objects) if o.key_slice is not None]
    encoder = _SliceEncoder(model, processor, slices, batch_size, autocast_dtype, keep=bool(propagated))
    encoder.cache.update(embeddings)
    box_slices = sorted({z for _, o in boxed for z in range(int(o.box[2]), int(o.box[5]) + 1)})
    total = len(box_slices) + len(propagated) * shape[0]
    with tqdm(total=total, desc="segmenting", unit="slice", disable=not progress) as bar:
        for start in range(0, len(box_slices), batch_size):
            chunk = box_slices[start : start + batch_size]
            encoder.encode(chunk)
            for z in chunk:
                on_slice = [(i, o) for i, o in boxed if o.box[2] <= z <= o.box[5]]
                slice_boxes = np.array([[o.box[0], o.box[1], o.box[3], o.box[4]] for _, o in on_slice])
                prediction = decode_prompts(
                    model, processor, encoder(z, 1), Prompts(boxes=slice_boxes), False, autocast_dtype
                )
                for row, (i, _) in enumerate(on_slice):
                    masks[i, z] = prediction.masks[row, 0]
                    scores[i, z] = prediction.scores[row, 0]
                bar.update()
        for i, prompt in propagated:

            def segment_slice(z: int, box: np.ndarray, direction: int, i: int = i) -> np.ndarray:
                prediction = decode_prompts(
                    model, processor, encoder(z, direction), Prompts(boxes=box), False, autocast_dtype
                )
                scores[i, z] = prediction.scores[0, 0]
                return prediction.masks[0, 0]

            key_box = np.asarray(prompt.box, dtype=np.float32)
            masks[i] = propagate_from_key_slice(segment_slice, prompt.key_slice, key_box, shape, margin, bar.update)
            scores[i, ~masks[i].any(axis=(1, 2))] = np.nan  # the slice past each end, where the mask vanished
    return LabelMap(resolve_overlaps(masks, scores), names, scores)


def read_objects_file(path: str | os.PathLike) -> list[ObjectPrompt]:
    """Objects from JSON (``[{"name": ..., "box": [...], "key_slice": k}, ...]``) or CSV
    (columns ``name, x0, y0, x1, y1`` and optionally ``z0, z1`` or ``key_slice``).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.lower().endswith(".json"):
            with open(path) as handle:
                return objects_from_json(handle.read())
        if path.lower().endswith(".csv"):
            with open(path, newline="") as handle:
                return [_csv_object(row) for row in csv.DictReader(handle)]
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    raise ValueError(f"{path}: objects file must be .json or .csv")


def objects_from_json(text: str) -> list[ObjectPrompt]:
    """Objects from ``[{"name": ..., "box": [...], "key_slice": k}, ...]`` (``key_slice`` optional)."""
    try:
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise ValueError("expected a JSON list of objects")
        return [ObjectPrompt(e["name"], e["box"], e.get("key_slice")) for e in entries]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise ValueError(
            f'not a valid objects list ({type(error).__name__}: {error}); expected [{{"name": ..., "box": [...]}}]'
        ) from None


def _csv_object(row: dict) -> ObjectPrompt:
    def number(column: str) -> float | None:
        text = (row.get(column) or "").strip()
        return float(text) if text else None

    x0, y0, x1, y1, z0, z1, key = (number(c) for c in ("x0", "y0", "x1", "y1", "z0", "z1", "key_slice"))
    if None in (x0, y0, x1, y1):
        raise ValueError(f"row {row}: needs columns name, x0, y0, x1, y1")
    if (z0 is None) != (z1 is None):
        raise ValueError(f"row {row}: give both z0 and z1, or neither")
    box = [x0, y0, z0, x1, y1, z1] if z0 is not None else [x0, y0, x1, y1]
    return ObjectPrompt(row.get("name") or "", box, None if key is None else int(key))


def legend_path(output: str | os.PathLike) -> str:
    """The sidecar JSON next to a label map: ``result.nii.gz`` -> ``result.json``."""
    from modeling_dbsam.io import path_suffix

    output = str(output)
    return output[: len(output) - len(path_suffix(output))] + ".json"


def write_legend(path: str | os.PathLike, label_map: LabelMap, overwrite: bool = False) -> None:
    from modeling_dbsam.io import atomic_write

    text = json.dumps(label_map.legend(), indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite)
