"""The convolution branch's own input I_conv: the native image resized once, in training and inference alike."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_transforms import _rows
from tiny import (
    TINY_MASK_SIZE,
    save_tiny_dbsam,
    scrambled_tiny_dbsam,
    tiny_processor,
    tiny_sam_config,
    tiny_sam_config_dict,
)
from transformers import SamModel, SamProcessor, pipeline
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from modeling_dbsam import DBSamConfig, DBSamModel
from modeling_dbsam.data import SamBoxTransform, collate_batch
from modeling_dbsam.inference import segment_volume
from modeling_dbsam.pipelines import TASK, register_pipelines
from modeling_dbsam.pixels import SamPixels, conv_input_size, processor_conv_pixel_values
from modeling_dbsam.predictor import encode_images, predict_boxes
from modeling_dbsam.processing import gray_to_rgb

register_pipelines()


class _Captured(Exception):
    """Raised by the hook once the branch's input is known: the rest of a 1024 px forward is not needed."""


@contextmanager
def branch_inputs(model, stop: bool = False):
    """Record every tensor the convolution branch receives (hook on its forward) while the block runs."""
    seen = []

    def hook(module, args):
        seen.append(args[0].detach().clone())
        if stop:
            raise _Captured

    handle = model.vision_encoder.conv_branch.register_forward_pre_hook(hook)
    try:
        yield seen
    except _Captured:
        pass
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def vit_b_sized():
    """A DB-SAM with ViT-B's geometry (1024 px input, patch 16, so I_conv is 256 px) and tiny widths,
    with the stock 1024 px processor."""
    config = tiny_sam_config_dict()
    config["vision_config"].update(image_size=1024, patch_size=16)
    config["prompt_encoder_config"].update(image_size=1024, patch_size=16)
    model = DBSamModel(DBSamConfig(**config)).eval()
    assert conv_input_size(model) == 256
    return model, SamProcessor(image_processor=SamImageProcessorPil())


def normalised(image: np.ndarray, processor) -> np.ndarray:
    """(x / 255 - mean) / std, channels first: the expectation, computed without the processor's code."""
    ip = processor.image_processor
    return ((image / 255.0 - np.asarray(ip.image_mean)) / np.asarray(ip.image_std)).transpose(2, 0, 1)


def test_a_256_px_image_reaches_the_branch_as_the_normalised_native_image(vit_b_sized):
    model, processor = vit_b_sized
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    with branch_inputs(model, stop=True) as seen:
        encode_images(model, processor, [image])
    assert seen[0].shape == (1, 3, 256, 256)
    np.testing.assert_allclose(seen[0][0].numpy(), normalised(image, processor), rtol=0, atol=1e-6)
    # Not one pixel resampled: the uint8 I_conv is the image itself.
    raw = SamPixels(processor).conv_pixel_values([image], 256, normalize=False)[0]
    assert torch.equal(raw, torch.from_numpy(image).permute(2, 0, 1))
    # The fallback (from the 1024 px pixel_values) is the low-passed copy the paper's input replaces.
    fallback = model.vision_encoder.conv_input(SamPixels(processor)([image])["pixel_values"])
    assert (fallback - seen[0]).abs().mean() > 0.05


def test_a_512_px_image_is_resized_once_not_twice(vit_b_sized):
    model, processor = vit_b_sized
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    pixels = SamPixels(processor)
    once = np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.BILINEAR))
    assert torch.equal(
        pixels.conv_pixel_values([image], 256, normalize=False)[0], torch.from_numpy(once.copy()).permute(2, 0, 1)
    )
    with branch_inputs(model, stop=True) as seen:
        encode_images(model, processor, [image])
    np.testing.assert_allclose(seen[0][0].numpy(), normalised(once, processor), rtol=0, atol=1e-6)
    up = Image.fromarray(image).resize((1024, 1024), Image.Resampling.BILINEAR)
    twice = np.asarray(up.resize((256, 256), Image.Resampling.BILINEAR))
    assert np.abs(once.astype(int) - twice.astype(int)).mean() > 1.0  # the round trip would differ


