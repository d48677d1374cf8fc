"""Training-step speed and peak memory: DB-SAM against the decoder-only baseline, ViT-B at 1024, batch 1, CPU.

Each configuration (model x activation checkpointing) runs in its own process, so that its peak
resident memory (``ru_maxrss``) is its own; the processes run interleaved over ``--rounds`` rounds
and the report gives min and median seconds per step and ratios against the baseline without
checkpointing, measured in this one run. Weights are random (no download): a step costs the same.
A step is what ``training/train.py`` does per micro-batch: forward with a box prompt, BCE + Dice on
the low-res logits, backward, AdamW step over the trainable parameters.

    python benchmarks/bench_train.py                       # the numbers in docs/benchmarks.md
    python benchmarks/bench_train.py --rounds 3 --steps 2  # more repeats

``--loops`` instead compares ``training/train.py`` (transformers' Trainer) with a reference loop that does
what the hand-written Accelerate loop it replaced did per step (device normalisation of the uint8 batch,
per-micro-batch dropout seed, forward, BCE + Dice, backward, clipping at 1.0, AdamW, polynomial schedule):
the quickstart model and data, batch 4, same seed, each loop in its own process, interleaved rounds.

    python benchmarks/bench_train.py --loops               # the Trainer row of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "baseline": {"use_channel_attention": False, "use_conv_branch": False, "use_fusion": False, "train_neck": False},
    "dbsam": {},
}


def measure(model_name: str, checkpointing: bool, steps: int, warmup: int, image_size: int) -> dict:
    """Run in a child process: build the model, time ``steps`` training steps after ``warmup``."""
    import torch

    from modeling_dbsam import DBSamConfig, DBSamModel
    from modeling_dbsam.losses import bce_dice_loss

    torch.manual_seed(0)
    grid = image_size // 16  # ViT-B's patch size
    config = DBSamConfig(
        vision_config={"image_size": image_size},  # the other ViT-B defaults stay
        prompt_encoder_config={"image_size": image_size, "image_embedding_size": grid},
        **CONFIGS[model_name],
    )
    model = DBSamModel(config)
    trainable = model.freeze_for_training()
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    pixel_values = torch.randn(1, 3, image_size, image_size)
    boxes = torch.tensor([[[200.0, 300.0, 600.0, 700.0]]]) * image_size / 1024
    mask_size = 4 * config.vision_config.image_size // config.vision_config.patch_size
    labels = torch.zeros(1, 1, mask_size, mask_size)
    labels[..., 50:90, 60:110] = 1
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        logits = model(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False).pred_masks[:, :, 0]
        bce_dice_loss(logits, labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"times": times, "peak_mib": peak_rss / 1024, "setup_mib": setup_rss / 1024, "trainable": trainable}


def measure_loop(loop: str, steps: int, warmup: int) -> dict:
    """Run in a child process: ``steps`` timed optimizer steps after ``warmup`` of one loop, data loading excluded."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "training"))
    import torch
    import train
    from transformers import TrainerCallback

    argv = [
        "--model_config",
        str(root / "training/configs/quickstart_model.json"),
        "--data",
        str(root / "data/sample"),
    ]
    argv += ["--output_dir", f"/tmp/bench-train-{loop}", "--overwrite_output_dir", "--seed", "0"]
    argv += ["--max_steps", str(warmup + steps), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3"]
    argv += ["--adapter_dropout", "0.1", "--adapter_drop_path_rate", "0.1", "--horizontal_flip", "0.5"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm"]
    argv += ["--logging_steps", "1000"]
    trainer = train.build_trainer(train.arguments.parse_config(argv))
    times, setup = [], {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            setup.setdefault("rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    if loop == "trainer":
        trainer.add_callback(StepTimer())
        trainer.train()
    else:  # the replaced loop's step, on the same model, data, optimizer settings and schedule
        from accelerate import Accelerator
        from transformers import get_polynomial_decay_schedule_with_warmup

        from modeling_dbsam.losses import bce_dice_loss

        accelerator, model = Accelerator(cpu=True), trainer.model
        parameters = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": 0.01}]
        groups.append({"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=1e-3)
        scheduler = get_polynomial_decay_schedule_with_warmup(optimizer, 12, warmup + steps)
        loader = trainer.get_train_dataloader()
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        loader.set_epoch(0)
        model.train()
        timer = StepTimer()
        for step, batch in zip(range(warmup + steps), loader):
            timer.on_step_begin(None, None, None)
            torch.manual_seed(train.derive_seed(0, step, 0))
            pixels = trainer.transform.pixels
            inputs = {"pixel_values": pixels.normalize(batch["pixel_values"], batch["reshaped_input_sizes"])}
            if "conv_pixel_values" in batch:  # I_conv, as the replaced loop gave it since the paper's I_conv landed
                inputs["conv_pixel_values"] = pixels.normalize_conv(
                    batch["conv_pixel_values"], batch["original_sizes"]
                )
            outputs = model(**inputs, input_boxes=batch["input_boxes"], multimask_output=False)
            losses = bce_dice_loss(outputs.pred_masks[:, :, 0], batch["labels"])
            accelerator.backward(losses.loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            timer.on_step_end(None, None, None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"times": times[warmup:], "peak_mib": peak / 1024, "setup_mib": setup["rss"] / 1024, "trainable": 0}


def compare_loops(args: argparse.Namespace) -> None:
    results: dict[str, list[dict]] = {"reference": [], "trainer": []}
    for round_index in range(args.rounds):
        for loop in results:
            command = [sys.executable, __file__, "--loop-child", loop, "--steps", str(args.steps)]
            result = subprocess.run(
                [*command, "--warmup", str(args.warmup)], capture_output=True, encoding="utf-8", errors="replace"
            )
            if result.returncode != 0:
                raise RuntimeError(f"{loop} failed:\n{result.stderr[-3000:]}")
            results[loop].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1}/{args.rounds}: {loop} done", file=sys.stderr, flush=True)
    print(f"quickstart model and data, batch 4, fp32, CPU; {args.rounds} interleaved rounds x {args.steps} steps")
    print("\n| loop | s/step min | s/step median | time vs reference | peak RSS MiB | peak above setup MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    reference = None
    for loop, runs in results.items():
        times = [t for run in runs for t in run["times"]]
        median, peak = statistics.median(times), max(run["peak_mib"] for run in runs)
        above = max(run["peak_mib"] - run["setup_mib"] for run in runs)
        reference = reference or (median, peak)
        print(
            f"| {loop} | {min(times):.3f} | {median:.3f} | {median / reference[0]:.3f}x | {peak:.0f} "
            f"({peak / reference[1]:.3f}x) | {above:.0f} |"
        )


def run_child(model_name: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", model_name, "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--image-size", str(args.image_size)]
    command += ["--checkpointing"] if checkpointing else []
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{model_name} (checkpointing={checkpointing}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every configuration")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loops", action="store_true", help="compare training/train.py with the reference loop")
    parser.add_argument("--loop-child", choices=("reference", "trainer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_child:
        print(json.dumps(measure_loop(args.loop_child, args.steps, args.warmup)))
        return
    if args.loops:
        compare_loops(args)
        return
    if args.child:
        print(json.dumps(measure(args.child, args.checkpointing, args.steps, args.warmup, args.image_size)))
        return

    import torch

    configurations = [(name, ckpt) for name in ("baseline", "dbsam") for ckpt in (False, True)]
    results: dict[tuple[str, bool], list[dict]] = {c: [] for c in configurations}
    for round_index in range(args.rounds):
        for configuration in configurations:
            results[configuration].append(run_child(*configuration, args))
            print(f"round {round_index + 1}/{args.rounds}: {configuration} done", file=sys.stderr, flush=True)

    rows = {}
    for (name, ckpt), runs in results.items():
        times = [t for run in runs for t in run["times"]]
        rows[(name, ckpt)] = {
            "min": min(times),
            "median": statistics.median(times),
            "peak": max(run["peak_mib"] for run in runs),
            "above_setup": max(run["peak_mib"] - run["setup_mib"] for run in runs),
            "trainable": runs[0]["trainable"],
            "samples": len(times),
        }
    reference = rows[("baseline", False)]
    print(
        f"ViT-B {args.image_size}px, batch 1, fp32, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; "
        f"{args.rounds} interleaved rounds x {args.steps} timed step(s) after {args.warmup} warm-up"
    )
    print()
    print(
        "| model | activation checkpointing | trainable params | s/step min | s/step median | steps/s (median) "
        "| time vs baseline | peak RSS MiB | peak above model MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, ckpt), row in rows.items():
        print(
            f"| {'DB-SAM' if name == 'dbsam' else 'decoder-only baseline'} | {'on' if ckpt else 'off'} "
            f"| {row['trainable'] / 1e6:.1f} M | {row['min']:.2f} | {row['median']:.2f} | {1 / row['median']:.3f} "
            f"| {row['median'] / reference['median']:.2f}x | {row['peak']:.0f} | {row['above_setup']:.0f} |"
        )
    for name in ("baseline", "dbsam"):
        off, on = rows[(name, False)], rows[(name, True)]
        print(
            f"\n{name}: checkpointing costs {on['median'] / off['median']:.2f}x time and saves "
            f"{off['above_setup'] - on['above_setup']:.0f} MiB of step memory ({off['above_setup']:.0f} -> "
            f"{on['above_setup']:.0f} MiB above the model)"
        )


if __name__ == "__main__":
    main()
