"""The committed real datasets (data/sample: brain MR; data/nuclei: microscopy) hold what their cards and scripts promise."""

from pathlib import Path

import numpy as np
import pytest

from modeling_dbsam.data import FEATURES, load_medsam_dataset

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE, NUCLEI = DATA / "sample", DATA / "nuclei"


def _card_row(ds, task: str, modality: str, dim: str) -> str:
    cells = [task, modality, dim]
    for split in ("train", "validation", "test"):
        cells += [str(len(set(ds[split]["case_id"]))), str(ds[split].num_rows)]
    return "| " + " | ".join(cells) + " |"


@pytest.mark.parametrize(
    ("folder", "task", "modality", "dim", "licence"),
    [
        (SAMPLE, "MR-T1 Brain Structures (AAL)", "MR-T1", "3D", "bsd-3-clause"),
        (NUCLEI, "Microscopy Nuclei (DSB 2018)", "Microscopy", "2D", "cc0-1.0"),
    ],
)
def test_splits_match_card_and_share_no_case(folder, task, modality, dim, licence):
    ds = load_medsam_dataset(folder)
    assert sorted(ds) == ["test", "train", "validation"] and ds["train"].features == FEATURES
    card = (folder / "README.md").read_text()
    assert _card_row(ds, task, modality, dim) in card
    assert licence in card and (folder / "LICENSE").is_file()
    cases = {split: set(ds[split]["case_id"]) for split in ds}
    assert not cases["train"] & cases["test"] and not cases["train"] & cases["validation"]
    assert not cases["validation"] & cases["test"]


def test_brain_slabs_cover_the_whole_head_and_share_no_slice():
    """Whole-head slices (both hemispheres) in every split, slabs separated by unlabelled slices."""
    ds = load_medsam_dataset(SAMPLE)
    slices = {split: set(ds[split]["slice_index"]) for split in ds}
    for a in slices:
        for b in slices:
            if a < b:
                gaps = np.abs(np.subtract.outer(sorted(slices[a]), sorted(slices[b])))
                assert gaps.min() >= 3  # 2 unlabelled slices between slabs of different splits
    for split in ds:
        labels = set(ds[split]["label"])
        assert {1, 2} <= labels or {11, 12} <= labels  # left and right structures alike
        image = np.asarray(ds[split][0]["image"])[..., 0]
        columns = np.nonzero(image.max(axis=0) > 20)[0]
        assert columns.max() - columns.min() > 80  # the whole head, not half of it
    example = ds["train"][0]
    image, mask = np.asarray(example["image"]), np.asarray(example["mask"])
    assert image.shape == (128, 128, 3) and mask.shape == (128, 128)
    # MedSAM's 100-pixel rule applies at native resolution: 217 x 181 px resized to 128 x 128 scale areas by 0.42
    smallest = min(int(np.count_nonzero(m)) for split in ds for m in ds[split]["mask"])
    assert smallest >= 0.95 * 100 * 128 * 128 / (217 * 181)
    # 1 mm MR (x 181, y 217) resized to 128 x 128: in-plane spacing scales, z stays.
    assert example["spacing"] == [1.0, 217 / 128, 181 / 128]


def test_nuclei_no_nucleus_in_two_splits():
    """Tiles of one image: every nucleus mask lies inside its own tile and the test tiles are one quadrant."""
    ds = load_medsam_dataset(NUCLEI)
    for split in ds:
        for row in ds[split]:
            image, mask = np.asarray(row["image"]), np.asarray(row["mask"])
            assert image.shape == (128, 128, 3) and mask.sum() >= 100
    test_tiles = {case[-4:] for case in ds["test"]["case_id"]}
    assert test_tiles == {"r2c2", "r2c3", "r3c2", "r3c3"}
