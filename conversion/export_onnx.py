"""Export a DB-SAM (or SAM) model folder to ONNX: an image encoder and prompt decoders, split as viewers use them.

    python conversion/export_onnx.py --model out/ --output-dir out-onnx/
    python conversion/export_onnx.py --model out/ --output-dir out-onnx-int8/ --quantize int8

The folder gets ``vision_encoder.onnx``, ``prompt_decoder.onnx``, ``prompt_decoder_multimask.onnx`` and
``preprocessing.json`` (see :mod:`modeling_dbsam.onnx_runtime` for the tensors, and docs/deployment.md).
Run it with ``dbsam segment --backend onnx --model out-onnx/ ...`` or from Python without PyTorch.

The exporter is ``torch.onnx.export``'s TorchScript tracer (``dynamo=False``): on this model the dynamo
exporter fails to decompose SAM's windowed attention at batch size 1, needs opset 18 or newer, and takes
about ten times longer. The graphs hold standard ONNX operators only; the deformable sampling is ``GridSample``
(opset 16 or newer). Before anything is written, every graph is run on ONNX Runtime and compared with
PyTorch on the same inputs (logits within 1e-4); with ``--quantize int8`` the encoder's linear layers are
quantized dynamically and its masks on the shipped sample slices must agree with fp32 ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeling_dbsam import onnx_runtime
from modeling_dbsam.pixels import conv_input_size

SUPPORTED_OPSETS = range(16, 21)  # GridSample arrived in 16; the TorchScript exporter stops at 20
DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
INT8_MIN_DICE = 0.9  # below this mean Dice against the fp32 masks, quantization is refused
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample"


class VisionEncoderGraph(nn.Module):
    """The image encoder as a graph: normalised ``pixel_values`` (and ``I_conv`` for DB-SAM) to embeddings."""

    def __init__(self, model: nn.Module, with_conv_input: bool):
        super().__init__()
        self.vision_encoder, self.with_conv_input = model.vision_encoder, with_conv_input

    def forward(self, pixel_values: torch.Tensor, conv_pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        if self.with_conv_input:
            return self.vision_encoder(pixel_values, conv_pixel_values=conv_pixel_values)[0]
        return self.vision_encoder(pixel_values)[0]


class PromptDecoderGraph(nn.Module):
    """SAM's prompt encoder and mask decoder on one image's embedding, prompts as point tokens.

    Points and box corners go through the prompt encoder's own point embedding; corners then get the
    box-corner embeddings, exactly as its box path adds them (see :func:`modeling_dbsam.onnx_runtime.prompt_tokens`).
    """

    def __init__(self, model: nn.Module, multimask_output: bool):
        super().__init__()
        self.model, self.multimask_output = model, multimask_output

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor):
        prompt_encoder = self.model.prompt_encoder
        labels = point_labels[None]
        sparse = prompt_encoder._embed_points(point_coords[None], labels, pad=False)
        for label, embedding in (
            (onnx_runtime.BOX_TOP_LEFT_LABEL, prompt_encoder.point_embed[2]),
            (onnx_runtime.BOX_BOTTOM_RIGHT_LABEL, prompt_encoder.point_embed[3]),
        ):
            sparse = torch.where((labels == label)[..., None], sparse + embedding.weight, sparse)
        _, dense = prompt_encoder(input_points=None, input_labels=None, input_boxes=None, input_masks=None)
        masks, scores = self.model.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=self.model.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask_output,
        )
        return masks[0], scores[0]


def load_model(folder: str):
    """The model (DB-SAM or SAM, through the auto classes) in fp32 eval mode, and its processor."""
    from transformers import AutoModelForMaskGeneration

    import modeling_dbsam  # noqa: F401  (registers the dbsam model type)
    from modeling_dbsam.processing import load_processor

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--model {folder}: no such folder")
    processor = load_processor(folder)  # first: a folder without a processor fails before the model loads
    model = AutoModelForMaskGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, processor


def check_processor_matches(model, processor) -> None:
    from modeling_dbsam.pixels import SamPixels

    image_size = model.config.vision_config.image_size
    if not SamPixels.supports(processor):
        raise ValueError(f"the processor must be a SamImageProcessor with resizing and padding on; got {processor}")
    pad = SamPixels(processor).pad_size
    longest = processor.image_processor.size["longest_edge"]
    if pad != (image_size, image_size) or longest != image_size:
        raise ValueError(
            f"the processor resizes to {longest} and pads to {pad[0]} x {pad[1]} but the model's image size is "
            f"{image_size}: fix the saved processor first"
        )


def example_inputs(model, conv_size: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """One random image (and I_conv) as the encoder takes them."""
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    inputs = {"pixel_values": torch.randn(1, 3, size, size, generator=generator)}
    if conv_size is not None:
        inputs["conv_pixel_values"] = torch.randn(1, 3, conv_size, conv_size, generator=generator)
    return inputs


def example_prompts(model, count: int = 3, points: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Prompts mixing points and boxes, in the encoder's frame."""
    rng = np.random.default_rng(seed)
    size = model.config.vision_config.image_size
    corners = np.sort(rng.uniform(0, size - 1, (count, 2, 2)), axis=1).reshape(count, 4)
    clicks = rng.uniform(0, size - 1, (count, points, 2))
    coords, labels = onnx_runtime.prompt_tokens(corners, clicks, rng.integers(0, 2, (count, points)))
    return {"point_coords": coords, "point_labels": labels}


