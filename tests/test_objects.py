"""Several objects per image or volume (one label map), the CLI's --box/--label/--boxes, and DICOM-SEG output."""

from __future__ import annotations

import json
import re

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_data import ct_series_volume, write_ct_series
from tiny import count_encoder_calls, save_tiny_dbsam, scrambled_tiny_dbsam, tiny_processor

from modeling_dbsam.cli import main
from modeling_dbsam.inference import encode_slices, segment_volume
from modeling_dbsam.io import read_image
from modeling_dbsam.objects import ObjectPrompt, read_objects_file, resolve_overlaps, segment_objects
from modeling_dbsam.predictor import predict_boxes
from modeling_dbsam.processing import IntensityConfig, to_model_rgb

CT = IntensityConfig("CT", (40, 400))
MR = IntensityConfig("MR")  # percentile clipping: the raw stored values of the test series are not HU


@pytest.fixture(scope="module")
def volume():
    return ct_series_volume(8)[:, ::2, ::2]  # (8, 64, 64) real CT values


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dbsam(tmp_path_factory.mktemp("objects_model"), modality="CT", window=(40, 400))


def test_overlaps_go_to_the_higher_score_on_each_slice():
    masks = np.zeros((2, 2, 4, 4), dtype=bool)
    masks[0, :, :3, :3] = True  # object 1 on both slices
    masks[1, :, 1:, 1:] = True  # object 2 overlaps it at [1:3, 1:3]
    scores = np.array([[0.9, 0.2], [0.5, 0.7]], dtype=np.float32)  # 1 wins slice 0, 2 wins slice 1
    labels = resolve_overlaps(masks, scores)
    assert labels.dtype == np.uint8
    assert (labels[0, 1:3, 1:3] == 1).all() and (labels[1, 1:3, 1:3] == 2).all()
    assert labels[0, 0, 0] == 1 and labels[0, 3, 3] == 2 and labels[1, 0, 0] == 1 and labels[1, 3, 3] == 2
    assert labels[0, 0, 3] == 0
    tie = resolve_overlaps(masks[:, 0], np.array([[0.5], [0.5]], dtype=np.float32))  # 2D, equal scores
    assert tie[1, 1] == 1 and tie[3, 3] == 2


def test_one_encoder_pass_per_slice_serves_every_object(model, processor, volume, monkeypatch):
    objects = [
        ObjectPrompt("a", (2, 2, 1, 40, 60, 5)),
        ObjectPrompt("b", (30, 20, 2, 62, 62, 6)),  # overlaps a on slices 2..5
        ObjectPrompt("c", (10, 10, 50, 50), key_slice=4),  # propagated over slices a and b encoded already
    ]
    calls = count_encoder_calls(model, monkeypatch)
    result = segment_objects(model, processor, volume, objects, is_volume=True, intensity=MR, batch_size=3)
    assert sum(calls) == 8  # slices 1..6 for the boxes, 0 and 7 for propagation: each once for all objects
    monkeypatch.undo()
    alone = [
        segment_volume(model, processor, volume, box=(2, 2, 1, 40, 60, 5), intensity=MR),
        segment_volume(model, processor, volume, box=(30, 20, 2, 62, 62, 6), intensity=MR),
        segment_volume(model, processor, volume, box_2d=(10, 10, 50, 50), key_slice=4, intensity=MR),
    ]
    assert result.names == ["a", "b", "c"] and result.labels.shape == volume.shape
    claimed = sum(a.astype(int) for a in alone)
    for value, mask in enumerate(alone, start=1):
        assert mask.any()
        only_here = (mask == 1) & (claimed == 1)
        assert (result.labels[only_here] == value).all()  # where one object claims a voxel, it is that object's
    assert ((result.labels > 0) == (claimed > 0)).all()
    overlap = claimed > 1
    assert overlap.any()
    for z, y, x in zip(*np.nonzero(overlap)):
        candidates = [k for k in range(3) if alone[k][z, y, x]]
        best = max(candidates, key=lambda k: (result.scores[k, z], -k))
        assert result.labels[z, y, x] == best + 1
    assert np.isnan(result.scores[0, 0]) and np.isnan(result.scores[1, 1]) and not np.isnan(result.scores[1, 2])


def test_2d_objects_share_one_encoder_pass(model, processor, monkeypatch):
    image = ct_series_volume(1)[0]
    boxes = [(5, 6, 70, 80), (40, 30, 120, 110)]
    calls = count_encoder_calls(model, monkeypatch)
    result = segment_objects(
        model, processor, image, [ObjectPrompt(f"o{i}", b) for i, b in enumerate(boxes)], is_volume=False, intensity=MR
    )
    assert calls == [1]
    monkeypatch.undo()
    expected = predict_boxes(model, processor, [to_model_rgb(image, MR)], [np.array(boxes)])[0]
    assert expected.masks.any(axis=(1, 2)).all()
    np.testing.assert_array_equal(result.labels > 0, expected.masks.any(axis=0))
    np.testing.assert_array_equal(result.scores[:, 0], expected.scores)


