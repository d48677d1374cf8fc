"""The promptable pipeline, the stock mask-generation pipeline and the intensity settings saved with the processor."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from tiny import count_encoder_calls, save_tiny_dbsam, scrambled_tiny_dbsam, tiny_processor
from transformers import AutoImageProcessor, AutoProcessor, SamProcessor, pipeline
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.pipelines import PIPELINE_REGISTRY

from modeling_dbsam import DBSamModel
from modeling_dbsam.intensity import clip_percentiles, window_ct
from modeling_dbsam.pipelines import TASK, PromptableMaskGenerationPipeline, register_pipelines
from modeling_dbsam.pixels import conv_input_size, processor_conv_pixel_values
from modeling_dbsam.processing import (
    IntensityConfig,
    get_intensity_config,
    load_intensity_config,
    load_processor,
    save_intensity_config,
    set_intensity_config,
    to_model_rgb,
)

register_pipelines()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dbsam(tmp_path_factory.mktemp("dbsam"))


@pytest.fixture(scope="module")
def seg(model_dir):
    return pipeline(TASK, model=model_dir)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :50]
    disc = ((yy - 18) ** 2 + (xx - 22) ** 2 < 120) * 150
    return np.clip(rng.normal(60, 20, (40, 50, 3)) + disc[..., None], 0, 255).astype(np.uint8)


def stock_masks(seg, image, multimask, **prompts):
    """Masks and scores through transformers' own path: processor prompts, full forward from pixel values, and
    I_conv from the processor asked for the convolution branch's size."""
    inputs = seg.processor(images=image, return_tensors="pt", **prompts)
    extra = {k: inputs[k].float() for k in ("input_boxes", "input_points") if k in inputs}
    extra["conv_pixel_values"] = processor_conv_pixel_values(seg.processor, [image], conv_input_size(seg.model))
    if "input_labels" in inputs:
        extra["input_labels"] = inputs["input_labels"]
    with torch.no_grad():
        output = seg.model(pixel_values=inputs["pixel_values"], multimask_output=multimask, **extra)
    masks = seg.processor.post_process_masks(
        output.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    return masks[0].numpy(), output.iou_scores[0].numpy()


def test_pipeline_loads_offline_from_a_saved_folder(seg):
    assert isinstance(seg, PromptableMaskGenerationPipeline)
    assert isinstance(seg.model, DBSamModel)
    # The processor saved with the model, not a 1024 px default, with the PIL backend even where torchvision is.
    assert seg.processor.image_processor.size["longest_edge"] == 32
    assert isinstance(seg.processor.image_processor, SamImageProcessorPil)
    assert PIPELINE_REGISTRY.supported_tasks[TASK]["impl"] is PromptableMaskGenerationPipeline


def test_box_masks_match_transformers_own_path_at_the_original_size(seg, image):
    boxes = [[5, 6, 30, 35], [10, 10, 45, 38]]
    result = seg(image, input_boxes=boxes)
    expected_masks, expected_scores = stock_masks(seg, image, False, input_boxes=[boxes])
    assert result["masks"].shape == (2, 40, 50) and result["masks"].dtype == bool
    assert 0 < result["masks"].mean() < 1  # not a degenerate model
    np.testing.assert_array_equal(result["masks"], expected_masks[:, 0])
    np.testing.assert_allclose(result["scores"], expected_scores[:, 0], atol=1e-5)


def test_point_prompts_match_transformers_own_path(seg, image):
    points, labels = [[[20, 18], [40, 5]]], [[1, 0]]
    result = seg(image, input_points=points, input_labels=labels)  # point-only: three masks by default
    expected_masks, expected_scores = stock_masks(seg, image, True, input_points=[points], input_labels=[labels])
    assert result["masks"].shape == (1, 3, 40, 50)
    np.testing.assert_array_equal(result["masks"], expected_masks)
    np.testing.assert_allclose(result["scores"], expected_scores, atol=1e-5)

    combined = seg(image, input_boxes=[[5, 6, 30, 35]], input_points=points, input_labels=labels)
    expected_masks, _ = stock_masks(
        seg, image, False, input_boxes=[[[5, 6, 30, 35]]], input_points=[points], input_labels=[labels]
    )
    assert combined["masks"].shape == (1, 40, 50)
    np.testing.assert_array_equal(combined["masks"], expected_masks[:, 0])
    assert not np.array_equal(combined["masks"], seg(image, input_boxes=[[5, 6, 30, 35]])["masks"])


def test_one_encoder_pass_per_image_whatever_the_number_of_boxes(seg, image, monkeypatch):
    calls = count_encoder_calls(seg.model, monkeypatch)
    rng = np.random.default_rng(1)
    corners = rng.integers(0, 20, (10, 2))
    boxes = np.concatenate([corners, corners + rng.integers(5, 20, (10, 2))], axis=1).tolist()
    result = seg(image, input_boxes=boxes)
    assert calls == [1]
    # Prompts are decoded independently: each row equals that box on its own.
    for index in (0, 7):
        np.testing.assert_array_equal(result["masks"][index], seg(image, input_boxes=[boxes[index]])["masks"][0])

    calls.clear()
    results = seg([image, image[:30]], input_boxes=[[boxes[0]], [[0, 0, 9, 9], [3, 4, 20, 29], [1, 1, 49, 5]]])
    assert calls == [1, 1]
    assert [r["masks"].shape for r in results] == [(1, 40, 50), (3, 30, 50)]


def test_paths_pil_images_and_arrays_give_the_same_masks(seg, image, tmp_path):
    path = tmp_path / "slice.png"
    Image.fromarray(image).save(path)
    box = [[5, 6, 30, 35]]
    expected = seg(image, input_boxes=box)["masks"]
    np.testing.assert_array_equal(seg(str(path), input_boxes=box)["masks"], expected)
    np.testing.assert_array_equal(seg(Image.fromarray(image), input_boxes=box)["masks"], expected)


def test_16_bit_images_follow_the_saved_ct_window(tmp_path, image):
    ct_dir = save_tiny_dbsam(tmp_path / "ct", modality="CT", window=(40, 400))
    ct_seg = pipeline(TASK, model=ct_dir)
    hu = (image[..., 0].astype(np.int16) * 8 - 1000).astype(np.int16)  # -1000..1040 HU
    windowed = np.clip((hu.astype(np.float64) + 160) / 400 * 255, 0, 255).round().astype(np.uint8)
    np.testing.assert_array_equal(to_model_rgb(hu, get_intensity_config(ct_seg.processor))[..., 1], windowed)
    box = [[5, 6, 30, 35]]
    expected = ct_seg(np.repeat(windowed[..., None], 3, axis=-1), input_boxes=box)["masks"]
    np.testing.assert_array_equal(ct_seg(hu, input_boxes=box)["masks"], expected)
    # A 16-bit file takes the same road: SimpleITK writes uint16 PNGs.
    path = tmp_path / "ct16.png"
    sitk.WriteImage(sitk.GetImageFromArray((hu.astype(np.int32) + 1024).astype(np.uint16)), str(path))
    shifted = ct_seg(str(path), input_boxes=box, modality="CT", intensity_window=(40 + 1024, 400))["masks"]
    np.testing.assert_array_equal(shifted, expected)


def test_16_bit_images_without_a_modality_are_percentile_clipped(seg, image):
    raw = image[..., 0].astype(np.uint16) * 200 + 7
    clipped = clip_percentiles(raw)
    np.testing.assert_array_equal(to_model_rgb(raw, IntensityConfig())[..., 2], clipped)
    box = [[5, 6, 30, 35]]
    expected = seg(np.repeat(clipped[..., None], 3, axis=-1), input_boxes=box)["masks"]
    np.testing.assert_array_equal(seg(raw, input_boxes=box)["masks"], expected)


def test_intensity_settings_round_trip_through_save_and_from_pretrained(tmp_path):
    processor = tiny_processor()
    set_intensity_config(processor, "CT", (60, 160))
    processor.save_pretrained(tmp_path / "a")
    expected = IntensityConfig("CT", (60.0, 160.0))
    for loaded in (
        AutoProcessor.from_pretrained(tmp_path / "a"),
        SamProcessor.from_pretrained(tmp_path / "a"),
        AutoImageProcessor.from_pretrained(tmp_path / "a"),
    ):
        assert get_intensity_config(loaded) == expected
    stored = json.loads((tmp_path / "a" / "processor_config.json").read_text())["image_processor"]
    assert stored["modality"] == "CT" and stored["intensity_window"] == [60.0, 160.0]
    # A re-save by the image processor alone (preprocessor_config.json) keeps them too.
    AutoImageProcessor.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["preprocessor_config.json"]
    assert get_intensity_config(AutoImageProcessor.from_pretrained(tmp_path / "b")) == expected

    save_intensity_config(tmp_path / "a", "CT", "liver")
    assert load_intensity_config(tmp_path / "a") == IntensityConfig("CT", "liver")
    assert window_ct(np.array([60.0]), 60, 160)[0] == IntensityConfig("CT", "liver").to_uint8(np.array([60.0]))[0]
    save_intensity_config(tmp_path / "a", "MR")
    assert load_intensity_config(tmp_path / "a") == IntensityConfig("MR", None)
    assert get_intensity_config(tiny_processor()) == IntensityConfig()
    assert IntensityConfig("CT", [60, 160]) == IntensityConfig("CT", (60.0, 160.0))


@pytest.mark.parametrize(
    ("modality", "window", "message"),
    [("MR", (40, 400), "windows apply to CT only"), ("CT", (40, 0), "width must be positive"),
     ("CT", "spleen", "unknown CT window preset"), (None, (40, 400), "needs a modality"),
     ("CT", (1, 2, 3), "level, width")],
)  # fmt: skip
def test_invalid_intensity_settings_are_refused(modality, window, message):
    with pytest.raises(ValueError, match=message):
        set_intensity_config(tiny_processor(), modality, window)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ({"input_boxes": [[5, 6, 50, 35]]}, "outside the image of width 50"),
        ({"input_boxes": [[-1, 6, 30, 35]]}, "outside the image"),
        ({"input_boxes": [[30, 6, 5, 35]]}, "inverted"),
        ({"input_boxes": [[5, 6, 30]]}, "shape"),
        ({"input_points": [[[20, 40]]]}, "outside the image"),
        ({"input_points": [[[20, 10]]], "input_labels": [[2]]}, "1 \\(foreground\\) or 0"),
        ({"input_points": [[[20, 10], [1, 1]]], "input_labels": [[1]]}, "one per point"),
        ({"input_boxes": [[5, 6, 30, 35]] * 2, "input_points": [[[20, 10]]]}, "box i and point group i"),
        ({}, "no prompt given"),
    ],
)
def test_bad_prompts_fail_before_the_encoder_runs(seg, image, monkeypatch, prompts, message):
    calls = count_encoder_calls(seg.model, monkeypatch)
    with pytest.raises(ValueError, match=message):
        seg(image, **prompts)
    assert calls == []