def _train_step_branch_input(model, processor, rows, normalize: bool) -> torch.Tensor:
    """The branch's input in a training step: the transform's batch through collate, fed as training/train.py does."""
    transform = SamBoxTransform(
        processor, fixed_shift=9, normalize=normalize, conv_size=conv_input_size(model), passthrough=()
    )
    batch = collate_batch([rows.with_transform(transform)[index] for index in range(len(rows))])
    pixels = SamPixels(processor)
    pixel_values, conv_pixel_values = batch["pixel_values"], batch["conv_pixel_values"]
    if not normalize:
        pixel_values = pixels.normalize(pixel_values, batch["reshaped_input_sizes"])
        conv_pixel_values = pixels.normalize_conv(conv_pixel_values, batch["original_sizes"])
    with branch_inputs(model) as seen, torch.no_grad():
        model(pixel_values=pixel_values, conv_pixel_values=conv_pixel_values, input_boxes=batch["input_boxes"])
    return seen[0]


@pytest.mark.parametrize("normalize", [True, False])
def test_training_and_inference_give_the_branch_the_same_tensor(normalize):
    model, processor = scrambled_tiny_dbsam(), tiny_processor()
    rows = _rows([(64, 64), (48, 80), (90, 40)], rgb=True)  # native, upsampled and downsampled to 64 px
    trained_on = _train_step_branch_input(model, processor, rows, normalize)
    images = [np.asarray(image) for image in rows["image"]]
    boxes = [np.array([[4.0, 4.0, 30.0, 30.0]])] * len(images)
    with branch_inputs(model) as seen:
        predict_boxes(model, processor, images, boxes, batch_size=len(images))
    assert torch.equal(trained_on, seen[-1])
    assert torch.equal(trained_on, processor_conv_pixel_values(processor, images, TINY_MASK_SIZE))
    np.testing.assert_allclose(trained_on[0].numpy(), normalised(images[0], processor), rtol=0, atol=1e-6)


def test_uint8_path_normalised_later_equals_the_normalised_path_and_the_processor():
    processor = tiny_processor()
    rng = np.random.default_rng(2)
    gray = np.repeat(rng.integers(0, 256, (30, 70, 1), dtype=np.uint8), 3, axis=-1)
    images = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), gray, rng.integers(0, 256, (100, 90, 3), np.uint8)]
    pixels = SamPixels(processor)
    raw = pixels(images, normalize=False, conv_size=64)
    assert raw["conv_pixel_values"].dtype == torch.uint8
    later = pixels.normalize_conv(raw["conv_pixel_values"], raw["original_sizes"])
    at_once = pixels(images, conv_size=64)["conv_pixel_values"]
    assert torch.equal(later, at_once)
    assert torch.equal(at_once, processor_conv_pixel_values(processor, images, 64))
    # Padding as for pixel_values: 30 x 70 scales to 27 x 64, the rows below are zero after normalising.
    assert at_once[1, :, 27:].abs().sum() == 0 and (at_once[1, :, 26] != 0).any()
    assert at_once[0, :, :, 48:].abs().sum() == 0


def test_horizontal_flip_flips_i_conv_with_the_image():
    processor = tiny_processor()
    rows = _rows([(64, 48), (64, 64)], rgb=True)  # 64 px long side: I_conv is the image itself, padding right
    plain = SamBoxTransform(processor, fixed_shift=9, conv_size=64)(dict(rows[:]))["conv_pixel_values"]
    flipped = SamBoxTransform(processor, fixed_shift=9, conv_size=64, horizontal_flip=1.0)(dict(rows[:]))
    conv = flipped["conv_pixel_values"]
    assert torch.equal(conv[0, :, :, :48], plain[0, :, :, :48].flip(-1)) and conv[0, :, :, 48:].abs().sum() == 0
    assert torch.equal(conv[1], plain[1].flip(-1))


def test_collate_joins_i_conv_without_a_copy():
    rows = _rows([(64, 64), (48, 80)])
    data = rows.with_transform(SamBoxTransform(tiny_processor(), conv_size=64, passthrough=()))
    batch = data[:]
    joined = collate_batch([{key: value[index] for key, value in batch.items()} for index in range(2)])
    assert joined["conv_pixel_values"].data_ptr() == batch["conv_pixel_values"].data_ptr()
    assert torch.equal(joined["conv_pixel_values"], batch["conv_pixel_values"])


def test_models_without_a_conv_branch_get_no_i_conv():
    plain_sam = SamModel(tiny_sam_config()).eval()
    vit_only = DBSamModel(DBSamConfig(**tiny_sam_config_dict(), use_conv_branch=False, use_fusion=False)).eval()
    assert conv_input_size(plain_sam) is None and conv_input_size(vit_only) is None
    assert conv_input_size(scrambled_tiny_dbsam()) == conv_input_size(scrambled_tiny_dbsam().config) == 64
    image = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for model in (plain_sam, vit_only):  # the encoder would raise if it were given conv_pixel_values
        assert encode_images(model, tiny_processor(), [image]).embeddings.shape[0] == 1
    assert "conv_pixel_values" not in SamBoxTransform(tiny_processor(), conv_size=None)(dict(_rows([(32, 32)])[:]))


