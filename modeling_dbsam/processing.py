"""The intensity settings saved with every DB-SAM processor, so that inference reproduces training.

``SamProcessor`` stores resizing and normalisation but assumes 8-bit images. Medical scans are
16-bit or float, so each checkpoint's image processor also records how raw values become uint8:

- ``"modality"``: e.g. ``"CT"``, ``"MR"``, ``"PET"``; ``null`` when unknown.
- ``"intensity_window"``: CT only, ``[level, width]`` in HU or a preset name of
  :data:`modeling_dbsam.intensity.CT_WINDOW_PRESETS`; ``null`` for MedSAM's default window.

Both are plain attributes of the image processor, so they are written to, and read back from,
its JSON (``processor_config.json`` under ``"image_processor"``, or ``preprocessor_config.json``)
by the stock ``save_pretrained`` / ``from_pretrained`` with no custom class and no remote code.
The rules themselves live in :mod:`modeling_dbsam.intensity`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from modeling_dbsam.intensity import check_modality, to_uint8
from modeling_dbsam.model_folder import PROCESSOR_FILES, call_loader, check_model_folder, is_hub_id

MODALITY_KEY = "modality"
WINDOW_KEY = "intensity_window"
SIZE_KEY = "dataset_image_size"
"""The slice size the training data was stored at (``null``: native); recorded for reference."""


@dataclass(frozen=True)
class IntensityConfig:
    """How raw image values become the uint8 the model was trained on."""

    modality: str | None = None
    window: tuple[float, float] | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _normalise_window(self.window))  # lists from JSON or a CLI -> tuples
        if self.window is not None and self.modality is None:
            raise ValueError("an intensity window needs a modality (windows apply to CT)")
        if self.modality is not None:
            # The intensity module is the one judge of valid settings: let it reject bad ones.
            check_modality(self.modality)
            to_uint8(np.zeros(1, dtype=np.float32), self.modality, self.window)

    def to_uint8(self, values: np.ndarray) -> np.ndarray:
        """Apply the modality's rule; with no modality, percentile clipping (MedSAM's rule for non-CT)."""
        return to_uint8(values, self.modality or "unspecified", self.window)


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


def set_intensity_config(processor, modality: str | None, window: tuple[float, float] | str | None = None) -> None:
    """Record the intensity rule on a ``SamProcessor`` (or its image processor) before ``save_pretrained``."""
    config = IntensityConfig(modality, window)
    image_processor = _image_processor(processor)
    setattr(image_processor, MODALITY_KEY, config.modality)
    setattr(image_processor, WINDOW_KEY, list(config.window) if isinstance(config.window, tuple) else config.window)


def set_dataset_preprocessing(processor, preprocessing: dict) -> None:
    """Record a dataset's preprocessing rule (its card's ``dbsam_preprocessing``) on the processor to be saved."""
    set_intensity_config(processor, preprocessing.get("modality"), preprocessing.get("intensity_window"))
    setattr(_image_processor(processor), SIZE_KEY, preprocessing.get("image_size"))


def get_intensity_config(processor) -> IntensityConfig:
    """The intensity rule stored on a loaded processor; an empty config if it has none."""
    image_processor = _image_processor(processor)
    return IntensityConfig(getattr(image_processor, MODALITY_KEY, None), getattr(image_processor, WINDOW_KEY, None))


def save_intensity_config(
    folder: str | os.PathLike, modality: str | None, window: tuple[float, float] | str | None = None
) -> None:
    """Add the intensity rule to the processor saved in ``folder``."""
    processor = load_processor(folder)
    set_intensity_config(processor, modality, window)
    processor.save_pretrained(folder)


def load_intensity_config(folder: str | os.PathLike) -> IntensityConfig:
    """Read the intensity rule from the processor saved in ``folder``."""
    return get_intensity_config(load_processor(folder))


def processor_config_path(folder: str | os.PathLike) -> str | None:
    """The processor's JSON in a saved model folder, or ``None`` when the folder has none."""
    for name in PROCESSOR_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_processor(folder: str | os.PathLike):
    """Load the ``SamProcessor`` saved with a model (a folder or a Hub id), with a clear error when it is missing.

    Always the PIL backend: ``AutoProcessor`` would pick the torchvision one where torchvision is
    installed, whose resizing differs slightly, so masks would depend on the environment.
    Raises :class:`~modeling_dbsam.model_folder.ModelFolderError` naming the file that is missing or damaged.
    """
    from transformers import AutoProcessor

    hub = is_hub_id(folder)
    if not hub:
        check_model_folder(folder, need_weights=False, need_config=False)
    return call_loader(folder, hub, AutoProcessor.from_pretrained, folder, backend="pil")


def to_model_rgb(image: np.ndarray, intensity: IntensityConfig) -> np.ndarray:
    """A 2D grayscale or RGB(A) image of any bit depth as the H x W x 3 uint8 the processor expects."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (1, 4):
        image = image[..., :3] if image.shape[-1] == 4 else image[..., 0]  # alpha carries no anatomy
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(
            f"image must be 2D grayscale (H, W) or RGB (H, W, 3); got shape {image.shape}"
            + (" (a 2-channel image)" if image.ndim == 3 and image.shape[-1] == 2 else "")
        )
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return gray_to_rgb(intensity.to_uint8(image))


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """Repeat a grayscale uint8 image into three channels; RGB passes through."""
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def _normalise_window(window) -> tuple[float, float] | str | None:
    if window is None or isinstance(window, str):
        return window
    values = tuple(float(v) for v in window)
    if len(values) != 2:
        raise ValueError(f"intensity window must be (level, width) or a preset name, got {window!r}")
    return values