def test_bad_images_are_refused(seg, image, tmp_path):
    with pytest.raises(ValueError, match="2-channel"):
        seg(image[..., :2], input_boxes=[[5, 6, 30, 35]])
    volume = tmp_path / "volume.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 40, 50), np.int16)), str(volume))
    with pytest.raises(ValueError, match="is a volume"):
        seg(str(volume), input_boxes=[[5, 6, 30, 35]])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot be read"):
        seg(str(broken), input_boxes=[[5, 6, 30, 35]])
    with pytest.raises(ValueError, match="for a list of 2 images"):
        seg([image, image], input_boxes=[[5, 6, 30, 35]])
    with pytest.raises(TypeError, match="unexpected arguments \\['input_box'\\]"):
        seg(image, input_box=[[5, 6, 30, 35]])


def test_a_folder_without_processor_config_names_the_missing_file(tmp_path):
    scrambled_tiny_dbsam().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no processor_config.json or preprocessor_config.json"):
        pipeline(TASK, model=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_processor(tmp_path / "missing")


def test_model_objects_with_a_processor_or_an_image_processor(seg, image):
    box = [[5, 6, 30, 35]]
    expected = seg(image, input_boxes=box)["masks"]
    with_processor = pipeline(TASK, model=seg.model, processor=seg.processor)
    np.testing.assert_array_equal(with_processor(image, input_boxes=box)["masks"], expected)
    with_image_processor = pipeline(TASK, model=seg.model, image_processor=seg.processor.image_processor)
    np.testing.assert_array_equal(with_image_processor(image, input_boxes=box)["masks"], expected)


def test_registration_is_idempotent():
    register_pipelines()
    register_pipelines()
    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()


def test_stock_mask_generation_finds_the_saved_image_processor_and_runs_db_sam(model_dir, image):
    """Everything of SAM's automatic mode up to its final NMS (the only part that needs torchvision)."""
    auto = pipeline("mask-generation", model=model_dir)
    assert isinstance(auto.model, DBSamModel)
    assert auto.image_processor.size["longest_edge"] == 32
    batches = list(auto.preprocess(Image.fromarray(image), points_per_batch=8, points_per_crop=4))
    assert len(batches) == 2 and batches[-1]["is_last"]  # 4 x 4 grid points, 8 per batch
    output = auto.forward(batches[0], pred_iou_thresh=-1.0, stability_score_thresh=0.0)
    # Masks come back run-length encoded at the image's own size, up to three per grid point.
    assert 0 < len(output["masks"]) == len(output["iou_scores"]) <= 3 * 8
    assert all(list(rle["size"]) == [40, 50] for rle in output["masks"])


def test_stock_mask_generation_end_to_end(model_dir, image):
    pytest.importorskip("torchvision", reason="SAM's automatic mask generation needs torchvision's batched_nms")
    auto = pipeline("mask-generation", model=model_dir)
    result = auto(Image.fromarray(image), points_per_batch=8, points_per_crop=4, pred_iou_thresh=-1.0,
                  stability_score_thresh=0.0)  # fmt: skip
    assert len(result["masks"]) == len(result["scores"]) > 0
    assert all(np.asarray(mask).shape == (40, 50) for mask in result["masks"])
