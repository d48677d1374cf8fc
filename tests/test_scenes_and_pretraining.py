"""The scene generator and the small-SAM pretraining script: deterministic, resumable, and what they claim."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling_dbsam.scenes import MIN_OBJECT_PIXELS, generate_scene

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import pretrain_small_sam  # noqa: E402


def test_a_scene_is_a_function_of_its_seed():
    first, again, other = generate_scene(7), generate_scene(7), generate_scene(8)
    assert np.array_equal(first.image, again.image)
    assert len(first.masks) == len(again.masks)
    assert all(np.array_equal(a, b) for a, b in zip(first.masks, again.masks))
    assert not np.array_equal(first.image, other.image)


def test_scene_masks_are_visible_regions_that_never_overlap():
    for seed in range(20):
        scene = generate_scene(seed, size=96)
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        stacked = np.stack(scene.masks).astype(int) if scene.masks else np.zeros((0, 96, 96), int)
        assert stacked.sum(axis=0).max() <= 1  # occlusion: a pixel belongs to at most one object
        minimum = max(4, round(MIN_OBJECT_PIXELS * (96 / 128) ** 2))
        assert all(mask.sum() >= minimum for mask in scene.masks)


def test_training_batches_depend_only_on_seed_and_step():
    processor = pretrain_small_sam.build_sam_processor(pretrain_small_sam.small_sam_config(32), [0.5] * 3, [0.25] * 3)
    make = lambda start: pretrain_small_sam.SceneBatches(processor, seed=3, batch_size=2, objects=2, start_step=start)  # noqa: E731
    from_start, resumed = iter(make(0)), iter(make(1))
    next(from_start)
    a, b = next(from_start), next(resumed)  # step 1 both ways
    for key in ("pixel_values", "input_boxes", "labels"):
        assert torch.equal(a[key], b[key])
    assert a["labels"].shape == (2, 2, 16, 16) and a["input_boxes"].shape == (2, 2, 4)


def test_random_fourier_features_get_meta_scale_and_stay_fixed():
    model = pretrain_small_sam.SamModel(pretrain_small_sam.small_sam_config(32))
    assert model.shared_image_embedding.positional_embedding.std() > 10  # transformers' init, made for loading
    pretrain_small_sam.pytorch_init(model)
    features = model.shared_image_embedding.positional_embedding
    assert 0.5 < features.std() < 1.5 and not features.requires_grad


@pytest.mark.slow
def test_pretraining_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    common = ["--image_size", "32", "--batch_size", "2", "--objects", "2", "--warmup_steps", "1", "--max_steps", "4"]
    common += ["--eval_scenes", "2", "--eval_steps", "100", "--save_steps", "2"]
    assert pretrain_small_sam.main(["--output_dir", str(tmp_path / "straight"), *common]) == 0

    save = pretrain_small_sam.save_checkpoint

    def killed_after_first_save(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_small_sam, "save_checkpoint", killed_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain_small_sam.main(["--output_dir", str(tmp_path / "resumed"), *common])
    monkeypatch.setattr(pretrain_small_sam, "save_checkpoint", save)
    assert not (tmp_path / "resumed" / "model").exists()
    assert pretrain_small_sam.main(["--output_dir", str(tmp_path / "resumed"), *common]) == 0
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    card = json.loads((tmp_path / "straight" / "model" / "pretraining.json").read_text())
    assert card["steps"] == 4 and 0.0 <= card["dice"] <= 1.0


def test_held_out_dice_by_group_partitions_the_objects():
    """The size bands split the objects (their weighted mean is the overall Dice), and so do the occlusion groups."""
    folder = Path(__file__).resolve().parents[1] / "modeling_dbsam" / "pretrained" / "small-sam"
    model = pretrain_small_sam.SamModel.from_pretrained(folder)
    processor = pretrain_small_sam.load_processor(folder)
    scores = pretrain_small_sam.evaluate(model, processor, pretrain_small_sam.held_out_scenes(6, 128))
    groups = scores["dice_by_group"]
    for names in (["0-100 px", "100-400 px", "400-1600 px", "1600+ px"], ["one piece", "occluded into pieces"]):
        present = [groups[name] for name in names if name in groups]
        assert sum(count for _, count in present) == scores["objects"]
        weighted = sum(dice * count for dice, count in present) / scores["objects"]
        assert weighted == pytest.approx(scores["dice"], abs=2e-3)  # the groups' Dice are rounded to 3 digits
