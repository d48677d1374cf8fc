"""Train DB-SAM (or the decoder-only MedSAM-style baseline) with the paper's recipe, on 1 to N devices.

    accelerate launch training/train.py --config training/configs/paper.yaml
    accelerate launch --num_processes 4 training/train.py --config training/configs/paper.yaml \\
        --model facebook/sam-vit-base --data /data/medsam-arrow --output_dir outputs/dbsam-vitb
    accelerate launch training/train.py --config ... --resume_from_checkpoint latest
    python training/train.py --config training/configs/quickstart.yaml

Accelerate handles devices, DDP/FSDP, mixed precision and gradient accumulation. The run is a
function of its configuration: data order, box jitter and dropout depend only on (seed, epoch,
step), so a run killed and resumed from a checkpoint ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from checkpointing import (
    PREFIX,
    TrainerState,
    latest_checkpoint,
    remove_interrupted_saves,
    resolve_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from model_setup import (
    build_model,
    build_optimizer,
    build_processor,
    build_scheduler,
    convert_to_sync_batch_norm,
    wants_sync_batch_norm,
)
from periodic_eval import SUMMARY_METRICS, available_metrics, evaluate_during_training
from reproducibility import EpochShuffleSampler, seed_micro_batch
from run_config import CONFIG_FILE_NAME, ConfigError, RunConfig, parse_config
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_dbsam import DBSamModel
from modeling_dbsam.data import SamBoxTransform, collate_batch
from modeling_dbsam.data.splits import carve_validation
from modeling_dbsam.io import atomic_write
from modeling_dbsam.losses import bce_dice_loss
from modeling_dbsam.pixels import SamPixels, conv_input_size

logger = get_logger("dbsam.train")
EVAL_RESULTS_FILE = "eval_results.json"
EVALUATIONS_DIR = "evaluations"  # per-case scores of every evaluation, inside output_dir
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN or infinite: training stops before the weights are touched."""


