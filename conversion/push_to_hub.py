"""Publish a DB-SAM folder, converted or trained, to the Hugging Face Hub with its model card.

    python conversion/push_to_hub.py out/ --repo-id user/dbsam-vit-base-medsam30 [--private] [--dry-run]

The folder is checked first and refused, before any network call, unless it loads with
``DBSamModel.from_pretrained`` with every weight present and holds its processor config.

The card (the repo's ``README.md``) is rendered from ``model_cards/``: ``trained.md`` when the folder
has evaluation results (``results.json``, see ``dbsam_card.read_results``) or a training configuration
(``training_config.yaml``/``.yml``/``.json``), ``converted.md`` when it only has the converter's
``conversion.json``. The folder itself is never modified: a ``README.md`` in it is not uploaded.

Only what a model repo needs is uploaded, in one commit: safetensors weights and their index,
``config.json``, the processor config, ``conversion.json``, the results and the training configuration.
Everything else (optimizer states, Accelerate checkpoints, logs) is listed as skipped. ``--dry-run``
prints the files and the card and makes no network call.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import dbsam_card
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.utils import validate_repo_id
from transformers import SamProcessor

from modeling_dbsam import DBSamConfig, DBSamModel
from modeling_dbsam.model_folder import check_model_folder

# `dbsam evaluate` writes results.json; training writes eval_results.json and training_config.yaml.
RESULTS_FILES = ("results.json", "eval_results.json")
TRAINING_CONFIG_FILES = ("training_config.yaml", "training_config.yml", "training_config.json")
CARD_FILE = "README.md"
_MODEL_FILES = {"config.json", "processor_config.json", "preprocessor_config.json", dbsam_card.CONVERSION_FILE}
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


@dataclass
class UploadPlan:
    repo_id: str
    private: bool
    files: dict[str, Path]  # path in the repo -> local file
    skipped: list[str]
    card: ModelCard
    template: str


def checked_model(folder: Path) -> dbsam_card.ModelFacts:
    """The folder's model facts, or an error saying why the folder cannot be published."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    processor_file = dbsam_card.processor_file(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; save the model with save_pretrained")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != DBSamConfig.model_type:
        raise ValueError(
            f"{folder}: config.json has model_type {model_type!r}, not 'dbsam'; convert SAM checkpoints with "
            "conversion/convert_sam_to_dbsam.py first"
        )
    check_model_folder(folder)
    try:
        model, info = DBSamModel.from_pretrained(folder, output_loading_info=True)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{folder}: does not load with DBSamModel.from_pretrained: {error}") from error
    problems = {
        name: sorted(info[name]) for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[name]
    }
    if problems:
        raise ValueError(f"{folder}: the weights do not match the config: {problems}")
    processor = SamProcessor.from_pretrained(folder)
    image_size = model.config.vision_config.image_size
    if processor.image_processor.pad_size["height"] != image_size:
        raise ValueError(
            f"{folder}: {processor_file} pads images to {processor.image_processor.pad_size['height']} px, "
            f"the model takes {image_size} px"
        )
    return dbsam_card.model_facts(model.eval(), processor, processor_file)


def _chosen_file(given: Path | None, folder: Path, names: tuple[str, ...]) -> Path | None:
    """The file given on the command line (which must exist), else the first of ``names`` in the folder."""
    if given is not None:
        if not given.is_file():
            raise FileNotFoundError(f"{given}: no such file")
        return given
    return next((folder / name for name in names if (folder / name).is_file()), None)


