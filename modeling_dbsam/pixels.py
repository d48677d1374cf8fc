"""SAM's image preprocessing split at the uint8 boundary: resize and pad on the CPU, normalise anywhere.

``SamImageProcessorPil`` spends ~60 ms per 256 -> 1024 image, mostly on channel-first float
normalisation, float64 rescaling, resizing three channels and stacking lists into arrays, and its
output is 12 MB of float32 per image. :class:`SamPixels` gives the same ``pixel_values`` bit for bit:

- an image whose channels are equal (every CT/MR slice) is resized once with the processor's PIL call;
- rescale + normalise become a 256-entry lookup table per channel, computed by the processor's own
  ``rescale`` / ``normalize``;
- everything is written straight into the batch tensor (in shared memory inside DataLoader workers).

With ``normalize=False`` the batch stays uint8 (3 MB per 1024 px image): a data loader then only
resizes, and :meth:`SamPixels.normalize` applies the table on the accelerator, as one gather per channel.
That is what lets two CPU cores feed a ViT-B training step (see docs/benchmarks.md, "Data pipeline").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it lives in shared memory (as ``default_collate``
    allocates its output there), so that handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


class SamPixels:
    """``pixel_values``, ``original_sizes`` and ``reshaped_input_sizes`` of a ``SamImageProcessorPil``, fast.

    >>> pixels = SamPixels(processor)
    >>> inputs = pixels(images)                                   # what processor(images=...) returns
    >>> raw = pixels(images, normalize=False)                     # uint8, resized and zero-padded
    >>> pixel_values = pixels.normalize(raw["pixel_values"].to("cuda"), raw["reshaped_input_sizes"])
    """

    def __init__(self, processor):
        if not self.supports(processor):
            raise TypeError(
                f"SamPixels reproduces SamImageProcessorPil with resizing and padding on; got "
                f"{type(_image_processor(processor)).__name__}: call the processor itself"
            )
        self.image_processor = _image_processor(processor)
        self.table = self._lookup_table()
        self._tables_by_device = {self.table.device: self.table}

    @staticmethod
    def supports(processor) -> bool:
        image_processor = _image_processor(processor)
        return (
            isinstance(image_processor, SamImageProcessorPil) and image_processor.do_resize and image_processor.do_pad
        )

    @property
    def pad_size(self) -> tuple[int, int]:
        return self.image_processor.pad_size["height"], self.image_processor.pad_size["width"]

    def resized_shape(self, shape: tuple[int, int], longest_edge: int | None = None) -> tuple[int, int]:
        """The processor's ``(height, width)`` for an image of ``shape`` scaled to ``longest_edge``
        (default: the image size; pass ``mask_size["longest_edge"]`` for labels)."""
        longest_edge = longest_edge or self.image_processor.size["longest_edge"]
        return self.image_processor._get_preprocess_shape(shape, longest_edge)

    def _lookup_table(self) -> torch.Tensor:
        """(3, 256) float32: the processor's own rescale and normalise applied to every uint8 value."""
        ip = self.image_processor
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # channels-first, as inside
        if ip.do_rescale:
            values = ip.rescale(values, ip.rescale_factor)
        if ip.do_normalize:
            values = ip.normalize(
                values.astype(np.float32) if not ip.do_rescale else values, ip.image_mean, ip.image_std
            )
        return torch.from_numpy(np.ascontiguousarray(values[:, 0, :], dtype=np.float32))

    def __call__(self, images: Sequence[np.ndarray], normalize: bool = True) -> dict[str, torch.Tensor]:
        """Resize and pad H x W x 3 uint8 images into one (B, 3, S, S) batch: float32 normalised exactly as
        the processor does, or, with ``normalize=False``, uint8 with zero padding for :meth:`normalize`."""
        height, width = self.pad_size
        count = len(images)
        pixel_values = batch_tensor((count, 3, height, width), torch.float32 if normalize else torch.uint8)
        original, reshaped = torch.empty(count, 2, dtype=torch.int64), torch.empty(count, 2, dtype=torch.int64)
        for index, image in enumerate(images):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {index} must be H x W x 3 uint8, got {image.shape} {image.dtype}")
            new_h, new_w = self.resized_shape(image.shape[:2])
            if new_h > height or new_w > width:
                raise ValueError(
                    f"resized image {new_h} x {new_w} exceeds the processor's pad size {height} x {width}"
                )
            original[index] = torch.tensor(image.shape[:2])
            reshaped[index] = torch.tensor([new_h, new_w])
            self._write(pixel_values[index], image, new_h, new_w, normalize)
        return {"pixel_values": pixel_values, "original_sizes": original, "reshaped_input_sizes": reshaped}

    def _write(self, target: torch.Tensor, image: np.ndarray, new_h: int, new_w: int, normalize: bool) -> None:
        """Resize with the processor's PIL filter into ``target`` (3, S, S), as table indices or uint8."""
        resample = self.image_processor.resample
        gray = np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
        if gray:  # PIL resizes each channel alike: resizing one is exact and 3x cheaper
            plane = torch.from_numpy(np.array(Image.fromarray(image[..., 0]).resize((new_w, new_h), resample)))
            planes = [plane] * 3
        else:
            resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
            planes = list(torch.from_numpy(resized.transpose(2, 0, 1).copy()))
        target[:, new_h:, :] = 0
        target[:, :new_h, new_w:] = 0
        if not normalize:
            for channel, plane in enumerate(planes):
                target[channel, :new_h, :new_w] = plane
            return
        indices = [planes[0].view(-1).int()] * 3 if gray else [plane.reshape(-1).int() for plane in planes]
        for channel, channel_indices in enumerate(indices):
            self._look_up(channel, channel_indices, target[channel, :new_h, :new_w])

    def _look_up(self, channel: int, indices: torch.Tensor, out: torch.Tensor) -> None:
        """``out[...] = table[channel][indices]``, written in place when ``out`` is contiguous."""
        table = self._tables_by_device.setdefault(out.device, self.table.to(out.device))
        if out.is_contiguous():
            torch.index_select(table[channel], 0, indices, out=out.view(-1))
        else:
            out.copy_(table[channel][indices].view(out.shape))

    def normalize(self, pixel_values: torch.Tensor, reshaped_input_sizes: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 from ``normalize=False`` -> the float32 the processor gives, on their device.

        Padding is zero after normalising, as in the processor, so the valid region of each image is
        taken from ``reshaped_input_sizes``.
        """
        if pixel_values.dtype != torch.uint8 or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"normalize takes (B, 3, S, S) uint8 pixel values, got {tuple(pixel_values.shape)} {pixel_values.dtype}"
            )
        if tuple(reshaped_input_sizes.shape) != (len(pixel_values), 2):
            raise ValueError(
                f"reshaped_input_sizes must be ({len(pixel_values)}, 2), got {tuple(reshaped_input_sizes.shape)}"
            )
        device = pixel_values.device
        normalized = torch.empty(pixel_values.shape, dtype=torch.float32, device=device)
        for index, image in enumerate(pixel_values):
            for channel in range(3):
                self._look_up(channel, image[channel].reshape(-1).int(), normalized[index, channel])
        sizes = reshaped_input_sizes.to(device)
        rows = torch.arange(pixel_values.shape[2], device=device)
        columns = torch.arange(pixel_values.shape[3], device=device)
        valid = (rows[None, :, None] < sizes[:, 0, None, None]) & (columns[None, None, :] < sizes[:, 1, None, None])
        return normalized.masked_fill_(~valid[:, None], 0.0)
