"""Small models shipped with the package, so that everything runs where SAM's weights cannot be downloaded.

- ``small-sam``: a 0.7 M-parameter SAM pretrained from scratch on generated scenes (no medical data) by
  ``scripts/pretrain_small_sam.py``: the stand-in for SAM ViT-B in the quickstart, the experiments and tests.
- ``small-dbsam-brain``: DB-SAM fine-tuned from ``small-sam`` on the brain-MR sample (``data/sample``):
  the default model of ``dbsam segment``, a demonstration, not a clinical tool.

Each folder is a ``from_pretrained`` folder with its processor and a model card (README.md) giving its scores.
"""

from __future__ import annotations

from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent
SMALL_SAM = "small-sam"
DEFAULT_MODEL = "small-dbsam-brain"
DEFAULT_MODEL_NOTICE = (
    "using the default model {folder}: a SMALL DEMONSTRATION DB-SAM (128 px input, a few MB) fine-tuned on "
    "one brain MR (MNI Colin27 with AAL structures) from a SAM pretrained on generated scenes; it is no "
    "substitute for DB-SAM on SAM ViT-B. Pass a real model with --model FOLDER (a DB-SAM, SAM or MedSAM saved "
    "with save_pretrained, e.g. converted by conversion/convert_sam_to_dbsam.py)."
)


def model_folder(name: str) -> Path:
    """The folder of the shipped model ``name``, checked: a missing or damaged folder raises one clear error."""
    from modeling_dbsam.model_folder import ModelFolderError, check_model_folder

    folder = PRETRAINED_DIR / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the shipped model {name!r} is missing: no folder {folder}. Reinstall the package, or pass a model "
            "folder of your own"
        )
    try:
        check_model_folder(folder)
    except ModelFolderError as error:
        raise ModelFolderError(f"the shipped model {name!r} is damaged ({error}); reinstall the package") from None
    return folder


def default_model_folder() -> Path:
    """The default model of ``dbsam segment``: the small DB-SAM fine-tuned on brain MR."""
    return model_folder(DEFAULT_MODEL)


def small_sam_folder() -> Path:
    """The small SAM pretrained on generated scenes, the stand-in for SAM ViT-B."""
    return model_folder(SMALL_SAM)


__all__ = ["DEFAULT_MODEL_NOTICE", "default_model_folder", "model_folder", "small_sam_folder"]
