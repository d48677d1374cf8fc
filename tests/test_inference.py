"""Volume inference (3D boxes, key-slice propagation), the overlay montage and ``dbsam segment``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from brain_slab import FIRST_SLICE, MR
from scipy import ndimage
from tiny import count_encoder_calls, save_tiny_dbsam, scrambled_tiny_dbsam, tiny_processor

from modeling_dbsam.boxes import expand_box, mask_to_box
from modeling_dbsam.cli import main
from modeling_dbsam.commands import segment as segment_command
from modeling_dbsam.inference import overlay_montage, propagate_from_key_slice, save_overlay, segment_volume
from modeling_dbsam.intensity import clip_percentiles
from modeling_dbsam.io import read_image
from modeling_dbsam.predictor import predict_boxes
from modeling_dbsam.processing import IntensityConfig


def ellipsoid(shape=(20, 64, 64), centre=(10, 30, 34), radii=(6, 14, 18)) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


class Untouchable:
    """A model that fails the test if anything uses it: validation must come first."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the input was validated")


@pytest.fixture(scope="module")
def brain():
    """12 axial slices of the real ch2 brain MR (uint8, so intensity passes through)."""
    return read_image(MR).array[70 - FIRST_SLICE : 82 - FIRST_SLICE]


# --- propagation logic, with an oracle in place of the model ---------------------------------------------


def oracle(truth: np.ndarray, requests: list):
    """Segments slice z perfectly inside the box it is given, and records every request."""

    def segment_slice(z, box, direction):
        requests.append((z, box.copy(), direction))
        x0, y0, x1, y1 = np.round(box).astype(int)
        inside = np.zeros(truth.shape[1:], dtype=bool)
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
        return truth[z] & inside

    return segment_slice


def test_propagation_follows_the_object_and_stops_one_slice_past_each_end():
    truth = ellipsoid()
    requests = []
    key_box = mask_to_box(truth[10])
    mask = propagate_from_key_slice(oracle(truth, requests), 10, key_box, truth.shape, margin=3)
    np.testing.assert_array_equal(mask, truth)  # slices 4..16 hold the object
    assert [z for z, _, _ in requests] == [10, *range(11, 18), *range(9, 2, -1)]
    assert [d for _, _, d in requests] == [1] * 8 + [-1] * 7
    # Each slice's box is the previous slice's mask box moved out by 3 px at 256 (0.75 px at 64).
    for z, box, direction in requests[1:]:
        np.testing.assert_allclose(box, expand_box(mask_to_box(truth[z - direction]), (64, 64), np.full(4, 3)))


def test_propagation_stops_at_the_volume_edge_and_an_empty_key_slice():
    truth = ellipsoid(centre=(17, 30, 34))  # the object runs past the last slice
    requests = []
    mask = propagate_from_key_slice(oracle(truth, requests), 18, mask_to_box(truth[18]), truth.shape)
    np.testing.assert_array_equal(mask, truth)
    assert max(z for z, _, _ in requests) == 19
    requests.clear()
    empty = propagate_from_key_slice(oracle(truth, requests), 2, np.array([5, 5, 20, 20.0]), truth.shape)
    assert not empty.any() and [z for z, _, _ in requests] == [2]


def test_propagation_margin_must_be_positive():
    with pytest.raises(ValueError, match="margin must be > 0"):
        propagate_from_key_slice(lambda *a: None, 0, np.array([1, 1, 5, 5.0]), (3, 8, 8), margin=0)


# --- segment_volume with a real (tiny) model ----------------------------------------------------------------


def test_3d_box_equals_slice_by_slice_segmentation(model, processor, brain, monkeypatch):
    calls = count_encoder_calls(model, monkeypatch)
    box = (40, 60, 3, 140, 170, 9)
    mask = segment_volume(model, processor, brain, box=box, batch_size=4)
    assert calls == [4, 3]  # slices 3..9 in batches of 4
    assert mask.shape == brain.shape and mask.dtype == np.uint8
    assert not mask[:3].any() and not mask[10:].any()
    rgb = [np.repeat(s[..., None], 3, axis=-1) for s in brain[3:10]]
    one_by_one = predict_boxes(model, processor, rgb, [np.array([[40, 60, 140, 170]])] * 7, batch_size=1)
    np.testing.assert_array_equal(mask[3:10], np.stack([p.masks[0] for p in one_by_one]))
    assert 0 < mask.mean() < 1


