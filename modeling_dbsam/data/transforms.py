"""Rows of the MedSAM schema to model inputs: the transform for ``Dataset.with_transform``.

The output equals what the model's own ``SamProcessor`` gives for the same image, mask and box,
bit for bit; the pixels come from :class:`modeling_dbsam.pixels.SamPixels`, 2-10x cheaper than the
processor (docs/benchmarks.md, "Data pipeline"), and with ``normalize=False`` stay uint8 for normalising on the accelerator. Any other image
processor falls back to calling the processor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from modeling_dbsam.boxes import box_prompt
from modeling_dbsam.data.schema import check_object_mask
from modeling_dbsam.pixels import SamPixels, batch_tensor, processor_conv_pixel_values

PASSTHROUGH = ("task", "case_id", "slice_index", "label")


def example_rng(seed: int, epoch: int, task: str, case_id: str, slice_index: int, label: int) -> np.random.Generator:
    """The generator for one example's box jitter in one epoch: fixed by what the example is, not where it sits,
    so shuffling, worker count and resuming do not change the boxes."""
    identity = f"{task}\0{case_id}\0{slice_index}\0{label}".encode()
    key = int.from_bytes(hashlib.blake2b(identity, digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, key])


def collate_batch(rows: list[dict]) -> dict:
    """``collate_fn`` for a DataLoader over ``dataset.with_transform(SamBoxTransform(...))``.

    ``datasets`` hands the DataLoader one batch as rows that are views of the transform's batch
    tensors; ``default_collate`` copies them into a new tensor (100 MB per 8 ViT-B images). This joins
    such views back without a copy and falls back to ``default_collate`` for anything else.
    """
    joined = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        first = values[0]
        if (
            isinstance(first, torch.Tensor)
            and first.is_contiguous()
            and all(
                isinstance(v, torch.Tensor)
                and v.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                and v.storage_offset() == first.storage_offset() + index * first.numel()
                and v.shape == first.shape
                for index, v in enumerate(values)
            )
        ):
            shape, stride = (len(values), *first.shape), (first.numel(), *first.stride())
            joined[key] = first.as_strided(shape, stride, first.storage_offset())
        else:
            joined[key] = default_collate(values)
    return joined


class SamBoxTransform:
    """Turn a batch of MedSAM-schema rows into ``SamModel`` / ``DBSamModel`` inputs.

    Use as ``dataset.with_transform(SamBoxTransform(processor, max_shift=20, seed=0))`` for training
    (each box side moves outward by ``randint(0, max_shift)`` pixels of a ``shift_resolution``-sized
    image, the paper's 0-20 px at 256) or ``SamBoxTransform(processor, fixed_shift=9)`` for evaluation
    (the authors' +9 px). The jitter of an example depends only on ``(seed, epoch, task, case_id,
    slice_index, label)``: call :meth:`set_epoch` at each epoch (with non-persistent DataLoader
    workers, which copy the transform when each epoch starts), and a resumed run sees the same boxes.
    Pass ``collate_fn=collate_batch`` to the DataLoader to skip a copy of every batch.

    ``horizontal_flip=p`` mirrors image and mask left-right with probability ``p`` before the box is
    drawn, seeded like the jitter (training augmentation; the paper uses none, so the default is 0).

    ``conv_size`` adds DB-SAM's ``I_conv``: pass ``conv_input_size(model)``
    (:func:`modeling_dbsam.pixels.conv_input_size`; ``None`` for a model without a convolution branch).
    The processor does not know it, since it belongs to the model's config.

    Returns, for a batch of B rows:

    - ``pixel_values``: (B, 3, S, S) float32, normalised and padded exactly as ``processor`` does
      (S = the processor's padded size: 1024 for ViT-B, 32 for the tiny test model); with
      ``normalize=False``, uint8 resized and zero-padded, a quarter of the bytes, for
      ``SamPixels(processor).normalize(pixel_values, reshaped_input_sizes)`` on the accelerator;
    - ``conv_pixel_values`` (only with ``conv_size``): (B, 3, C, C), the image resized once, from its own
      size, to ``C = conv_size`` and padded and normalised like ``pixel_values`` (float32, or uint8 with
      ``normalize=False``, for ``SamPixels(processor).normalize_conv(conv_pixel_values, original_sizes)``);
    - ``original_sizes``, ``reshaped_input_sizes``: (B, 2) int64, as the processor returns them;
    - ``input_boxes``: (B, 1, 4) float32, x0, y0, x1, y1 in the S frame (one box per image);
    - ``labels``: (B, 1, M, M) float32 0/1, the mask resized (nearest) and padded as the processor
      does, aligned with ``pred_masks[:, :, 0]`` (M = 4 x the ViT grid: 256 for ViT-B, 64 tiny);
    - the columns in ``passthrough`` (default ``task``, ``case_id``, ``slice_index``, ``label``), as lists.
    """

    def __init__(
        self,
        processor,
        *,
        max_shift: int = 20,
        fixed_shift: int | None = None,
        shift_resolution: int | None = 256,
        seed: int = 0,
        epoch: int = 0,
        horizontal_flip: float = 0.0,
        normalize: bool = True,
        conv_size: int | None = None,
        passthrough: Sequence[str] = PASSTHROUGH,
    ):
        if max_shift < 0 or (fixed_shift is not None and fixed_shift < 0):
            raise ValueError(f"shifts must be >= 0, got max_shift={max_shift}, fixed_shift={fixed_shift}")
        if not 0.0 <= horizontal_flip <= 1.0:
            raise ValueError(f"horizontal_flip is a probability in [0, 1], got {horizontal_flip}")
        self.processor = processor
        self.pixels = SamPixels(processor) if SamPixels.supports(processor) else None
        if not normalize and self.pixels is None:
            raise ValueError(
                "normalize=False needs a SamImageProcessorPil that resizes and pads (SamPixels.supports); "
                f"got {type(getattr(processor, 'image_processor', processor)).__name__}"
            )
        self.max_shift, self.fixed_shift, self.shift_resolution = max_shift, fixed_shift, shift_resolution
        if conv_size is not None and conv_size < 1:
            raise ValueError(f"conv_size must be a positive side in pixels or None, got {conv_size}")
        self.seed, self.epoch, self.normalize, self.conv_size = seed, epoch, normalize, conv_size
        self.horizontal_flip = horizontal_flip
        self.passthrough = tuple(passthrough)

    def set_epoch(self, epoch: int) -> None:
        """Draw new jitter and flips for every example from now on (call once per epoch)."""
        self.epoch = epoch

    def _augment_and_box(self, batch: dict, images: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
        """Flip examples in place where drawn, then draw each box from its (possibly flipped) mask."""
        boxes = []
        for index, mask in enumerate(masks):
            rng = None
            if self.horizontal_flip > 0 or (self.fixed_shift is None and self.max_shift > 0):
                rng = example_rng(
                    self.seed,
                    self.epoch,
                    batch["task"][index],
                    batch["case_id"][index],
                    batch["slice_index"][index],
                    batch["label"][index],
                )
            if self.horizontal_flip > 0 and rng.random() < self.horizontal_flip:
                images[index] = np.ascontiguousarray(images[index][:, ::-1])
                masks[index] = np.ascontiguousarray(mask[:, ::-1])
            boxes.append(box_prompt(masks[index], self.max_shift, rng, self.fixed_shift, self.shift_resolution))
        return np.stack(boxes).astype(np.float64)

    def __call__(self, batch: dict[str, list]) -> dict:
        missing = {"image", "mask", "task", "case_id", "slice_index", "label", *self.passthrough} - set(batch)
        if missing:
            raise ValueError(f"rows lack columns {sorted(missing)} of the MedSAM schema")
        images = [np.asarray(image) for image in batch["image"]]
        masks = []
        for index, (image, mask) in enumerate(zip(images, batch["mask"])):
            source = (
                f"case {batch['case_id'][index]!r} slice {batch['slice_index'][index]} label {batch['label'][index]}"
            )
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"{source}: image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
            masks.append(check_object_mask(np.asarray(mask), image.shape[:2], source))
        boxes = self._augment_and_box(batch, images, masks)
        if self.pixels is not None:
            outputs = self._fast(images, masks, boxes)
        else:
            outputs = self._with_processor(images, masks, boxes)
        outputs.update({name: list(batch[name]) for name in self.passthrough})
        return outputs

    def _fast(self, images: list[np.ndarray], masks: list[np.ndarray], boxes: np.ndarray) -> dict:
        outputs = self.pixels(images, normalize=self.normalize, conv_size=self.conv_size)
        image_processor = self.pixels.image_processor
        pad = image_processor.mask_pad_size
        labels = batch_tensor((len(masks), 1, pad["height"], pad["width"])).zero_()
        for index, mask in enumerate(masks):
            mask_h, mask_w = self.pixels.resized_shape(mask.shape, image_processor.mask_size["longest_edge"])
            small = Image.fromarray(mask).resize((mask_w, mask_h), Image.Resampling.NEAREST)
            labels[index, 0, :mask_h, :mask_w] = torch.from_numpy(np.asarray(small, dtype=np.float32))
        scale = outputs["reshaped_input_sizes"].numpy() / outputs["original_sizes"].numpy()  # (B, 2): y, x
        outputs["input_boxes"] = torch.from_numpy((boxes * scale[:, [1, 0, 1, 0]]).astype(np.float32))[:, None, :]
        outputs["labels"] = labels
        return outputs

    def _with_processor(self, images: list[np.ndarray], masks: list[np.ndarray], boxes: np.ndarray) -> dict:
        inputs = self.processor(
            images=images, segmentation_maps=masks, input_boxes=[[box.tolist()] for box in boxes], return_tensors="pt"
        )
        outputs = {
            "pixel_values": inputs["pixel_values"].float(),
            "original_sizes": inputs["original_sizes"],
            "reshaped_input_sizes": inputs["reshaped_input_sizes"],
            "input_boxes": inputs["input_boxes"].float(),
            "labels": inputs["labels"].float()[:, None],
        }
        if self.conv_size is not None:
            outputs["conv_pixel_values"] = processor_conv_pixel_values(self.processor, images, self.conv_size)
        return outputs
