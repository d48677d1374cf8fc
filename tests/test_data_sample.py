"""The committed sample dataset (data/sample) loads fast and holds what its card and script promise."""

from pathlib import Path

import numpy as np

from modeling_dbsam.data import FEATURES, load_medsam_dataset

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def test_sample_splits_counts_and_geometry():
    ds = load_medsam_dataset(SAMPLE)
    assert sorted(ds) == ["test", "train"] and ds["train"].features == FEATURES
    assert set(ds["train"]["case_id"]) == {"colin27_left"} and set(ds["test"]["case_id"]) == {"colin27_right"}
    card = (SAMPLE / "README.md").read_text()
    row = f"| MR-T1 Brain Structures (AAL) | MR-T1 | 3D | 1 | {ds['train'].num_rows} | 1 | {ds['test'].num_rows} |"
    assert row in card and 200 <= ds["train"].num_rows <= 600
    assert "bsd-3-clause" in card and (SAMPLE / "LICENSE").is_file()
    for split in ds.values():
        assert set(split["label"]) == set(range(1, 7))  # the six structures in both hemispheres
    example = ds["train"][0]
    image, mask = np.asarray(example["image"]), np.asarray(example["mask"])
    assert image.shape == (128, 128, 3) and mask.shape == (128, 128) and mask.sum() >= 100
    # 1 mm MR (x 181, y 217) resized to 128 x 128: in-plane spacing scales, z stays.
    assert example["spacing"] == [1.0, 217 / 128, 181 / 128]


def test_hemispheres_do_not_overlap():
    """Train images hold one half of the head and test images the other half."""
    ds = load_medsam_dataset(SAMPLE)
    columns = {}
    for split in ds:
        images = [np.asarray(ds[split][i]["image"])[..., 0] for i in range(0, ds[split].num_rows, 25)]
        columns[split] = np.nonzero(np.max(images, axis=(0, 1)))[0]
    shared = np.intersect1d(columns["train"], columns["test"])
    assert shared.size <= 1  # the midline column, blended by the bicubic resize
    assert columns["train"].size > 50 and columns["test"].size > 50
