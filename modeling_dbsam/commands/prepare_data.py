"""``dbsam prepare-data RAW_DIR OUT_DIR``: raw volumes and label maps to a MedSAM-format Arrow dataset."""

from __future__ import annotations

import argparse

NAME = "prepare-data"
HELP = (
    "Convert image volumes and label maps (NIfTI, NRRD, MHA, DICOM series; PNG/JPG for 2D) into a MedSAM-format "
    "Arrow dataset (one object per slice, MedSAM's intensity rules, case-level splits)."
)


def _window(text: str) -> tuple[float, float] | str:
    """``"40,400"`` as (level, width), or a preset name such as ``"lung"``."""
    if "," not in text:
        return text
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--window must be LEVEL,WIDTH in HU or a preset name, got {text!r}"
        ) from error
    return level, width


def _labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--labels must be comma-separated integers, got {text!r}") from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "raw_dir",
        metavar="RAW_DIR",
        help="folder with imagesTr/ + labelsTr/ (nnU-Net layout) or the files the globs match",
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="output folder (save_to_disk layout with README.md); must not exist"
    )
    parser.add_argument("--modality", help="CT, MR, MR-T1, PET, Ultrasound, X-Ray, ... (default: the task's)")
    parser.add_argument(
        "--task", help="one of the paper's 30 tasks (e.g. 'CT Liver') or your own name (default: from the folder name)"
    )
    parser.add_argument(
        "--window",
        type=_window,
        help="CT window LEVEL,WIDTH in HU (e.g. 40,400; a negative level needs '=': --window=-600,1500) "
        "or a preset name (e.g. lung)",
    )
    parser.add_argument("--labels", type=_labels, help="label values to keep, e.g. 1,2,6 (default: all)")
    parser.add_argument(
        "--split",
        default=None,
        help="train,validation,test fractions of the cases (default: imagesTs/ is test and the rest train, else 0.8,0.1,0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the case-level split (default 0)")
    parser.add_argument(
        "--size", type=int, default=256, help="resize slices to SIZE x SIZE; 0 keeps the native size (default 256)"
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=100,
        help="remove 2D connected components (8-connectivity) under this many pixels per slice, at native "
        "resolution before resizing (MedSAM: 100; 0 keeps all)",
    )
    parser.add_argument(
        "--min-volume",
        type=int,
        default=1000,
        help="in volumes, first remove 3D connected components (26-connectivity) under this many voxels, at native "
        "resolution (MedSAM: 1000; 0 keeps all)",
    )
    parser.add_argument("--components", action="store_true", help="one object per connected component of each label")
    parser.add_argument(
        "--images", help="glob of image files or DICOM folders, relative to RAW_DIR (with --label-maps)"
    )
    parser.add_argument("--label-maps", help="glob of label maps; paired with --images by what the wildcards matched")
    parser.add_argument(
        "--channel", type=int, default=0, help="image channel suffix to use in nnU-Net names (_0000 = 0)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def run(args: argparse.Namespace) -> int:
    from modeling_dbsam.data.raw import prepare_raw_dataset

    report = prepare_raw_dataset(
        args.raw_dir,
        args.out_dir,
        modality=args.modality,
        task=args.task,
        window=args.window,
        labels=args.labels,
        split=args.split,
        seed=args.seed,
        size=args.size or None,
        min_size=args.min_size,
        min_volume=args.min_volume,
        components=args.components,
        images=args.images,
        label_maps=args.label_maps,
        channel=args.channel,
        overwrite=args.overwrite,
    )
    print(report.summary())
    return 0