def export_graph(module: nn.Module, args: tuple, path: str, names: dict, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic; parity is checked after export
        torch.onnx.export(
            module.eval(),  # a fresh wrapper is in training mode: BatchNorm would trace batch statistics
            args,
            path,
            dynamo=False,
            opset_version=opset,
            input_names=names["inputs"],
            output_names=names["outputs"],
            dynamic_axes=names["dynamic_axes"],
        )


def export_encoder(model, path: str, conv_size: int | None, opset: int) -> None:
    """One image per run: traced with a dynamic batch axis, the graph computes wrong embeddings for other
    batch sizes, and on a CPU a batch is no faster than its images one by one."""
    inputs = example_inputs(model, conv_size)
    names = list(inputs)
    export_graph(
        VisionEncoderGraph(model, conv_size is not None),
        tuple(inputs.values()),
        path,
        {
            "inputs": names,
            "outputs": ["image_embeddings"],
            "dynamic_axes": {},
        },
        opset,
    )


def export_decoder(model, path: str, multimask_output: bool, opset: int) -> None:
    grid = model.config.prompt_encoder_config.image_embedding_size
    channels = model.config.mask_decoder_config.hidden_size
    embeddings = torch.randn(1, channels, grid, grid, generator=torch.Generator().manual_seed(0))
    prompts = {name: torch.from_numpy(value) for name, value in example_prompts(model).items()}
    export_graph(
        PromptDecoderGraph(model, multimask_output),
        (embeddings, prompts["point_coords"], prompts["point_labels"]),
        path,
        {
            "inputs": ["image_embeddings", "point_coords", "point_labels"],
            "outputs": ["low_res_logits", "iou_scores"],
            "dynamic_axes": {
                "point_coords": {0: "prompts", 1: "tokens"},
                "point_labels": {0: "prompts", 1: "tokens"},
                "low_res_logits": {0: "prompts"},
                "iou_scores": {0: "prompts"},
            },
        },
        opset,
    )


def check_graph_parity(model, folder: str, conv_size: int | None) -> dict[str, float]:
    """Largest |ORT - PyTorch| of the embeddings and of both decoders' outputs, on inputs the export did not see.

    The decoders run on the encoder's output with 4 prompts of 3 points and a box each, other counts
    than at export, so their dynamic axes are exercised too. Raises when any difference exceeds ``PARITY_TOLERANCE``.
    """
    inputs = example_inputs(model, conv_size, seed=1)
    with torch.no_grad():  # first, so that PyTorch's activations are freed before ONNX Runtime loads
        expected = VisionEncoderGraph(model, conv_size is not None)(**inputs)
    onnx_model = onnx_runtime.OnnxSamModel.from_folder(folder)
    errors = {"image_embeddings": (onnx_model.get_image_embeddings(**inputs) - expected).abs().max().item()}
    prompts = example_prompts(model, count=4, points=3, seed=1)
    for multimask in (False, True):
        graph = PromptDecoderGraph(model, multimask)
        with torch.no_grad():
            logits, scores = graph(expected[:1], *(torch.from_numpy(value) for value in prompts.values()))
        actual_logits, actual_scores = onnx_model.decoder(multimask).run(
            None, {"image_embeddings": expected[:1].numpy(), **prompts}
        )
        suffix = "_multimask" if multimask else ""
        errors["low_res_logits" + suffix] = float(np.abs(actual_logits - logits.numpy()).max())
        errors["iou_scores" + suffix] = float(np.abs(actual_scores - scores.numpy()).max())
    worst = max(errors, key=errors.get)
    if errors[worst] > PARITY_TOLERANCE:
        raise RuntimeError(
            f"ONNX Runtime differs from PyTorch by {errors[worst]:.2e} in {worst} (tolerance {PARITY_TOLERANCE}); "
            "nothing was written"
        )
    return errors


def quantize_encoder(fp32_path: str, int8_path: str) -> None:
    """ONNX Runtime's dynamic int8 quantization of the encoder's linear layers (MatMul and Gemm weights).

    Only products with a constant weight are quantized: attention's query-key and probability-value products
    stay fp32 (uint8 probabilities would lose most of a 4096-token softmax). Weights are int8 with a scale per
    output channel, activations uint8 with one scale per run: ONNX Runtime fuses each product into one
    ``DynamicQuantizeMatMul``, whose u8 x s8 product runs on the CPU's VNNI or AMX int8 instructions where it
    has them (with uint8 weights the ViT-B encoder took 1.7 times as long).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        fp32_path,
        int8_path,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )


def sample_slices(limit: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Up to ``limit`` of the shipped sample MR slices as RGB uint8, and each one's ground-truth box."""
    from datasets import load_from_disk

    from modeling_dbsam.boxes import mask_to_box
    from modeling_dbsam.processing import gray_to_rgb

    test = load_from_disk(str(SAMPLE_DATA))["test"]
    images, boxes = [], []
    for example in test:
        box = mask_to_box(np.asarray(example["mask"]) > 0)
        if box[0] < box[2] and box[1] < box[3]:  # a box needs some width and height
            images.append(gray_to_rgb(np.asarray(example["image"], dtype=np.uint8)))
            boxes.append(box[None])
        if len(images) == limit:
            break
    return images, boxes


def mask_agreement(reference_folder: str, candidate_folder: str, limit: int = 8) -> float:
    """Mean Dice of the candidate export's masks against the reference export's on the sample slices."""
    from modeling_dbsam.metrics import dice_score
    from modeling_dbsam.predictor import predict_boxes

    images, boxes = sample_slices(limit)
    scores = []
    predictions = [
        predict_boxes(*onnx_runtime.load_onnx_model(folder), images, boxes, batch_size=4)
        for folder in (reference_folder, candidate_folder)
    ]
    for reference, candidate in zip(*predictions):
        scores.extend(dice_score(c, r) for c, r in zip(candidate.masks, reference.masks))
    return float(np.mean(scores))


def preprocessing_settings(model, processor, source: str, opset: int, quantize: str | None) -> dict:
    from modeling_dbsam.processing import get_intensity_config

    image_processor = json.loads(processor.image_processor.to_json_string())
    intensity = get_intensity_config(processor)
    vision, grid = model.config.vision_config, model.config.prompt_encoder_config.image_embedding_size
    versions = {name: metadata.version(package) for name, package in _VERSIONED_PACKAGES.items()}
    return {
        "format": onnx_runtime.FORMAT,
        "format_version": 1,
        "files": {
            "vision_encoder": onnx_runtime.ENCODER_FILE,
            "prompt_decoder": onnx_runtime.DECODER_FILE,
            "prompt_decoder_multimask": onnx_runtime.MULTIMASK_DECODER_FILE,
        },
        "image_processor": image_processor,
        "intensity": {"modality": intensity.modality, "window": image_processor.get("intensity_window")},
        "sizes": {
            "image_size": vision.image_size,
            "conv_input_size": conv_input_size(model),
            "embedding_channels": model.config.mask_decoder_config.hidden_size,
            "embedding_grid": grid,
            "low_res_mask_size": 4 * grid,
        },
        "prompt_labels": onnx_runtime.PROMPT_LABELS,
        "provenance": {
            "source_model": source,
            "model_type": model.config.model_type,
            "export_date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
            "opset": opset,
            "quantization": quantize,
            "versions": versions,
        },
    }


_VERSIONED_PACKAGES = {
    "dbsam": "dbsam-transformers",
    "torch": "torch",
    "transformers": "transformers",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
}


def check_arguments(model: str, output_dir: str, opset: int, quantize: str | None, overwrite: bool) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"--opset {opset} is not supported: use {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1} "
            "(GridSample, the deformable attention's sampling, needs opset 16; the TorchScript exporter ends at 20)"
        )
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize!r}: the only quantization is int8")
    if os.path.abspath(model) == os.path.abspath(output_dir):
        raise ValueError("--output-dir must differ from --model")
    if os.path.exists(output_dir) and not overwrite and os.listdir(output_dir):
        raise FileExistsError(f"--output-dir {output_dir} exists and is not empty; pass --overwrite to replace it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output-dir {output_dir} is a file, not a folder")


