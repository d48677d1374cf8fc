"""Inference cost: many prompts on one image, and batched slices of a volume, measured in one run.

    python benchmarks/bench_inference.py                    # both parts, CPU
    python benchmarks/bench_inference.py --part prompts --device cuda
    python benchmarks/bench_inference.py --part decoder
    python benchmarks/bench_inference.py --quick            # tiny models: checks the script runs

(a) ``prompts``: one image (512 x 512) through the ``promptable-mask-generation`` pipeline with
10 boxes against 1 box, DB-SAM ViT-B at 1024 px, random weights. The image embedding is computed
once per image, so 10 boxes should cost little more than 1 (target: at most 1.3x).

``decoder``: the part of (a) that grows with the number of boxes, alone: the prompt encoder and mask
decoder on a cached ViT-B embedding, 10 boxes against 1. SAM's decoder runs its two-way transformer
on a copy of the 64 x 64 embedding per prompt, so its cost is linear in the boxes; (a) stays near 1x
only because the encoder dwarfs it.

(b) ``volume``: a 40-slice volume (256 x 256 slices), one box per slice, through ``segment_volume``
with the encoder batched (8 slices a call) against a slice-by-slice loop (batch 1), then key-slice
propagation the same two ways. On CPU this uses a smaller DB-SAM (ViT width 256, 4 layers, 256 px
input): 80 ViT-B encodings take over half an hour on two shared cores. ``--volume-model vit-b`` asks for
the full size.

Variants are timed interleaved (A, B, A, B...) so that machine noise hits both alike; the report
gives min and median seconds and the ratio of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import pipeline

from modeling_dbsam import DBSamConfig, DBSamModel
from modeling_dbsam.inference import segment_volume
from modeling_dbsam.pipelines import TASK, register_pipelines
from modeling_dbsam.predictor import EncodedImages, Prompts, decode_prompts


def small_config(image_size: int) -> DBSamConfig:
    """A DB-SAM small enough for 40-slice volumes on CPU: ViT width 256, 4 layers, patch 16."""
    return DBSamConfig(
        vision_config={
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 16,
            "window_size": 4,
            "global_attn_indexes": [1, 3],
            "mlp_dim": 1024,
        },
        prompt_encoder_config={"image_size": image_size, "patch_size": 16},
    )


def make_processor(image_size: int):
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    mask_size = 4 * image_size // 16
    return SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": image_size},
            pad_size={"height": image_size, "width": image_size},
            mask_size={"longest_edge": mask_size},
            mask_pad_size={"height": mask_size, "width": mask_size},
        )
    )


def build(config: DBSamConfig, device: str):
    torch.manual_seed(0)
    return DBSamModel(config).to(device).eval(), make_processor(config.vision_config.image_size)


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, device: str) -> dict:
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    summary = {name: {"min": min(t), "median": statistics.median(t), "runs": len(t)} for name, t in times.items()}
    first, second = list(variants)
    summary["ratio_min"] = summary[second]["min"] / summary[first]["min"]
    summary["ratio_median"] = summary[second]["median"] / summary[first]["median"]
    return summary


def bench_prompts(config: DBSamConfig, device: str, repeats: int) -> dict:
    register_pipelines()
    model, processor = build(config, device)
    seg = pipeline(TASK, model=model, processor=processor, device=device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (512, 512), dtype=np.uint8)
    corners = rng.integers(0, 300, (10, 2))
    boxes = np.concatenate([corners, corners + rng.integers(20, 200, (10, 2))], axis=1).tolist()
    return interleaved(
        {"1 box": lambda: seg(image, input_boxes=boxes[:1]), "10 boxes": lambda: seg(image, input_boxes=boxes)},
        repeats,
        device,
    )


def bench_decoder(config: DBSamConfig, device: str, repeats: int) -> dict:
    model, processor = build(config, device)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    side = config.vision_config.image_size
    embedding = torch.randn(1, config.vision_config.output_channels, grid, grid, device=device)
    encoded = EncodedImages(embedding, torch.tensor([[side // 2, side // 2]]), torch.tensor([[side, side]]))
    rng = np.random.default_rng(0)
    corners = rng.integers(0, side // 4, (10, 2))
    boxes = np.concatenate([corners, corners + rng.integers(20, side // 4, (10, 2))], axis=1)
    return interleaved(
        {
            "1 box": lambda: decode_prompts(model, processor, encoded, Prompts(boxes=boxes[:1])),
            "10 boxes": lambda: decode_prompts(model, processor, encoded, Prompts(boxes=boxes)),
        },
        repeats,
        device,
    )


def bench_volume(config: DBSamConfig, device: str, repeats: int, slices: int, batch_size: int) -> dict:
    model, processor = build(config, device)
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 200, (slices, 256, 256)).astype(np.int16)
    volume[:, 64:192, 80:200] += 300  # a bright block the boxes point at
    box = (80, 64, 0, 199, 191, slices - 1)
    modes = {"3d box": {"box": box}, "propagation": {"box_2d": (80, 64, 199, 191), "key_slice": slices // 2}}
    results = {}
    for mode, prompt in modes.items():
        results[mode] = interleaved(
            {
                "slice by slice": lambda prompt=prompt: segment_volume(
                    model, processor, volume, batch_size=1, **prompt
                ),
                f"batch {batch_size}": lambda prompt=prompt: segment_volume(
                    model, processor, volume, batch_size=batch_size, **prompt
                ),
            },
            repeats,
            device,
        )
        mask = segment_volume(model, processor, volume, batch_size=batch_size, **prompt)
        results[mode]["slices segmented"] = int(mask.reshape(len(mask), -1).any(axis=1).sum())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["prompts", "decoder", "volume", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--volume-model", choices=["small", "vit-b"], default="small")
    parser.add_argument("--quick", action="store_true", help="small models, 8 slices, 1 repeat: a smoke test")
    args = parser.parse_args()

    prompt_config = small_config(256) if args.quick else DBSamConfig()
    volume_config = DBSamConfig() if args.volume_model == "vit-b" and not args.quick else small_config(256)
    slices, repeats = (8, 1) if args.quick else (args.slices, args.repeats)
    report = {"device": args.device, "threads": torch.get_num_threads(), "quick": args.quick}
    if args.part in ("prompts", "all"):
        report["prompts (ViT-B 1024)" if not args.quick else "prompts (small)"] = bench_prompts(
            prompt_config, args.device, repeats
        )
    if args.part in ("decoder", "all"):
        report["decoder (ViT-B 1024)" if not args.quick else "decoder (small)"] = bench_decoder(
            prompt_config, args.device, repeats
        )
    if args.part in ("volume", "all"):
        report[f"volume ({args.volume_model if not args.quick else 'small'}, {slices} slices)"] = bench_volume(
            volume_config, args.device, repeats, slices, args.batch_size
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
