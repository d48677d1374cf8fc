"""ONNX Runtime against PyTorch for DB-SAM at ViT-B: export cost, encoder and decoder speed, parity, int8 agreement.

    python benchmarks/bench_onnx.py                         # ViT-B at 1024 px, 2 threads, 3 sample slices

One run, in this order:

1. a DB-SAM at the ViT-B config with fan-in-scaled random weights (no weights can be downloaded here;
   a fresh SAM init gives constant masks) is saved with a 1024 px processor;
2. ``conversion/export_onnx.py`` exports it in a subprocess, whose peak resident memory is the export's;
3. the encoder is quantized to int8 (``export_onnx.quantize_encoder``, what ``--quantize int8`` does);
4. each shipped sample slice goes through PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8 in turn
   (after one warm-up slice), all through :mod:`modeling_dbsam.predictor`: the encoder is timed per image,
   the masks of the slice's ground-truth box compared with PyTorch's;
5. the prompt decoder is timed per box on one cached embedding.

Every backend gets the same number of threads (``--threads``). Speed is reported as ratios against
PyTorch fp32 within this run: of the medians, and the median over slices of the ratio on the same slice
(the backends encode it one after the other, so it moves least with the load of a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "conversion"))
sys.path.insert(0, str(ROOT / "tests"))  # the weight scrambling is shared with the tests

import export_onnx  # noqa: E402  (a script folder, not a package)
from tiny import scramble_weights  # noqa: E402

from modeling_dbsam import DBSamConfig, DBSamModel  # noqa: E402
from modeling_dbsam.metrics import dice_score  # noqa: E402
from modeling_dbsam.onnx_runtime import ENCODER_FILE, OnnxSamModel, processor_from_settings  # noqa: E402
from modeling_dbsam.predictor import Prompts, decode_prompts, encode_images  # noqa: E402
from modeling_dbsam.processing import load_processor  # noqa: E402

LOGIT_TOLERANCE = 1e-4


def random_vit_b(image_size: int) -> DBSamModel:
    """DB-SAM at the ViT-B config with fan-in-scaled random weights, so that masks are not constant."""
    config = DBSamConfig(vision_config={"image_size": image_size}, prompt_encoder_config={"image_size": image_size})
    return scramble_weights(DBSamModel(config).eval())


def save_model(folder: Path, image_size: int) -> None:
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    random_vit_b(image_size).save_pretrained(folder)
    mask_size = image_size // 4
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_size},
        mask_pad_size={"height": mask_size, "width": mask_size},
    )
    SamProcessor(image_processor=image_processor).save_pretrained(folder)


def export_in_subprocess(model_dir: Path, onnx_dir: Path, threads: int) -> dict:
    """Run the exporter as a user would; its peak RSS is the largest child's ``ru_maxrss``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "conversion" / "export_onnx.py"), "--model", str(model_dir)]
    start = time.perf_counter()
    subprocess.run([*command, "--output-dir", str(onnx_dir)], check=True, env=env)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # kB on Linux
    parity = json.loads((onnx_dir / "preprocessing.json").read_text())["provenance"]["parity"]
    return {"seconds": seconds, "peak_rss_gb": peak_gb, "parity_random_inputs": parity["max_abs_difference"]}


def quantize(onnx_dir: Path, int8_dir: Path) -> float:
    shutil.copytree(onnx_dir, int8_dir)
    start = time.perf_counter()
    export_onnx.quantize_encoder(str(onnx_dir / ENCODER_FILE), str(int8_dir / ENCODER_FILE))
    return time.perf_counter() - start


