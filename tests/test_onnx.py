"""ONNX export (conversion/export_onnx.py) and the ONNX Runtime backend against PyTorch, on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import export_onnx
import numpy as np
import onnx
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from tiny import save_tiny_dbsam, tiny_processor

from modeling_dbsam import DBSamModel
from modeling_dbsam.cli import main
from modeling_dbsam.onnx_runtime import (
    DECODER_FILE,
    ENCODER_FILE,
    MULTIMASK_DECODER_FILE,
    PREPROCESSING_FILE,
    load_onnx_model,
    prompt_tokens,
)
from modeling_dbsam.pipelines import PromptableMaskGenerationPipeline
from modeling_dbsam.pixels import SamPixels
from modeling_dbsam.predictor import Prompts, predict_prompts
from modeling_dbsam.processing import load_processor

LOGIT_TOLERANCE = 1e-4
ADAPTERS_OFF = {"use_channel_attention": False, "use_conv_branch": False, "use_fusion": False}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny DB-SAM (MR intensity rule) and its export."""
    root = tmp_path_factory.mktemp("onnx")
    model_dir = save_tiny_dbsam(root / "model", modality="MR")
    export_onnx.export(model_dir, str(root / "onnx"))
    return model_dir, str(root / "onnx")


@pytest.fixture(scope="module")
def exported_sam(tmp_path_factory, exported):
    """The same weights with every adapter switched off (a plain SAM), and its export."""
    root = tmp_path_factory.mktemp("onnx_sam")
    model = DBSamModel.from_pretrained(exported[0], **ADAPTERS_OFF)
    model.save_pretrained(root / "model")
    tiny_processor().save_pretrained(root / "model")
    export_onnx.export(str(root / "model"), str(root / "onnx"))
    return str(root / "model"), str(root / "onnx")


def sample_slices(count: int = 4):
    images, boxes = export_onnx.sample_slices(count)
    return images, [b[0] for b in boxes]


def pytorch_model(folder):
    return DBSamModel.from_pretrained(folder).eval(), load_processor(folder)


def near_zero(processor, prediction) -> np.ndarray:
    """Pixels of the full-size masks whose upscaled logit lies within the tolerance of the threshold 0."""
    logits = torch.from_numpy(prediction.low_res_logits)
    shape = tuple(prediction.masks.shape[-2:])
    reshaped = SamPixels(processor).resized_shape(shape)
    upscaled = processor.post_process_masks([logits], torch.tensor([shape]), torch.tensor([reshaped]), binarize=False)
    return np.abs(upscaled[0].numpy()) < LOGIT_TOLERANCE


def assert_same_predictions(reference, candidate, processor):
    np.testing.assert_allclose(candidate.low_res_logits, reference.low_res_logits, atol=LOGIT_TOLERANCE, rtol=0)
    np.testing.assert_allclose(candidate.scores, reference.scores, atol=LOGIT_TOLERANCE, rtol=0)
    allowed = near_zero(processor, reference)
    assert candidate.masks.shape == reference.masks.shape
    assert np.array_equal(candidate.masks[~allowed], reference.masks[~allowed])
    assert reference.masks.any() and not reference.masks.all()  # a constant mask would prove nothing


def mixed_prompts(image, box):
    """Boxes alone, points alone and both, on one image."""
    height, width = image.shape[:2]
    centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
    whole = np.array([1, 1, width - 2, height - 2], dtype=np.float32)
    return [
        (Prompts(boxes=np.stack([box, whole])), False),
        (Prompts(points=np.array([[centre, [2.0, 3.0]]]), labels=np.array([[1, 0]])), True),
        (Prompts(boxes=box[None], points=np.array([[centre]])), False),
    ]


def test_prompt_tokens_follow_sam_prompt_encoder_order():
    boxes = np.array([[1, 2, 3, 4]], dtype=np.float32)
    points = np.array([[[5, 6], [7, 8]]], dtype=np.float32)
    coords, labels = prompt_tokens(boxes, None, None)
    np.testing.assert_array_equal(coords, [[[1, 2], [3, 4]]])
    np.testing.assert_array_equal(labels, [[2, 3]])
    coords, labels = prompt_tokens(None, points, np.array([[1, 0]]))
    np.testing.assert_array_equal(coords, [[[5, 6], [7, 8], [0, 0]]])  # a padding point closes a box-less prompt
    np.testing.assert_array_equal(labels, [[1, 0, -1]])
    coords, labels = prompt_tokens(boxes, points, np.array([[1, 1]]))
    np.testing.assert_array_equal(coords, [[[5, 6], [7, 8], [1, 2], [3, 4]]])
    np.testing.assert_array_equal(labels, [[1, 1, 2, 3]])
    assert coords.dtype == np.float32 and labels.dtype == np.int64


