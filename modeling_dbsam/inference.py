"""Box-prompted segmentation of whole CT/MR volumes, slice by slice, and an overlay montage to check it.

Coordinates are voxel indices of the array as read by :func:`modeling_dbsam.io.read_image`
(``(z, y, x)`` order): x = column, y = row, z = slice, all inclusive, so a box ``x0..x1`` covers
columns ``x0`` to ``x1`` (the convention of :func:`modeling_dbsam.boxes.mask_to_box` and so of the
training prompts). Two ways to prompt a volume:

- a 3D box ``(x0, y0, z0, x1, y1, z1)``: every slice ``z0..z1`` gets the box ``(x0, y0, x1, y1)``;
  slices go through the encoder ``batch_size`` at a time;
- a 2D box on a key slice: the key slice is segmented, then the mask propagates up and down, each
  slice prompted with the previous slice's mask box (plus ``margin``), until the mask vanishes (as
  LiteMedSAM does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm.auto import tqdm

from modeling_dbsam.boxes import expand_box, mask_to_box
from modeling_dbsam.io import atomic_write
from modeling_dbsam.predictor import EncodedImages, Prompts, check_boxes, decode_prompts, encode_images, predict_boxes
from modeling_dbsam.processing import IntensityConfig, get_intensity_config, gray_to_rgb

PROPAGATION_MARGIN = 3
"""Outward shift of each side of a propagated box, in pixels of a 256 px image (LiteMedSAM's ``bbox_shift``)."""


def check_volume(volume: np.ndarray) -> np.ndarray:
    """A volume must be one 3D scalar array ``(z, y, x)``."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        channels = " (a multi-channel or 4D image)" if volume.ndim == 4 else ""
        raise ValueError(f"volume must be a 3D array (z, y, x); got shape {volume.shape}{channels}")
    return volume


def check_volume_box(box: Sequence[float], shape: tuple[int, int, int]) -> tuple[np.ndarray, int, int]:
    """Validate a 3D box ``(x0, y0, z0, x1, y1, z1)``; return the 2D box and the inclusive z-range."""
    values = np.asarray(box, dtype=np.float64)
    if values.shape != (6,):
        raise ValueError(f"a 3D box needs 6 values x0, y0, z0, x1, y1, z1; got {list(np.ravel(values))}")
    x0, y0, z0, x1, y1, z1 = values
    depth = shape[0]
    if z0 != round(z0) or z1 != round(z1):
        raise ValueError(f"z0 and z1 are slice indices and must be integers; got {z0}, {z1}")
    if z0 > z1:
        raise ValueError(f"box z-range {int(z0)}..{int(z1)} is inverted: need z0 <= z1")
    if z0 < 0 or z1 > depth - 1:
        raise ValueError(f"box z-range {int(z0)}..{int(z1)} lies outside the volume's slices 0..{depth - 1}")
    return check_boxes([x0, y0, x1, y1], shape[1:])[0], int(z0), int(z1)


def check_key_slice_box(box_2d: Sequence[float], key_slice: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Validate a 2D box ``(x0, y0, x1, y1)`` on slice ``key_slice`` of a volume of shape ``(z, y, x)``."""
    if key_slice != int(key_slice) or not 0 <= key_slice < shape[0]:
        raise ValueError(f"key slice {key_slice} lies outside the volume's slices 0..{shape[0] - 1}")
    return check_boxes(box_2d, shape[1:])[0]


def propagate_from_key_slice(
    segment_slice: Callable[[int, np.ndarray, int], np.ndarray],
    key_slice: int,
    key_box: np.ndarray,
    shape: tuple[int, int, int],
    margin: float = PROPAGATION_MARGIN,
    on_slice: Callable[[], None] | None = None,
) -> np.ndarray:
    """Segment the key slice, then walk up (+1) and down (-1) while the previous slice's mask is not empty.

    ``segment_slice(z, box, direction)`` returns slice ``z``'s bool mask for ``box``; the box of slice
    ``z + direction`` is the tight box of slice ``z``'s mask moved out by ``margin`` (pixels at 256 px).
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0 so that a one-pixel mask still gives a box; got {margin}")
    depth, height, width = shape
    mask = np.zeros(shape, dtype=bool)
    mask[key_slice] = segment_slice(key_slice, key_box, 1)
    if on_slice:
        on_slice()
    for direction in (1, -1):
        z = key_slice
        while mask[z].any() and 0 <= z + direction < depth:
            box = expand_box(mask_to_box(mask[z]), (height, width), np.full(4, margin), resolution=256)
            z += direction
            mask[z] = segment_slice(z, box, direction)
            if on_slice:
                on_slice()
    return mask


def encode_slices(
    model, processor, slices: Sequence[np.ndarray], autocast_dtype: torch.dtype | None = None
) -> EncodedImages:
    """The image embeddings of uint8 slices as the model sees them: grayscale ``(y, x)`` or RGB ``(y, x, 3)``."""
    return encode_images(model, processor, [gray_to_rgb(pixels) for pixels in slices], autocast_dtype)


class _SliceEncoder:
    """Slice embeddings for propagation, encoded ``batch_size`` slices ahead in the walk direction.

    Each propagated slice needs the previous slice's mask, so decoding is sequential, but the
    encoder (the expensive part) does not depend on the masks: batching it ahead costs at most
    ``batch_size - 1`` encodings of slices past the object's end.
    """

    def __init__(
        self,
        model,
        processor,
        slices: np.ndarray,
        batch_size: int,
        autocast_dtype: torch.dtype | None,
        keep: bool = False,
    ):
        self.model, self.processor, self.slices = model, processor, slices
        self.batch_size, self.autocast_dtype = batch_size, autocast_dtype
        self.keep = keep  # keep embeddings after use, for several objects on the same slices
        self.cache: dict[int, EncodedImages] = {}

    def encode(self, indexes: Sequence[int]) -> None:
        """Encode the slices not yet cached, ``batch_size`` at a time."""
        indexes = [i for i in dict.fromkeys(indexes) if i not in self.cache]
        for start in range(0, len(indexes), self.batch_size):
            batch = indexes[start : start + self.batch_size]
            encoded = encode_slices(self.model, self.processor, [self.slices[i] for i in batch], self.autocast_dtype)
            self.cache.update({i: encoded.select(k) for k, i in enumerate(batch)})

    def __call__(self, z: int, direction: int) -> EncodedImages:
        if z not in self.cache:
            ahead = range(z, z + direction * self.batch_size, direction)
            self.encode([i for i in ahead if 0 <= i < len(self.slices)])
        return self.cache[z] if self.keep else self.cache.pop(z)


def segment_volume(
    model,
    processor,
    volume: np.ndarray,
    box: Sequence[float] | None = None,
    *,
    box_2d: Sequence[float] | None = None,
    key_slice: int | None = None,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    margin: float = PROPAGATION_MARGIN,
    intensity: IntensityConfig | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Segment the object in a box of a ``(z, y, x)`` volume of raw values; returns a uint8 0/1 mask of its shape.

    Pass either ``box=(x0, y0, z0, x1, y1, z1)`` or ``box_2d=(x0, y0, x1, y1)`` with ``key_slice``
    (see the module docstring). Raw values become uint8 over the whole volume by ``intensity``,
    by default the rule saved with ``processor``.
    """
    volume = check_volume(volume)
    if (box is None) == (box_2d is None) or (box_2d is None) != (key_slice is None):
        raise ValueError("pass either box=(x0, y0, z0, x1, y1, z1) or box_2d=(x0, y0, x1, y1) with key_slice")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if box is not None:
        box2d, z0, z1 = check_volume_box(box, volume.shape)
    else:
        key_box = check_key_slice_box(box_2d, key_slice, volume.shape)
    slices = (intensity or get_intensity_config(processor)).to_uint8(volume)
    if box is not None:
        images = [gray_to_rgb(s) for s in slices[z0 : z1 + 1]]
        predictions = predict_boxes(
            model, processor, images, [box2d] * len(images), batch_size, autocast_dtype, progress=progress
        )
        mask = np.zeros(volume.shape, dtype=np.uint8)
        mask[z0 : z1 + 1] = np.stack([p.masks[0] for p in predictions])
        return mask

    encoder = _SliceEncoder(model, processor, slices, batch_size, autocast_dtype)

    def segment_slice(z: int, slice_box: np.ndarray, direction: int) -> np.ndarray:
        encoded = encoder(z, direction)
        prediction = decode_prompts(model, processor, encoded, Prompts(boxes=slice_box), False, autocast_dtype)
        return prediction.masks[0, 0]

    with tqdm(total=len(volume), desc="propagating", unit="slice", disable=not progress) as bar:
        mask = propagate_from_key_slice(segment_slice, int(key_slice), key_box, volume.shape, margin, bar.update)
    return mask.astype(np.uint8)


MASK_COLOUR, PROMPT_COLOUR = (255, 128, 0), (0, 220, 255)  # orange outline, cyan box


def overlay_montage(
    image: np.ndarray,
    mask: np.ndarray,
    max_panels: int = 16,
    columns: int = 4,
    panel_size: int = 256,
    box: Sequence[float] | None = None,
) -> np.ndarray:
    """An RGB montage of up to ``max_panels`` slices with the mask outlined; slices that hold the mask first.

    ``image`` is uint8 ``(y, x)``, ``(y, x, 3)`` or ``(z, y, x)``; ``mask`` has its spatial shape. ``box`` (the
    prompt: ``x0, y0, x1, y1``, or ``x0, y0, z0, x1, y1, z1`` for a volume) is drawn in cyan on the slices it
    spans. An empty mask is written on every panel, so that it cannot be mistaken for a missed outline.
    """
    volume, masks = (image[None], mask[None]) if mask.ndim == 2 else (image, mask)
    if volume.shape[:3] != masks.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the image's {image.shape}")
    holding = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    candidates = holding if holding.size else np.arange(len(volume))
    picks = np.linspace(0, len(candidates) - 1, min(max_panels, len(candidates))).round().astype(int)
    chosen = candidates[np.unique(picks)]
    empty = "" if holding.size else "EMPTY MASK"  # say so on the picture, not only on the terminal
    labels = [" ".join(filter(None, (f"z={z}" if len(volume) > 1 else "", empty))) for z in chosen]
    panels = [
        _outlined_panel(volume[z], masks[z], panel_size, label, _box_on_slice(box, z))
        for z, label in zip(chosen, labels)
    ]
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    height, width = panels[0].shape[:2]
    montage = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        montage[row * height : (row + 1) * height, column * width : (column + 1) * width] = panel
    return montage


def _box_on_slice(box: Sequence[float] | None, z: int) -> tuple[float, float, float, float] | None:
    """The 2D box to draw on slice ``z``: a 2D box everywhere, a 3D box on the slices it spans."""
    if box is None:
        return None
    if len(box) == 4:
        return tuple(box)
    x0, y0, z0, x1, y1, z1 = box
    return (x0, y0, x1, y1) if z0 <= z <= z1 else None


def _outlined_panel(
    image: np.ndarray,
    mask: np.ndarray,
    panel_size: int,
    label: str,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """One slice scaled to fit ``panel_size``, the mask's outline drawn in orange at display resolution, the box
    prompt in cyan, the label in yellow (red when it reports an empty mask)."""
    scale = panel_size / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    panel = Image.fromarray(gray_to_rgb(image)).resize(size, Image.Resampling.BILINEAR)
    shown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    outline = shown & ~ndimage.binary_erosion(shown, iterations=2)
    pixels = np.array(panel)
    pixels[outline] = MASK_COLOUR
    panel = Image.fromarray(pixels)
    draw = ImageDraw.Draw(panel)
    if box is not None:
        x0, y0, x1, y1 = (value * scale for value in box)
        draw.rectangle((x0, y0, x1 + scale - 1, y1 + scale - 1), outline=PROMPT_COLOUR)
    if label:
        draw.text((4, 4), label, fill=(255, 64, 64) if "EMPTY" in label else (255, 255, 0))
    return np.asarray(panel)


def empty_mask_reason(image: np.ndarray, region: tuple[slice, ...]) -> str:
    """Why a mask may have come out empty, judged from the uint8 ``image`` the model saw and the prompt's ``region``."""
    if image.min() == image.max():
        return (
            f"the image is constant ({int(image.min())} everywhere) after the intensity rule: check the modality "
            "and window (--modality, --window) and the input's values"
        )
    inside = image[region]
    if inside.size and inside.min() == inside.max():
        return (
            f"the box covers a constant region ({int(inside.min())}): check the box coordinates (x = column, y = row)"
        )
    return "the model found no object in the box"


def save_overlay(
    path: str | os.PathLike, image: np.ndarray, mask: np.ndarray, overwrite: bool = False, **montage_kwargs
) -> None:
    """Write :func:`overlay_montage` as a PNG, atomically."""
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"{path}: the overlay is written as PNG; give a .png path")
    montage = Image.fromarray(overlay_montage(image, mask, **montage_kwargs))
    atomic_write(path, lambda tmp: montage.save(tmp, format="PNG", optimize=True), overwrite)
