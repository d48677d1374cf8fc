"""The one example schema every reader writes, and the checks that guard it.

One example is one object on one 2D slice:

=============  =====================================  ==============================================
column         Arrow feature                          meaning
=============  =====================================  ==============================================
``image``      ``Image(mode="RGB")`` (PNG)            H x W x 3 uint8 after decoding; grayscale
                                                      slices are stored as 1-channel PNG (a third
                                                      of the bytes) and decoded to 3 equal channels
``mask``       ``Image()`` (1-channel PNG)            H x W uint8, 0/1: the one object
``task``       ``Value("string")``                    canonical task name (:mod:`.tasks`) or
                                                      ``"unknown"`` or a user's own task name
``modality``   ``Value("string")``                    e.g. ``"CT"``, ``"MR-T1"``, ``"Ultrasound"``
``dimension``  ``Value("string")``                    ``"2D"`` or ``"3D"``
``case_id``    ``Value("string")``                    unique within a split (patient / volume / image)
``slice_index`` ``Value("int32")``                    slice of the case (0 for 2D images)
``label``      ``Value("int64")``                     the object's label value; an object of a case
                                                      is identified by ``(case_id, label)``
``spacing``    ``List(Value("float64"))``             mm in array order of the stored slices: (z, y, x)
                                                      for volumes, (y, x) for 2D images; None if unknown
=============  =====================================  ==============================================

PNG keeps the Arrow files small (MedSAM's 256 x 256 slices compress 5-10x) and decodes in
about a millisecond; ``benchmarks/bench_data.py`` compares it with fixed-size arrays.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image

FEATURES = datasets.Features(
    {
        "image": datasets.Image(mode="RGB"),
        "mask": datasets.Image(),
        "task": datasets.Value("string"),
        "modality": datasets.Value("string"),
        "dimension": datasets.Value("string"),
        "case_id": datasets.Value("string"),
        "slice_index": datasets.Value("int32"),
        "label": datasets.Value("int64"),
        "spacing": datasets.List(datasets.Value("float64")),
    }
)

PNG_COMPRESS_LEVEL = 1
"""zlib level for stored PNGs: level 1 writes about 2x faster than the default 6 for ~10% more bytes."""


@dataclass(frozen=True)
class EncodedImage:
    """A slice image encoded once as PNG, shared by every object on that slice."""

    png: bytes
    shape: tuple[int, int]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def gray_or_rgb(image: np.ndarray, source: str) -> np.ndarray:
    """``image`` as H x W when it is grayscale (1 channel or 3 equal channels), else H x W x 3.

    An alpha channel is dropped. Anything but uint8 is refused: intensities must already follow
    the modality's rule (:func:`modeling_dbsam.intensity.to_uint8`).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{source}: image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[2] == 3:
        if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
            return np.ascontiguousarray(image[..., 0])
        return np.ascontiguousarray(image)
    if image.ndim != 2:
        raise ValueError(f"{source}: image must be H x W or H x W x 3, got shape {image.shape}")
    return image


def encode_image(image: np.ndarray, source: str) -> EncodedImage:
    """PNG-encode a slice image (see :func:`gray_or_rgb`)."""
    image = gray_or_rgb(image, source)
    return EncodedImage(_png(image), image.shape[:2])


def check_object_mask(mask: np.ndarray, shape: tuple[int, int], source: str) -> np.ndarray:
    """``mask`` as H x W uint8 0/1 holding one non-empty object on an image of ``shape``."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{source}: mask shape {mask.shape} differs from image shape {tuple(shape)}")
    binary = mask.max(initial=0) <= 1 if mask.dtype == np.uint8 else bool(np.isin(mask, (0, 1)).all())
    if not binary:
        raise ValueError(
            f"{source}: mask must be binary (one object, values 0/1), got values {np.unique(mask)[:10].tolist()}; "
            "split label maps into one mask per label value"
        )
    if not mask.any():
        raise ValueError(f"{source}: mask is empty; an example needs one object")
    return mask.astype(np.uint8, copy=False)


def make_example(
    image: EncodedImage,
    mask: np.ndarray,
    *,
    task: str,
    modality: str,
    dimension: str,
    case_id: str,
    slice_index: int,
    label: int,
    spacing: Sequence[float] | None,
    source: str,
) -> dict:
    """One row of :data:`FEATURES`, validated; ``source`` names the file and slice in error messages."""
    if dimension not in ("2D", "3D"):
        raise ValueError(f"{source}: dimension must be '2D' or '3D', got {dimension!r}")
    mask = check_object_mask(mask, image.shape, source)
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) not in (2, 3) or not all(s > 0 for s in spacing):
            raise ValueError(f"{source}: spacing must be 2 or 3 positive values in mm, got {spacing}")
    return {
        "image": {"bytes": image.png, "path": None},
        "mask": {"bytes": _png(mask), "path": None},
        "task": task,
        "modality": modality,
        "dimension": dimension,
        "case_id": case_id,
        "slice_index": int(slice_index),
        "label": int(label),
        "spacing": spacing,
    }


def label_values(label_map: np.ndarray, source: str) -> np.ndarray:
    """Sorted non-zero label values of an integer label map; refuses negative or fractional labels."""
    label_map = np.asarray(label_map)
    if label_map.dtype == bool:
        return np.array([1]) if label_map.any() else np.array([], dtype=np.int64)
    values = np.unique(label_map)
    if not np.issubdtype(label_map.dtype, np.integer) and not np.array_equal(values, np.round(values)):
        raise ValueError(
            f"{source}: label map holds non-integer values, e.g. {values[values != np.round(values)][:5]}"
        )
    if values.size and values[0] < 0:
        raise ValueError(f"{source}: label map holds negative values, e.g. {values[0]}")
    return values[values != 0].astype(np.int64)


def generate_dataset(generator, split: str, gen_kwargs: dict, **kwargs) -> datasets.Dataset:
    """``Dataset.from_generator`` with :data:`FEATURES`, streaming examples into Arrow files.

    A ``ValueError`` raised while reading (a bad file) reaches the caller as itself, not wrapped in
    ``DatasetGenerationError``, so that its message names the file. No example gives an empty dataset.
    """
    try:
        return datasets.Dataset.from_generator(
            generator, features=FEATURES, split=datasets.NamedSplit(split), gen_kwargs=gen_kwargs, **kwargs
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, (ValueError, FileNotFoundError)):
            raise error.__cause__ from None
        raise
    except ValueError as error:  # datasets refuses to build a split that received no example
        if "corresponds to no data" not in str(error):
            raise
        return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES, split=split)
