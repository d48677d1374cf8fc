"""Pretrain a small SAM from scratch on generated scenes: the stand-in for SAM ViT-B on machines without it.

Every part of a ``SamModel`` (ViT, prompt encoder, mask decoder) trains, box-prompted as SAM's
interactive stage is: several objects per image share one image embedding, each box side is jittered
outward by ``randint(0, 20)`` px at 256 px (the project's ``box_prompt``), the loss is BCE + Dice on the
low-res logits (``modeling_dbsam.losses``) plus SAM's MSE between predicted and actual IoU. Scenes come
from :mod:`modeling_dbsam.scenes`, one seed per image derived from (seed, step, index): the run is a
function of its arguments, and a run killed and restarted continues from its last checkpoint.

    python scripts/pretrain_small_sam.py --output_dir outputs/small-sam --max_steps 6000
    python scripts/pretrain_small_sam.py --output_dir outputs/small-sam --max_steps 6000   # resumes
    python scripts/pretrain_small_sam.py --evaluate modeling_dbsam/pretrained/small-sam     # held-out Dice

The held-out set is ``--eval_scenes`` scenes with seeds from ``EVAL_SEED_OFFSET`` (never drawn in
training), every object of at least ``MIN_OBJECT_PIXELS`` scored with the evaluation box (tight box + 9 px
per side at 256 px, the paper protocol), Dice by ``modeling_dbsam.metrics.dice_score``; "fill the box"
is reported beside it. The result is a ``from_pretrained`` folder: weights, processor, model card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader, IterableDataset
from transformers import SamConfig, SamModel, get_cosine_schedule_with_warmup

from modeling_dbsam.boxes import box_prompt
from modeling_dbsam.convert import SAM_PIXEL_MEAN, SAM_PIXEL_STD, build_sam_processor
from modeling_dbsam.evaluation import PAPER
from modeling_dbsam.io import atomic_write
from modeling_dbsam.losses import bce_dice_loss
from modeling_dbsam.metrics import dice_score
from modeling_dbsam.modeling_dbsam import reset_to_pytorch_init
from modeling_dbsam.pixels import SamPixels
from modeling_dbsam.predictor import predict_boxes
from modeling_dbsam.processing import load_processor
from modeling_dbsam.scenes import generate_scene

EVAL_SEED_OFFSET = 10**9  # training seeds stay far below: seed * 10**7 + step * batch + index
CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"
SMALL_SAM = {  # 128 px, ViT width 96, 4 layers, patch 8 (16 x 16 tokens), low-res masks 64 px
    "vision_config": {
        "hidden_size": 96,
        "output_channels": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 128,
        "patch_size": 8,
        "window_size": 8,
        "global_attn_indexes": [1, 3],
        "num_pos_feats": 32,
        "mlp_dim": 384,
    },
    "prompt_encoder_config": {"hidden_size": 64, "image_size": 128, "patch_size": 8, "mask_input_channels": 16},
    "mask_decoder_config": {
        "hidden_size": 64,
        "mlp_dim": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "iou_head_hidden_dim": 64,
    },
}


def scene_seed(seed: int, step: int, index: int, batch_size: int) -> int:
    return seed * 10**7 + step * batch_size + index


class SceneBatches(IterableDataset):
    """Training batches from ``start_step`` on: images, ``objects`` jittered boxes per image and their labels.

    Each batch depends only on (seed, step), so resuming reproduces the uninterrupted run's data.
    """

    def __init__(self, processor, seed: int, batch_size: int, objects: int, start_step: int, max_shift: int = 20):
        self.pixels = SamPixels(processor)
        self.mask_size = processor.image_processor.mask_size["longest_edge"]
        self.image_size = processor.image_processor.size["longest_edge"]
        self.seed, self.batch_size, self.objects = seed, batch_size, objects
        self.start_step, self.max_shift = start_step, max_shift

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        images, boxes, labels = [], [], []
        for index in range(self.batch_size):
            seed = scene_seed(self.seed, step, index, self.batch_size)
            scene = generate_scene(seed, self.image_size)
            while not scene.masks:  # rare: every object was covered or too small
                seed += EVAL_SEED_OFFSET // 2
                scene = generate_scene(seed, self.image_size)
            rng = np.random.default_rng([self.seed, step, index])
            chosen = rng.choice(len(scene.masks), self.objects, replace=len(scene.masks) < self.objects)
            images.append(scene.image)
            boxes.append([box_prompt(scene.masks[k], self.max_shift, rng) for k in chosen])
            # the low-res target: the mask resized (nearest) as SamBoxTransform does for the processor's mask size
            labels.append(
                [
                    np.asarray(Image.fromarray(scene.masks[k]).resize((self.mask_size,) * 2, Image.Resampling.NEAREST))
                    for k in chosen
                ]
            )
        inputs = self.pixels(images)
        scale = inputs["reshaped_input_sizes"][0, 0].item() / self.image_size
        return {
            "pixel_values": inputs["pixel_values"],
            "input_boxes": torch.from_numpy(np.asarray(boxes, np.float32) * scale),
            "labels": torch.from_numpy(np.asarray(labels, np.float32)),
        }

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def pytorch_init(model: SamModel) -> None:
    """Meta's segment-anything initialisation: PyTorch's default for every layer (:func:`reset_to_pytorch_init`),
    and the prompt encoder's random Fourier features drawn with scale 1 and kept fixed, as Meta's
    ``PositionEmbeddingRandom`` buffer is.

    transformers draws those features with std ``hidden_size // 2`` (48 here): frequencies far above what a
    16 x 16 grid resolves, so box corners encode as noise and a model trained from there does not learn to
    follow boxes (held-out Dice fell from 0.18 to 0.14 between steps 500 and 1000 in a first run).
    """
    reset_to_pytorch_init(model)
    features = model.shared_image_embedding.positional_embedding
    with torch.no_grad():
        features.normal_(0.0, 1.0)
    features.requires_grad_(False)


def training_loss(model: SamModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + Dice on every object's low-res logits, plus SAM's MSE between predicted and actual IoU."""
    outputs = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    logits, labels = outputs.pred_masks[:, :, 0], batch["labels"]  # (B, K, M, M)
    losses = bce_dice_loss(logits, labels)
    with torch.no_grad():
        predicted = logits > 0
        intersection = (predicted & (labels > 0)).flatten(-2).sum(-1)
        union = (predicted | (labels > 0)).flatten(-2).sum(-1).clamp(min=1)
        iou = intersection / union
    iou_loss = torch.nn.functional.mse_loss(outputs.iou_scores[:, :, 0].float(), iou.float())
    return losses.loss + iou_loss, {
        "bce": losses.bce.item(),
        "dice_loss": losses.dice.item(),
        "iou_mse": iou_loss.item(),
    }


