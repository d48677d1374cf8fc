"""SamPixels: the processor's pixel values bit for bit, and uint8 + normalise equal to normalising at once."""

import numpy as np
import pytest
import torch
from tiny import TINY_IMAGE_SIZE, tiny_processor
from transformers import SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from modeling_dbsam.pixels import SamPixels


def _images(shapes, rgb, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for height, width in shapes:
        plane = rng.integers(0, 256, (height, width, 3 if rgb else 1), dtype=np.uint8)
        images.append(plane if rgb else np.repeat(plane, 3, axis=-1))
    return images


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("full_size", [False, True])
def test_pixels_equal_the_processor_and_uint8_then_normalise_equals_both(rgb, full_size):
    processor = SamProcessor(image_processor=SamImageProcessorPil()) if full_size else tiny_processor()
    side = 1024 if full_size else TINY_IMAGE_SIZE
    images = _images([(64, 64), (48, 80), (90, 40)], rgb)
    pixels = SamPixels(processor)
    reference = processor(images=images, return_tensors="pt")
    normalised = pixels(images)
    raw = pixels(images, normalize=False)
    for key in ("original_sizes", "reshaped_input_sizes"):
        assert torch.equal(normalised[key], reference[key]) and torch.equal(raw[key], reference[key])
    assert normalised["pixel_values"].dtype == torch.float32
    assert torch.equal(normalised["pixel_values"], reference["pixel_values"])
    assert raw["pixel_values"].dtype == torch.uint8 and raw["pixel_values"].shape == (3, 3, side, side)
    # 48 x 80 becomes 3/5 as tall as wide: the rows below it are padding, zero in uint8.
    height = int(reference["reshaped_input_sizes"][1, 0])
    assert height < side and not raw["pixel_values"][1, :, height:].any()
    again = pixels.normalize(raw["pixel_values"], raw["reshaped_input_sizes"])
    assert torch.equal(again, reference["pixel_values"])


def test_uint8_values_are_the_resized_image():
    """Known answer: a constant image resizes to the same constant; the padding stays zero."""
    pixels = SamPixels(tiny_processor())
    raw = pixels([np.full((16, 32, 3), 200, np.uint8)], normalize=False)["pixel_values"][0]
    assert (raw[:, :16] == 200).all() and (raw[:, 16:] == 0).all()
    ip = tiny_processor().image_processor
    expected = (200 / 255 - np.asarray(ip.image_mean)) / np.asarray(ip.image_std)
    normalised = pixels.normalize(raw[None], torch.tensor([[16, 32]]))[0]
    assert torch.allclose(normalised[:, 0, 0], torch.tensor(expected, dtype=torch.float32))
    assert (normalised[:, 16:] == 0).all()


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="SamImageProcessorPil with resizing and padding"):
        SamPixels(SamImageProcessorPil(do_pad=False))
    pixels = SamPixels(tiny_processor())
    with pytest.raises(ValueError, match=r"image 0 must be H x W x 3 uint8, got \(8, 8\) uint8"):
        pixels([np.zeros((8, 8), np.uint8)])
    raw = pixels([np.zeros((8, 8, 3), np.uint8)], normalize=False)
    with pytest.raises(ValueError, match="uint8 pixel values, got .* torch.float32"):
        pixels.normalize(raw["pixel_values"].float(), raw["reshaped_input_sizes"])
    with pytest.raises(ValueError, match=r"reshaped_input_sizes must be \(1, 2\), got \(2,\)"):
        pixels.normalize(raw["pixel_values"], raw["reshaped_input_sizes"][0])