def test_export_writes_standard_onnx_with_gridsample(exported):
    _, folder = exported
    encoder = onnx.load(f"{folder}/{ENCODER_FILE}")
    onnx.checker.check_model(encoder)
    ops = {(node.domain or "ai.onnx", node.op_type) for node in encoder.graph.node}
    assert {domain for domain, _ in ops} == {"ai.onnx"}  # no custom operators
    assert ("ai.onnx", "GridSample") in ops  # the deformable sampling
    assert [i.name for i in encoder.graph.input] == ["pixel_values", "conv_pixel_values"]
    assert encoder.opset_import[0].version == export_onnx.DEFAULT_OPSET
    for name in (DECODER_FILE, MULTIMASK_DECODER_FILE):
        decoder = onnx.load(f"{folder}/{name}")
        assert [i.name for i in decoder.graph.input] == ["image_embeddings", "point_coords", "point_labels"]
        assert [o.name for o in decoder.graph.output] == ["low_res_logits", "iou_scores"]
    settings = json.loads(Path(folder, PREPROCESSING_FILE).read_text())
    assert settings["intensity"] == {"modality": "MR", "window": None}
    assert settings["sizes"] == {
        "image_size": 32,
        "conv_input_size": 64,
        "embedding_channels": 16,
        "embedding_grid": 16,
        "low_res_mask_size": 64,
    }
    assert settings["image_processor"]["pad_size"] == {"height": 32, "width": 32}
    provenance = settings["provenance"]
    assert provenance["opset"] == export_onnx.DEFAULT_OPSET and provenance["model_type"] == "dbsam"
    assert set(provenance["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime"}
    assert max(provenance["parity"]["max_abs_difference"].values()) <= LOGIT_TOLERANCE


@pytest.mark.parametrize("which", ["dbsam", "sam"])
def test_onnx_backend_matches_pytorch_on_sample_slices(exported, exported_sam, which):
    model_dir, onnx_dir = exported if which == "dbsam" else exported_sam
    model, processor = pytorch_model(model_dir)
    onnx_model, onnx_processor = load_onnx_model(onnx_dir)
    images, boxes = sample_slices(3)
    for image, box in zip(images, boxes):
        for prompts, multimask in mixed_prompts(image, box):
            reference = predict_prompts(model, processor, [image], [prompts], multimask_output=multimask)[0]
            candidate = predict_prompts(onnx_model, onnx_processor, [image], [prompts], multimask_output=multimask)[0]
            assert_same_predictions(reference, candidate, processor)


def test_sam_export_has_no_conv_input(exported_sam):
    encoder = onnx.load(f"{exported_sam[1]}/{ENCODER_FILE}")
    assert [i.name for i in encoder.graph.input] == ["pixel_values"]
    assert "GridSample" not in {node.op_type for node in encoder.graph.node}


def test_pipeline_runs_on_onnx_runtime(exported):
    model_dir, onnx_dir = exported
    image, box = (item[0] for item in sample_slices(1))
    point = [[[int(box[0] + box[2]) // 2, int(box[1] + box[3]) // 2]]]
    model, processor = pytorch_model(model_dir)
    reference = PromptableMaskGenerationPipeline(model=model, processor=processor)
    onnx_model, onnx_processor = load_onnx_model(onnx_dir)
    candidate = PromptableMaskGenerationPipeline(model=onnx_model, processor=onnx_processor)
    for prompts in ({"input_boxes": [box.tolist()]}, {"input_points": point}):
        expected, actual = reference(image, **prompts), candidate(image, **prompts)
        np.testing.assert_allclose(actual["scores"], expected["scores"], atol=LOGIT_TOLERANCE)
        assert (actual["masks"] == expected["masks"]).mean() > 0.999


def test_segment_cli_onnx_equals_pytorch(exported, tmp_path):
    model_dir, onnx_dir = exported
    images, boxes = sample_slices(3)
    png = tmp_path / "slice.png"
    Image.fromarray(images[0][..., 0]).save(png)
    volume = tmp_path / "volume.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([image[..., 0] for image in images])), str(volume))
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    for source, box in ((png, f"{x0},{y0},{x1},{y1}"), (volume, f"{x0},{y0},0,{x1},{y1},2")):
        outputs = {}
        for backend, folder in (("pytorch", model_dir), ("onnx", onnx_dir)):
            outputs[backend] = tmp_path / f"{source.stem.split('.')[0]}-{backend}{''.join(source.suffixes)}"
            argv = ["segment", str(source), "--model", folder, "--box", box, "--output", str(outputs[backend])]
            assert main([*argv, "--backend", backend]) == 0
        masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in outputs.values()]
        assert masks[0].any()
        np.testing.assert_array_equal(masks[1], masks[0])


def weight_products(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The float MatMul and Gemm nodes whose second input is a stored weight."""
    weights = {tensor.name for tensor in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights]


def test_int8_quantization_reports_dice_and_refuses_broken_parity(exported, tmp_path, monkeypatch):
    model_dir, fp32_dir = exported
    report = export_onnx.export(model_dir, str(tmp_path / "int8"), quantize="int8")
    assert 0.9 <= report["int8_dice_vs_fp32"] <= 1.0
    quantized = onnx.load(str(tmp_path / "int8" / ENCODER_FILE))
    fp32 = onnx.load(str(Path(fp32_dir) / ENCODER_FILE))
    # Every product with a weight is quantized, and only those: attention's products of activations stay fp32.
    assert weight_products(quantized) == []
    assert len(weight_products(fp32)) == sum(node.op_type == "MatMulInteger" for node in quantized.graph.node) > 0
    assert {"MatMul"} <= {node.op_type for node in quantized.graph.node}
    assert (tmp_path / "int8" / ENCODER_FILE).stat().st_size < (Path(fp32_dir) / ENCODER_FILE).stat().st_size
    settings = json.loads((tmp_path / "int8" / PREPROCESSING_FILE).read_text())
    assert settings["provenance"]["quantization"] == "int8"
    monkeypatch.setattr(export_onnx, "INT8_MIN_DICE", 1.01)  # no quantized model can pass: it must be refused
    with pytest.raises(RuntimeError, match="int8 quantization breaks this model"):
        export_onnx.export(model_dir, str(tmp_path / "refused"), quantize="int8")
    assert not (tmp_path / "refused").exists()


def test_export_refuses_bad_requests_with_one_clear_message(exported, tmp_path, capsys):
    model_dir, onnx_dir = exported
    no_processor = tmp_path / "no_processor"
    shutil.copytree(model_dir, no_processor)
    (no_processor / "processor_config.json").unlink(missing_ok=True)
    (no_processor / "preprocessor_config.json").unlink(missing_ok=True)
    cases = [
        (["--model", model_dir, "--output-dir", str(tmp_path / "a"), "--opset", "15"], "--opset 15 is not supported"),
        (["--model", model_dir, "--output-dir", str(tmp_path / "b"), "--opset", "21"], "--opset 21 is not supported"),
        (["--model", model_dir, "--output-dir", onnx_dir], "exists and is not empty; pass --overwrite"),
        (["--model", str(no_processor), "--output-dir", str(tmp_path / "c")], "no processor_config.json"),
        (["--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "d")], "no such"),
    ]
    before = sorted(p.name for p in Path(onnx_dir).iterdir())
    for argv, message in cases:
        assert export_onnx.main(argv) == 1
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1 and "Traceback" not in error
    assert sorted(p.name for p in Path(onnx_dir).iterdir()) == before
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_onnx_folder_without_or_with_a_wrong_preprocessing_json_is_refused(exported, tmp_path, capsys):
    _, onnx_dir = exported
    missing, wrong = tmp_path / "missing", tmp_path / "wrong"
    shutil.copytree(onnx_dir, missing)
    (missing / PREPROCESSING_FILE).unlink()
    shutil.copytree(onnx_dir, wrong)
    settings = json.loads((wrong / PREPROCESSING_FILE).read_text())
    settings["image_processor"]["pad_size"] = {"height": 64, "width": 64}
    settings["image_processor"]["size"] = {"longest_edge": 64}
    (wrong / PREPROCESSING_FILE).write_text(json.dumps(settings))
    with pytest.raises(FileNotFoundError, match=f"no {PREPROCESSING_FILE}"):
        load_onnx_model(missing)
    with pytest.raises(
        ValueError, match="does not match vision_encoder.onnx: the encoder takes pixel_values of 32 x 32"
    ):
        load_onnx_model(wrong)
    image = tmp_path / "slice.png"
    Image.fromarray(sample_slices(1)[0][0]).save(image)
    for folder, message in ((missing, f"no {PREPROCESSING_FILE}"), (wrong, "does not match vision_encoder.onnx")):
        argv = ["segment", str(image), "--model", str(folder), "--box", "10,10,40,40", "--backend", "onnx"]
        assert main([*argv, "--output", str(tmp_path / f"{folder.name}.png")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"{folder.name}.png").exists()
