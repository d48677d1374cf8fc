"""Raw-volume import on the real brain MR + AAL atlas (mricron-data) and on synthetic edge cases.

Expected values are derived here independently of the import code: voxel counts with numpy,
MedSAM's percentile rule written out, nearest-neighbour resizing with SimpleITK's resampler.
"""

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from modeling_dbsam.cli import main as dbsam
from modeling_dbsam.data import load_medsam_dataset, prepare_raw_dataset
from modeling_dbsam.data import raw as raw_module
from modeling_dbsam.data.pairing import RawCase, find_glob_cases
from modeling_dbsam.data.raw import ImportSettings, case_examples, open_case
from modeling_dbsam.data.splits import assign_splits

MR = "/usr/share/mricron/templates/ch2.nii.gz"
ATLAS = "/usr/share/mricron/templates/aal.nii.gz"
LABELS = [7, 47, 48, 85, 86]  # Frontal_Mid_L (from z = 69), Lingual L/R, Temporal_Mid L/R
SLABS = {"brainA": (60, 66), "brainB": (70, 76), "brainC": (80, 86)}  # z ranges: disjoint "patients"


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    """Three cases cut from the brain MR (as float, so the MR rule applies) with the atlas labels."""
    mr, atlas = sitk.ReadImage(MR), sitk.ReadImage(ATLAS)
    assert mr.GetSize() == atlas.GetSize() and mr.GetSpacing() == atlas.GetSpacing()
    assert mr.GetOrigin() == atlas.GetOrigin() and mr.GetDirection() == atlas.GetDirection()
    root = tmp_path_factory.mktemp("brain") / "raw"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    arrays = {}
    for case, (z0, z1) in SLABS.items():
        image, labels = sitk.Cast(mr[:, :, z0:z1], sitk.sitkFloat32), atlas[:, :, z0:z1]
        sitk.WriteImage(image, str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(labels, str(root / "labelsTr" / f"{case}.nii.gz"))
        arrays[case] = (sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels))
    return root, arrays


def _medsam_mr_rule(volume):
    """MedSAM's non-CT rule, written out: clip at the 0.5/99.5 percentiles of non-zero voxels, scale, keep zeros."""
    low, high = np.percentile(volume[volume != 0], [0.5, 99.5])
    scaled = np.round((np.clip(volume, low, high) - low) / (high - low) * 255.0)
    scaled[volume == 0] = 0
    return scaled


def _medsam_dust(labels, values, min_volume=1000, min_area=100):
    """MedSAM's small-object rules written with SimpleITK's connected components (fully connected: 26 in 3D,
    8 in 2D): 3D components under ``min_volume`` voxels, then 2D components under ``min_area`` per slice."""

    def remove(mask_array, minimum):
        numbered = sitk.GetArrayFromImage(
            sitk.ConnectedComponent(sitk.GetImageFromArray(mask_array.astype(np.uint8)), True)
        )
        sizes = np.bincount(numbered.ravel())
        small = [k for k in range(1, len(sizes)) if sizes[k] < minimum]
        return np.isin(numbered, small), len(small)

    cleaned, removed_3d, removed_2d = labels.copy(), 0, 0
    for value in values:
        gone, count = remove(cleaned == value, min_volume)
        cleaned[gone], removed_3d = 0, removed_3d + count
        for z in range(len(cleaned)):
            gone, count = remove(cleaned[z] == value, min_area)
            cleaned[z][gone], removed_2d = 0, removed_2d + count
    return cleaned, removed_3d, removed_2d


