"""Overlay PNG for the quickstart: the same test slices with the ground truth and each model's prediction outlined.

A title names the split and the structure; one row per source (ground truth, then each model), one
column per slice; a legend explains the colours. Every model gets the evaluation's box prompt (tight box
of the ground truth + 9 px per side at 256 px, the ``paper`` protocol; drawn in cyan) through the shared
predictor, and panels are drawn by the inference module's overlay code.

    python scripts/quickstart_overlays.py --data data/sample --models outputs/quickstart/dbsam outputs/quickstart/baseline \\
        --names DB-SAM baseline --output outputs/quickstart/overlays.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

from modeling_dbsam import DBSamModel
from modeling_dbsam.boxes import box_prompt
from modeling_dbsam.evaluation import PAPER
from modeling_dbsam.inference import MASK_COLOUR, PROMPT_COLOUR, overlay_montage
from modeling_dbsam.io import atomic_write
from modeling_dbsam.predictor import predict_boxes
from modeling_dbsam.processing import load_processor

PANEL_SIZE = 160
LABEL_WIDTH = 110


def pick_examples(split: datasets.Dataset, count: int) -> datasets.Dataset:
    """``count`` examples of the split's most frequent object label, evenly spread over its slices."""
    labels = np.asarray(split["label"])
    common = np.bincount(labels).argmax()
    rows = np.flatnonzero(labels == common)
    rows = rows[np.argsort(np.asarray(split["slice_index"])[rows], kind="stable")]
    return split.select(rows[np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int)])


def labelled_row(name: str, images: list[np.ndarray], masks: list[np.ndarray], boxes: list[np.ndarray]) -> np.ndarray:
    panels = [
        overlay_montage(image[..., 0], mask, max_panels=1, panel_size=PANEL_SIZE, box=box[0])
        for image, mask, box in zip(images, masks, boxes)
    ]
    row = np.concatenate(panels, axis=1)
    label = Image.new("RGB", (LABEL_WIDTH, row.shape[0]))
    ImageDraw.Draw(label).text((6, row.shape[0] // 2 - 6), name, fill=(255, 255, 255))
    return np.concatenate([np.asarray(label), row], axis=1)


def structure_name(data: str, label: int) -> str:
    """The label's structure name from the dataset card's label table, else the label value."""
    card = Path(data) / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    found = re.search(rf"^\| {label} \| ([^|]+) \|$", text, re.MULTILINE)
    return found.group(1).strip() if found else f"label {label}"


def framed(grid: np.ndarray, title: str) -> np.ndarray:
    """The panel grid with a title above and a colour legend below."""
    width = grid.shape[1]
    header = Image.new("RGB", (width, 24))
    ImageDraw.Draw(header).text((6, 6), title, fill=(255, 255, 255))
    legend = Image.new("RGB", (width, 24))
    draw = ImageDraw.Draw(legend)
    x = 6
    for colour, text in ((MASK_COLOUR, "mask outline (ground truth or prediction)"), (PROMPT_COLOUR, "box prompt")):
        draw.rectangle((x, 7, x + 12, 17), outline=colour, width=2)
        draw.text((x + 18, 6), text, fill=(255, 255, 255))
        x += 30 + 7 * len(text)
    return np.concatenate([np.asarray(header), grid, np.asarray(legend)], axis=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="DatasetDict folder (save_to_disk)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", nargs="+", required=True, help="saved model folders")
    parser.add_argument("--names", nargs="+", help="row labels, one per model (default: folder names)")
    parser.add_argument("--slices", type=int, default=6, help="columns: test slices shown (default 6)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    names = args.names or [Path(m).name for m in args.models]
    if len(names) != len(args.models):
        parser.error(f"got {len(args.models)} models but {len(names)} names")

    examples = pick_examples(datasets.load_from_disk(args.data)[args.split], args.slices)
    images = [np.asarray(image) for image in examples["image"]]
    truths = [np.asarray(mask).astype(bool) for mask in examples["mask"]]
    boxes = [box_prompt(t, fixed_shift=PAPER.box_shift, resolution=PAPER.box_resolution)[None] for t in truths]
    rows = [labelled_row("ground truth", images, truths, boxes)]
    for name, folder in zip(names, args.models):
        model = DBSamModel.from_pretrained(folder).eval()
        predictions = predict_boxes(model, load_processor(folder), images, boxes)
        rows.append(labelled_row(name, images, [p.masks[0] for p in predictions], boxes))
    structure = structure_name(args.data, int(examples[0]["label"]))
    title = f"{examples[0]['task']}: {structure}, {args.split} split, {len(images)} slices"
    montage = Image.fromarray(framed(np.concatenate(rows, axis=0), title))
    atomic_write(args.output, lambda tmp: montage.save(tmp, format="PNG"), overwrite=args.overwrite)
    print(f"overlays: {args.output} ({title})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
