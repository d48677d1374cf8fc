"""The box-prompt transform: parity with SamProcessor, reproducible jitter, shapes the model accepts."""

import datasets
import numpy as np
import pytest
import torch
from tiny import TINY_IMAGE_SIZE, TINY_MASK_SIZE, tiny_processor, tiny_sam_config
from transformers import SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from modeling_dbsam.data import FEATURES, SamBoxTransform, collate_batch
from modeling_dbsam.data.schema import encode_image, make_example
from modeling_dbsam.pixels import SamPixels


def _rows(shapes, rgb=False, seed=0):
    """A dataset of one object per image, through the real Arrow schema (PNG encode and decode)."""
    rng = np.random.default_rng(seed)
    examples = []
    for index, (height, width) in enumerate(shapes):
        plane = rng.integers(0, 256, (height, width, 3 if rgb else 1), dtype=np.uint8)
        image = plane if rgb else np.repeat(plane, 3, axis=-1)
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4 : height // 2 + index, width // 5 : width // 2] = 1
        examples.append(
            make_example(
                encode_image(image, "test"), mask, task="CT Liver", modality="CT", dimension="3D",
                case_id=f"case{index}", slice_index=index, label=1, spacing=None, source="test",
            )
        )  # fmt: skip
    return datasets.Dataset.from_list(examples, features=FEATURES)


def _reference(processor, rows, boxes):
    """What SamProcessor itself makes of the same images, masks and pixel boxes."""
    images = [np.asarray(r["image"]) for r in rows]
    masks = [np.asarray(r["mask"]) for r in rows]
    return processor(
        images=images, segmentation_maps=masks, input_boxes=[[b.tolist()] for b in boxes], return_tensors="pt"
    )


def _pixel_boxes(rows, shift):
    boxes = []
    for row in rows:
        ys, xs = np.nonzero(np.asarray(row["mask"]))
        height, width = np.asarray(row["mask"]).shape
        sx, sy = shift * width / 256, shift * height / 256
        boxes.append(
            np.array(
                [
                    max(0, xs.min() - sx),
                    max(0, ys.min() - sy),
                    min(width - 1, xs.max() + sx),
                    min(height - 1, ys.max() + sy),
                ]
            )
        )
    return boxes


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("full_size", [False, True])
def test_bitwise_parity_with_sam_processor(rgb, full_size):
    processor = SamProcessor(image_processor=SamImageProcessorPil()) if full_size else tiny_processor()
    rows = _rows([(64, 64), (48, 80), (90, 40)], rgb=rgb)
    ours = rows.with_transform(SamBoxTransform(processor, fixed_shift=9))[:]
    reference = _reference(processor, [rows[i] for i in range(3)], _pixel_boxes(rows, 9))
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])
    assert torch.equal(ours["labels"], reference["labels"].float()[:, None])
    assert torch.equal(ours["input_boxes"], reference["input_boxes"].float())
    assert torch.equal(ours["original_sizes"], reference["original_sizes"])
    assert torch.equal(ours["reshaped_input_sizes"], reference["reshaped_input_sizes"])
    side, mask_side = (1024, 256) if full_size else (TINY_IMAGE_SIZE, TINY_MASK_SIZE)
    assert ours["pixel_values"].shape == (3, 3, side, side) and ours["labels"].shape == (3, 1, mask_side, mask_side)
    assert ours["input_boxes"].dtype == torch.float32 and ours["task"] == ["CT Liver"] * 3


def test_fixed_shift_box_known_coordinates():
    rows = _rows([(128, 128)])
    box = rows.with_transform(SamBoxTransform(tiny_processor(), fixed_shift=9))[0]["input_boxes"][0]
    # mask rows 32..63, columns 25..63; +9 px at 256 is +4.5 px at 128; the 128 image becomes 32 px (x 1/4).
    expected = torch.tensor([25 - 4.5, 32 - 4.5, 63 + 4.5, 63 + 4.5]) / 4
    assert torch.allclose(box, expected)