def test_real_brain_native_size_counts_masks_intensities_boxes(brain, tmp_path):
    root, arrays = brain
    report = prepare_raw_dataset(
        root, tmp_path / "out", modality="MR-T1", task="MR-T1 Brain Atlas", labels=LABELS, size=None, split="1,0,0"
    )
    rows = load_medsam_dataset(tmp_path / "out")["train"]
    expected, dropped, empty, cleaned_maps = {}, np.zeros(2, int), 0, {}
    for case, (_, labels) in arrays.items():
        cleaned, removed_3d, removed_2d = _medsam_dust(labels, LABELS)
        dropped += (removed_3d, removed_2d)
        cleaned_maps[case] = cleaned
        for z, label_slice in enumerate(cleaned):
            counts = {v: int((label_slice == v).sum()) for v in LABELS}
            empty += not any(counts.values())
            expected |= {(case, z, v): c for v, c in counts.items() if c}
    found = {(r["case_id"], r["slice_index"], r["label"]): int(np.asarray(r["mask"]).sum()) for r in rows}
    assert found == expected
    assert dropped[1] > 0  # the atlas has small in-plane pieces, so the 2D rule is exercised on real data
    counts = (report.small_components_dropped_3d, report.small_components_dropped_2d, report.empty_slices_dropped)
    assert counts == (dropped[0], dropped[1], empty)
    assert report.cases["train"] == 3 and report.examples["train"] == len(expected) == rows.num_rows
    row = rows[0]
    assert (row["task"], row["modality"], row["dimension"], row["spacing"]) == (
        "MR-T1 Brain Atlas",
        "MR-T1",
        "3D",
        [1, 1, 1],
    )
    volume, labels = arrays[row["case_id"]]
    image = np.asarray(row["image"])
    reference = _medsam_mr_rule(volume.astype(np.float64))[row["slice_index"]]
    assert image.shape == (217, 181, 3) and np.array_equal(image[..., 0], image[..., 2])
    assert np.abs(image[..., 0] - reference).max() <= 1 and (image[..., 0] == reference).mean() > 0.99
    assert np.array_equal(np.asarray(row["mask"]), cleaned_maps[row["case_id"]][row["slice_index"]] == row["label"])