def test_slices_encoded_beforehand_only_run_the_decoder_and_change_nothing(model, processor, volume, monkeypatch):
    image = ct_series_volume(1)[0]
    cases = [  # (image, is_volume, box, the slice encoded beforehand)
        (volume, True, (2, 2, 3, 40, 60, 3), 3),  # one slice: what the app does with the slice on screen
        (image, False, (5, 6, 70, 80), 0),
        (volume, True, (2, 2, 3, 40, 60, 5), 3),  # slices 4 and 5 still go through the encoder
    ]

    def run(image, is_volume, box, embeddings=None):
        objects = [ObjectPrompt("a", box)]
        return segment_objects(
            model, processor, image, objects, is_volume=is_volume, intensity=MR, embeddings=embeddings
        )

    uncached = [run(image, is_volume, box) for image, is_volume, box, _ in cases]
    given = [
        encode_slices(model, processor, [MR.to_uint8(image)[z] if is_volume else to_model_rgb(image, MR)])
        for image, is_volume, _, z in cases
    ]
    calls = count_encoder_calls(model, monkeypatch)
    cached = [run(image, v, box, {z: encoded}) for (image, v, box, z), encoded in zip(cases, given)]
    assert calls == [2]
    for before, after in zip(uncached[:2], cached[:2]):
        assert before.labels.any()
        np.testing.assert_array_equal(after.labels, before.labels)
        np.testing.assert_array_equal(after.scores, before.scores)
    # slice 3 encoded alone, not in a batch with 4 and 5: the same up to the rounding of batched matrix products
    np.testing.assert_array_equal(cached[2].labels, uncached[2].labels)
    np.testing.assert_allclose(cached[2].scores, uncached[2].scores, rtol=1e-5)
    elsewhere = run(volume, True, cases[0][2], {4: given[0]})  # slice 3's embedding given as slice 4's: not used
    np.testing.assert_array_equal(elsewhere.labels, uncached[0].labels)
    misplaced = run(volume, True, (2, 2, 4, 40, 60, 4), {4: given[0]})
    assert (misplaced.labels[4] != run(volume, True, (2, 2, 4, 40, 60, 4)).labels[4]).sum() > 20  # it is used


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ([], "no object given"),
        ([ObjectPrompt("a", (1, 1, 0, 9, 9, 2)), ObjectPrompt("a", (2, 2, 0, 9, 9, 2))], "unique; repeated: a"),
        ([ObjectPrompt(" ", (1, 1, 0, 9, 9, 2))], "non-empty name"),
        ([ObjectPrompt("a", (1, 1, 0, 9, 9, 2)), ObjectPrompt("b", (5, 5, 0, 5, 9, 2))], "object 'b': .*inverted or empty"),
        ([ObjectPrompt("a", (1, 1, 9, 9))], "object 'a': a volume takes a 3D box"),
        ([ObjectPrompt("a", (1, 1, 9, 70), key_slice=2)], "object 'a': .*outside the image"),
    ],
)  # fmt: skip
def test_bad_objects_fail_before_the_model_runs(processor, volume, objects, message):
    with pytest.raises(ValueError, match=message):
        segment_objects(object(), processor, volume, objects, is_volume=True, intensity=CT)


