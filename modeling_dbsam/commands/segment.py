"""``dbsam segment``: segment a box in an image or a whole CT/MR volume and write the mask with the input's geometry.

Every argument is checked, and the image read, before the model is loaded, so that a typo costs
seconds, not a model load.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

NAME = "segment"
HELP = "Segment the object in a box of an image or volume (NIfTI, NRRD, MHA, DICOM series, PNG/JPG/DICOM)."

VOLUME_OUTPUTS = (".nii", ".nii.gz", ".nrrd", ".mha")
IMAGE_OUTPUTS = (".png", *VOLUME_OUTPUTS)
DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
BACKENDS = ("pytorch", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="image file, volume file or DICOM series folder")
    parser.add_argument("--model", required=True, help="folder of a saved DB-SAM (or SAM) model with its processor")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pytorch",
        help="pytorch (default), or onnx: --model is a folder written by conversion/export_onnx.py, run on "
        "ONNX Runtime on the CPU",
    )
    parser.add_argument(
        "--box",
        help="inclusive voxel indices (x = column, y = row, z = slice): x0,y0,z0,x1,y1,z1 for a volume "
        "(every slice z0..z1 gets the box), x0,y0,x1,y1 for a 2D image",
    )
    parser.add_argument("--box-2d", help="x0,y0,x1,y1 on --key-slice, propagated up and down through the volume")
    parser.add_argument("--key-slice", type=int, help="slice index (z) that --box-2d is drawn on")
    parser.add_argument(
        "--output", required=True, help=f"mask file: {', '.join(VOLUME_OUTPUTS)} (volumes), also .png for 2D (0/255)"
    )
    parser.add_argument("--overlay", help="also write a PNG montage of the slices with the mask outlined")
    parser.add_argument(
        "--overlay-slices", type=int, default=16, help="most slices in the overlay montage (default: 16)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (default: fp32)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per encoder batch (default: 8)")
    parser.add_argument(
        "--margin", type=float, default=3.0, help="propagated box margin, pixels at 256 px (default: 3)"
    )
    parser.add_argument("--modality", help="override the modality saved with the processor (e.g. CT, MR)")
    parser.add_argument("--window", help="override the CT window: level,width in HU or a preset name (e.g. liver)")


@dataclass
class Request:
    """Everything ``run`` needs, checked."""

    image: object  # modeling_dbsam.io.MedicalImage
    array: object  # np.ndarray: the volume (z, y, x) or the 2D image (y, x[, c]) to segment
    box: list[float] | None
    box_2d: list[float] | None
    key_slice: int | None
    intensity: object  # modeling_dbsam.processing.IntensityConfig | None


def parse_numbers(flag: str, text: str | None, counts: tuple[int, ...]) -> list[float] | None:
    """``"1,2,3,4"`` as floats, with an error naming ``flag`` when the count or a value is wrong."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if len(values) not in counts:
        raise ValueError(f"{flag}: expected {' or '.join(map(str, counts))} values, got {len(values)} ({text!r})")
    return values


def check_output(flag: str, path: str, allowed: tuple[str, ...], overwrite: bool, what: str = "a mask") -> None:
    """Refuse a file type that cannot hold ``what`` and an existing file (unless ``overwrite``), naming ``flag``."""
    from modeling_dbsam.io import check_output_path, path_suffix

    suffix = path_suffix(path)
    if suffix not in allowed:
        lossy = suffix in (".jpg", ".jpeg") and flag == "--output"
        reason = " (JPEG is lossy: it would change mask values)" if lossy else ""
        raise ValueError(
            f"{flag} {path}: {suffix or 'no suffix'} cannot hold {what}{reason}; use {', '.join(allowed)}"
        )
    try:
        check_output_path(path, overwrite)
    except (FileExistsError, FileNotFoundError) as error:
        raise type(error)(f"{flag} {error}") from None


def check_model_folder(folder: str) -> None:
    from modeling_dbsam.processing import processor_config_path

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--model {folder}: no such folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"--model {folder}: no config.json; save the model with model.save_pretrained")
    if processor_config_path(folder) is None:
        raise FileNotFoundError(
            f"--model {folder}: no processor_config.json or preprocessor_config.json; save the SamProcessor "
            "with the model (processor.save_pretrained)"
        )


def check_onnx_arguments(args: argparse.Namespace) -> None:
    """An exported folder with its preprocessing, run in fp32 on the CPU (what ONNX Runtime's CPU backend does)."""
    from modeling_dbsam.onnx_runtime import ENCODER_FILE, read_preprocessing

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such folder")
    if not os.path.isfile(os.path.join(args.model, ENCODER_FILE)):
        raise FileNotFoundError(
            f"--model {args.model}: no {ENCODER_FILE}; --backend onnx runs a folder written by conversion/export_onnx.py"
        )
    read_preprocessing(args.model)
    if args.device != "cpu" or args.dtype != "fp32":
        raise ValueError(f"--backend onnx runs in fp32 on the CPU; got --device {args.device} --dtype {args.dtype}")