def test_mismatched_conv_pixel_values_name_both_shapes():
    model = scrambled_tiny_dbsam()
    pixel_values = torch.zeros(2, 3, 32, 32)
    for conv_shape in ((1, 3, 64, 64), (2, 3, 32, 32)):
        message = rf"conv_pixel_values must have shape \(2, 3, 64, 64\), got \({', '.join(map(str, conv_shape))}\)"
        with pytest.raises(ValueError, match=message):
            model(pixel_values=pixel_values, conv_pixel_values=torch.zeros(conv_shape))


def test_an_image_too_thin_to_pad_as_the_vit_input_is_refused():
    processor = tiny_processor()
    thin = np.zeros((1, 300, 3), np.uint8)  # 1 x 64 / 300 rounds to 0 rows at the 64 px I_conv
    message = r"an image of 1 x 300 pixels cannot be scaled to a longest side of \d+: its short side would be 0"
    with pytest.raises(ValueError, match=message):
        SamPixels(processor)([thin], conv_size=64)
    with pytest.raises(ValueError, match=message):
        processor_conv_pixel_values(processor, [thin], 64)
    with pytest.raises(ValueError, match=message):
        encode_images(scrambled_tiny_dbsam(), processor, [thin])
    # At ViT-B sizes a 1 x 600 image is 2 rows at 1024 px but 0 at the 256 px I_conv: refused there too.
    sam_pixels = SamPixels(SamProcessor(image_processor=SamImageProcessorPil()))
    assert tuple(sam_pixels([np.zeros((1, 600, 3), np.uint8)])["reshaped_input_sizes"][0]) == (2, 1024)
    with pytest.raises(ValueError, match="an image of 1 x 600 pixels cannot be scaled to a longest side of 256"):
        sam_pixels([np.zeros((1, 600, 3), np.uint8)], conv_size=256)
    with pytest.raises(ValueError, match="conv_size must be a positive side"):
        SamBoxTransform(processor, conv_size=0)


def test_the_pipeline_and_volume_inference_give_the_branch_each_native_image(tmp_path):
    model_dir = save_tiny_dbsam(tmp_path / "model", modality="MR")
    seg = pipeline(TASK, model=model_dir)
    processor = seg.processor
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (64, 56, 3), dtype=np.uint8)  # 64 px long side: I_conv is the image itself
    with branch_inputs(seg.model) as seen:
        seg(image, input_boxes=[[5, 5, 40, 40]])
    np.testing.assert_allclose(seen[0][0, :, :, :56].numpy(), normalised(image, processor), rtol=0, atol=1e-6)
    assert seen[0][0, :, :, 56:].abs().sum() == 0

    volume = rng.integers(0, 256, (3, 64, 64)).astype(np.uint8)  # uint8 passes the MR rule unchanged
    with branch_inputs(seg.model) as seen:
        segment_volume(seg.model, processor, volume, box=(5, 5, 0, 40, 40, 2), batch_size=3)
    slices = np.stack([normalised(gray_to_rgb(plane), processor) for plane in volume])
    np.testing.assert_allclose(seen[0].numpy(), slices, rtol=0, atol=1e-6)


def test_processors_sampixels_does_not_support_still_give_the_same_i_conv():
    """An image processor that does not pad takes the processor path; on square images it must agree."""
    unpadded = SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": 32}, mask_size={"longest_edge": TINY_MASK_SIZE}, do_pad=False
        )
    )
    assert not SamPixels.supports(unpadded)
    model = scrambled_tiny_dbsam()
    rows = _rows([(48, 48)], rgb=True)
    image = np.asarray(rows[0]["image"])
    expected = SamPixels(tiny_processor()).conv_pixel_values([image], TINY_MASK_SIZE)
    batch = SamBoxTransform(unpadded, fixed_shift=9, conv_size=conv_input_size(model))(dict(rows[:]))
    assert torch.equal(batch["conv_pixel_values"], expected)
    with branch_inputs(model) as seen:
        encode_images(model, unpadded, [image])
    assert torch.equal(seen[0], expected)
