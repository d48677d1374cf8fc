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

DB-SAM's convolution branch reads its own image, ``I_conv`` (``conv_pixel_values``): the native image
resized once, directly, to the branch's ``conv_input_size`` (paper section 2.2), by the same resize, pad
and normalise rule as ``pixel_values``: what the processor itself returns when called with
``size={"longest_edge": C}, pad_size={"height": C, "width": C}``. :func:`conv_input_size` says
whether a model takes one and at which size.
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


def conv_input_size(model) -> int | None:
    """The side of ``I_conv`` that ``model`` (or its config) reads, or ``None`` when it has no convolution branch.

    A model without one (plain ``SamModel``, DB-SAM with ``use_conv_branch=False``) must not be given
    ``conv_pixel_values``: its encoder refuses them. Every caller asks here, so the rule lives in one place.
    """
    config = getattr(model, "config", model)
    return int(config.conv_input_size) if getattr(config, "use_conv_branch", False) else None


def resized_shape(image_processor, shape: tuple[int, int], longest_edge: int) -> tuple[int, int]:
    """The processor's ``(height, width)`` for an image of ``shape`` scaled so its longest side is ``longest_edge``.

    An image so thin that its short side would round to 0 pixels cannot be resized and padded like the
    others: that is an error naming the image's shape, not an empty tensor.
    """
    new_h, new_w = image_processor._get_preprocess_shape(tuple(shape), longest_edge)
    if min(new_h, new_w) < 1:
        raise ValueError(
            f"an image of {shape[0]} x {shape[1]} pixels cannot be scaled to a longest side of {longest_edge}: "
            f"its short side would be 0 pixels (aspect ratio above {2 * longest_edge}:1); crop or pad it first"
        )
    return new_h, new_w


def processor_conv_pixel_values(processor, images: Sequence[np.ndarray], conv_size: int) -> torch.Tensor:
    """``I_conv`` from any SAM image processor: the processor itself, asked for ``conv_size`` instead of its size.

    The definition that :meth:`SamPixels.conv_pixel_values` reproduces bit for bit, and the path for
    image processors it does not support.
    """
    image_processor = _image_processor(processor)
    for image in images:
        resized_shape(image_processor, np.shape(image)[:2], conv_size)
    inputs = image_processor(
        images=list(images),
        size={"longest_edge": conv_size},
        pad_size={"height": conv_size, "width": conv_size},
        return_tensors="pt",
    )
    return inputs["pixel_values"].float()


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
        (default: the image size; pass ``mask_size["longest_edge"]`` for labels, ``conv_size`` for ``I_conv``)."""
        return resized_shape(self.image_processor, shape, longest_edge or self.image_processor.size["longest_edge"])

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

    def __call__(
        self, images: Sequence[np.ndarray], normalize: bool = True, conv_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Resize and pad H x W x 3 uint8 images into one (B, 3, S, S) batch: float32 normalised exactly as
        the processor does, or, with ``normalize=False``, uint8 with zero padding for :meth:`normalize`.

        With ``conv_size`` (:func:`conv_input_size` of the model) the result also holds
        ``conv_pixel_values``, the convolution branch's ``I_conv`` (see :meth:`conv_pixel_values`).
        """
        images = self._checked(images)
        height, width = self.pad_size
        pixel_values, reshaped = self._resize_and_pad(images, None, (height, width), normalize)
        original = torch.tensor([image.shape[:2] for image in images], dtype=torch.int64).reshape(-1, 2)
        outputs = {"pixel_values": pixel_values, "original_sizes": original, "reshaped_input_sizes": reshaped}
        if conv_size is not None:
            outputs["conv_pixel_values"] = self.conv_pixel_values(images, conv_size, normalize)
        return outputs

    def conv_pixel_values(self, images: Sequence[np.ndarray], conv_size: int, normalize: bool = True) -> torch.Tensor:
        """``I_conv``: (B, 3, C, C) for ``C = conv_size``, each image resized once from its own size.

        The longest side becomes ``C`` with the processor's filter (no resampling at all when it already
        is ``C``), the rest is zero padding at the bottom and right, values normalised as for
        ``pixel_values``; with ``normalize=False`` uint8, for :meth:`normalize_conv` on the accelerator.
        Equal, bit for bit, to :func:`processor_conv_pixel_values`.
        """
        return self._resize_and_pad(self._checked(images), conv_size, (conv_size, conv_size), normalize)[0]

    @staticmethod
    def _checked(images: Sequence[np.ndarray]) -> list[np.ndarray]:
        checked = [np.asarray(image) for image in images]
        for index, image in enumerate(checked):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {index} must be H x W x 3 uint8, got {image.shape} {image.dtype}")
        return checked

    def _resize_and_pad(
        self, images: list[np.ndarray], longest_edge: int | None, pad: tuple[int, int], normalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch tensor (B, 3, *pad) and each image's resized (height, width)."""
        height, width = pad
        pixel_values = batch_tensor((len(images), 3, height, width), torch.float32 if normalize else torch.uint8)
        reshaped = torch.empty(len(images), 2, dtype=torch.int64)
        for index, image in enumerate(images):
            new_h, new_w = self.resized_shape(image.shape[:2], longest_edge)
            if new_h > height or new_w > width:
                raise ValueError(
                    f"resized image {new_h} x {new_w} exceeds the processor's pad size {height} x {width}"
                )
            reshaped[index] = torch.tensor([new_h, new_w])
            self._write(pixel_values[index], image, new_h, new_w, normalize)
        return pixel_values, reshaped

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

    def normalize_conv(self, conv_pixel_values: torch.Tensor, original_sizes: torch.Tensor) -> torch.Tensor:
        """uint8 ``conv_pixel_values`` from ``normalize=False`` -> float32 ``I_conv``, on their device.

        The valid region of each image follows from its ``original_sizes`` (the batch's (B, 2)) at the
        tensor's side, exactly as :meth:`conv_pixel_values` resized it.
        """
        conv_size = conv_pixel_values.shape[-1]
        sizes = [self.resized_shape(tuple(size), conv_size) for size in original_sizes.tolist()]
        return self.normalize(conv_pixel_values, torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2))

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
