"""``dbsam app``: the session logic, the page through ``gradio_client`` (a plugin's view) and in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from browser import BROWSER_MISSING, AppPage, start_browser
from dicom_data import write_ct_series, write_two_series_zip
from tiny import count_encoder_calls, save_tiny_dbsam, scrambled_tiny_dbsam

from modeling_dbsam.app import session as app
from modeling_dbsam.io import read_image
from modeling_dbsam.objects import ObjectPrompt, segment_objects
from modeling_dbsam.processing import IntensityConfig

BLOB = Path(__file__).parent / "data" / "blob_ct.nii.gz"
CT = IntensityConfig("CT", (40, 400))
BOX = (26, 16, 48, 36)  # x0, y0, x1, y1 on the blob's middle slice; the tiny model's mask there is not empty
Z = 20


def expected_labels(model, processor, box=BOX, z=Z, intensity=CT):
    """The direct call on the raw volume: no cached embedding, no cached windowing."""
    volume = read_image(BLOB).array
    prompt = ObjectPrompt("blob", (box[0], box[1], z, box[2], box[3], z))
    return segment_objects(model, processor, volume, [prompt], is_volume=True, intensity=intensity).labels


# --- session logic -------------------------------------------------------------------------------------------


def test_session_segments_named_objects_and_exports_in_the_input_geometry(model, processor, tmp_path):
    state = app.Session(scan=app.open_scan([str(BLOB)]))
    assert state.scan.is_volume and state.scan.depth == 40
    scale = app.display_scale(state.scan.plane_shape)
    assert scale == 8
    assert "first corner" in app.click(state, BOX[2] * scale + 3, BOX[3] * scale + 7)  # any point of the pixel
    assert "box x=26..48, y=16..36" in app.click(state, BOX[0] * scale, BOX[1] * scale)
    assert state.box == BOX
    shown = app.render(state, Z, CT)
    assert shown.shape == (512, 512, 3) and (shown[16 * 8, 26 * 8 : 48 * 8] == (255, 255, 0)).all()  # box top edge
    app.segment(state, model, processor, CT, "blob", "slice", Z)
    expected = expected_labels(model, processor)
    np.testing.assert_array_equal(state.objects[0].mask, expected == 1)
    overlay = app.render(state, Z, CT)[::8, ::8]  # one pixel per voxel
    reddish = overlay[..., 0].astype(int) - overlay[..., 1] > 60
    np.testing.assert_array_equal(reddish, expected[Z] == 1)

    app.set_box(state, [10, 10, 30, 30])
    app.segment(state, model, processor, CT, "second", "3D box", Z, (18, 22))
    assert state.objects[1].mask[:18].sum() == 0 and state.objects[1].mask[23:].sum() == 0
    path, legend = app.export(state, ".nrrd", str(tmp_path))
    written = sitk.ReadImage(path)
    reference = read_image(BLOB).reference
    assert written.GetSize() == reference.GetSize() and written.GetSpacing() == reference.GetSpacing()
    assert written.GetOrigin() == reference.GetOrigin()
    labels = sitk.GetArrayFromImage(written)
    np.testing.assert_array_equal(labels, state.label_map().labels)
    assert [o["name"] for o in json.loads(Path(legend).read_text())["objects"]] == ["blob", "second"]
    assert app.remove(state) == "removed 'second'" and [o.name for o in state.objects] == ["blob"]
    with pytest.raises(ValueError, match="DICOM-SEG needs a DICOM input; blob_ct.nii.gz is not DICOM"):
        app.export(state, "DICOM-SEG", str(tmp_path / "seg"))


def test_boxes_on_one_slice_share_its_embedding_and_give_what_an_uncached_call_gives(model, processor, monkeypatch):
    state = app.Session(scan=app.open_scan([str(BLOB)]))
    calls = count_encoder_calls(model, monkeypatch)

    def segment_box(session, name, box, z, intensity=CT):
        app.set_box(session, box)
        return app.segment(session, model, processor, intensity, name, "slice", z).mask

    other_box = (20, 20, 40, 44)
    on_z = [segment_box(state, "a", BOX, Z), segment_box(state, "b", other_box, Z)]
    assert calls == [1]  # the second box ran only the prompt decoder
    next_z = segment_box(state, "c", BOX, Z + 3)  # another slice: its own embedding
    assert calls == [1, 1]
    windowed = IntensityConfig("CT", (40, 80))  # another rule for the model: another embedding of the same slice
    rewindowed = segment_box(state, "d", BOX, Z + 3, windowed)
    assert calls == [1, 1, 1]
    monkeypatch.undo()

    np.testing.assert_array_equal(on_z[0], expected_labels(model, processor) == 1)
    np.testing.assert_array_equal(on_z[1], expected_labels(model, processor, other_box) == 1)
    fresh = app.Session(scan=app.open_scan([str(BLOB)]))
    np.testing.assert_array_equal(next_z, segment_box(fresh, "c", BOX, Z + 3))
    np.testing.assert_array_equal(next_z, expected_labels(model, processor, z=Z + 3) == 1)
    np.testing.assert_array_equal(rewindowed, expected_labels(model, processor, z=Z + 3, intensity=windowed) == 1)
    # slice Z's embedding would give another mask on slice Z + 3, and the window matters: the checks above can fail
    assert (next_z[Z + 3] != on_z[0][Z]).sum() > 20 and (rewindowed != next_z).sum() > 20
    assert state.objects[2].scores[Z + 3] == fresh.objects[0].scores[Z + 3]


def test_a_2d_image_reuses_its_embedding(model, processor, tmp_path, monkeypatch):
    image = (np.add.outer(np.arange(48), np.arange(64)) * 2).astype(np.uint8)
    image[10:30, 20:40] = 230
    path = tmp_path / "square.png"
    sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
    state = app.Session(scan=app.open_scan([str(path)]))
    calls = count_encoder_calls(model, monkeypatch)
    masks = []
    for name, box in (("a", (15, 5, 45, 35)), ("b", (2, 2, 30, 40))):
        app.set_box(state, box)
        masks.append(app.segment(state, model, processor, CT, name, "slice", 0).mask)
    assert calls == [1]
    monkeypatch.undo()
    for mask, box in zip(masks, ((15, 5, 45, 35), (2, 2, 30, 40))):
        expected = segment_objects(model, processor, image, [ObjectPrompt("x", box)], is_volume=False, intensity=CT)
        np.testing.assert_array_equal(mask, expected.labels == 1)


def test_session_bad_input_is_one_clear_message(model, processor, tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.nii.gz: (cannot be read as an image|corrupt or truncated)"):
        app.open_scan([str(text)])
    four_d = tmp_path / "4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))] * 2), str(four_d))
    with pytest.raises(ValueError, match="4D images are not supported"):
        app.open_scan([str(four_d)])
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("readme.txt", "no dicom here")
    with pytest.raises(ValueError, match="empty.zip: the zip holds no DICOM series"):
        app.open_scan([str(empty_zip)])

    state = app.Session(scan=app.open_scan([str(BLOB)]))
    with pytest.raises(ValueError, match="draw a box first"):
        app.segment(state, model, processor, CT, "a", "slice", Z)
    app.click(state, 80, 80)
    app.click(state, 80, 300)  # same column: zero width
    with pytest.raises(ValueError, match="has zero area"):
        app.segment(state, model, processor, CT, "a", "slice", Z)
    with pytest.raises(ValueError, match="outside the image of width 64"):
        app.click(state, 600, 10)
    app.set_box(state, [10, 10, 70, 30])
    with pytest.raises(ValueError, match="object 'a': .*outside the image of width 64"):
        app.segment(state, model, processor, CT, "a", "slice", Z)
    with pytest.raises(ValueError, match="slice 40 lies outside the scan's slices 0..39"):
        app.segment(state, model, processor, CT, "a", "slice", 40)
    with pytest.raises(ValueError, match="nothing to export"):
        app.export(state, ".nii.gz", str(tmp_path))
    assert state.objects == []


def test_a_zip_with_two_series_opens_the_largest_and_says_so(tmp_path):
    write_two_series_zip(tmp_path / "two.zip", small=3, large=5)
    scan = app.open_scan([str(tmp_path / "two.zip")])
    assert scan.depth == 5 and scan.dicom_source is not None
    assert "two.zip holds 2 DICOM series; opened the largest" in scan.note and "(3 slices)" in scan.note
    shutil.rmtree(scan.folder)


def test_dicom_files_uploaded_together_export_dicom_seg(model, processor, tmp_path):
    highdicom = pytest.importorskip("highdicom")
    files = write_ct_series(tmp_path / "series", 4)
    state = app.Session(scan=app.open_scan([str(f) for f in files]))
    assert state.scan.depth == 4
    app.set_box(state, [20, 20, 100, 90])
    app.segment(state, model, processor, IntensityConfig("MR"), "tissue", "3D box", 1, (0, 3))
    path, _ = app.export(state, "DICOM-SEG", str(tmp_path))
    seg = highdicom.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tissue"]
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    import pydicom

    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in files}


# --- the page, through gradio_client and in a browser -------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on 127.0.0.1 (a free port) serving a tiny model, started once for the module."""
    pytest.importorskip("gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from modeling_dbsam.commands.app import build, free_port

    folder = save_tiny_dbsam(tmp_path_factory.mktemp("app_model"), modality="CT", window=(40, 400))
    demo = build(folder, "cpu")
    port = free_port("127.0.0.1")
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_gradio_client_drives_the_app_like_a_plugin(server, model, processor, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    client.predict([handle_file(str(BLOB))], api_name="/open")
    client.predict(",".join(map(str, BOX)), Z, app.MODEL_WINDOW, api_name="/set_box")
    client.predict("blob", "slice", Z, 0, 0, app.MODEL_WINDOW, api_name="/segment")
    downloads, status = client.predict(".nii.gz", api_name="/export")
    assert "ready" in status
    label_path = next(d for d in downloads if str(d).endswith(".nii.gz"))
    written = sitk.ReadImage(label_path)
    reference = read_image(BLOB).reference
    assert written.GetSize() == reference.GetSize() and written.GetOrigin() == reference.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected_labels(model, processor))

    client.predict("5,5,5,30", Z, app.MODEL_WINDOW, api_name="/set_box")
    status = client.predict("flat", "slice", Z, 0, 0, app.MODEL_WINDOW, api_name="/segment")[-1]
    assert status.startswith("**Error:** the box x=5..5, y=5..30 has zero area")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    status = client.predict([handle_file(str(broken))], api_name="/open")[-1]
    assert re.match(r"\*\*Error:\*\* broken.nii.gz: (cannot be read as an image|corrupt or truncated)", status)
    downloads, _ = client.predict(".nrrd", api_name="/export")  # the errors left the scan and its object intact
    label_path = next(d for d in downloads if str(d).endswith(".nrrd"))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(label_path)), expected_labels(model, processor)
    )

    objects = json.dumps([{"name": "blob", "box": [BOX[0], BOX[1], Z, BOX[2], BOX[3], Z]}])
    label_path, legend_path = client.predict(handle_file(str(BLOB)), objects, ".nrrd", api_name="/segment_file")
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(label_path)), expected_labels(model, processor)
    )
    assert json.loads(Path(legend_path).read_text())["objects"][0]["name"] == "blob"
    with pytest.raises(AppError, match="DICOM-SEG needs a DICOM input"):
        client.predict(handle_file(str(BLOB)), objects, "DICOM-SEG", api_name="/segment_file")