def held_out_scenes(count: int, size: int) -> list:
    return [generate_scene(EVAL_SEED_OFFSET + index, size) for index in range(count)]


def evaluate(model: SamModel, processor, scenes: list) -> dict[str, float]:
    """Mean Dice over every object of the held-out scenes, box-prompted as the paper evaluates; filling the box;
    and Dice by object size and by occlusion (whole or cut into pieces), which shows where the model loses."""
    model.eval()
    boxes = [
        np.stack([box_prompt(m, fixed_shift=PAPER.box_shift, resolution=PAPER.box_resolution) for m in s.masks])
        for s in scenes
    ]
    predictions = predict_boxes(model, processor, [s.image for s in scenes], boxes, batch_size=16)
    dice, fill, areas, pieces = [], [], [], []
    for scene, image_boxes, prediction in zip(scenes, boxes, predictions):
        for mask, box, predicted in zip(scene.masks, image_boxes, prediction.masks):
            dice.append(dice_score(predicted, mask))
            filled = np.zeros_like(mask, dtype=bool)
            x0, y0, x1, y1 = np.round(box).astype(int)
            filled[y0 : y1 + 1, x0 : x1 + 1] = True
            fill.append(dice_score(filled, mask))
            areas.append(int(mask.sum()))
            pieces.append(ndimage.label(mask, structure=np.ones((3, 3)))[1])
    dice, areas, pieces = np.asarray(dice), np.asarray(areas), np.asarray(pieces)
    scale = (scenes[0].image.shape[0] / 128) ** 2  # size bands in visible pixels at 128 px
    bands = ((0, 100), (100, 400), (400, 1600), (1600, None))
    groups = {
        **{
            (f"{low}-{high} px" if high else f"{low}+ px"): (areas >= low * scale) & (areas < (high or np.inf) * scale)
            for low, high in bands
        },
        "one piece": pieces == 1,
        "occluded into pieces": pieces > 1,
    }
    return {
        "dice": float(dice.mean()),
        "fill_the_box_dice": float(np.mean(fill)),
        "objects": len(dice),
        "dice_by_group": {
            name: [round(float(dice[chosen].mean()), 3), int(chosen.sum())]
            for name, chosen in groups.items()
            if chosen.any()
        },
    }


