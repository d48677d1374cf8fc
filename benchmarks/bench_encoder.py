"""Image-encoder cost of DB-SAM against SAM at ViT-B size, measured in one run.

    python benchmarks/bench_encoder.py                      # CPU: fp32 and bf16 autocast, then a training step
    python benchmarks/bench_encoder.py --device cuda --batch-sizes 1 8

Encoders are timed interleaved (SAM, DB-SAM, SAM, ...) so machine noise hits both alike; the
report gives min and median seconds and the DB-SAM / SAM ratio of each. The training step
(forward + backward through the adapters, ViT frozen) runs with and without activation
checkpointing, each in a fresh subprocess so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import SamConfig, SamModel

from modeling_dbsam import DBSamConfig, DBSamModel


def vit_b_config(image_size: int) -> dict:
    """SAM ViT-B at ``image_size`` (1024 is SAM's own; smaller sizes keep slow CPU dtypes affordable)."""
    return {"vision_config": {"image_size": image_size}, "prompt_encoder_config": {"image_size": image_size}}


def build_models(device: str, image_size: int) -> tuple[SamModel, DBSamModel]:
    torch.manual_seed(0)
    sam = SamModel(SamConfig(**vit_b_config(image_size))).to(device).eval()  # random weights
    dbsam = DBSamModel(DBSamConfig(**vit_b_config(image_size))).to(device).eval()
    return sam, dbsam


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_encoders(device: str, dtype: torch.dtype | None, batch: int, repeats: int, image_size: int) -> dict:
    sam, dbsam = build_models(device, image_size)
    pixel_values = torch.randn(batch, 3, image_size, image_size, device=device)
    times: dict[str, list[float]] = {"sam": [], "dbsam": []}
    with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        for model in (sam, dbsam):  # warm-up
            model.vision_encoder(pixel_values)
        for _ in range(repeats):
            for name, model in (("sam", sam), ("dbsam", dbsam)):
                synchronize(device)
                start = time.perf_counter()
                model.vision_encoder(pixel_values)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    summary = {name: {"min": min(t), "median": statistics.median(t)} for name, t in times.items()}
    summary["ratio_min"] = summary["dbsam"]["min"] / summary["sam"]["min"]
    summary["ratio_median"] = summary["dbsam"]["median"] / summary["sam"]["median"]
    return summary


def training_step(device: str, checkpointing: bool, batch: int, steps: int) -> dict:
    """Runs in a child process: time and peak memory of forward + backward with the ViT frozen."""
    torch.manual_seed(0)
    model = DBSamModel(DBSamConfig()).to(device)
    trainable = model.freeze_for_training()
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    pixel_values = torch.randn(batch, 3, 1024, 1024, device=device)
    boxes = torch.tensor([[[100.0, 120.0, 600.0, 700.0]]], device=device).repeat(batch, 1, 1)
    dtype = torch.bfloat16 if device == "cuda" else None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False).pred_masks
        logits.float().sigmoid().mean().backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of the process's peak resident memory over the model's own footprint
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {
        "seconds_min": min(times),
        "seconds_median": statistics.median(times),
        "peak_mib": peak_mib,
        "trainable": trainable,
    }


def run_training_step_subprocess(device: str, checkpointing: bool, batch: int, steps: int) -> dict:
    args = [sys.executable, __file__, "--child-train-step", "--device", device, "--steps", str(steps)]
    args += ["--batch-sizes", str(batch)] + (["--checkpointing"] if checkpointing else [])
    output = subprocess.run(args, check=True, capture_output=True, encoding="utf-8", errors="replace").stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--image-size", type=int, default=1024, help="encoder timing only; training uses 1024")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--child-train-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_train_step:
        print(json.dumps(training_step(args.device, args.checkpointing, args.batch_sizes[0], args.steps)))
        return
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for batch in args.batch_sizes:
        for label in args.dtypes:
            summary = time_encoders(args.device, dtypes[label], batch, args.repeats, args.image_size)
            print(
                f"encoder {args.image_size}px batch {batch} {label}: SAM min {summary['sam']['min']:.3f}s median "
                f"{summary['sam']['median']:.3f}s | DB-SAM min {summary['dbsam']['min']:.3f}s median "
                f"{summary['dbsam']['median']:.3f}s | ratio min {summary['ratio_min']:.3f} "
                f"median {summary['ratio_median']:.3f}",
                flush=True,
            )
        if args.skip_train:
            continue
        for checkpointing in (False, True):
            result = run_training_step_subprocess(args.device, checkpointing, batch, args.steps)
            print(
                f"train step batch {batch} checkpointing={checkpointing}: min {result['seconds_min']:.3f}s "
                f"median {result['seconds_median']:.3f}s peak {result['peak_mib']:.0f} MiB "
                f"(trainable {result['trainable']:,})",
                flush=True,
            )


if __name__ == "__main__":
    main()