@pytest.mark.skipif(BROWSER_MISSING is not None, reason=str(BROWSER_MISSING))
def test_a_box_drawn_in_a_real_browser_is_segmented_shown_and_downloaded(
    server, model, processor, tmp_path, monkeypatch
):
    pytest.importorskip("selenium")
    driver = start_browser()
    try:
        page = AppPage(driver, server)
        page.upload(str(BLOB))
        assert "volume of 40 slices, 64 x 64 pixels" in page.text("#scan-summary")
        page.find("#segment").click()  # no box yet: a message in the page, not a stack trace
        assert page.error_message().startswith("Error: draw a box first")

        encoded = []  # the slices the page encodes, and when
        encode = app.encode_slices
        monkeypatch.setattr(app, "encode_slices", lambda *args: encoded.append(len(args[2])) or encode(*args))
        page.draw_box(BOX, scale=8)  # the page opens on the middle slice, z = 20
        page.wait_for(lambda: encoded == [1])  # encoded after the first corner, while the box is being drawn
        drawn = page.shown_slice()
        yellow = (drawn[..., 0] > 200) & (drawn[..., 1] > 200) & (drawn[..., 2] < 80)
        rows, cols = np.nonzero(yellow)
        factor = drawn.shape[1] / 512  # screenshot pixels per shown pixel
        assert abs(rows.min() / factor - BOX[1] * 8) <= 3 and abs(cols.max() / factor - (BOX[2] * 8 + 7)) <= 3

        page.type_into("#object-name", "blob")
        page.segment("blob")
        shown = page.shown_slice()
        cell = shown.shape[0] / 64  # screenshot pixels per voxel
        centres = ((np.arange(64) + 0.5) * cell).astype(int)
        voxels = shown[centres][:, centres].astype(int)
        overlaid = voxels[..., 0] - voxels[..., 1] > 60  # the first object's red over grey
        expected = expected_labels(model, processor)[Z] == 1
        assert expected.sum() > 50
        np.testing.assert_array_equal(overlaid, expected)
        assert encoded == [1]  # Segment ran only the prompt decoder, on the embedding made at the first corner

        page.find("#export").click()
        links = page.wait_for(lambda: [a.get_attribute("href") for a in page.find_all("#downloads a[href]")])
        target = tmp_path / "downloaded.nii.gz"
        urllib.request.urlretrieve(next(h for h in links if h.endswith("-labels.nii.gz")), target)
        written, reference = sitk.ReadImage(str(target)), read_image(BLOB).reference
        assert written.GetSize() == reference.GetSize() and written.GetSpacing() == reference.GetSpacing()
        assert written.GetOrigin() == reference.GetOrigin() and written.GetDirection() == reference.GetDirection()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected_labels(model, processor))
    finally:
        driver.quit()