MODEL_CARD = """\
---
license: apache-2.0
tags:
- segment-anything
- db-sam
- synthetic-pretraining
---

# Small SAM pretrained on generated scenes (a stand-in for SAM ViT-B)

A {parameters:,}-parameter `SamModel` ({image_size} px input, ViT width {width}, {layers} layers, patch
{patch}), trained from random weights by `scripts/pretrain_small_sam.py` on procedurally generated
natural-like scenes (`modeling_dbsam.scenes`: textured, overlapping shapes of many sizes and contrasts).
It has never seen a medical image, a photograph, or any data not generated by that code.

**What it is:** a pretrained, box-promptable SAM small enough to fine-tune on two CPU cores, so that
the project's setting (a frozen pretrained ViT adapted to medical images) can be exercised on machines
where SAM's weights cannot be downloaded: quickstart, experiments, tests.
**What it is not:** SAM. It is about {ratio:,}x smaller than ViT-B, was trained for {minutes:.0f} minutes,
and its scores say nothing about SAM's or DB-SAM's at full scale.

## Training

{steps} steps of AdamW (peak lr {lr}, weight decay {weight_decay}, {warmup} warmup steps, cosine decay),
{batch} scenes per step with {objects} box prompts each (each side jittered outward by 0-20 px at
256 px), loss BCE + Dice + IoU MSE, all parameters trained, seed {seed}; {examples_per_second:.1f} scenes/s
on this machine's CPU.

## Held-out score

Box-prompted Dice on {eval_scenes} generated scenes never used in training ({objects_scored} objects; box
= tight box + 9 px per side at 256 px): **{dice:.3f}** (filling the box: {fill:.3f}). Reproduce:

    python scripts/pretrain_small_sam.py --evaluate <this folder>
"""


def save_model(model: SamModel, processor, folder: Path, card: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(MODEL_CARD.format(**card)), overwrite=True)
    atomic_write(
        folder / "pretraining.json", lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2)), overwrite=True
    )


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list, seconds: float) -> None:
    state = {
        "seconds": seconds,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "history": json.dumps(history),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", help="checkpoint, log and the final model (OUTPUT_DIR/model)")
    parser.add_argument("--evaluate", metavar="MODEL", help="only score a saved model on the held-out scenes")
    parser.add_argument("--max_steps", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=8, help="scenes per step")
    parser.add_argument("--objects", type=int, default=4, help="box prompts per scene")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (on a busy 2-core machine 1 is several times faster)"
    )
    parser.add_argument("--save_steps", type=int, default=100, help="checkpoint interval (resume point)")
    parser.add_argument("--eval_steps", type=int, default=500)
    parser.add_argument("--eval_scenes", type=int, default=200)
    parser.add_argument("--image_size", type=int, default=128, help="scene and model input size")
    args = parser.parse_args(argv)
    if not args.evaluate and not args.output_dir:
        parser.error("give --output_dir (train) or --evaluate MODEL")
    return args


