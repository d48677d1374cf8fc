"""``dbsam segment``: segment a box in an image or a whole CT/MR volume and write the mask with the input's geometry.

Every argument is checked, and the image read, before the model is loaded, so that a typo costs
seconds, not a model load.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

NAME = "segment"
HELP = "Segment the objects in boxes of an image or volume (NIfTI, NRRD, MHA, DICOM series, PNG/JPG/DICOM)."

VOLUME_OUTPUTS = (".nii", ".nii.gz", ".nrrd", ".mha")
IMAGE_OUTPUTS = (".png", *VOLUME_OUTPUTS)
DICOM_SEG_OUTPUT = ".dcm"
DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
BACKENDS = ("pytorch", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="image file, volume file or DICOM series folder")
    parser.add_argument(
        "--model",
        help="folder of a saved DB-SAM (or SAM) model with its processor (default: the small demonstration "
        "DB-SAM shipped with the package, fine-tuned on brain MR)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pytorch",
        help="pytorch (default), or onnx: --model is a folder written by conversion/export_onnx.py, run on "
        "ONNX Runtime on the CPU",
    )
    parser.add_argument(
        "--box",
        action="append",
        help="inclusive voxel indices (x = column, y = row, z = slice): x0,y0,z0,x1,y1,z1 for a volume "
        "(every slice z0..z1 gets the box), x0,y0,x1,y1 for a 2D image; repeat for several objects",
    )
    parser.add_argument(
        "--label",
        action="append",
        help="name of each object, in the order of --box then --box-2d (default: object 1, object 2, ...)",
    )
    parser.add_argument(
        "--boxes",
        help="JSON or CSV file of named objects (see docs/inference.md), added after --box/--box-2d",
    )
    parser.add_argument("--box-2d", help="x0,y0,x1,y1 on --key-slice, propagated up and down through the volume")
    parser.add_argument("--key-slice", type=int, help="slice index (z) that --box-2d is drawn on")
    parser.add_argument(
        "--output",
        required=True,
        help=f"label map: {', '.join(VOLUME_OUTPUTS)} (volumes), also .png for 2D (0/255 for one object); "
        f"{DICOM_SEG_OUTPUT} writes DICOM-SEG (DICOM input); names and values go to a sidecar .json",
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
    parser.add_argument(
        "--window",
        help="override the CT window: LEVEL,WIDTH in HU or a preset name (e.g. liver); implies --modality CT; "
        "a negative level needs '=': --window=-600,1500",
    )


@dataclass
class Request:
    """Everything ``run`` needs, checked."""

    image: object  # modeling_dbsam.io.MedicalImage
    array: object  # np.ndarray: the volume (z, y, x) or the 2D image (y, x[, c]) to segment
    objects: list  # list[modeling_dbsam.objects.ObjectPrompt], checked
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


def check_output(
    flag: str, path: str, allowed: tuple[str, ...], overwrite: bool, what: str = "a mask", inputs: tuple[str, ...] = ()
) -> None:
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
        check_output_path(path, overwrite, inputs)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        raise type(error)(f"{flag} {error}") from None


def check_model_folder(folder: str) -> None:
    """A local folder is checked in full (config, weights, processor) before the image is read; a Hub id is tried at load."""
    from modeling_dbsam.model_folder import ModelFolderError, check_model_folder, is_hub_id

    if not is_hub_id(folder):
        try:
            check_model_folder(folder)
        except ModelFolderError as error:
            raise ModelFolderError(f"--model {error}") from None


def default_model() -> str:
    """The shipped demonstration model, announced on every use (what it is, how to pass a real one)."""
    import sys

    from modeling_dbsam.pretrained import DEFAULT_MODEL_NOTICE, default_model_folder

    folder = default_model_folder()
    print(DEFAULT_MODEL_NOTICE.format(folder=folder), file=sys.stderr)
    return str(folder)


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
    from modeling_dbsam.io import path_suffix, read_image
    from modeling_dbsam.objects import ObjectPrompt, check_objects, read_objects_file
    from modeling_dbsam.predictor import check_boxes
    from modeling_dbsam.processing import IntensityConfig

    if not os.path.exists(args.input):  # before the default model's notice, which would bury this line
        raise FileNotFoundError(f"{args.input}: no such file or folder")
    boxes = [parse_numbers("--box", text, (4, 6)) for text in args.box or []]
    box_2d = parse_numbers("--box-2d", args.box_2d, (4,))
    if not boxes and box_2d is None and args.boxes is None:
        raise ValueError("give --box (repeatable), --box-2d with --key-slice, or --boxes FILE")
    if (box_2d is None) != (args.key_slice is None):
        raise ValueError("--box-2d and --key-slice go together")
    names = check_labels(args.label, len(boxes) + (box_2d is not None))
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
        modality = args.modality or ("CT" if window is not None else None)  # windows are CT's
        intensity = IntensityConfig(modality, window) if modality else None
    except ValueError as error:
        raise ValueError(f"--modality/--window: {error}") from None
    check_output("--output", args.output, (*IMAGE_OUTPUTS, DICOM_SEG_OUTPUT), args.overwrite, inputs=(args.input,))
    check_legend_output(args.output, args.overwrite)
    if args.overlay is not None:
        check_output(
            "--overlay",
            args.overlay,
            (".png",),
            args.overwrite,
            "the overlay, a PNG picture",
            (args.input, args.output),
        )
    if args.model is None:
        if args.backend == "onnx":
            raise ValueError("--backend onnx needs --model: a folder written by conversion/export_onnx.py")
        args.model = default_model()
    if args.backend == "onnx":
        check_onnx_arguments(args)
    else:
        check_model_folder(args.model)
        check_device(args.device)

    if path_suffix(args.output) == DICOM_SEG_OUTPUT:
        check_dicom_seg_input(args.input)
    file_objects = read_objects_file(args.boxes) if args.boxes is not None else []

    image = read_image(args.input)
    array = image.array
    if image.is_volume:
        if image.reference.GetNumberOfComponentsPerPixel() > 1:
            raise ValueError(f"{args.input}: a volume with {image.reference.GetNumberOfComponentsPerPixel()} channels")
        check_volume(image.array)
        check_output(
            "--output",
            args.output,
            (*VOLUME_OUTPUTS, DICOM_SEG_OUTPUT),
            args.overwrite,
            "a 3D mask with its geometry",
            (args.input,),
        )
        for box in boxes:
            if len(box) != 6:
                raise ValueError(
                    f"--box: {args.input} is a volume of shape (z, y, x) {image.array.shape}; give x0,y0,z0,x1,y1,z1 "
                    "or --box-2d x0,y0,x1,y1 with --key-slice"
                )
            try:
                check_volume_box(box, image.array.shape)
            except ValueError as error:
                raise ValueError(f"--box: {error}") from None
        if box_2d is not None:
            try:
                check_key_slice_box(box_2d, args.key_slice, image.array.shape)
            except ValueError as error:
                raise ValueError(f"--box-2d/--key-slice: {error}") from None
        shape = image.array.shape
    else:
        if array.ndim == 4 and len(array) == 1:  # a one-slice multi-channel file (e.g. an RGB DICOM)
            array = array[0]
        if box_2d is not None or any(len(box) != 4 for box in boxes):
            raise ValueError(f"--box: {args.input} is a 2D image; give --box x0,y0,x1,y1 (no z, no --key-slice)")
        if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{args.input}: a 2D image with {array.shape[-1]} channels; need grayscale or RGB")
        for box in boxes:
            try:
                check_boxes(box, array.shape[:2])
            except ValueError as error:
                raise ValueError(f"--box: {error}") from None
        shape = array.shape[:2]
    prompts = [ObjectPrompt(name, box) for name, box in zip(names, boxes)]
    if box_2d is not None:
        prompts.append(ObjectPrompt(names[-1], box_2d, args.key_slice))
    try:
        objects = check_objects(prompts + file_objects, shape, image.is_volume)
    except ValueError as error:
        raise ValueError(f"{'--boxes ' + args.boxes if file_objects else '--label'}: {error}") from None
    return Request(image, array, objects, intensity)


def check_labels(labels: list[str] | None, count: int) -> list[str]:
    """One name per --box/--box-2d object, or default names."""
    if labels is None:
        return [f"object {k + 1}" for k in range(count)]
    if len(labels) != count:
        raise ValueError(f"--label: got {len(labels)} names for {count} boxes (--box and --box-2d); give one each")
    return labels


def check_legend_output(output: str, overwrite: bool) -> None:
    from modeling_dbsam.io import check_output_path
    from modeling_dbsam.objects import legend_path

    try:
        check_output_path(legend_path(output), overwrite)
    except FileExistsError as error:
        raise FileExistsError(f"--output's sidecar {error}") from None


def check_dicom_seg_input(path: str) -> None:
    """DICOM-SEG references the source DICOM instances: the input must be DICOM, and highdicom installed."""
    from modeling_dbsam.dicom import check_dicom_seg_source

    try:
        check_dicom_seg_source(path)
    except ValueError as error:
        raise ValueError(f"--output {DICOM_SEG_OUTPUT} (DICOM-SEG): {error}") from None


def load_model_and_processor(folder: str, device: str, backend: str = "pytorch"):
    """The saved model (DB-SAM or SAM, through the auto classes) in eval mode, and its processor; with
    ``backend="onnx"`` the exported model on ONNX Runtime and the processor its preprocessing.json describes."""
    if backend == "onnx":
        from modeling_dbsam.onnx_runtime import load_onnx_model

        return load_onnx_model(folder)
    from modeling_dbsam.model_folder import load_model
    from modeling_dbsam.processing import load_processor

    return load_model(folder).to(device).eval(), load_processor(folder)


def prompt_region(prompt) -> tuple[slice, ...]:
    """The part of the image an object's box covers: its slices and rectangle (the key slice's when propagated)."""
    if prompt.key_slice is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
        return (prompt.key_slice, slice(y0, y1 + 1), slice(x0, x1 + 1))
    if len(prompt.box) == 6:
        x0, y0, z0, x1, y1, z1 = (int(round(v)) for v in prompt.box)
        return (slice(z0, z1 + 1), slice(y0, y1 + 1), slice(x0, x1 + 1))
    x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
    return (slice(y0, y1 + 1), slice(x0, x1 + 1))


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from modeling_dbsam.inference import empty_mask_reason, save_overlay
    from modeling_dbsam.intensity import non_finite_note
    from modeling_dbsam.io import path_suffix, write_mask
    from modeling_dbsam.objects import legend_path, segment_objects, write_legend
    from modeling_dbsam.processing import get_intensity_config, to_model_rgb

    request = check_request(args)
    note = non_finite_note(request.array)
    if note:
        print(f"note: {args.input}: {note}", file=sys.stderr)
    model, processor = load_model_and_processor(args.model, args.device, args.backend)
    intensity = request.intensity or get_intensity_config(processor)
    if intensity.modality is None and request.array.dtype != np.uint8:
        print(
            f"note: {args.model} records no intensity rule (modality, CT window): {request.array.dtype} values are "
            "clipped at percentiles; pass --modality/--window to match how the model's training data was made",
            file=sys.stderr,
        )
    autocast_dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    image = request.image
    label_map = segment_objects(
        model,
        processor,
        request.array,
        request.objects,
        is_volume=image.is_volume,
        intensity=intensity,
        batch_size=args.batch_size,
        autocast_dtype=autocast_dtype,
        margin=args.margin,
        progress=True,
    )
    labels = label_map.labels
    if path_suffix(args.output) == DICOM_SEG_OUTPUT:
        from modeling_dbsam.dicom import write_dicom_seg

        write_dicom_seg(args.output, label_map, args.input, overwrite=args.overwrite)
    else:
        single_png = path_suffix(args.output) == ".png" and len(request.objects) == 1
        write_mask(args.output, labels * 255 if single_png else labels, image.reference, overwrite=args.overwrite)
    write_legend(legend_path(args.output), label_map, overwrite=args.overwrite)
    shown = intensity.to_uint8(request.array) if image.is_volume else to_model_rgb(request.array, intensity)
    for entry, prompt in zip(label_map.legend()["objects"], request.objects):
        voxels = labels == entry["value"]
        slices = np.flatnonzero(voxels.reshape(len(voxels), -1).any(axis=1)) if voxels.ndim == 3 else []
        where = f" in slices {slices.min()}..{slices.max()}" if len(slices) else ""
        print(f"{entry['value']} {entry['name']}: {entry['voxels']} voxels{where}")
        if not entry["voxels"]:
            which = "the mask" if len(request.objects) == 1 else f"the mask of {entry['name']!r}"
            print(f"warning: {which} is empty: {empty_mask_reason(shown, prompt_region(prompt))}", file=sys.stderr)
    print(f"wrote {args.output} and {legend_path(args.output)}")
    if args.overlay:
        save_overlay(args.overlay, shown, labels > 0, overwrite=args.overwrite, max_panels=args.overlay_slices)
        print(f"wrote {args.overlay}")
    return 0