def run_backends(backends: dict, slices: int) -> dict:
    """Encoder seconds per image and box masks of each backend on the sample slices (first slice: warm-up)."""
    images, boxes = export_onnx.sample_slices(slices + 1)
    seconds = {name: [] for name in backends}
    predictions = {name: [] for name in backends}
    for index, (image, box) in enumerate(zip(images, boxes)):
        for name, (model, processor) in backends.items():
            start = time.perf_counter()
            encoded = encode_images(model, processor, [image])
            elapsed = time.perf_counter() - start
            if index == 0:
                continue
            seconds[name].append(elapsed)
            predictions[name].append(decode_prompts(model, processor, encoded, Prompts(boxes=box)))
    return {"seconds": seconds, "predictions": predictions}


def compare(reference: list, candidate: list) -> dict:
    differences = [float(np.abs(c.low_res_logits - r.low_res_logits).max()) for r, c in zip(reference, candidate)]
    dice = [dice_score(c.masks[0, 0], r.masks[0, 0]) for r, c in zip(reference, candidate)]
    differing = [int((c.masks != r.masks).sum()) for r, c in zip(reference, candidate)]
    return {
        "max_abs_logit_difference": max(differences),
        "mean_dice": float(np.mean(dice)),
        "pixels_differing": differing,
    }


def time_decoder(backends: dict, repeats: int, boxes_per_call: int) -> dict:
    """Seconds per box of the prompt encoder + mask decoder on one cached embedding."""
    model, processor = backends["pytorch_fp32"]
    images, _ = export_onnx.sample_slices(1)
    embeddings = encode_images(model, processor, images).embeddings
    size = model.config.vision_config.image_size
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, size - 1, (boxes_per_call, 2, 2)), axis=1).reshape(1, boxes_per_call, 4)
    input_boxes = torch.from_numpy(corners.astype(np.float32))
    result = {}
    for name in ("pytorch_fp32", "onnxruntime_fp32"):
        decoder = backends[name][0]
        with torch.inference_mode():
            decoder(image_embeddings=embeddings, multimask_output=False, input_boxes=input_boxes)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                decoder(image_embeddings=embeddings, multimask_output=False, input_boxes=input_boxes)
                times.append((time.perf_counter() - start) / boxes_per_call)
        result[name] = {"median_s_per_box": statistics.median(times), "min_s_per_box": min(times)}
    result["ratio_median"] = (
        result["onnxruntime_fp32"]["median_s_per_box"] / result["pytorch_fp32"]["median_s_per_box"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=3, help="sample slices per backend after one warm-up slice")
    parser.add_argument("--decoder-repeats", type=int, default=10)
    parser.add_argument("--boxes-per-call", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as work:
        work = Path(work)
        save_model(work / "model", args.image_size)
        report = {"config": vars(args), "export": export_in_subprocess(work / "model", work / "onnx", args.threads)}
        report["int8_quantization_seconds"] = quantize(work / "onnx", work / "int8")
        backends = {
            "pytorch_fp32": (DBSamModel.from_pretrained(work / "model").eval(), load_processor(work / "model"))
        }
        for name, folder in (("onnxruntime_fp32", work / "onnx"), ("onnxruntime_int8", work / "int8")):
            model = OnnxSamModel.from_folder(folder, threads=args.threads)
            backends[name] = (model, processor_from_settings(model.settings))
        runs = run_backends(backends, args.slices)
        report["decoder"] = time_decoder(backends, args.decoder_repeats, args.boxes_per_call)

    seconds = runs["seconds"]
    baseline = seconds["pytorch_fp32"]
    report["encoder_s_per_image"] = {
        name: {
            "seconds": times,
            "median": statistics.median(times),
            "min": min(times),
            "ratio_median": statistics.median(times) / statistics.median(baseline),
            "ratio_same_slice": statistics.median(t / b for t, b in zip(times, baseline)),
        }
        for name, times in seconds.items()
    }
    predictions = runs["predictions"]
    report["sample_masks_vs_pytorch"] = {
        name: compare(predictions["pytorch_fp32"], predictions[name])
        for name in ("onnxruntime_fp32", "onnxruntime_int8")
    }
    report["int8_vs_onnxruntime_fp32"] = compare(predictions["onnxruntime_fp32"], predictions["onnxruntime_int8"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
