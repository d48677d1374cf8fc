"""Readers of the MedSAM layouts, on fixture folders written here in both of the authors' layouts."""

import os
import warnings

import datasets
import numpy as np
import pytest

from modeling_dbsam.data import FEATURES, detect_layout, load_medsam_dataset, save_dataset
from modeling_dbsam.data.card import merge_card


def _gray_rgb(rng, shape):
    plane = rng.integers(0, 256, shape, dtype=np.uint8)
    return np.repeat(plane[..., None], 3, axis=-1)


def _blob_labels(shape, boxes):
    """A label map with rectangles ``value: (y0, y1, x0, x1)``."""
    labels = np.zeros(shape, dtype=np.uint8)
    for value, (y0, y1, x0, x1) in boxes.items():
        labels[y0:y1, x0:x1] = value
    return labels


@pytest.fixture
def npy_folder(tmp_path):
    """The authors' train layout: two slices of a CT liver case and one of an unnamed case."""
    rng = np.random.default_rng(0)
    root = tmp_path / "MedSAM-Train"
    (root / "npy_images").mkdir(parents=True)
    (root / "npy_gts").mkdir()
    slices = {
        "CT_Liver_case01-003": {1: (10, 40, 10, 50), 2: (60, 80, 60, 90)},
        "CT_Liver_case01-004": {1: (12, 42, 10, 50)},
        "scan_07-000": {5: (0, 5, 0, 5)},
    }
    arrays = {}
    for name, boxes in slices.items():
        image, labels = _gray_rgb(rng, (96, 96)), _blob_labels((96, 96), boxes)
        np.savez_compressed(root / "npy_images" / f"{name}.npz", img=image)
        np.save(root / "npy_gts" / f"{name}.npy", labels)
        arrays[name] = (image, labels)
    return root, arrays


@pytest.fixture
def npz_folder(tmp_path):
    """The authors' test layout (task folders, no spacing) plus one case in MedSAM's later layout."""
    rng = np.random.default_rng(1)
    root = tmp_path / "Test"
    stack = np.stack([_gray_rgb(rng, (64, 64)) for _ in range(3)])
    gts = np.stack([_blob_labels((64, 64), {1: (5, 20 + i, 5, 30)}) for i in range(3)])
    gts[2] = 0  # a slice without the object
    (root / "01-MR-T1_Brain_Ventricle").mkdir(parents=True)
    np.savez_compressed(root / "01-MR-T1_Brain_Ventricle" / "case_a.npz", imgs=stack, gts=gts)
    (root / "22-2D-Images").mkdir()
    rgb = rng.integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    two = np.stack([_blob_labels((48, 40), {1: (1, 30, 2, 20)}), _blob_labels((48, 40), {1: (3, 9, 3, 9)})])
    np.savez_compressed(root / "22-2D-Images" / "US_Breast_batch.npz", imgs=rgb, gts=two)
    (root / "99-Mystery").mkdir()
    np.savez_compressed(root / "99-Mystery" / "thing.npz", img=rgb[0], gt=two[0])
    later = root / "CT_Liver_later"
    later.mkdir()
    volume = rng.integers(0, 256, (2, 32, 40), dtype=np.uint8)
    labels = np.stack([_blob_labels((32, 40), {1: (2, 9, 2, 9), 3: (20, 30, 20, 30)})] * 2)
    np.savez_compressed(later / "liver_001.npz", imgs=volume, gts=labels, spacing=np.array([0.8, 0.7, 2.5]))
    return root, {"stack": stack, "gts": gts, "rgb": rgb, "two": two, "volume": volume, "labels": labels}


def _rows(dataset):
    return {(r["case_id"], r["slice_index"], r["label"]): r for r in dataset}


def test_npy_layout_one_row_per_object(npy_folder, tmp_path):
    root, arrays = npy_folder
    with pytest.warns(UserWarning, match="scan") as record:
        ds = load_medsam_dataset(root, cache_dir=str(tmp_path / "cache"))
    assert len([w for w in record if "match none of the 30 tasks" in str(w.message)]) == 1
    assert list(ds) == ["train"]  # named from "MedSAM-Train"
    rows = _rows(ds["train"])
    assert set(rows) == {
        ("CT_Liver_case01", 3, 1),
        ("CT_Liver_case01", 3, 2),
        ("CT_Liver_case01", 4, 1),
        ("scan_07", 0, 5),
    }
    for (case, index, label), row in rows.items():
        image, labels = arrays[f"{case}-{index:03d}"]
        assert np.array_equal(np.asarray(row["image"]), image)
        assert np.array_equal(np.asarray(row["mask"]), (labels == label).astype(np.uint8))
        assert row["spacing"] is None
    liver = rows[("CT_Liver_case01", 3, 2)]
    assert (liver["task"], liver["modality"], liver["dimension"]) == ("CT Liver", "CT", "3D")
    assert rows[("scan_07", 0, 5)]["task"] == "unknown"
    assert ds["train"].features == FEATURES