@dataclass
class StepPlan:
    """How many optimizer steps a run takes and how they map onto epochs and micro-batches."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int

    @classmethod
    def make(cls, micro_batches_per_epoch: int, accumulation: int, num_train_epochs: int, max_steps: int):
        steps_per_epoch = math.ceil(micro_batches_per_epoch / accumulation)
        total = max_steps if max_steps > 0 else steps_per_epoch * num_train_epochs
        return cls(micro_batches_per_epoch, steps_per_epoch, total, math.ceil(total / steps_per_epoch))


class Training:
    """One training run: set up from a RunConfig, then ``train()``."""

    def __init__(self, config: RunConfig):
        self.config = config
        args = config.training
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator(
            cpu=args.use_cpu,
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=args.logging_dir or str(self.output_dir / "runs")
            ),
            step_scheduler_with_optimizer=False,
        )
        if self.accelerator.distributed_type == DistributedType.FSDP and args.eval_strategy != "no":
            raise ConfigError(
                "evaluation during training runs on each process's full model copy, which FSDP shards: "
                "set eval_strategy: no and run dbsam evaluate on the saved model"
            )
        set_seed(args.seed)  # identical random init (adapters, or the whole model from model_config) on every rank
        model = build_model(config.model)
        self.processor = build_processor(config.model, model.config)
        self.trainable_parameters = model.freeze_for_training()
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable()
        if wants_sync_batch_norm(args.sync_batch_norm, self.accelerator.num_processes, self.accelerator.device):
            convert_to_sync_batch_norm(model)

        train_set, self.eval_set = training_and_eval_sets(config)
        if self.eval_set is not None:
            check_eval_set(self.eval_set, config)
        self.sampler = EpochShuffleSampler(len(train_set), args.seed)
        self._prepare_output_dir()  # only now: a setup error above leaves output_dir untouched
        # Box jitter is a function of (seed, epoch, example): see SamBoxTransform. Loader workers only resize:
        # uint8 batches (a quarter of the bytes) are normalised on the device, by the processor's own table.
        self.pixels = SamPixels(self.processor) if SamPixels.supports(self.processor) else None
        self.transform = SamBoxTransform(
            self.processor,
            max_shift=config.data.max_box_shift,
            horizontal_flip=config.data.horizontal_flip,
            seed=args.seed,
            normalize=self.pixels is None,
            conv_size=conv_input_size(model),  # I_conv from each native image, as the paper does
            passthrough=(),
        )
        loader = DataLoader(
            train_set.with_transform(self.transform),
            batch_size=args.per_device_train_batch_size,
            sampler=self.sampler,
            num_workers=args.dataloader_num_workers,
            collate_fn=collate_batch,
            pin_memory=torch.cuda.is_available(),
        )
        self.train_loader = self.accelerator.prepare(loader)
        self.plan = StepPlan.make(
            len(self.train_loader), args.gradient_accumulation_steps, args.num_train_epochs, args.max_steps
        )
        optimizer = build_optimizer(model, args)
        scheduler = build_scheduler(optimizer, args, self.plan.total_steps)
        # Prepared (not registered as a custom object, which Accelerate reloads with weights_only=False), the
        # scheduler is saved as scheduler.bin and resumed with weights_only=True. With
        # step_scheduler_with_optimizer=False its step() is the plain scheduler's.
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.state = TrainerState()
        if args.resume_from_checkpoint is not None:
            checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.checkpoints_dir)
            logger.info(f"resuming from {checkpoint}")
            self.accelerator.load_state(str(checkpoint))
            self.state = TrainerState.load(checkpoint)
        self._loss_sums = torch.zeros(3, device=self.accelerator.device)  # loss, bce, dice since the last log
        self._micro_batches_since_log = 0
        self._last_log_time = time.perf_counter()

    def _prepare_output_dir(self) -> None:
        """Main process: start over if told to, drop interrupted checkpoint saves, record the configuration."""
        if self.accelerator.is_main_process:
            if self.args.overwrite_output_dir:  # stale checkpoints and scores must never be mistaken for this run's
                for folder in (self.args.checkpoints_dir, self.output_dir / EVALUATIONS_DIR):
                    shutil.rmtree(folder, ignore_errors=True)
            for folder in remove_interrupted_saves(self.args.checkpoints_dir):
                logger.warning(f"removed {folder}: an interrupted checkpoint save")
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output_dir / CONFIG_FILE_NAME, self.config.save, overwrite=True)
        self.accelerator.wait_for_everyone()

    # ---- the loop -------------------------------------------------------------------------------------------

    def train(self) -> int:
        args, plan, state = self.args, self.plan, self.state
        logger.info(
            f"{len(self.sampler)} training examples, {plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps "
            f"in {plan.num_epochs} epochs on {self.accelerator.num_processes} process(es); "
            f"{self.trainable_parameters:,} trainable parameters",
            main_process_only=True,
        )
        self.accelerator.init_trackers("dbsam", config=tracker_config(self.config))
        progress = tqdm(
            total=plan.total_steps,
            initial=state.global_step,
            desc="training",
            unit="step",
            disable=args.disable_tqdm or not self.accelerator.is_local_main_process,
        )
        for epoch in range(state.global_step // plan.steps_per_epoch, plan.num_epochs):
            if state.global_step >= plan.total_steps:  # resumed from the final checkpoint
                break
            state.epoch = epoch
            self._train_epoch(epoch, progress)
        progress.close()
        self._finish()
        return 0

    def _train_epoch(self, epoch: int, progress: tqdm) -> None:
        args, plan, state = self.args, self.plan, self.state
        self.model.train()
        self.train_loader.set_epoch(epoch)  # the sampler's order and Accelerate's epoch counter
        self.transform.set_epoch(epoch)  # box jitter; DataLoader workers copy the transform per epoch
        done = (state.global_step - epoch * plan.steps_per_epoch) * args.gradient_accumulation_steps
        loader = self.accelerator.skip_first_batches(self.train_loader, done) if done else self.train_loader
        for micro_batch, batch in enumerate(loader, start=done):
            seed_micro_batch(
                args.seed, epoch * plan.micro_batches_per_epoch + micro_batch, self.accelerator.process_index
            )
            with self.accelerator.accumulate(self.model):
                grad_norm = self._train_micro_batch(batch)
            if not self.accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update()
            if state.global_step % args.logging_steps == 0:
                self._log_training(grad_norm, progress)
            self._evaluate_and_save_if_due()
            if state.global_step >= plan.total_steps:
                return

    def _train_micro_batch(self, batch: dict) -> torch.Tensor | None:
        """Forward, loss, backward; on the micro-batch that completes an optimizer step also clip and step."""
        pixel_values = batch["pixel_values"]
        if self.pixels is not None:
            pixel_values = self.pixels.normalize(pixel_values, batch["reshaped_input_sizes"])
        conv_inputs = {}
        if "conv_pixel_values" in batch:
            conv_pixel_values = batch["conv_pixel_values"]
            if self.pixels is not None:
                conv_pixel_values = self.pixels.normalize_conv(conv_pixel_values, batch["original_sizes"])
            conv_inputs["conv_pixel_values"] = conv_pixel_values
        outputs = self.model(
            pixel_values=pixel_values, input_boxes=batch["input_boxes"], multimask_output=False, **conv_inputs
        )
        losses = bce_dice_loss(outputs.pred_masks[:, :, 0], batch["labels"].to(outputs.pred_masks.dtype))
        self._stop_if_non_finite(losses.loss.detach(), "loss")
        self._loss_sums += torch.stack([term.detach() for term in losses])
        self._micro_batches_since_log += 1
        self.accelerator.backward(losses.loss)
        grad_norm = None
        if self.accelerator.sync_gradients:
            max_norm = self.args.max_grad_norm or float("inf")  # 0: measure the norm, clip nothing
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
            if self.args.mixed_precision != "fp16":  # fp16's loss scaler skips such steps by itself
                self._stop_if_non_finite(grad_norm, "gradient norm")
        self.optimizer.step()
        if self.accelerator.sync_gradients and not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _stop_if_non_finite(self, value: torch.Tensor, what: str) -> None:
        """Stop every process, before the optimizer step, when any process sees a NaN or inf."""
        values = self.accelerator.gather(value.float().reshape(1))
        bad = values[~torch.isfinite(values)]
        if len(bad):
            step = self.state.global_step + 1
            latest = latest_checkpoint(self.args.checkpoints_dir)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
            raise NonFiniteError(
                f"{what} is {bad[0].item()} at step {step} (epoch {self.state.epoch}); training stopped and {kept}. "
                "The run is deterministic, so resuming with the same settings repeats it: check the data, or "
                "train again with other settings (a lower learning_rate, fp32)"
            )

    def _log_training(self, grad_norm: torch.Tensor | None, progress: tqdm) -> None:
        now = time.perf_counter()
        sums = self.accelerator.reduce(self._loss_sums, "mean") / max(self._micro_batches_since_log, 1)
        micro_batches = self._micro_batches_since_log
        examples = micro_batches * self.args.per_device_train_batch_size * self.accelerator.num_processes
        elapsed = max(now - self._last_log_time, 1e-9)
        values = {
            "train/loss": sums[0].item(),
            "train/bce": sums[1].item(),
            "train/dice": sums[2].item(),
            "train/learning_rate": self.scheduler.get_last_lr()[0],
            "train/examples_per_second": examples / elapsed,
            "train/steps_per_second": micro_batches / self.args.gradient_accumulation_steps / elapsed,
            "train/epoch": self.state.global_step / self.plan.steps_per_epoch,
        }
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        self.accelerator.log(values, step=self.state.global_step)
        progress.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/learning_rate']:.2e}")
        self._loss_sums.zero_()
        self._micro_batches_since_log = 0
        self._last_log_time = now

    # ---- checkpoints and evaluation --------------------------------------------------------------------------

    def _evaluate_and_save_if_due(self) -> None:
        """After an optimizer step: evaluate (eval_strategy), then checkpoint (save_steps, epoch ends, the last step,
        and every evaluated step, so that the best checkpoint exists)."""
        args, step = self.args, self.state.global_step
        epoch_end = step % self.plan.steps_per_epoch == 0
        final = step >= self.plan.total_steps
        evaluate = (args.eval_strategy == "epoch" and (epoch_end or final)) or (
            args.eval_strategy == "steps" and (step % args.eval_steps == 0 or final)
        )
        if evaluate:
            self._evaluate()
        if evaluate or epoch_end or final or (args.save_steps and step % args.save_steps == 0):
            path = save_checkpoint(self.accelerator, args.checkpoints_dir, self.state)
            if self.accelerator.is_main_process:
                rotate_checkpoints(args.checkpoints_dir, args.save_total_limit, keep=self.state.best_checkpoint)
            logger.info(f"saved {path}")

    def _evaluate(self) -> None:
        """Score the model on the eval split, log the scores and track the best checkpoint."""
        state, args = self.state, self.args
        evaluation = evaluate_during_training(
            self.accelerator,
            self.model,
            self.processor,
            self.eval_set,
            args.eval_protocol,
            self.output_dir / EVALUATIONS_DIR / f"step-{state.global_step}",
            args.per_device_eval_batch_size,
            AUTOCAST_DTYPES[args.mixed_precision],
        )
        state.evaluations.append({"step": state.global_step, "epoch": state.epoch, **evaluation})
        metrics = evaluation["metrics"]
        self.accelerator.log({f"eval/{name}": value for name, value in metrics.items()}, step=state.global_step)
        logger.info(
            f"step {state.global_step}: "
            + ", ".join(f"{name} {metrics[name]:.4f}" for name in SUMMARY_METRICS if name in metrics)
        )
        self._track_best(metrics)

    def _track_best(self, metrics: dict[str, float]) -> None:
        name, state = self.args.metric_for_best_model, self.state
        if name is None:
            return
        value, best = metrics[name], state.best_metric
        if best is None or (value > best if self.args.greater_is_better else value < best):
            state.best_metric, state.best_checkpoint = value, f"{PREFIX}{state.global_step}"

    def _finish(self) -> None:
        """Write the Hub-ready model folder: weights, config, processor, training config, evaluation results."""
        state, accelerator = self.state, self.accelerator
        if self.args.load_best_model_at_end and state.best_checkpoint is not None:
            logger.info(f"loading the best checkpoint {state.best_checkpoint} ({state.best_metric})")
            accelerator.load_state(str(self.args.checkpoints_dir / state.best_checkpoint))
        evaluation = self._published_evaluation()
        state_dict = accelerator.get_state_dict(self.model)
        if accelerator.is_main_process:
            publish_model(
                accelerator.unwrap_model(self.model), state_dict, self.processor, evaluation, self.output_dir
            )
            logger.info(f"saved the trained model to {self.output_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()

    def _published_evaluation(self) -> dict | None:
        """The evaluation entry describing the weights that get published (best or final), if any."""
        if self.args.load_best_model_at_end and self.state.best_checkpoint is not None:
            best_step = int(self.state.best_checkpoint.removeprefix(PREFIX))
            return next(e for e in self.state.evaluations if e["step"] == best_step)
        final = [e for e in self.state.evaluations if e["step"] == self.state.global_step]
        return final[-1] if final else None


def publish_model(model: DBSamModel, state_dict: dict, processor, evaluation: dict | None, output_dir: Path) -> None:
    """Save into a staging folder, then move each file into ``output_dir`` (atomic per file)."""
    staging = output_dir / ".tmp-model"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging, state_dict=state_dict)
    processor.save_pretrained(staging)
    results = output_dir / EVAL_RESULTS_FILE
    if evaluation is not None:
        (staging / EVAL_RESULTS_FILE).write_text(json.dumps(evaluation, indent=2))
    elif results.exists():
        results.unlink()  # an older run's results would describe other weights
    for file in staging.iterdir():
        os.replace(file, output_dir / file.name)
    staging.rmdir()


def training_and_eval_sets(config: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training split and the split that selects the model: the dataset's own, or one carved from the
    training split by case (``validation_fraction``). The test split is left to ``dbsam evaluate``."""
    data = config.data
    splits = datasets.load_from_disk(data.data)
    train_set = splits[data.train_split]
    if data.validation_fraction > 0:
        train_set, validation = carve_validation(train_set, data.validation_fraction, data.validation_seed)
        splits = {**splits, "validation": validation}
    eval_set = splits[data.eval_split] if config.training.eval_strategy != "no" else None
    return train_set, eval_set


def check_eval_set(eval_set: datasets.Dataset, config: RunConfig) -> None:
    """The eval split is not empty and yields metric_for_best_model (a 2D metric needs 2D tasks...)."""
    if len(eval_set) == 0:
        raise ConfigError(f"eval_split {config.data.eval_split!r} of {config.data.data} is empty")
    name = config.training.metric_for_best_model
    if name is not None and name not in (names := available_metrics(eval_set)):
        raise ConfigError(
            f"metric_for_best_model {name!r} cannot be computed on eval_split {config.data.eval_split!r}; "
            f"it yields {', '.join(names)}"
        )


def tracker_config(config: RunConfig) -> dict:
    """The configuration as tracker hyper-parameters (TensorBoard takes only scalars and strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file save/load messages
    # SAM ties the prompt encoder's positional embedding to the shared one; safetensors stores it once.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        setup_logging()
        training = Training(config)
    except (ValueError, FileNotFoundError) as error:  # configuration, model or data problems found in setup
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    try:
        return training.train()
    except NonFiniteError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
