"""Box-prompted mask prediction for a batch of images: the one forward path shared by evaluation,
the promptable pipeline and volume inference.

The image encoder runs once per image, however many boxes the image has; the prompt encoder and
mask decoder then run on the cached embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import SamModel, SamProcessor


@dataclass
class BoxPrediction:
    """Masks at the image's own size and their predicted IoU, one row per input box."""

    masks: np.ndarray  # (n_boxes, H, W) bool
    scores: np.ndarray  # (n_boxes,) float32
    low_res_logits: np.ndarray  # (n_boxes, 4*grid, 4*grid) float32: the decoder's raw output


def check_boxes(boxes: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """Validate ``(n, 4)`` boxes ``x0, y0, x1, y1`` in pixels against an image of shape ``(H, W)``."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4) as x0, y0, x1, y1; got {boxes.shape}")
    height, width = image_shape
    for box in boxes:
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box {box.tolist()} is inverted or empty: need x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"box {box.tolist()} lies outside the image of width {width} and height {height}")
    return boxes


def boxes_to_model_frame(boxes: np.ndarray, original_size, reshaped_size) -> torch.Tensor:
    """Scale pixel boxes to the resized image the encoder sees, as ``SamProcessor`` does for its inputs."""
    (old_h, old_w), (new_h, new_w) = (int(s) for s in original_size), (int(s) for s in reshaped_size)
    scale = torch.tensor([new_w / old_w, new_h / old_h, new_w / old_w, new_h / old_h], dtype=torch.float32)
    return torch.as_tensor(boxes, dtype=torch.float32) * scale


@torch.inference_mode()
def predict_boxes(
    model: SamModel,
    processor: SamProcessor,
    images: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> list[BoxPrediction]:
    """Segment each image with its boxes (``images[i]`` is H x W x 3 uint8, ``boxes[i]`` is (n_i, 4) in pixels).

    Images go through the encoder ``batch_size`` at a time; each image's boxes are decoded
    together on its cached embedding. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the
    model under autocast on its device.
    """
    if len(images) != len(boxes):
        raise ValueError(f"got {len(images)} images but {len(boxes)} box arrays")
    device = next(model.parameters()).device
    results: list[BoxPrediction] = []
    for start in range(0, len(images), batch_size):
        chunk = [np.asarray(image) for image in images[start : start + batch_size]]
        chunk_boxes = [check_boxes(b, image.shape[:2]) for image, b in zip(chunk, boxes[start : start + batch_size])]
        inputs = processor(images=chunk, return_tensors="pt")
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            embeddings = model.get_image_embeddings(inputs["pixel_values"].to(device))
            for index, image_boxes in enumerate(chunk_boxes):
                original_size = inputs["original_sizes"][index : index + 1]
                reshaped_size = inputs["reshaped_input_sizes"][index : index + 1]
                model_boxes = boxes_to_model_frame(image_boxes, original_size[0], reshaped_size[0])
                output = model(
                    image_embeddings=embeddings[index : index + 1],
                    input_boxes=model_boxes[None].to(device),
                    multimask_output=False,
                )
                logits = output.pred_masks[0, :, 0].float()  # (n_boxes, h, w)
                masks = processor.post_process_masks(
                    [logits[:, None].cpu()], original_size, reshaped_size, binarize=True
                )[0][:, 0]
                results.append(
                    BoxPrediction(
                        masks=masks.numpy().astype(bool),
                        scores=output.iou_scores[0, :, 0].float().cpu().numpy(),
                        low_res_logits=logits.cpu().numpy(),
                    )
                )
    return results