def test_jitter_is_reproducible_per_example_and_epoch():
    rows = _rows([(64, 64)] * 6)
    transform = SamBoxTransform(tiny_processor(), max_shift=20, seed=3)
    first = rows.with_transform(transform)[:]["input_boxes"]
    shuffled = rows.select([5, 3, 1, 0, 2, 4]).with_transform(transform)[:]["input_boxes"]
    assert torch.equal(shuffled, first[[5, 3, 1, 0, 2, 4]])  # order and batch do not change an example's box
    tight = rows.with_transform(SamBoxTransform(tiny_processor(), max_shift=0))[:]["input_boxes"]
    shift = (first - tight) * torch.tensor([-1, -1, 1, 1])  # outward movement of each side, in the 32 px frame
    assert (shift >= 0).all() and (shift <= 20 * 64 / 256 / 2 + 1e-6).all() and (shift > 0).any()
    transform.set_epoch(1)
    assert not torch.equal(rows.with_transform(transform)[:]["input_boxes"], first)
    transform.set_epoch(0)
    assert torch.equal(rows.with_transform(transform)[:]["input_boxes"], first)
    other_seed = rows.with_transform(SamBoxTransform(tiny_processor(), max_shift=20, seed=4))[:]["input_boxes"]
    assert not torch.equal(other_seed, first)


def test_dataloader_batches_feed_the_model_and_workers_agree():
    rows = _rows([(64, 64), (64, 64), (48, 80), (64, 64)])
    transform = SamBoxTransform(tiny_processor(), max_shift=20, seed=0, conv_size=TINY_MASK_SIZE)
    data = rows.with_transform(transform)
    batches = [
        next(iter(torch.utils.data.DataLoader(data, batch_size=4, num_workers=workers, collate_fn=collate)))
        for workers, collate in ((0, None), (0, collate_batch), (2, collate_batch))
    ]
    for other in batches[1:]:
        assert other.keys() == batches[0].keys() and other["case_id"] == batches[0]["case_id"]
        for key in ("pixel_values", "conv_pixel_values", "input_boxes", "labels", "original_sizes", "slice_index"):
            assert torch.equal(other[key], batches[0][key]), key
    batch = batches[0]
    assert batch["case_id"] == ["case0", "case1", "case2", "case3"]
    model = SamModel(tiny_sam_config()).eval()
    with torch.no_grad():
        out = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    assert out.pred_masks.shape == (4, 1, 1, TINY_MASK_SIZE, TINY_MASK_SIZE)
    assert out.pred_masks[:, :, 0].shape == batch["labels"].shape
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.pred_masks[:, :, 0], batch["labels"])
    assert torch.isfinite(loss)


def test_bad_rows_are_refused_with_their_identity():
    rows = _rows([(32, 32)]).to_list()
    transform = SamBoxTransform(tiny_processor())
    batch = {key: [value] for key, value in rows[0].items()}
    batch["image"] = [np.zeros((32, 32, 3), np.uint8)]
    batch["mask"] = [np.full((32, 32), 2, np.uint8)]
    with pytest.raises(ValueError, match="case 'case0' slice 0 label 1: mask must be binary"):
        transform(batch)
    batch["mask"] = [np.zeros((32, 32), np.uint8)]
    with pytest.raises(ValueError, match="case 'case0'.*mask is empty"):
        transform(batch)
    batch["mask"] = [np.ones((32, 31), np.uint8)]
    with pytest.raises(ValueError, match="differs from image shape"):
        transform(batch)
    with pytest.raises(ValueError, match=r"lack columns \['case_id'\]"):
        transform({key: value for key, value in batch.items() if key != "case_id"})
    with pytest.raises(ValueError, match="shifts must be >= 0"):
        SamBoxTransform(tiny_processor(), max_shift=-1)


