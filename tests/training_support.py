"""Shared pieces of the training tests: a tiny dataset in the project's schema, the tiny model as a
config file, and an in-process runner for ``training/train.py``."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
from tiny import tiny_sam_config_dict

from modeling_dbsam.data.schema import FEATURES, encode_image, make_example

ROOT = Path(__file__).resolve().parents[1]
TRAINING_DIR = ROOT / "training"  # on pytest's pythonpath (pyproject.toml): its modules import by name

IMAGE_SIZE = 32  # the tiny model's input size, so the processor does not resize


def square_example(index: int, rng: np.random.Generator, case: str, dimension: str = "2D") -> dict:
    """A noisy image holding one bright square (the object) at a random place."""
    size = int(rng.integers(6, 14))
    y, x = rng.integers(1, IMAGE_SIZE - size - 1, size=2)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[y : y + size, x : x + size] = 1
    image = (rng.integers(0, 60, size=mask.shape) + 150 * mask).astype(np.uint8)
    return make_example(
        encode_image(np.repeat(image[..., None], 3, axis=-1), f"synthetic {index}"),
        mask,
        task="Synthetic Square",
        modality="MR",
        dimension=dimension,
        case_id=case,
        slice_index=index,
        label=1,
        spacing=[1.0, 1.0, 1.0] if dimension == "3D" else [1.0, 1.0],
        source=f"synthetic {index}",
    )


def make_dataset(folder: Path, num_train: int = 8, num_test: int = 4, seed: int = 0, num_validation: int = 0) -> Path:
    """A DatasetDict (train / [validation /] test) in the project's schema, written with ``save_to_disk``."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", num_train), ("test", num_test), ("validation", num_validation)):
        if split == "validation" and not count:
            continue
        rows = [square_example(i, rng, case=f"{split}-case-{i // 2}", dimension="3D") for i in range(count)]
        splits[split] = datasets.Dataset.from_list(rows, features=FEATURES)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def write_tiny_model_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**tiny_sam_config_dict(), **overrides}))
    return path