def read_training_config(path: Path) -> tuple[dict, str]:
    """The training configuration and its YAML text for the card (JSON is shown as YAML too)."""
    text = path.read_text(encoding="utf-8")
    try:
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot be parsed ({error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return loaded, yaml.safe_dump(loaded, sort_keys=False).strip() if path.suffix == ".json" else text.strip()


def starting_model(training_config: dict | None, record: dict | None) -> str | None:
    """The Hub model the weights descend from: training's ``model`` if it is a Hub id, the ``base_model``
    of the converted folder it names, or this folder's own ``conversion.json``."""
    start = (training_config or {}).get("model")
    if isinstance(start, str) and start:
        start_record = Path(start) / dbsam_card.CONVERSION_FILE
        if start_record.is_file():
            return json.loads(start_record.read_text(encoding="utf-8")).get("base_model")
        if not Path(start).exists():
            return start
    return (record or {}).get("base_model")


def model_files(folder: Path) -> dict[str, Path]:
    """The folder's files every model repo needs: weights, their index, configs, conversion record."""
    return {
        path.name: path
        for path in sorted(folder.iterdir())
        if path.is_file() and (path.name in _MODEL_FILES or path.name.endswith(_WEIGHT_SUFFIXES))
    }


def skipped_files(folder: Path, files: dict[str, Path]) -> list[str]:
    """Everything in the folder that is not uploaded (its README.md is replaced by the rendered card)."""
    uploaded = {path.resolve() for path in files.values()}
    return [
        path.name + ("/" if path.is_dir() else "")
        for path in sorted(folder.iterdir())
        if path.resolve() not in uploaded and path.name != CARD_FILE
    ]


def plan_upload(args: argparse.Namespace) -> UploadPlan:
    validate_repo_id(args.repo_id)
    folder = Path(args.folder)
    facts = checked_model(folder)
    files = model_files(folder)
    results_path = _chosen_file(args.results, folder, RESULTS_FILES)
    training_path = _chosen_file(args.training_config, folder, TRAINING_CONFIG_FILES)
    training_config, training_text = read_training_config(training_path) if training_path else (None, None)
    conversion_path = folder / dbsam_card.CONVERSION_FILE
    record = json.loads(conversion_path.read_text(encoding="utf-8")) if conversion_path.is_file() else None
    model_name = args.repo_id.split("/")[-1]
    if results_path is None and training_path is None and record is not None:
        card = dbsam_card.converted_card(model_name, args.repo_id, facts, record, license=args.license)
        template = dbsam_card.CONVERTED_TEMPLATE
    else:
        card = dbsam_card.trained_card(
            model_name,
            args.repo_id,
            facts,
            results=None if results_path is None else dbsam_card.read_results(results_path),
            training_config=training_text,
            base_model=args.base_model or starting_model(training_config, record),
            datasets=args.dataset or None,
            license=args.license,
        )
        template = dbsam_card.TRAINED_TEMPLATE
        if results_path is not None:
            files[results_path.name if results_path.name in RESULTS_FILES else RESULTS_FILES[0]] = results_path
        if training_path is not None:
            files[f"training_config{training_path.suffix}"] = training_path
    return UploadPlan(args.repo_id, args.private, files, skipped_files(folder, files), card, template)


def _size(path: Path) -> str:
    size, unit = float(path.stat().st_size), "B"
    for larger in ("kB", "MB", "GB"):
        if size < 1000:
            break
        size, unit = size / 1000, larger
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def describe(plan: UploadPlan) -> str:
    visibility = "private" if plan.private else "public"
    lines = [f"repo: {plan.repo_id} ({visibility} model repo), one commit with:"]
    lines.append(f"  {CARD_FILE}  (model card from model_cards/{plan.template}, {len(str(plan.card).encode())} B)")
    lines += [f"  {name}  ({_size(path)})" for name, path in sorted(plan.files.items())]
    if plan.skipped:
        lines.append("skipped (not part of a model repo): " + ", ".join(plan.skipped))
    lines += [f"----- {CARD_FILE} -----", str(plan.card)]
    return "\n".join(lines)


def upload(plan: UploadPlan, commit_message: str) -> str:
    api = HfApi()
    api.create_repo(plan.repo_id, private=plan.private, repo_type="model", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(plan.card).encode())]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files.items()
    ]
    commit = api.create_commit(plan.repo_id, operations=operations, commit_message=commit_message, repo_type="model")
    return commit.commit_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a DB-SAM folder written by save_pretrained or the converter")
    parser.add_argument("--repo-id", required=True, help="Hub repo, e.g. user/dbsam-vit-base-medsam30")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="print the files and the card; no network")
    parser.add_argument(
        "--results", type=Path, help=f"evaluation results (default: the folder's {' or '.join(RESULTS_FILES)})"
    )
    parser.add_argument(
        "--training-config",
        type=Path,
        help=f"training configuration (default: the folder's {'/'.join(TRAINING_CONFIG_FILES)})",
    )
    parser.add_argument(
        "--base-model",
        help="Hub id the weights descend from (default: the training config's model, or conversion.json)",
    )
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id for the card (repeatable)")
    parser.add_argument("--license", default=dbsam_card.DEFAULT_LICENSE, help="license id for the card")
    parser.add_argument("--commit-message", default="Upload DB-SAM checkpoint", help="Hub commit message")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_upload(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"push_to_hub: error: {error}", file=sys.stderr)
        return 2
    print(describe(plan))
    if args.dry_run:
        print("dry run: nothing was uploaded")
        return 0
    try:
        url = upload(plan, args.commit_message)
    except Exception as error:  # httpx / huggingface_hub errors: offline, no token, no rights; say it in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"push_to_hub: error: uploading {args.folder} to the Hub repo {plan.repo_id} failed "
            f"({type(error).__name__}: {reason}); check the network and your token (hf auth login)",
            file=sys.stderr,
        )
        return 1
    print(f"uploaded: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
