"""The app's overhead: seconds from clicking "Segment" in a real browser to the overlay shown, against the
same segmentation called directly in Python, in one run.

    python benchmarks/bench_app.py                      # the shipped default model, else a small DB-SAM
    python benchmarks/bench_app.py --model out/ --repeats 5
    python benchmarks/bench_app.py --quick              # tiny model, 1 repeat: checks the script runs

Two cases on a 40 x 256 x 256 CT-like volume (tests/data/blob_ct.nii.gz enlarged 4x in-plane): the box on
one slice ("slice"), and a 40-slice 3D box ("3D box"). The browser is Debian's headless Chromium driven
by Selenium (tests/browser.py); its time runs from the click to the new overlay image decoded in the page
(so it includes the queue, the segmentation, drawing the overlay, PNG encoding and the transfer), timed
inside the page; ``app_segment_s`` is the segmentation alone inside the app's handler. The
Python time is :func:`modeling_dbsam.objects.segment_objects` on the same prompt in the same process.
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

    handler_times = []  # the segmentation inside the app's Segment handler: browser time minus this is transport
    segment_in_app = app_session.segment

    def timed_segment(*arguments, **keywords):
        start = time.perf_counter()
        try:
            return segment_in_app(*arguments, **keywords)
        finally:
            handler_times.append(time.perf_counter() - start)

    app_session.segment = timed_segment
    demo = build(folder, args.device)
    port = free_port("127.0.0.1")
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    driver = start_browser()
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
            browser_times, python_times, in_handler = [], [], []
            for repeat in range(repeats + 1):  # the first round warms both up and is not counted
                page.find("#clear").click()
                page.wait_for(lambda: "cleared" in page.text("#status"))
                page.draw_box(BOX, scale=2)
                name = f"{case} {repeat}".replace(" ", "-")
                page.type_into("#object-name", name)
                seconds = page.segment(name)
                start = time.perf_counter()
                segment_objects(model, processor, volume, [prompt], is_volume=True, intensity=intensity)
                if repeat:
                    browser_times.append(seconds)
                    python_times.append(time.perf_counter() - start)
                    in_handler.append(handler_times[-1])
            results[case] = {
                "browser_s": [round(t, 3) for t in browser_times],
                "python_s": [round(t, 3) for t in python_times],
                "app_segment_s": [round(t, 3) for t in in_handler],
                "ratio_of_medians": round(statistics.median(browser_times) / statistics.median(python_times), 3),
            }
            print(case, json.dumps(results[case]), flush=True)
    finally:
        driver.quit()
        demo.close()
    print(json.dumps({"model": described, "device": args.device, "repeats": repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