def test_medsam_dust_rules_run_at_native_resolution_before_resizing(tmp_path):
    """A 7 x 64 x 64 label volume built so that each rule drops exactly one known component, upsampled to 128.

    After a 2x upsampling every object would pass a 100-pixel count, so only rules applied at the native
    resolution drop them.
    """
    labels = np.zeros((7, 64, 64), np.uint8)
    labels[:, 2:16, 2:16] = 1  # 14 x 14 x 7 = 1372 voxels: kept
    labels[0:3, 2:12, 40:50] = 1  # 10 x 10 x 3 = 300 voxels: dropped by the 3D rule (100 px per slice)
    labels[1:7, 20:35, 2:17] = 2  # 15 x 15 x 6 = 1350 voxels ...
    labels[0, 35:40, 17:22] = 2  # ... plus a 25 px patch on slice 0 touching it diagonally across slices (26-conn):
    # kept by the 3D rule (1375 voxels), dropped on slice 0 by the 2D rule
    labels[:, 40:49, 30:39] = 3  # two 9 x 9 = 81 px squares touching at one corner: one 162 px component under
    labels[:, 49:58, 39:48] = 3  # 8-connectivity (kept; 4-connectivity would drop both), 1134 voxels in 3D: kept
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    hu = np.broadcast_to(np.linspace(-100, 100, 64, dtype=np.float32), labels.shape).copy()
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(raw / "imagesTr" / "dust_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(raw / "labelsTr" / "dust.nii.gz"))
    report = prepare_raw_dataset(raw, tmp_path / "out", modality="CT", size=128, split="1,0,0")
    assert (report.small_components_dropped_3d, report.small_components_dropped_2d) == (1, 1)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "1 in 3D, 1 in 2D slices" in card
    rows = load_medsam_dataset(tmp_path / "out")["train"]
    found = {(r["slice_index"], r["label"]): int(np.asarray(r["mask"]).sum()) for r in rows}
    # Masks come from the cleaned map, upsampled 2x (each pixel becomes 2 x 2).
    expected = {(z, 1): 196 * 4 for z in range(7)} | {(z, 3): 162 * 4 for z in range(7)}
    expected |= {(z, 2): 225 * 4 for z in range(1, 7)}
    assert found == expected
    # The thresholds are options: switched off, every object survives, the 3D-dropped block included.
    report = prepare_raw_dataset(
        raw, tmp_path / "all", modality="CT", size=128, split="1,0,0", min_volume=0, min_size=0
    )
    rows = load_medsam_dataset(tmp_path / "all")["train"]
    found = {(r["slice_index"], r["label"]): int(np.asarray(r["mask"]).sum()) for r in rows}
    assert found[(0, 1)] == (196 + 100) * 4 and found[(0, 2)] == 25 * 4
    assert (report.small_components_dropped_3d, report.small_components_dropped_2d) == (0, 0)


def test_2d_image_objects_under_100_px_are_dropped_before_upsampling(tmp_path):
    """The issue's case: a 120 x 45 px image with 21, 40 and 82 px objects, upsampled to 256, keeps none of them
    (after resizing they would count 248, 481 and 986 px); a 150 px object stays (2D images get no 3D rule)."""
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    Image.fromarray(np.full((45, 120, 3), 90, np.uint8)).save(raw / "img" / "a.png")
    mask = np.zeros((45, 120), np.uint8)
    mask[2:5, 2:9] = 1  # 21 px
    mask[10:15, 2:10] = 2  # 40 px
    mask[20:22, 2:43] = 3  # 82 px
    mask[30:40, 50:65] = 4  # 150 px
    Image.fromarray(mask).save(raw / "img" / "a_mask.png")
    report = prepare_raw_dataset(
        raw, tmp_path / "out", task="X-Ray Lungs", images="img/a.png", label_maps="img/a_mask.png", split="1,0,0"
    )
    rows = load_medsam_dataset(tmp_path / "out")["train"]
    assert rows["label"] == [4]
    assert (report.small_components_dropped_3d, report.small_components_dropped_2d) == (0, 3)


def test_real_brain_box_in_model_frame(brain, tmp_path):
    """The tight box of a stored object, through the tiny processor's 217 x 181 -> 32 x 27 frame."""
    from tiny import tiny_processor

    from modeling_dbsam.data import SamBoxTransform

    root, arrays = brain
    prepare_raw_dataset(root, tmp_path / "out", modality="MR", labels=[85], size=None, split="1,0,0")
    rows = load_medsam_dataset(tmp_path / "out")["train"]
    inputs = rows.with_transform(SamBoxTransform(tiny_processor(), fixed_shift=0))[:3]
    for index in range(3):
        row = rows[index]
        ys, xs = np.nonzero(arrays[row["case_id"]][1][row["slice_index"]] == 85)
        expected = np.array([xs.min() * 27 / 181, ys.min() * 32 / 217, xs.max() * 27 / 181, ys.max() * 32 / 217])
        np.testing.assert_allclose(inputs["input_boxes"][index, 0].numpy(), expected, rtol=1e-6)


def test_resize_spacing_nearest_labels_and_case_level_split(brain, tmp_path):
    root, arrays = brain
    report = prepare_raw_dataset(
        root, tmp_path / "out", modality="MR", labels=LABELS, size=64, min_size=20, split="0.34,0.33,0.33"
    )
    ds = load_medsam_dataset(tmp_path / "out")
    assert sorted(ds) == ["test", "train", "validation"]
    cases = {split: set(ds[split]["case_id"]) for split in ds}
    assert all(len(c) == 1 for c in cases.values()) and set.union(*cases.values()) == set(SLABS)
    assert (
        assign_splits([RawCase(c, "", "") for c in SLABS], (0.34, 0.33, 0.33), seed=0)["train"][0].case_id
        in cases["train"]
    )
    row = ds["test"][0]
    assert row["spacing"] == [1.0, 217 / 64, 181 / 64] and np.asarray(row["image"]).shape == (64, 64, 3)
    label_slice = sitk.GetImageFromArray(arrays[row["case_id"]][1][row["slice_index"]])
    step = (181 / 64, 217 / 64)
    resampled = sitk.Resample(
        label_slice, (64, 64), sitk.Transform(), sitk.sitkNearestNeighbor,
        (-0.5 + step[0] / 2, -0.5 + step[1] / 2), step, label_slice.GetDirection(), 0, label_slice.GetPixelID(),
    )  # fmt: skip
    assert np.array_equal(np.asarray(row["mask"]), sitk.GetArrayFromImage(resampled) == row["label"])
    assert sum(report.examples.values()) == sum(ds[s].num_rows for s in ds)


def _ct_case(folder, name, hu_rows, labels, spacing=(0.5, 0.5, 2.0)):
    """A CT volume whose rows hold known HU values, with its label map."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    volume = np.broadcast_to(np.asarray(hu_rows, np.int16)[None, :, None], (4, len(hu_rows), 16)).copy()
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(spacing)
    label = sitk.GetImageFromArray(labels.astype(np.uint8))
    label.SetSpacing(spacing)
    sitk.WriteImage(image, str(folder / "imagesTr" / f"{name}_0000.nii.gz"))
    sitk.WriteImage(label, str(folder / "labelsTr" / f"{name}.nii.gz"))


def test_ct_window_through_the_cli_and_output_folder_rules(tmp_path, capsys):
    raw = tmp_path / "raw"
    labels = np.zeros((4, 5, 16), np.uint8)
    labels[1, :, :8], labels[1, :, 8:], labels[2, :, :] = 1, 2, 3
    _ct_case(raw, "ct01", [-1000, 0, 40, 240, 1000], labels)
    out = tmp_path / "out"
    argv = [
        "prepare-data",
        str(raw),
        str(out),
        "--modality",
        "CT",
        "--window",
        "40,400",
        "--labels",
        "1,3",
        "--size",
        "0",
        "--min-volume",
        "0",
    ]
    assert dbsam([*argv, "--min-size", "10", "--split", "1,0,0"]) == 0
    assert "train: 1 cases, 2 examples" in capsys.readouterr().out
    rows = {r["label"]: r for r in load_medsam_dataset(out)["train"]}
    assert sorted(rows) == [1, 3]
    # window 40/400 spans -160..240 HU: -1000 -> 0, 0 -> 102, 40 -> 128 (127.5 rounds to even), 240 and 1000 -> 255
    assert np.asarray(rows[1]["image"])[:, 0, 0].tolist() == [0, 102, 128, 255, 255]
    assert rows[1]["spacing"] == [2.0, 0.5, 0.5] and rows[3]["slice_index"] == 2
    assert dbsam([*argv, "--min-size", "10"]) == 2
    assert "exists; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err
    assert dbsam([*argv, "--min-size", "10", "--window", "lung", "--overwrite", "--split", "1,0,0"]) == 0
    lung = {r["label"]: r for r in load_medsam_dataset(out)["train"]}
    # lung preset -600/1500 spans -1350..150 HU: 0 HU -> round(1350 / 1500 * 255) = 230
    assert np.asarray(lung[1]["image"])[1, 0, 0] == 230
    assert dbsam(["prepare-data", str(raw), str(tmp_path / "o2"), "--modality", "MR", "--window", "40,400"]) == 2
    assert "windows apply to CT only" in capsys.readouterr().err


def test_bad_cases_are_skipped_counted_and_named(tmp_path):
    raw = tmp_path / "raw"
    labels = np.zeros((4, 5, 16), np.uint8)
    labels[:, :, 2:14] = 1
    _ct_case(raw, "good", [0, 10, 20, 30, 40], labels)
    _ct_case(raw, "shifted", [0, 10, 20, 30, 40], labels)
    moved = sitk.ReadImage(str(raw / "labelsTr" / "shifted.nii.gz"))
    moved.SetSpacing((0.6, 0.5, 2.0))
    sitk.WriteImage(moved, str(raw / "labelsTr" / "shifted.nii.gz"))
    _ct_case(raw, "cut", [0, 10, 20, 30, 40], labels)
    image_file = raw / "imagesTr" / "cut_0000.nii.gz"
    image_file.write_bytes(image_file.read_bytes()[:60])
    _ct_case(raw, "lonely", [0, 10, 20, 30, 40], labels)
    (raw / "labelsTr" / "lonely.nii.gz").unlink()
    series = raw / "imagesTr" / "dicom"
    series.mkdir()
    for index, shape in enumerate([(16, 5), (16, 5), (16, 6), (16, 5)]):
        plane = sitk.GetImageFromArray(np.zeros(shape[::-1], np.int16))
        for tag, value in (("0020|000e", "1.2.3.4"), ("0020|0013", str(index + 1)), ("0020|0032", f"0\\0\\{index}")):
            plane.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(series / f"s{index}.dcm"))
        writer.Execute(plane)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(raw / "labelsTr" / "dicom.nii.gz"))
    report = prepare_raw_dataset(raw, tmp_path / "out", modality="CT", min_size=1, min_volume=0, split="1,0,0")
    reasons = "\n".join(report.skipped)
    assert len(report.skipped) == 4, reasons
    assert "shifted.nii.gz: label map spacing (0.6, 0.5, 2.0) differs from image" in reasons
    assert "cut_0000.nii.gz: cannot be read" in reasons
    assert "lonely_0000.nii.gz: no label map" in reasons
    assert "dicom: DICOM series mixes slice sizes" in reasons
    assert report.cases["train"] == 1 and set(load_medsam_dataset(tmp_path / "out")["train"]["case_id"]) == {"good"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Files or cases skipped: 4." in card and "shifted.nii.gz" in card


def test_failed_import_leaves_no_output_folder(tmp_path):
    raw = tmp_path / "raw"
    _ct_case(raw, "tiny", [0, 10, 20, 30, 40], np.pad(np.ones((4, 2, 2), np.uint8), ((0, 0), (0, 3), (0, 14))))
    with pytest.raises(ValueError, match="no example survived"):
        prepare_raw_dataset(raw, tmp_path / "out", modality="CT", size=None)  # every object is under 100 pixels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    with pytest.raises(ValueError, match="modality"):
        prepare_raw_dataset(raw, tmp_path / "out")
    with pytest.raises(ValueError, match="task 'CT Liver' is CT"):
        prepare_raw_dataset(raw, tmp_path / "out", task="liver ct", modality="MR")


def test_connected_components_and_task_window_preset(tmp_path):
    raw = tmp_path / "Lungs"
    labels = np.zeros((4, 5, 16), np.uint8)
    labels[1:3, :, 1:4] = 2
    labels[1:3, :, 9:15] = 2
    _ct_case(raw, "c1", [-1000, -600, 0, 100, 200], labels)
    report = prepare_raw_dataset(
        raw, tmp_path / "out", modality="CT", size=None, min_size=1, min_volume=0, components=True, split="1,0,0"
    )
    rows = load_medsam_dataset(tmp_path / "out")["train"]
    assert report.task == "CT Lung Infections"  # from the modality and the folder name
    assert sorted(set(rows["label"])) == [2001, 2002]
    widths = {r["label"]: int(np.asarray(r["mask"]).any(axis=0).sum()) for r in rows}
    assert widths == {2001: 3, 2002: 6}
    # The task's preset (lung: -600/1500 -> -1350..150 HU) applies without --window: -600 HU -> 128.
    assert np.asarray(rows[0]["image"])[1, 0, 0] == round(750 / 1500 * 255)


def test_2d_png_pairs_by_glob(tmp_path):
    raw = tmp_path / "raw"
    for case in ("a", "b"):
        (raw / "scans" / case).mkdir(parents=True)
        rgb = np.random.default_rng(len(case)).integers(0, 256, (40, 30, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(raw / "scans" / case / "photo.png")
        mask = np.zeros((40, 30), np.uint8)
        mask[5:25, 5:20] = 255
        Image.fromarray(mask).save(raw / "scans" / case / "mask.png")
    cases, problems = find_glob_cases(raw, "scans/*/photo.png", "scans/*/mask.png")
    assert [c.case_id for c in cases] == ["a", "b"] and problems == []
    prepare_raw_dataset(
        raw, tmp_path / "out", task="Endoscope Polyp", images="scans/*/photo.png", label_maps="scans/*/mask.png",
        size=None, split="1,0,0",
    )  # fmt: skip
    rows = load_medsam_dataset(tmp_path / "out")["train"]
    row = rows[0]
    assert (row["task"], row["modality"], row["dimension"], row["spacing"], row["label"]) == (
        "Endoscope Polyp", "Endoscope", "2D", None, 255,
    )  # fmt: skip
    expected = np.asarray(Image.open(raw / "scans" / row["case_id"] / "photo.png"))
    assert np.array_equal(np.asarray(row["image"]), expected) and np.asarray(row["mask"]).sum() == 20 * 15


def test_import_streams_slice_by_slice(brain, monkeypatch):
    """The first example comes out after one slice is converted, not after the whole volume."""
    root, _ = brain
    resized = []
    original = raw_module.resize_image
    monkeypatch.setattr(raw_module, "resize_image", lambda image, size: resized.append(1) or original(image, size))
    settings = ImportSettings("MR Brain", "MR", None, tuple(LABELS), 64, 100, False)
    case = RawCase("brainA", str(root / "imagesTr" / "brainA_0000.nii.gz"), str(root / "labelsTr" / "brainA.nii.gz"))
    examples = case_examples(open_case(case, settings), settings, raw_module.ImportReport())
    next(examples)
    assert len(resized) == 1
    assert len(list(examples)) >= 5 and len(resized) == 6


def test_atomic_folder_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    from modeling_dbsam.data import atomic_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_folder(out, overwrite=True) as work:
        (work / "result").mkdir()
        (work / "result" / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    with atomic_folder(out, overwrite=True) as work:
        (work / "result").mkdir()
        (work / "result" / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("modality, window", [("CT", None), ("CT", "lung"), ("MR", None), ("PET", None)])
def test_rule_fitted_on_the_volume_applied_per_slice_equals_whole_volume_conversion(modality, window):
    from modeling_dbsam.intensity import fit_intensity_rule, to_uint8

    volume = np.random.default_rng(1).normal(100, 400, (5, 12, 10)).astype(np.float32)
    volume[:, :2] = 0
    rule = fit_intensity_rule(volume, modality, window)
    assert np.array_equal(np.stack([rule(s) for s in volume]), to_uint8(volume, modality, window))
