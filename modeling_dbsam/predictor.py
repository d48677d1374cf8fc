"""Prompted mask prediction for a batch of images: the one forward path shared by evaluation,
the promptable pipeline and volume inference.

The image encoder runs once per image, however many prompts the image has; the prompt encoder and
mask decoder then run on the cached embeddings. Boxes ``x0, y0, x1, y1`` and points ``x, y`` are
pixel indices of the image as given (x = column, y = row), the convention of
:func:`modeling_dbsam.boxes.mask_to_box` and hence of the training prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import SamModel, SamProcessor

from modeling_dbsam.pixels import SamPixels, conv_input_size, processor_conv_pixel_values


@dataclass
class Prompts:
    """The prompts of one image: ``n`` boxes, or ``n`` groups of ``k`` points, or both (box ``i`` with group ``i``).

    ``labels`` mark each point as foreground (1) or background (0); all foreground if omitted.
    """

    boxes: np.ndarray | None = None  # (n, 4) x0, y0, x1, y1
    points: np.ndarray | None = None  # (n, k, 2) x, y
    labels: np.ndarray | None = None  # (n, k)

    def checked(self, image_shape: tuple[int, int]) -> Prompts:
        """Validated float32/int64 copies with the shapes above, for an image of shape ``(H, W)``."""
        boxes = None if self.boxes is None else check_boxes(self.boxes, image_shape)
        points, labels = (None, None) if self.points is None else check_points(self.points, self.labels, image_shape)
        if boxes is None and points is None:
            raise ValueError("no prompt given: pass boxes and/or points")
        if boxes is not None and points is not None and len(boxes) != len(points):
            raise ValueError(
                f"got {len(boxes)} boxes but {len(points)} point groups: box i and point group i form prompt i"
            )
        return Prompts(boxes, points, labels)

    def __len__(self) -> int:
        return len(self.boxes) if self.boxes is not None else len(self.points)


@dataclass
class MaskPrediction:
    """Masks at the image's own size and their predicted IoU: one row per prompt, one column per mask output."""

    masks: np.ndarray  # (n_prompts, n_masks, H, W) bool
    scores: np.ndarray  # (n_prompts, n_masks) float32
    low_res_logits: np.ndarray  # (n_prompts, n_masks, 4*grid, 4*grid) float32: the decoder's raw output


@dataclass
class BoxPrediction:
    """Masks at the image's own size and their predicted IoU, one row per input box."""

    masks: np.ndarray  # (n_boxes, H, W) bool
    scores: np.ndarray  # (n_boxes,) float32
    low_res_logits: np.ndarray  # (n_boxes, 4*grid, 4*grid) float32: the decoder's raw output


@dataclass
class EncodedImages:
    """Image embeddings with the sizes needed to map prompts in and masks out."""

    embeddings: torch.Tensor  # (n, C, grid, grid) on the model's device
    original_sizes: torch.Tensor  # (n, 2) H, W of each image as given
    reshaped_sizes: torch.Tensor  # (n, 2) H, W after resizing to the encoder's longest side

    def __len__(self) -> int:
        return len(self.embeddings)

    def select(self, index: int) -> EncodedImages:
        return EncodedImages(
            *(t[index : index + 1] for t in (self.embeddings, self.original_sizes, self.reshaped_sizes))
        )


