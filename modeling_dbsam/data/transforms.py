"""Rows of the MedSAM schema to model inputs: the transform for ``Dataset.with_transform``.

The output equals what the model's own ``SamProcessor`` gives for the same image, mask and box,
bit for bit. ``SamImageProcessorPil`` spends ~60 ms per 256 -> 1024 image, mostly on channel-first
float normalisation, float64 rescaling, resizing three channels and stacking lists into arrays.
Here an image whose channels are equal (every CT/MR slice) is resized once with the same PIL call,
and rescale + normalise become a 256-entry lookup table per channel computed by the processor's own
``rescale``/``normalize``, written straight into the batch tensor: about 9 ms per image (see
docs/benchmarks.md, "Data pipeline"). Any other image processor falls back to calling the processor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate, get_worker_info
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from modeling_dbsam.boxes import box_prompt
from modeling_dbsam.data.schema import check_object_mask

PASSTHROUGH = ("task", "case_id", "slice_index", "label")


def example_rng(seed: int, epoch: int, task: str, case_id: str, slice_index: int, label: int) -> np.random.Generator:
    """The generator for one example's box jitter in one epoch: fixed by what the example is, not where it sits,
    so shuffling, worker count and resuming do not change the boxes."""
    identity = f"{task}\0{case_id}\0{slice_index}\0{label}".encode()
    key = int.from_bytes(hashlib.blake2b(identity, digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, key])


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it lives in shared memory (as ``default_collate``
    allocates its output there), so that handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


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

    Returns, for a batch of B rows:

    - ``pixel_values``: (B, 3, S, S) float32, normalised and padded exactly as ``processor`` does
      (S = the processor's padded size: 1024 for ViT-B, 32 for the tiny test model);
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
        passthrough: Sequence[str] = PASSTHROUGH,
    ):
        if max_shift < 0 or (fixed_shift is not None and fixed_shift < 0):
            raise ValueError(f"shifts must be >= 0, got max_shift={max_shift}, fixed_shift={fixed_shift}")
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", processor)
        self.max_shift, self.fixed_shift, self.shift_resolution = max_shift, fixed_shift, shift_resolution
        self.seed, self.epoch = seed, epoch
        self.passthrough = tuple(passthrough)
        ip = self.image_processor
        self.fast = isinstance(ip, SamImageProcessorPil) and ip.do_resize and ip.do_pad
        if self.fast:
            self.lut = self._lookup_table()

    def set_epoch(self, epoch: int) -> None:
        """Draw new jitter for every example from now on (call once per epoch)."""
        self.epoch = epoch

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

    def _resized_shape(self, shape: tuple[int, int], longest_edge: int) -> tuple[int, int]:
        return self.image_processor._get_preprocess_shape(shape, longest_edge)

    def _boxes(self, batch: dict, masks: list[np.ndarray]) -> np.ndarray:
        boxes = []
        for index, mask in enumerate(masks):
            rng = None
            if self.fixed_shift is None and self.max_shift > 0:
                rng = example_rng(
                    self.seed,
                    self.epoch,
                    batch["task"][index],
                    batch["case_id"][index],
                    batch["slice_index"][index],
                    batch["label"][index],
                )
            boxes.append(box_prompt(mask, self.max_shift, rng, self.fixed_shift, self.shift_resolution))
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
        boxes = self._boxes(batch, masks)
        outputs = self._fast(images, masks, boxes) if self.fast else self._with_processor(images, masks, boxes)
        outputs.update({name: list(batch[name]) for name in self.passthrough})
        return outputs

    def _fast(self, images: list[np.ndarray], masks: list[np.ndarray], boxes: np.ndarray) -> dict:
        ip = self.image_processor
        pad_h, pad_w = ip.pad_size["height"], ip.pad_size["width"]
        mask_pad_h, mask_pad_w = ip.mask_pad_size["height"], ip.mask_pad_size["width"]
        count = len(images)
        pixel_values = _batch_tensor((count, 3, pad_h, pad_w))
        labels = _batch_tensor((count, 1, mask_pad_h, mask_pad_w)).zero_()
        original, reshaped = torch.empty(count, 2, dtype=torch.int64), torch.empty(count, 2, dtype=torch.int64)
        for index, (image, mask) in enumerate(zip(images, masks)):
            height, width = image.shape[:2]
            new_h, new_w = self._resized_shape((height, width), ip.size["longest_edge"])
            if new_h > pad_h or new_w > pad_w:
                raise ValueError(f"resized image {new_h} x {new_w} exceeds the processor's pad size {pad_h} x {pad_w}")
            original[index] = torch.tensor([height, width])
            reshaped[index] = torch.tensor([new_h, new_w])
            self._write_pixels(pixel_values[index], image, new_h, new_w)
            mask_h, mask_w = self._resized_shape((height, width), ip.mask_size["longest_edge"])
            small = Image.fromarray(mask).resize((mask_w, mask_h), Image.Resampling.NEAREST)
            labels[index, 0, :mask_h, :mask_w] = torch.from_numpy(np.asarray(small, dtype=np.float32))
            boxes[index] *= [new_w / width, new_h / height, new_w / width, new_h / height]
        return {
            "pixel_values": pixel_values,
            "original_sizes": original,
            "reshaped_input_sizes": reshaped,
            "input_boxes": torch.from_numpy(boxes.astype(np.float32))[:, None, :],
            "labels": labels,
        }

    def _write_pixels(self, target: torch.Tensor, image: np.ndarray, new_h: int, new_w: int) -> None:
        """Resize with the processor's PIL filter, then look up normalised values into ``target`` (3, S, S)."""
        resample = self.image_processor.resample
        gray = np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
        if gray:  # PIL resizes each channel alike: resizing one is exact and 3x cheaper
            resized = Image.fromarray(image[..., 0]).resize((new_w, new_h), resample)
            plane = torch.from_numpy(np.asarray(resized, dtype=np.int32)).view(-1)
            indices = [plane] * 3
        else:
            resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
            planes = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.int32))
            indices = [planes[c].view(-1) for c in range(3)]
        full = (new_h, new_w) == tuple(target.shape[1:])
        if not full:
            target.zero_()
        for channel, index in enumerate(indices):
            if full:
                torch.index_select(self.lut[channel], 0, index, out=target[channel].view(-1))
            else:
                target[channel, :new_h, :new_w] = self.lut[channel][index].view(new_h, new_w)

    def _with_processor(self, images: list[np.ndarray], masks: list[np.ndarray], boxes: np.ndarray) -> dict:
        inputs = self.processor(
            images=images, segmentation_maps=masks, input_boxes=[[box.tolist()] for box in boxes], return_tensors="pt"
        )
        return {
            "pixel_values": inputs["pixel_values"].float(),
            "original_sizes": inputs["original_sizes"],
            "reshaped_input_sizes": inputs["reshaped_input_sizes"],
            "input_boxes": inputs["input_boxes"].float(),
            "labels": inputs["labels"].float()[:, None],
        }