def export(
    model_folder: str,
    output_dir: str,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Export, check parity and write the folder (all or nothing); returns the measured parity."""

    check_arguments(model_folder, output_dir, opset, quantize, overwrite)
    model, processor = load_model(model_folder)
    check_processor_matches(model, processor)
    conv_size = conv_input_size(model)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".export-onnx-") as work:
        staged = os.path.join(work, "onnx")
        os.makedirs(staged)
        settings = preprocessing_settings(model, processor, model_folder, opset, quantize)
        with open(os.path.join(staged, onnx_runtime.PREPROCESSING_FILE), "w") as file:
            json.dump(settings, file, indent=2)
        export_encoder(model, os.path.join(staged, onnx_runtime.ENCODER_FILE), conv_size, opset)
        export_decoder(model, os.path.join(staged, onnx_runtime.DECODER_FILE), False, opset)
        export_decoder(model, os.path.join(staged, onnx_runtime.MULTIMASK_DECODER_FILE), True, opset)
        report = {"max_abs_difference": check_graph_parity(model, staged, conv_size)}
        if quantize == "int8":
            quantized = os.path.join(work, "int8")
            shutil.copytree(staged, quantized)
            quantize_encoder(
                os.path.join(staged, onnx_runtime.ENCODER_FILE), os.path.join(quantized, onnx_runtime.ENCODER_FILE)
            )
            dice = mask_agreement(staged, quantized)
            report["int8_dice_vs_fp32"] = dice
            if dice < INT8_MIN_DICE:
                raise RuntimeError(
                    f"int8 quantization breaks this model: its masks on the sample slices agree with fp32 ones at "
                    f"Dice {dice:.3f} (at least {INT8_MIN_DICE} needed); export without --quantize"
                )
            staged = quantized
        settings["provenance"]["parity"] = report
        with open(os.path.join(staged, onnx_runtime.PREPROCESSING_FILE), "w") as file:
            json.dump(settings, file, indent=2)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staged, output_dir)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved DB-SAM or SAM folder with its processor")
    parser.add_argument("--output-dir", required=True, help="folder for the ONNX files and preprocessing.json")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--quantize", choices=["int8"], help="dynamic int8 quantization of the encoder's linear layers"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = export(args.model, args.output_dir, args.opset, args.quantize, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    worst = max(report["max_abs_difference"].values())
    print(f"wrote {args.output_dir}: ONNX Runtime matches PyTorch within {worst:.1e}")
    if "int8_dice_vs_fp32" in report:
        print(f"int8 masks agree with fp32 ones at Dice {report['int8_dice_vs_fp32']:.4f} on the sample slices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