def test_npz_layouts_tasks_spacing_and_2d_stacks(npz_folder, tmp_path):
    root, arrays = npz_folder
    with pytest.warns(UserWarning, match="99-Mystery") as record:
        ds = load_medsam_dataset(root, cache_dir=str(tmp_path / "cache"))
    assert sum("match none of the 30 tasks" in str(w.message) for w in record) == 1
    assert list(ds) == ["test"]
    rows = _rows(ds["test"])
    brain = [r for r in rows.values() if r["task"] == "MR-T1 Brain Ventricles"]
    assert [r["slice_index"] for r in brain] == [0, 1]  # slice 2 has no object
    for row in brain:
        index = row["slice_index"]
        assert np.array_equal(np.asarray(row["image"]), arrays["stack"][index])
        assert np.asarray(row["mask"]).sum() == (arrays["gts"][index] == 1).sum()
        assert row["case_id"] == "01-MR-T1_Brain_Ventricle/case_a" and row["dimension"] == "3D"
    breast = sorted((r for r in rows.values() if r["task"] == "Ultrasound Breast Tumor"), key=lambda r: r["case_id"])
    assert [r["case_id"] for r in breast] == ["22-2D-Images/US_Breast_batch#0", "22-2D-Images/US_Breast_batch#1"]
    assert np.array_equal(np.asarray(breast[1]["image"]), arrays["rgb"][1])  # colour kept
    assert all(r["dimension"] == "2D" and r["slice_index"] == 0 for r in breast)
    later = [r for r in rows.values() if r["case_id"] == "CT_Liver_later/liver_001"]
    assert {(r["slice_index"], r["label"]) for r in later} == {(0, 1), (0, 3), (1, 1), (1, 3)}
    # SimpleITK's (x, y, z) = (0.8, 0.7, 2.5) is stored in array order (z, y, x).
    assert all(r["spacing"] == [2.5, 0.7, 0.8] and r["task"] == "CT Liver" for r in later)
    gray = np.asarray(later[0]["image"])
    assert gray.shape == (32, 40, 3) and np.array_equal(gray[..., 2], arrays["volume"][later[0]["slice_index"]])
    assert rows[("99-Mystery/thing", 0, 1)]["task"] == "unknown"


def test_split_folders_dicts_task_map_and_filter(npy_folder, npz_folder, tmp_path):
    (npy_root, _), (npz_root, _) = npy_folder, npz_folder
    assert (
        detect_layout(npy_root) == "npy"
        and detect_layout(npz_root) == "npz"
        and detect_layout(tmp_path / "nope") is None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_folder = load_medsam_dataset(tmp_path, cache_dir=str(tmp_path / "cache"))
        by_dict = load_medsam_dataset(
            {"train": npy_root, "test": npz_root},
            task_map={"99-Mystery/*": "Ultrasound Breast Tumor", "scan_*": "Endoscope Polyp"},
            cache_dir=str(tmp_path / "cache"),
        )
    assert sorted(by_folder) == sorted(by_dict) == ["test", "train"]
    assert by_dict["train"].num_rows == by_folder["train"].num_rows == 4
    liver = by_dict["test"].filter(lambda ex: ex["task"] == "CT Liver")
    assert liver.num_rows == 4 and set(liver["case_id"]) == {"CT_Liver_later/liver_001"}
    assert "unknown" not in set(by_dict["test"]["task"]) | set(by_dict["train"]["task"])


def test_arrow_round_trip_with_card(npz_folder, tmp_path):
    root, _ = npz_folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_medsam_dataset(root, cache_dir=str(tmp_path / "cache"))
    out = save_dataset(ds, tmp_path / "arrow")
    card = (out / "README.md").read_text()
    assert "| CT Liver | CT | 3D | 1 | 4 |" in card and "| MR-T1 Brain Ventricles | MR-T1 | 3D | 1 | 2 |" in card
    again = load_medsam_dataset(out)
    assert again["test"].num_rows == ds["test"].num_rows
    assert again["test"][0]["case_id"] == ds["test"][0]["case_id"]
    assert np.array_equal(np.asarray(again["test"][3]["mask"]), np.asarray(ds["test"][3]["mask"]))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_dataset(ds, out)
    ds.save_to_disk(str(tmp_path / "plain"))  # standard datasets calls work on the result
    assert datasets.load_from_disk(str(tmp_path / "plain"))["test"].num_rows == ds["test"].num_rows


def test_card_merge_keeps_hub_metadata():
    hub = "---\ndataset_info:\n  features: []\nconfigs:\n- config_name: default\n---\n# generated\n"
    card = "---\nlicense: other\n---\n# ours\n"
    merged = merge_card(hub, card)
    assert "configs:" in merged and "dataset_info:" in merged and "license: other" in merged
    assert merged.endswith("# ours\n") and "# generated" not in merged


def test_cache_follows_file_changes(npz_folder, tmp_path):
    root, arrays = npz_folder
    case = root / "CT_Liver_later" / "liver_001.npz"
    kwargs = {"cache_dir": str(tmp_path / "cache"), "task_map": {"99-Mystery/*": "X-Ray Heart"}}
    first = load_medsam_dataset(root, **kwargs)["test"]
    assert load_medsam_dataset(root, **kwargs)["test"].cache_files == first.cache_files  # unchanged: cache reused
    labels = arrays["labels"].copy()
    labels[:, 2:9, 2:9] = 0  # drop label 1
    np.savez_compressed(case, imgs=arrays["volume"], gts=labels, spacing=np.array([0.8, 0.7, 2.5]))
    os.utime(case, ns=(1, 1))
    second = load_medsam_dataset(root, **kwargs)["test"]
    assert second.num_rows == first.num_rows - 2


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            {"imgs": np.zeros((2, 8, 8, 3), np.uint8), "gts": np.ones((2, 8, 9), np.uint8)},
            "does not match label shape",
        ),
        ({"images": np.zeros((2, 8, 8, 3), np.uint8), "gts": np.ones((2, 8, 8), np.uint8)}, "has no 'imgs' or 'img'"),
        ({"imgs": np.zeros((2, 8, 8, 3), np.float32), "gts": np.ones((2, 8, 8), np.uint8)}, "expected uint8"),
        ({"imgs": np.zeros((1, 8, 8, 3), np.uint8), "gts": np.full((1, 8, 8), 0.5)}, "non-integer"),
        (
            {
                "imgs": np.zeros((1, 8, 8), np.uint8),
                "gts": np.ones((1, 8, 8), np.uint8),
                "spacing": np.array([1.0, -1, 1]),
            },
            "spacing",
        ),
    ],
)
def test_bad_npz_files_name_the_file_and_problem(tmp_path, arrays, message):
    folder = tmp_path / "CT_Liver"
    folder.mkdir()
    np.savez(folder / "bad_case.npz", **arrays)
    with pytest.raises(ValueError, match=message) as error:
        load_medsam_dataset(folder, cache_dir=str(tmp_path / "cache"))
    assert "bad_case.npz" in str(error.value)