def check_boxes(boxes: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """Validate ``(n, 4)`` boxes ``x0, y0, x1, y1`` (pixel indices) against an image of shape ``(H, W)``."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"boxes must have shape (n, 4) as x0, y0, x1, y1 with n >= 1; got {boxes.shape}")
    height, width = image_shape
    for box in boxes:
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box {box.tolist()} is inverted or empty: need x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
            raise ValueError(
                f"box {box.tolist()} lies outside the image of width {width} and height {height} "
                f"(pixel indices: 0 <= x <= {width - 1}, 0 <= y <= {height - 1})"
            )
    return boxes


def check_points(
    points: np.ndarray, labels: np.ndarray | None, image_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(n, k, 2)`` points (a ``(k, 2)`` array is one group) and their ``(n, k)`` labels."""
    points = np.asarray(points, dtype=np.float32)
    if points.ndim == 2:
        points = points[None]
    if points.ndim != 3 or points.shape[-1] != 2 or points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"points must have shape (n, k, 2) as x, y; got {points.shape}")
    labels = np.ones(points.shape[:2], dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if labels.ndim == 1:
        labels = labels[None]
    if labels.shape != points.shape[:2]:
        raise ValueError(f"labels must have shape {points.shape[:2]} (one per point); got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"point labels must be 1 (foreground) or 0 (background); got {np.unique(labels).tolist()}")
    height, width = image_shape
    outside = (
        (points[..., 0] < 0) | (points[..., 0] > width - 1) | (points[..., 1] < 0) | (points[..., 1] > height - 1)
    )
    if outside.any():
        raise ValueError(
            f"point {points[outside][0].tolist()} lies outside the image of width {width} and height {height}"
        )
    return points, labels


def _to_model_frame(coords: np.ndarray, encoded: EncodedImages) -> torch.Tensor:
    """Scale pixel coordinates (last axis x, y, x, y...) to the resized image the encoder sees, as ``SamProcessor`` does."""
    (old_h, old_w), (new_h, new_w) = encoded.original_sizes[0].tolist(), encoded.reshaped_sizes[0].tolist()
    scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float32).repeat(coords.shape[-1] // 2)
    return torch.as_tensor(coords, dtype=torch.float32) * scale


def _model_dtype_and_device(model: SamModel) -> tuple[torch.dtype, torch.device]:
    """Of a PyTorch model, or of :class:`modeling_dbsam.onnx_runtime.OnnxSamModel` (fp32 on the CPU)."""
    return model.dtype, model.device


@torch.inference_mode()
def encode_images(
    model: SamModel, processor: SamProcessor, images: Sequence[np.ndarray], autocast_dtype: torch.dtype | None = None
) -> EncodedImages:
    """Run the image encoder once on a batch of H x W x 3 uint8 images.

    A DB-SAM with a convolution branch also gets ``I_conv``, resized from each image as given
    (:func:`modeling_dbsam.pixels.conv_input_size`).
    """
    dtype, device = _model_dtype_and_device(model)
    images = [np.asarray(image) for image in images]
    conv_size = conv_input_size(model)
    if SamPixels.supports(processor):  # the processor's values, cheaper; normalised on the device
        pixels = SamPixels(processor)
        on_cpu = device.type == "cpu"
        inputs = pixels(images, normalize=on_cpu, conv_size=conv_size)
        if not on_cpu:
            inputs["pixel_values"] = pixels.normalize(
                inputs["pixel_values"].to(device), inputs["reshaped_input_sizes"]
            )
            if conv_size is not None:
                inputs["conv_pixel_values"] = pixels.normalize_conv(
                    inputs["conv_pixel_values"].to(device), inputs["original_sizes"]
                )
    else:
        inputs = dict(processor(images=images, return_tensors="pt"))
        if conv_size is not None:
            inputs["conv_pixel_values"] = processor_conv_pixel_values(processor, images, conv_size)
    conv_inputs = {}
    if conv_size is not None:  # a model without a convolution branch refuses conv_pixel_values
        conv_inputs["conv_pixel_values"] = inputs["conv_pixel_values"].to(device=device, dtype=dtype)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        embeddings = model.get_image_embeddings(inputs["pixel_values"].to(device=device, dtype=dtype), **conv_inputs)
    return EncodedImages(embeddings, inputs["original_sizes"], inputs["reshaped_input_sizes"])


@torch.inference_mode()
def decode_prompts(
    model: SamModel,
    processor: SamProcessor,
    encoded: EncodedImages,
    prompts: Prompts,
    multimask_output: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> MaskPrediction:
    """Decode all prompts of one encoded image (``len(encoded) == 1``) in one mask-decoder call."""
    if len(encoded) != 1:
        raise ValueError(f"decode_prompts takes one encoded image, got {len(encoded)}")
    dtype, device = _model_dtype_and_device(model)
    prompts = prompts.checked(tuple(encoded.original_sizes[0].tolist()))
    model_inputs = {}
    if prompts.boxes is not None:
        model_inputs["input_boxes"] = _to_model_frame(prompts.boxes, encoded)[None].to(device=device, dtype=dtype)
    if prompts.points is not None:
        model_inputs["input_points"] = _to_model_frame(prompts.points, encoded)[None].to(device=device, dtype=dtype)
        model_inputs["input_labels"] = torch.as_tensor(prompts.labels)[None].to(device)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output = model(image_embeddings=encoded.embeddings, multimask_output=multimask_output, **model_inputs)
    logits = output.pred_masks[0].float().cpu()  # (n_prompts, n_masks, h, w)
    masks = processor.post_process_masks([logits], encoded.original_sizes, encoded.reshaped_sizes, binarize=True)[0]
    return MaskPrediction(
        masks=masks.numpy().astype(bool),
        scores=output.iou_scores[0].float().cpu().numpy(),
        low_res_logits=logits.numpy(),
    )


def predict_prompts(
    model: SamModel,
    processor: SamProcessor,
    images: Sequence[np.ndarray],
    prompts: Sequence[Prompts],
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    multimask_output: bool = False,
    progress: bool = False,
) -> list[MaskPrediction]:
    """Segment each image (H x W x 3 uint8) with its prompts.

    Every image's prompts are checked before the encoder runs. Images go through the encoder
    ``batch_size`` at a time; each image's prompts are decoded together on its cached embedding.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the model under autocast on its device.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompt sets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = [np.asarray(image) for image in images]
    prompts = [p.checked(image.shape[:2]) for image, p in zip(images, prompts)]
    results: list[MaskPrediction] = []
    with tqdm(total=len(images), desc="segmenting", unit="image", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            encoded = encode_images(model, processor, images[start : start + batch_size], autocast_dtype)
            for index, image_prompts in enumerate(prompts[start : start + batch_size]):
                results.append(
                    decode_prompts(
                        model, processor, encoded.select(index), image_prompts, multimask_output, autocast_dtype
                    )
                )
                bar.update()
    return results


def predict_boxes(
    model: SamModel,
    processor: SamProcessor,
    images: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[BoxPrediction]:
    """Segment each image (H x W x 3 uint8) with its boxes (``boxes[i]`` is (n_i, 4) in pixels), one mask per box."""
    if len(images) != len(boxes):
        raise ValueError(f"got {len(images)} images but {len(boxes)} box arrays")
    predictions = predict_prompts(
        model, processor, images, [Prompts(boxes=b) for b in boxes], batch_size, autocast_dtype, progress=progress
    )
    return [BoxPrediction(p.masks[:, 0], p.scores[:, 0], p.low_res_logits[:, 0]) for p in predictions]