def check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r}: {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")


def check_request(args: argparse.Namespace) -> Request:
    """Validate every argument and read the image; raises before any model is loaded."""
    from modeling_dbsam.inference import check_key_slice_box, check_volume, check_volume_box
    from modeling_dbsam.io import read_image
    from modeling_dbsam.predictor import check_boxes
    from modeling_dbsam.processing import IntensityConfig

    box = parse_numbers("--box", args.box, (4, 6))
    box_2d = parse_numbers("--box-2d", args.box_2d, (4,))
    if (box is None) == (box_2d is None):
        raise ValueError("give either --box or --box-2d with --key-slice")
    if (box_2d is None) != (args.key_slice is None):
        raise ValueError("--box-2d and --key-slice go together")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.overlay_slices < 1:
        raise ValueError(f"--overlay-slices must be >= 1, got {args.overlay_slices}")
    if args.margin <= 0:
        raise ValueError(f"--margin must be > 0, got {args.margin}")
    window = args.window
    if window is not None and "," in window:
        window = parse_numbers("--window", window, (2,))
    try:
        intensity = IntensityConfig(args.modality, window) if args.modality or window else None
    except ValueError as error:
        raise ValueError(f"--modality/--window: {error}") from None
    check_output("--output", args.output, IMAGE_OUTPUTS, args.overwrite)
    if args.overlay is not None:
        check_output("--overlay", args.overlay, (".png",), args.overwrite, what="the overlay, a PNG picture")
    if args.backend == "onnx":
        check_onnx_arguments(args)
    else:
        check_model_folder(args.model)
        check_device(args.device)

    image = read_image(args.input)
    array = image.array
    if image.is_volume:
        if image.reference.GetNumberOfComponentsPerPixel() > 1:
            raise ValueError(f"{args.input}: a volume with {image.reference.GetNumberOfComponentsPerPixel()} channels")
        check_volume(image.array)
        check_output("--output", args.output, VOLUME_OUTPUTS, args.overwrite, what="a 3D mask with its geometry")
        if box is not None and len(box) != 6:
            raise ValueError(
                f"--box: {args.input} is a volume of shape (z, y, x) {image.array.shape}; give x0,y0,z0,x1,y1,z1 "
                "or --box-2d x0,y0,x1,y1 with --key-slice"
            )
        try:
            if box is not None:
                check_volume_box(box, image.array.shape)
            else:
                check_key_slice_box(box_2d, args.key_slice, image.array.shape)
        except ValueError as error:
            raise ValueError(f"{'--box' if box is not None else '--box-2d/--key-slice'}: {error}") from None
    else:
        if array.ndim == 4 and len(array) == 1:  # a one-slice multi-channel file (e.g. an RGB DICOM)
            array = array[0]
        if box is None or len(box) != 4:
            raise ValueError(f"--box: {args.input} is a 2D image; give --box x0,y0,x1,y1 (no z, no --key-slice)")
        if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{args.input}: a 2D image with {array.shape[-1]} channels; need grayscale or RGB")
        try:
            check_boxes(box, array.shape[:2])
        except ValueError as error:
            raise ValueError(f"--box: {error}") from None
    return Request(image, array, box, box_2d, args.key_slice, intensity)


def load_model_and_processor(folder: str, device: str, backend: str = "pytorch"):
    """The saved model (DB-SAM or SAM, through the auto classes) in eval mode, and its processor; with
    ``backend="onnx"`` the exported model on ONNX Runtime and the processor its preprocessing.json describes."""
    if backend == "onnx":
        from modeling_dbsam.onnx_runtime import load_onnx_model

        return load_onnx_model(folder)
    from transformers import AutoModelForMaskGeneration

    import modeling_dbsam  # noqa: F401  (registers the dbsam model type with the auto classes)
    from modeling_dbsam.processing import load_processor

    model = AutoModelForMaskGeneration.from_pretrained(folder).to(device).eval()
    return model, load_processor(folder)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from modeling_dbsam.inference import save_overlay, segment_volume
    from modeling_dbsam.io import path_suffix, write_mask
    from modeling_dbsam.predictor import predict_boxes
    from modeling_dbsam.processing import get_intensity_config, to_model_rgb

    request = check_request(args)
    model, processor = load_model_and_processor(args.model, args.device, args.backend)
    intensity = request.intensity or get_intensity_config(processor)
    autocast_dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    image = request.image
    if image.is_volume:
        mask = segment_volume(
            model,
            processor,
            request.array,
            request.box,
            box_2d=request.box_2d,
            key_slice=request.key_slice,
            batch_size=args.batch_size,
            autocast_dtype=autocast_dtype,
            margin=args.margin,
            intensity=intensity,
            progress=True,
        )
        shown = intensity.to_uint8(request.array)
    else:
        shown = to_model_rgb(request.array, intensity)
        prediction = predict_boxes(model, processor, [shown], [np.array([request.box])], 1, autocast_dtype)[0]
        mask = prediction.masks[0].astype(np.uint8)
    label = 255 if path_suffix(args.output) == ".png" else 1
    write_mask(args.output, mask * label, image.reference, overwrite=args.overwrite)
    slices = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1)) if mask.ndim == 3 else []
    where = f" in slices {slices.min()}..{slices.max()}" if len(slices) else ""
    print(f"wrote {args.output}: {int(mask.sum())} voxels{where}")
    if args.overlay:
        save_overlay(args.overlay, shown, mask, overwrite=args.overwrite, max_panels=args.overlay_slices)
        print(f"wrote {args.overlay}")
    return 0
