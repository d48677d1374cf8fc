"""``dbsam evaluate``: DSC and NSD of a model on a dataset split, in the layout of the paper's Tables 1 and 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "evaluate"
HELP = "Score a model on a dataset split (DSC, NSD per task; paper or physical protocol) and write a report."

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (save_pretrained output, with its processor)")
    parser.add_argument("--data", required=True, help="dataset folder written by DatasetDict.save_to_disk")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument(
        "--protocol",
        choices=("paper", "physical"),
        default="paper",
        help="paper: 256x256 grid, unit spacing, tolerance 1 (the authors' code); "
        "physical: each image's own resolution and real spacing, tolerance in mm",
    )
    parser.add_argument("--tolerance", type=float, help="NSD tolerance in mm for --protocol physical (default 1)")
    parser.add_argument("--output", required=True, help="report folder; a rerun with the same folder resumes")
    parser.add_argument(
        "--baseline", nargs="+", default=[], metavar="RESULTS_JSON", help="earlier results.json to compare"
    )
    parser.add_argument("--name", help="model name in the report (default: the model folder's name)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype for the model")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder batch (default 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or different report in --output")


def _load_split(data: Path, split: str):
    from modeling_dbsam.data.save import load_splits

    loaded = load_splits(data)
    if split not in loaded:
        raise ValueError(f"{data}: has no split {split!r} (splits: {', '.join(loaded)})")
    return loaded[split]


def warn_if_preprocessing_differs(model_dir: Path, data_dir: Path) -> None:
    """The test images were made by the rule in the dataset's card; say so when the model was trained on another."""
    from modeling_dbsam.data.card import read_preprocessing
    from modeling_dbsam.processing import IntensityConfig, load_intensity_config

    recorded = read_preprocessing(data_dir)
    if not recorded:
        return
    data_rule = IntensityConfig(recorded.get("modality"), recorded.get("intensity_window"))
    model_rule = load_intensity_config(model_dir)
    if model_rule.modality is not None and (model_rule.modality, model_rule.window) != (
        data_rule.modality,
        data_rule.window,
    ):
        print(
            f"warning: {data_dir} was prepared with {data_rule.modality} / window {data_rule.window}, but {model_dir} "
            f"was trained on {model_rule.modality} / window {model_rule.window}",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    import torch

    from modeling_dbsam.evaluation import evaluate_model, get_protocol, load_baseline, model_fingerprint
    from modeling_dbsam.model_folder import check_model_folder, load_model
    from modeling_dbsam.processing import load_processor

    protocol = get_protocol(args.protocol, args.tolerance)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model_dir, data_dir = Path(args.model).resolve(), Path(args.data).resolve()
    check_model_folder(model_dir)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    autocast_dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    if device.type == "cpu" and autocast_dtype == torch.float16:
        raise ValueError("--dtype float16 needs a GPU; use bfloat16 or float32 on CPU")

    warn_if_preprocessing_differs(model_dir, data_dir)
    baselines = [load_baseline(path, protocol) for path in args.baseline]
    dataset = _load_split(data_dir, args.split)

    def load_model_and_processor():
        return load_model(model_dir).to(device).eval(), load_processor(model_dir)

    results = evaluate_model(
        load_model_and_processor,
        dataset,
        protocol,
        args.output,
        model_info={
            "name": args.name or model_dir.name,
            "path": str(model_dir),
            "fingerprint": model_fingerprint(model_dir),
        },
        data_info={"path": str(data_dir), "split": args.split, "fingerprint": getattr(dataset, "_fingerprint", None)},
        baselines=baselines,
        batch_size=args.batch_size,
        autocast_dtype=autocast_dtype,
        overwrite=args.overwrite,
    )
    for dimension, average in results["averages"].items():
        print(
            f"{dimension} average over {average['tasks']} tasks: "
            f"DSC {100 * average['dsc']:.2f}%  NSD {100 * average['nsd']:.2f}%"
        )
    print(f"report: {Path(args.output) / 'results.md'}")
    return 0