def test_the_space_entry_file_builds_the_app_from_its_variables(tmp_path, monkeypatch):
    gradio = pytest.importorskip("gradio")
    import runpy

    monkeypatch.setenv("DBSAM_MODEL", save_tiny_dbsam(tmp_path / "model", modality="CT"))
    monkeypatch.setenv("DBSAM_DEVICE", "cpu")
    space = runpy.run_path(str(Path(__file__).parents[1] / "space" / "app.py"), run_name="space_app")
    assert isinstance(space["demo"], gradio.Blocks)
    endpoints = {fn.api_name for fn in space["demo"].fns.values()}
    assert {"open", "set_box", "segment", "export", "segment_file"} <= endpoints
    monkeypatch.setenv("DBSAM_MODEL", str(tmp_path / "nowhere"))  # not a folder: taken as a Hub id, offline here
    with pytest.raises(Exception, match="nowhere"):
        runpy.run_path(str(Path(__file__).parents[1] / "space" / "app.py"), run_name="space_app")


def test_app_command_refuses_a_model_folder_without_processor_before_serving(tmp_path, capsys):
    from modeling_dbsam.cli import main

    scrambled_tiny_dbsam().save_pretrained(tmp_path / "no_processor")
    assert main(["app", "--model", str(tmp_path / "no_processor")]) == 2
    assert "no processor_config.json" in capsys.readouterr().err
