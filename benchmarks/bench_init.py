"""Does a SAM trained from random weights learn to follow a box? transformers' initialisation against Meta's.

    python benchmarks/bench_init.py                 # 300 steps, 3 seeds (about 10 minutes on 2 cores)
    python benchmarks/bench_init.py --steps 50      # a quick check that the script runs

The task needs nothing but the prompt: blank images, and the target is the box itself. The tiny test
model (32 px), every weight trainable, AdamW at 1e-3, batch 16, BCE + Dice. ``transformers``: the
model as ``DBSamModel(config)`` builds it (SAM's init: normal std 0.02, std 1e-10 in the ViT);
``meta``: the same after ``modeling_dbsam.modeling_dbsam.reset_to_pytorch_init`` (PyTorch's default layer init,
as Meta's segment-anything has it), which ``training/train.py`` applies to models built from
``--model_config``. Reports the mean Dice of the last 50 steps' predictions per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny import TINY_IMAGE_SIZE, TINY_MASK_SIZE, tiny_sam_config_dict  # noqa: E402

from modeling_dbsam import DBSamConfig, DBSamModel  # noqa: E402
from modeling_dbsam.losses import bce_dice_loss  # noqa: E402
from modeling_dbsam.modeling_dbsam import reset_to_pytorch_init  # noqa: E402


def box_batch(generator: torch.Generator, count: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blank images, random boxes in the model's frame, and the boxes as low-resolution masks."""
    corner = torch.randint(0, TINY_IMAGE_SIZE - 12, (count, 2), generator=generator)
    size = torch.randint(4, 12, (count, 2), generator=generator)
    boxes = torch.cat([corner, corner + size], dim=1).float()
    scale = TINY_MASK_SIZE // TINY_IMAGE_SIZE
    labels = torch.zeros(count, 1, TINY_MASK_SIZE, TINY_MASK_SIZE)
    for index, (x0, y0, x1, y1) in enumerate(boxes.long() * scale):
        labels[index, 0, y0:y1, x0:x1] = 1
    return torch.zeros(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), boxes[:, None], labels


def train_box_following(init: str, seed: int, steps: int) -> float:
    torch.manual_seed(seed)
    model = DBSamModel(DBSamConfig(**tiny_sam_config_dict()))
    if init == "meta":
        reset_to_pytorch_init(model, keep=model.adapter_modules())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    dice = []
    for step in range(steps):
        pixel_values, boxes, labels = box_batch(generator)
        logits = model(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False).pred_masks[:, :, 0]
        loss = bce_dice_loss(logits, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= steps - 50:
            predicted = logits.detach() > 0
            overlap = (predicted & (labels > 0)).sum((1, 2, 3))
            dice.append((2 * overlap / (predicted.sum((1, 2, 3)) + labels.sum((1, 2, 3)))).mean().item())
    return statistics.mean(dice)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {
        init: [round(train_box_following(init, seed, args.steps), 3) for seed in range(args.seeds)]
        for init in ("transformers", "meta")
    }
    print(json.dumps({"steps": args.steps, "dice_of_last_50_steps_per_seed": results}, indent=2))


if __name__ == "__main__":
    main()