def test_objects_files_json_and_csv(tmp_path):
    (tmp_path / "o.json").write_text(
        json.dumps(
            [{"name": "liver", "box": [1, 2, 0, 9, 9, 3]}, {"name": "lesion", "box": [3, 3, 6, 6], "key_slice": 2}]
        )
    )
    (tmp_path / "o.csv").write_text("name,x0,y0,x1,y1,z0,z1,key_slice\nliver,1,2,9,9,0,3,\nlesion,3,3,6,6,,,2\n")
    for name in ("o.json", "o.csv"):
        objects = read_objects_file(tmp_path / name)
        assert [(o.name, list(o.box), o.key_slice) for o in objects] == [
            ("liver", [1, 2, 0, 9, 9, 3], None),
            ("lesion", [3, 3, 6, 6], 2),
        ]
    (tmp_path / "bad.json").write_text('[{"box": [1, 2, 3, 4]}]')
    with pytest.raises(ValueError, match="bad.json: not a valid objects list"):
        read_objects_file(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("name,x0,y0,x1\na,1,2,3\n")
    with pytest.raises(ValueError, match="bad.csv: .*needs columns name, x0, y0, x1, y1"):
        read_objects_file(tmp_path / "bad.csv")


# --- dbsam segment with several objects --------------------------------------------------------------------------


def test_cli_writes_one_label_map_and_a_sidecar_of_names(model_dir, tmp_path, capsys):
    series = tmp_path / "series"
    write_ct_series(series, 6)
    image = read_image(series)
    out = tmp_path / "labels.nii.gz"
    boxes = ["4,6,1,60,70,3", "50,40,2,120,110,5"]
    argv = [str(series), "--model", model_dir, "--box", boxes[0], "--label", "liver", "--box", boxes[1]]
    assert main(["segment", *argv, "--label", "spleen", "--output", str(out)]) == 0
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == image.reference.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), image.reference.GetOrigin(), atol=1e-4)
    expected = segment_objects(
        scrambled_tiny_dbsam(),
        tiny_processor(),
        image.array,
        [ObjectPrompt(n, [float(v) for v in b.split(",")]) for n, b in zip(("liver", "spleen"), boxes)],
        is_volume=True,
        intensity=CT,
    )
    labels = sitk.GetArrayFromImage(written)
    np.testing.assert_array_equal(labels, expected.labels)
    assert set(np.unique(labels)) == {0, 1, 2}
    legend = json.loads((tmp_path / "labels.json").read_text())
    assert [(o["value"], o["name"]) for o in legend["objects"]] == [(1, "liver"), (2, "spleen")]
    assert [o["voxels"] for o in legend["objects"]] == [int((labels == 1).sum()), int((labels == 2).sum())]
    assert "highest predicted IoU" in legend["overlaps"]
    assert "1 liver:" in capsys.readouterr().out

    (tmp_path / "objects.json").write_text(
        json.dumps(
            [{"name": "liver", "box": [4, 6, 1, 60, 70, 3]}, {"name": "spleen", "box": [50, 40, 2, 120, 110, 5]}]
        )
    )
    from_file = tmp_path / "from_file.nrrd"
    argv = [str(series), "--model", model_dir, "--boxes", str(tmp_path / "objects.json"), "--output", str(from_file)]
    assert main(["segment", *argv]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(from_file))), labels)


def test_cli_bad_objects_are_one_clear_error(model_dir, tmp_path, capsys):
    series = tmp_path / "series"
    write_ct_series(series, 4)
    nifti = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.ReadImage([str(p) for p in sorted(series.iterdir())]), str(nifti))
    (tmp_path / "taken.json").write_text("{}")
    out = str(tmp_path / "out.nii.gz")
    model = ["--model", model_dir]
    cases = [
        ([str(series), *model, "--box", "1,1,0,9,9,2", "--box", "2,2,0,9,9,2", "--label", "a", "--output", out], "--label: got 1 names for 2 boxes"),
        ([str(series), *model, "--box", "1,1,0,9,9,2", "--box", "2,2,0,9,9,2", "--label", "a", "--label", "a", "--output", out], "unique; repeated: a"),
        ([str(series), *model, "--box", "1,1,0,1,9,2", "--output", out], "--box: box .* inverted or empty"),
        ([str(series), *model, "--box", "1,1,0,9,9,2", "--output", str(tmp_path / "taken.nii.gz")], "sidecar .*taken.json: exists"),
        ([str(nifti), *model, "--box", "1,1,0,9,9,2", "--output", str(tmp_path / "seg.dcm")], "DICOM-SEG.*scan.nii.gz is not DICOM"),
    ]  # fmt: skip
    capsys.readouterr()
    for argv, message in cases:
        assert main(["segment", *argv]) == 2, argv
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and re.search(message, error), (message, error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz", "series", "taken.json"]  # nothing written


# --- DICOM-SEG -------------------------------------------------------------------------------------------------


def test_dicom_seg_references_the_series_and_matches_the_nifti_label_map(model_dir, tmp_path):
    highdicom = pytest.importorskip("highdicom")
    series = tmp_path / "series"
    files = write_ct_series(series, 6)
    boxes = ["--box", "4,6,1,60,70,3", "--label", "liver", "--box", "50,40,2,120,110,5", "--label", "spleen"]
    assert main(["segment", str(series), "--model", model_dir, *boxes, "--output", str(tmp_path / "seg.dcm")]) == 0
    assert main(["segment", str(series), "--model", model_dir, *boxes, "--output", str(tmp_path / "l.nii.gz")]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))

    seg = highdicom.seg.segread(tmp_path / "seg.dcm")
    sources = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
    first = next(iter(sources.values()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "liver"), (2, "spleen")]
    assert all("RecommendedDisplayCIELabValue" in s for s in seg.SegmentSequence)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    np.testing.assert_allclose([float(v) for v in spacing], [float(v) for v in first.PixelSpacing])
    # Each source slice's frames, by position, hold exactly the NIfTI label map's slice.
    image = read_image(series)
    for z in range(len(labels)):
        position = image.reference.TransformIndexToPhysicalPoint((0, 0, z))
        uid = next(
            u for u, ds in sources.items() if np.allclose([float(v) for v in ds.ImagePositionPatient], position)
        )
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid],
            combine_segments=True,
            skip_overlap_checks=True,
            assert_missing_frames_are_empty=True,
        )[0]
        np.testing.assert_array_equal(pixels, labels[z], err_msg=f"slice {z}")
    assert labels[1:4].any()