def small_sam_config(image_size: int) -> SamConfig:
    config = json.loads(json.dumps(SMALL_SAM))
    config["vision_config"]["image_size"] = config["prompt_encoder_config"]["image_size"] = image_size
    return SamConfig(**config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        model = SamModel.from_pretrained(args.evaluate)
        processor = load_processor(args.evaluate)
        size = processor.image_processor.size["longest_edge"]
        print(json.dumps(evaluate(model, processor, held_out_scenes(args.eval_scenes, size))))
        return 0

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    config = small_sam_config(args.image_size)
    model = SamModel(config)
    pytorch_init(model)
    processor = build_sam_processor(config, [v / 255 for v in SAM_PIXEL_MEAN], [v / 255 for v in SAM_PIXEL_STD])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    step, history, previous_seconds = 0, [], 0.0
    checkpoint = output_dir / CHECKPOINT
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history, previous_seconds = state["step"], json.loads(state["history"]), float(state["seconds"])
        print(f"resumed at step {step} from {checkpoint}", flush=True)

    scenes = held_out_scenes(args.eval_scenes, args.image_size)
    data = SceneBatches(processor, args.seed, args.batch_size, args.objects, step)
    loader = iter(DataLoader(data, batch_size=None, num_workers=1, prefetch_factor=4))
    log = (output_dir / "log.jsonl").open("a", encoding="utf-8")
    started, examples, window = time.perf_counter(), 0, []
    while step < args.max_steps:
        model.train()
        batch = next(loader)
        loss, parts = training_loss(model, batch)
        if not math.isfinite(loss.item()):
            print(f"loss is {loss.item()} at step {step}: stopping; last checkpoint kept", file=sys.stderr)
            return 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        examples += args.batch_size
        window.append(loss.item())
        if step % 25 == 0:
            elapsed = time.perf_counter() - started
            record = {
                "step": step,
                "loss": float(np.mean(window)),
                **parts,
                "lr": scheduler.get_last_lr()[0],
                "scenes_per_second": examples / elapsed,
                "seconds": previous_seconds + elapsed,
            }
            window = []
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % args.eval_steps == 0 or step == args.max_steps:
            scores = evaluate(model, processor, scenes)
            record = {"step": step, "eval": scores, "seconds": previous_seconds + time.perf_counter() - started}
            history.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if step % args.save_steps == 0 or step == args.max_steps:
            seconds = previous_seconds + time.perf_counter() - started
            save_checkpoint(checkpoint, model, optimizer, scheduler, step, history, seconds)
    elapsed = previous_seconds + time.perf_counter() - started
    final = history[-1]["eval"] if history and history[-1]["step"] == step else evaluate(model, processor, scenes)
    vision = config.vision_config
    card = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_size": vision.image_size,
        "width": vision.hidden_size,
        "layers": vision.num_hidden_layers,
        "patch": vision.patch_size,
        "ratio": round(93_735_472 / sum(p.numel() for p in model.parameters())),  # SAM ViT-B's parameter count
        "minutes": elapsed / 60,
        "steps": step,
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "warmup": args.warmup_steps,
        "batch": args.batch_size,
        "objects": args.objects,
        "seed": args.seed,
        "examples_per_second": step * args.batch_size / max(elapsed, 1e-9),
        "eval_scenes": args.eval_scenes,
        "objects_scored": final["objects"],
        "dice": final["dice"],
        "fill": final["fill_the_box_dice"],
        "wall_seconds": elapsed,
    }
    save_model(model, processor, output_dir / MODEL_DIR, card)
    print(json.dumps(card), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