def test_key_slice_propagation_equals_a_manual_walk(model, processor, brain, monkeypatch):
    calls = count_encoder_calls(model, monkeypatch)
    box_2d, key = (50, 60, 130, 160), 6
    mask = segment_volume(model, processor, brain, box_2d=box_2d, key_slice=key, batch_size=3)
    reached = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    assert key in reached

    def by_hand(z, box):
        rgb = np.repeat(brain[z][..., None], 3, axis=-1)
        return predict_boxes(model, processor, [rgb], [np.asarray([box])], batch_size=1)[0].masks[0]

    expected = np.zeros(brain.shape, dtype=bool)
    expected[key] = by_hand(key, box_2d)
    for direction in (1, -1):
        z = key
        while expected[z].any() and 0 <= z + direction < len(brain):
            box = expand_box(mask_to_box(expected[z]), brain.shape[1:], np.full(4, 3))
            z += direction
            expected[z] = by_hand(z, box)
    np.testing.assert_array_equal(mask, expected)
    # Encoded ahead in batches of 3: never more than 2 slices wasted past each end.
    assert all(n <= 3 for n in calls) and sum(calls) <= len(brain)


def test_raw_volumes_are_converted_over_the_whole_volume(model, processor):
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 300.0, (5, 40, 48)).astype(np.float32)
    volume[:, :4] = 0  # background stays 0 and is left out of the percentiles
    box = (5, 6, 1, 40, 35, 3)
    mask = segment_volume(model, processor, volume, box=box, intensity=IntensityConfig("MR"))
    expected = segment_volume(model, processor, clip_percentiles(volume), box=box)
    np.testing.assert_array_equal(mask, expected)
    per_slice = np.stack([clip_percentiles(s) for s in volume])
    assert not np.array_equal(clip_percentiles(volume), per_slice)  # so the test can tell the two apart


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"box": (5, 6, 0, 48, 35, 3)}, "outside the image of width 48"),
        ({"box": (30, 6, 0, 5, 35, 3)}, "inverted"),
        ({"box": (5, 6, 3, 40, 35, 1)}, "z-range 3..1 is inverted"),
        ({"box": (5, 6, 4, 40, 35, 9)}, "outside the volume's slices 0..4"),
        ({"box": (5, 6, 0.5, 40, 35, 2)}, "must be integers"),
        ({"box": (5, 6, 40, 35)}, "needs 6 values"),
        ({"box_2d": (5, 6, 40, 35), "key_slice": 5}, "key slice 5 lies outside"),
        ({"box_2d": (5, 6, 40, 35)}, "pass either"),
        ({}, "pass either"),
    ],
)
def test_bad_volume_boxes_fail_before_the_model_is_used(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        segment_volume(Untouchable(), processor, np.zeros((5, 40, 48), np.int16), **kwargs)


def test_4d_and_multichannel_volumes_are_refused(processor):
    with pytest.raises(ValueError, match="multi-channel or 4D"):
        segment_volume(Untouchable(), processor, np.zeros((5, 40, 48, 2)), box=(1, 1, 0, 9, 9, 1))


# --- overlay --------------------------------------------------------------------------------------------------


def test_overlay_outlines_the_mask_on_the_slices_that_hold_it(tmp_path):
    image = np.full((20, 64, 64), 100, dtype=np.uint8)
    mask = ellipsoid().astype(np.uint8)
    montage = overlay_montage(image, mask, max_panels=4, columns=2, panel_size=64)
    assert montage.shape == (128, 128, 3)
    orange = (montage == (255, 128, 0)).all(axis=-1)
    first = ellipsoid()[4]  # the first of the slices 4..16 that hold the mask
    ring = first & ~ndimage.binary_erosion(first, iterations=2)
    np.testing.assert_array_equal(orange[:64, :64][8:], ring[8:])  # below the slice label
    assert orange[64:, 64:].any()  # the last panel is slice 16, which also holds the mask

    path = tmp_path / "overlay.png"
    save_overlay(path, image, mask)
    with pytest.raises(FileExistsError):
        save_overlay(path, image, mask)
    with pytest.raises(ValueError, match="PNG"):
        save_overlay(tmp_path / "overlay.jpg", image, mask)


# --- dbsam segment --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dbsam(tmp_path_factory.mktemp("cli_model"), modality="CT", window=(40, 400))


def ct_volume(path, shape=(6, 40, 48)):
    """A CT-like volume with non-trivial geometry: anisotropic spacing, an origin and an oblique direction."""
    rng = np.random.default_rng(0)
    values = (rng.normal(0, 30, shape) + ellipsoid(shape, (3, 20, 24), (3, 12, 14)) * 150).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 20.5, 3.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    sitk.WriteImage(image, str(path))
    return image


def assert_same_geometry(written, reference):
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_cli_segments_a_nifti_volume_with_its_geometry(model_dir, tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    reference = ct_volume(scan)
    out, overlay = tmp_path / "liver.nii.gz", tmp_path / "liver.png"
    args = [
        str(scan),
        "--model",
        model_dir,
        "--box",
        "10,8,1,38,32,4",
        "--output",
        str(out),
        "--overlay",
        str(overlay),
    ]
    assert main(["segment", *args, "--batch-size", "3"]) == 0
    written = sitk.ReadImage(str(out))
    assert_same_geometry(written, reference)
    mask = sitk.GetArrayFromImage(written)
    assert set(np.unique(mask)) <= {0, 1} and not mask[0].any() and not mask[5].any()
    volume = sitk.GetArrayFromImage(reference)
    expected = segment_volume(scrambled_tiny_dbsam(), tiny_processor(), volume, box=(10, 8, 1, 38, 32, 4),
                              intensity=IntensityConfig("CT", (40, 400)))  # fmt: skip
    np.testing.assert_array_equal(mask, expected)
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out

    assert main(["segment", *args]) == 2  # outputs exist now
    assert "exists" in capsys.readouterr().err
    assert main(["segment", *args, "--overwrite", "--dtype", "bf16"]) == 0
    in_bf16 = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert not in_bf16[0].any() and (in_bf16 == mask).mean() > 0.9  # autocast moves few boundary voxels


def test_cli_propagates_through_a_dicom_series(model_dir, tmp_path):
    reference = ct_volume(tmp_path / "ref.nii.gz")
    series = tmp_path / "series"
    series.mkdir()
    write_dicom_series(reference, series)
    read_back = read_image(series)
    out = tmp_path / "mask.nrrd"
    assert main(["segment", str(series), "--model", model_dir, "--box-2d", "10,8,38,32", "--key-slice", "3",
                 "--output", str(out)]) == 0  # fmt: skip
    written = sitk.ReadImage(str(out))
    assert_same_geometry(written, read_back.reference)
    expected = segment_volume(scrambled_tiny_dbsam(), tiny_processor(), read_back.array, box_2d=(10, 8, 38, 32),
                              key_slice=3, intensity=IntensityConfig("CT", (40, 400)))  # fmt: skip
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)


def write_dicom_series(image: sitk.Image, folder) -> None:
    """One CT slice per file with the tags GDCM needs to stack them back with their geometry."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3]))
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        position = "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z)))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
                "0020|0037": orientation, "0020|0032": position, "0020|0013": str(z + 1),
                "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}", "0018|0050": str(image.GetSpacing()[2]),
                "0028|1052": "0", "0028|1053": "1"}  # fmt: skip
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)


def test_cli_segments_a_2d_png_as_0_255(model_dir, tmp_path):
    from PIL import Image

    from modeling_dbsam.pipelines import register_pipelines

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "xray.png")
    out = tmp_path / "mask.png"
    assert main(["segment", str(tmp_path / "xray.png"), "--model", model_dir, "--box", "5,6,30,35",
                 "--output", str(out)]) == 0  # fmt: skip
    written = np.asarray(Image.open(out))
    assert written.shape == (40, 50) and set(np.unique(written)) <= {0, 255}
    register_pipelines()
    from transformers import pipeline

    expected = pipeline("promptable-mask-generation", model=model_dir)(pixels, input_boxes=[[5, 6, 30, 35]])
    np.testing.assert_array_equal(written == 255, expected["masks"][0])


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*args):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(segment_command, "load_model_and_processor", refuse)


def bad_input_cases(tmp_path, model_dir):
    scan = tmp_path / "scan.nii.gz"
    ct_volume(scan)
    png = tmp_path / "flat.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 50), np.uint8)), str(png))
    four_d = tmp_path / "4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))] * 2), str(four_d))
    two_channel = tmp_path / "two.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 50, 2), np.uint8), isVector=True), str(two_channel))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    no_processor = tmp_path / "no_processor"
    scrambled_tiny_dbsam().save_pretrained(no_processor)
    existing = tmp_path / "existing.nii.gz"
    existing.write_bytes(b"keep me")
    out = str(tmp_path / "out.nii.gz")
    model = ["--model", model_dir]
    return [
        ([str(scan), *model, "--box", "10,8,1,48,32,4", "--output", out], "--box: box .* outside the image of width 48"),
        ([str(scan), *model, "--box", "38,8,1,10,32,4", "--output", out], "--box: box .* inverted"),
        ([str(scan), *model, "--box", "10,8,4,38,32,1", "--output", out], "--box: box z-range 4..1 is inverted"),
        ([str(scan), *model, "--box", "10,8,6,38,32,9", "--output", out], "--box: .* outside the volume's slices 0..5"),
        ([str(scan), *model, "--box", "10,8,38,32", "--output", out], "--box: .* is a volume"),
        ([str(scan), *model, "--box", "10,8,a,38,32,4", "--output", out], "--box: expected comma-separated numbers"),
        ([str(scan), *model, "--box-2d", "10,8,38,32", "--key-slice", "6", "--output", out], "--box-2d/--key-slice: key slice 6"),
        ([str(scan), *model, "--box-2d", "10,8,38,32", "--output", out], "--box-2d and --key-slice go together"),
        ([str(png), *model, "--box-2d", "1,1,9,9", "--key-slice", "0", "--output", out], "--box: .* is a 2D image"),
        ([str(png), *model, "--box", "1,1,50,9", "--output", out], "--box: box .* outside the image of width 50"),
        ([str(four_d), *model, "--box", "1,1,0,5,5,1", "--output", out], "4D images are not supported"),
        ([str(two_channel), *model, "--box", "1,1,9,9", "--output", out], "2 channels"),
        ([str(broken), *model, "--box", "1,1,0,5,5,1", "--output", out], "broken.nii.gz: corrupt or truncated gzip data"),
        ([str(tmp_path / "missing.nii.gz"), *model, "--box", "1,1,0,5,5,1", "--output", out], "no such file"),
        ([str(tmp_path / "missing.nii.gz"), "--box", "1,1,0,5,5,1", "--output", out], "no such file"),  # default model
        ([str(scan), "--model", str(no_processor), "--box", "10,8,1,38,32,4", "--output", out], "--model .*no processor_config.json"),
        ([str(scan), "--model", str(tmp_path / "nowhere"), "--box", "10,8,1,38,32,4", "--output", out], "--model .*no such model folder"),
        ([str(scan), *model, "--box", "10,8,1,38,32,4", "--output", str(existing)], "--output .*exists; pass overwrite"),
        ([str(scan), *model, "--box", "10,8,1,38,32,4", "--output", str(tmp_path / "m.png")], "--output .*.png cannot hold a 3D mask with its geometry"),
        ([str(png), *model, "--box", "1,1,9,9", "--output", str(tmp_path / "m.jpg")], "--output .*JPEG is lossy"),
        ([str(scan), *model, "--box", "10,8,1,38,32,4", "--output", str(tmp_path / "none" / "m.nii.gz")], "--output .*folder does not exist"),
        ([str(scan), *model, "--box", "10,8,1,38,32,4", "--output", out, "--overlay", str(tmp_path / "o.jpg")], "--overlay .*cannot hold the overlay, a PNG picture; use .png"),
        ([str(scan), *model, "--box", "10,8,1,38,32,4", "--output", out, "--modality", "MR", "--window", "40,400"], "--modality/--window: .*CT only"),
        ([str(scan), *model, "--box", "10,8,1,38,32,4", "--output", out, "--device", "cuda:0"], "--device cuda:0: CUDA is not available"),
        ([str(scan), *model, "--box", "10,8,1,38,32,4", "--output", out, "--batch-size", "0"], "--batch-size must be >= 1"),
    ]  # fmt: skip


def test_cli_bad_input_is_a_clear_error_before_the_model_loads(model_dir, tmp_path, capsys, no_model_load):
    cases = bad_input_cases(tmp_path, model_dir)
    capsys.readouterr()
    for argv, message in cases:
        if "cuda" in message and torch.cuda.is_available():
            continue
        assert main(["segment", *argv]) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("dbsam segment: error: ") and len(error.strip().splitlines()) == 1, error
        assert re.search(message, error), (message, error)
    assert (tmp_path / "existing.nii.gz").read_bytes() == b"keep me"
    assert not (tmp_path / "out.nii.gz").exists()