def test_uint8_output_normalised_later_equals_normalised_output_through_workers():
    rows = _rows([(64, 64), (48, 80), (90, 40), (64, 64)], rgb=False)
    processor = tiny_processor()
    normalised = rows.with_transform(SamBoxTransform(processor, max_shift=20, seed=1))[:]
    loader = torch.utils.data.DataLoader(
        rows.with_transform(SamBoxTransform(processor, max_shift=20, seed=1, normalize=False)),
        batch_size=4,
        num_workers=2,
        collate_fn=collate_batch,
    )
    raw = next(iter(loader))
    assert raw["pixel_values"].dtype == torch.uint8
    for key in ("input_boxes", "labels", "original_sizes", "reshaped_input_sizes"):
        assert torch.equal(raw[key], normalised[key]), key
    pixel_values = SamPixels(processor).normalize(raw["pixel_values"], raw["reshaped_input_sizes"])
    assert torch.equal(pixel_values, normalised["pixel_values"])
    with pytest.raises(ValueError, match="normalize=False needs a SamImageProcessorPil"):
        SamBoxTransform(SamImageProcessorPil(do_pad=False), normalize=False)


def test_horizontal_flip_mirrors_image_mask_and_box():
    rows = _rows([(64, 64), (48, 80)], rgb=True)
    batch = rows[:]
    processor = tiny_processor()
    flipped = SamBoxTransform(processor, fixed_shift=9, horizontal_flip=1.0, conv_size=TINY_MASK_SIZE)(dict(batch))
    mirrored = dict(
        batch,
        image=[np.asarray(image)[:, ::-1] for image in batch["image"]],
        mask=[np.asarray(mask)[:, ::-1] for mask in batch["mask"]],
    )
    expected = SamBoxTransform(processor, fixed_shift=9, conv_size=TINY_MASK_SIZE)(mirrored)
    for key in ("pixel_values", "conv_pixel_values", "labels", "input_boxes", "reshaped_input_sizes"):
        assert torch.equal(flipped[key], expected[key]), key
    # Known answer: the box of the mirrored mask is the mirrored box, x -> (W - 1) - x, in the model's frame.
    plain = SamBoxTransform(processor, fixed_shift=9)(dict(batch))["input_boxes"][:, 0]
    scale = flipped["reshaped_input_sizes"][:, 1] / flipped["original_sizes"][:, 1]
    width = (flipped["original_sizes"][:, 1] - 1) * scale
    assert torch.allclose(flipped["input_boxes"][:, 0, 0], width - plain[:, 2])
    assert torch.allclose(flipped["input_boxes"][:, 0, 2], width - plain[:, 0])
    assert torch.equal(flipped["input_boxes"][:, 0, 1::2], plain[:, 1::2])


def test_random_flips_are_seeded_per_example_and_epoch():
    rows = _rows([(40, 64)] * 12, rgb=True)
    transform = SamBoxTransform(tiny_processor(), max_shift=0, horizontal_flip=0.5, seed=5)
    plain = rows.with_transform(SamBoxTransform(tiny_processor(), max_shift=0))[:]["pixel_values"]
    first = rows.with_transform(transform)[:]["pixel_values"]
    flipped = [not torch.equal(a, b) for a, b in zip(first, plain)]
    assert 0 < sum(flipped) < len(flipped)  # 12 draws at p = 0.5: both outcomes occur for this seed
    reordered = rows.select(list(range(11, -1, -1))).with_transform(transform)[:]["pixel_values"]
    assert torch.equal(reordered, first.flip(0))  # an example's flip does not depend on its position
    transform.set_epoch(1)
    assert not torch.equal(rows.with_transform(transform)[:]["pixel_values"], first)
    with pytest.raises(ValueError, match=r"horizontal_flip is a probability in \[0, 1\], got 1.5"):
        SamBoxTransform(tiny_processor(), horizontal_flip=1.5)