def test_truncated_files_raise_or_are_skipped_and_counted(npz_folder, tmp_path):
    root, _ = npz_folder
    bad = root / "CT_Liver_later" / "liver_002.npz"
    bad.write_bytes((root / "CT_Liver_later" / "liver_001.npz").read_bytes()[:200])
    kwargs = {"cache_dir": str(tmp_path / "cache"), "task_map": {"99-Mystery/*": "X-Ray Heart"}}
    with pytest.raises(ValueError, match="liver_002.npz: cannot be read"):
        load_medsam_dataset(root, **kwargs)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .*liver_002.npz"):
        ds = load_medsam_dataset(root, on_error="skip", **kwargs)
    assert ds["test"].num_rows == 9 and "CT_Liver_later/liver_002" not in set(ds["test"]["case_id"])


@pytest.mark.filterwarnings("ignore:.*match none of the 30 tasks")
def test_npy_layout_problems(npy_folder, tmp_path):
    root, _ = npy_folder
    (root / "npy_gts" / "scan_07-000.npy").unlink()
    with pytest.raises(ValueError, match=r"scan_07-000"):
        load_medsam_dataset(root, cache_dir=str(tmp_path / "cache"))
    np.save(root / "npy_gts" / "scan_07-000.npy", np.ones((95, 96), np.uint8))
    with pytest.raises(ValueError, match=r"scan_07-000.npz: image shape \(96, 96, 3\) does not match"):
        load_medsam_dataset(root, cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(ValueError, match="layout must be one of"):
        load_medsam_dataset(root, layout="zip")


def test_push_to_hub_with_card_uploads_the_merged_card(npz_folder, tmp_path, monkeypatch):
    """Offline: the Hub calls are replaced; the README uploaded must be our card with the Hub's metadata kept."""
    import huggingface_hub

    from modeling_dbsam.data import dataset_card, push_to_hub_with_card

    root, _ = npz_folder
    ds = load_medsam_dataset(root, cache_dir=str(tmp_path / "cache"), task_map={"99-Mystery/*": "X-Ray Heart"})
    pushed, uploaded = [], {}
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.append(repo_id))
    generated = tmp_path / "README.md"
    generated.write_text("---\nconfigs:\n- config_name: default\n---\n# generated\n")
    monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", lambda self, *a, **kw: str(generated))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", lambda self, **kw: uploaded.update(kw))
    push_to_hub_with_card(ds, "user/medsam-30", dataset_card(ds, title="MedSAM test", intensity="as stored"))
    readme = uploaded["path_or_fileobj"].decode()
    assert pushed == ["user/medsam-30"] and uploaded["path_in_repo"] == "README.md"
    assert "config_name: default" in readme and "| CT Liver | CT | 3D | 1 | 4 |" in readme
