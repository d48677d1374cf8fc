"""The app's overhead: seconds from clicking "Segment" in a real browser to the overlay shown, against the
same segmentation called directly in Python, in one run.

    python benchmarks/bench_app.py                      # the shipped default model, else a small DB-SAM
    python benchmarks/bench_app.py --model out/ --repeats 5
    python benchmarks/bench_app.py --quick              # tiny model, 1 repeat: checks the script runs

Two cases on a 40 x 256 x 256 CT-like volume (tests/data/blob_ct.nii.gz enlarged 4x in-plane): the box on
one slice ("slice"), and a 40-slice 3D box ("3D box"). The browser is Debian's headless Chromium driven
by Selenium (tests/browser.py). Each round draws the box with two clicks, types the name, presses Segment:

- ``browser_s``: from the click on Segment to the new overlay decoded in the page, timed inside the page;
  split into ``in_s`` (click to the segmentation starting in the app's handler: request, queue),
  ``app_segment_s`` (the segmentation inside the handler) and ``out_s`` (the rest: drawing the overlay, the
  objects table, PNG, transfer, decoding);
- ``embedding_s`` ("slice" only): the slice's image embedding, which the page computes after the first
  corner of the box, while the box is finished (the round waits for it, as a person's second click and
  typing would). Every round starts without one, as for the first box on a slice; a second box on the same
  slice would find it ready too;
- ``python_s``: :func:`modeling_dbsam.objects.segment_objects` on the raw volume, nothing cached (what a
  script does); ``python_cached_s``: the same call with what the app holds already: the volume windowed
  to uint8 and, for "slice", the slice's embedding (so only the prompt decoder runs).

Runs are interleaved (browser, Python, browser, ...) so that machine noise hits both alike; the target is
a browser / Python ratio of at most 1.2.

Without ``--model`` and without a shipped default model, the model is a random-weight DB-SAM of
:func:`bench_inference.small_config` (ViT width 256, 4 layers, 256 px input): compute is what matters here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the browser driver and the tiny model are shared with the tests

BOX = (100, 60, 196, 148)  # around the blob at 256 px


def model_folder(args, workdir: str) -> tuple[str, str]:
    """The folder to serve and a description of it."""
    from modeling_dbsam.commands.app import model_folder as default_or_given

    if args.quick:
        from tiny import save_tiny_dbsam

        return save_tiny_dbsam(os.path.join(workdir, "tiny"), modality="CT", window=(40, 400)), "tiny test model"
    try:
        return default_or_given(args.model), args.model or "the shipped default model"
    except ValueError:
        from bench_inference import small_config

        from modeling_dbsam import DBSamModel
        from modeling_dbsam.processing import set_intensity_config

        folder = os.path.join(workdir, "small")
        DBSamModel(small_config(256)).eval().save_pretrained(folder)
        processor = small_processor(256)
        set_intensity_config(processor, "CT", (40, 400))
        processor.save_pretrained(folder)
        return folder, "random-weight DB-SAM, ViT width 256, 4 layers, 256 px (no default model shipped)"


def small_processor(image_size: int):
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": image_size // 4},
        mask_pad_size={"height": image_size // 4, "width": image_size // 4},
    )
    return SamProcessor(image_processor=image_processor)


def enlarged_blob(path: str) -> None:
    image = sitk.ReadImage(str(ROOT / "tests" / "data" / "blob_ct.nii.gz"))
    array = np.repeat(np.repeat(sitk.GetArrayFromImage(image), 4, axis=1), 4, axis=2)
    out = sitk.GetImageFromArray(array)
    out.SetSpacing((0.2, 0.2, image.GetSpacing()[2]))
    out.SetOrigin(image.GetOrigin())
    sitk.WriteImage(out, path, useCompression=True)


def seconds_of(function, *arguments, **keywords) -> float:
    start = time.perf_counter()
    function(*arguments, **keywords)
    return time.perf_counter() - start


def summary(rows: list[dict]) -> dict:
    """Each column's values (rounded) and the ratios of the browser's median to the Python medians."""
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    result = {key: None if None in values else [round(v, 3) for v in values] for key, values in columns.items()}
    browser = statistics.median(columns["browser_s"])
    result["browser_over_python"] = round(browser / statistics.median(columns["python_s"]), 3)
    result["browser_over_python_cached"] = round(browser / statistics.median(columns["python_cached_s"]), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the shipped default, else a small random DB-SAM)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from browser import AppPage, start_browser

    from modeling_dbsam.app import session as app_session
    from modeling_dbsam.commands.app import build, free_port
    from modeling_dbsam.commands.segment import load_model_and_processor
    from modeling_dbsam.inference import encode_slices
    from modeling_dbsam.io import read_image
    from modeling_dbsam.objects import ObjectPrompt, segment_objects
    from modeling_dbsam.processing import get_intensity_config

    workdir = tempfile.mkdtemp(prefix="bench-app-")
    folder, described = model_folder(args, workdir)
    scan = os.path.join(workdir, "blob256.nii.gz")
    enlarged_blob(scan)
    volume = read_image(scan).array
    model, processor = load_model_and_processor(folder, args.device)
    intensity = get_intensity_config(processor)

    segmented, encoded = [], []  # (start, end) epochs of the app's segmentations and of its slice encodings
    app_segment, app_encode = app_session.segment, app_session.encode_slices

    def timed(function, log):
        def run(*arguments, **keywords):
            start = time.time()
            try:
                return function(*arguments, **keywords)
            finally:
                log.append((start, time.time()))

        return run

    def segment_from_scratch(session, *arguments, **keywords):
        try:
            return app_segment(session, *arguments, **keywords)
        finally:
            session.embedding = None  # the next round's box is the first on its slice again

    app_session.segment = timed(segment_from_scratch, segmented)
    app_session.encode_slices = timed(app_encode, encoded)
    demo = build(folder, args.device)
    port = free_port("127.0.0.1")
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    driver = start_browser()
    windowed = intensity.to_uint8(volume)  # what the app holds for the open scan
    load = {"start": round(os.getloadavg()[0], 2)}
    results = {}
    try:
        page = AppPage(driver, f"http://127.0.0.1:{port}/")
        page.upload(scan)
        z = len(volume) // 2
        cases = {"slice": (z, z), "3D box": (0, len(volume) - 1)}
        for case, (z0, z1) in cases.items():
            page.find(f"#mode input[value='{case}']").click()
            for css, value in (("#z-from", z0), ("#z-to", z1)):
                page.type_into(css, str(value))
            prompt = ObjectPrompt("python", (BOX[0], BOX[1], z0, BOX[2], BOX[3], z1))
            rows = []
            for repeat in range(repeats + 1):  # the first round warms both up and is not counted
                page.find("#clear").click()
                page.wait_for(lambda: "cleared" in page.text("#status"))
                encodings = len(encoded)
                page.draw_box(BOX, scale=2)
                if case == "slice":
                    page.wait_for(lambda before=encodings: len(encoded) > before)
                name = f"{case} {repeat}".replace(" ", "-")
                page.type_into("#object-name", name)
                seconds = page.segment(name)
                clicked = page.driver.execute_script("return window.segmentClickedAt;") / 1000
                start, end = segmented[-1]
                row = {
                    "browser_s": seconds,
                    "in_s": start - clicked,
                    "app_segment_s": end - start,
                    "out_s": clicked + seconds - end,
                    "embedding_s": encoded[-1][1] - encoded[-1][0] if case == "slice" else None,
                }
                direct = {"is_volume": True, "intensity": intensity}
                row["python_s"] = seconds_of(segment_objects, model, processor, volume, [prompt], **direct)
                if case == "slice":
                    direct["embeddings"] = {z: encode_slices(model, processor, [windowed[z]])}
                row["python_cached_s"] = seconds_of(segment_objects, model, processor, windowed, [prompt], **direct)
                if repeat:
                    rows.append(row)
            results[case] = summary(rows)
            print(case, json.dumps(results[case]), flush=True)
    finally:
        driver.quit()
        demo.close()
    load["end"] = round(os.getloadavg()[0], 2)
    report = {"model": described, "device": args.device, "repeats": repeats, "load_average_1min": load}
    print(json.dumps({**report, "results": results}, indent=2))


if __name__ == "__main__":
    main()
