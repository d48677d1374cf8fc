"""Train DB-SAM (or the decoder-only MedSAM-style baseline) with the paper's recipe, on transformers' Trainer.

    accelerate launch training/train.py --config training/configs/paper.yaml
    accelerate launch --config_file training/accelerate/ddp.yaml training/train.py --config training/configs/paper.yaml \\
        --model facebook/sam-vit-base --data /data/medsam-arrow --output_dir outputs/dbsam-vitb
    accelerate launch training/train.py --config ... --resume_from_checkpoint latest
    python training/train.py --config training/configs/quickstart.yaml

Every ``TrainingArguments`` option works (``--optim``, ``--lr_scheduler_type``, ``--torch_compile``,
``--report_to``, ``--push_to_hub``...). ``DBSamTrainer`` changes only what the project does differently: the
loss, the seeded data order and box jitter, uint8 batches normalised on the device, the case-level DSC/NSD
evaluation, the NaN stop, atomic checkpoints and the published folder. Data order, box jitter and dropout
depend only on (seed, epoch, step), so a run killed and resumed ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import datasets
import torch
import transformers
from arguments import CONFIG_FILE_NAME, ConfigError, RunConfig, latest_checkpoint, parse_config, resolve_checkpoint
from model_setup import build_model, build_processor, convert_to_sync_batch_norm, wants_sync_batch_norm
from periodic_eval import available_metrics, evaluate_during_training
from reproducibility import EpochShuffleSampler, derive_seed
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from modeling_dbsam.data import SamBoxTransform, collate_batch
from modeling_dbsam.data.splits import carve_validation
from modeling_dbsam.io import atomic_write
from modeling_dbsam.losses import bce_dice_loss
from modeling_dbsam.pixels import SamPixels, conv_input_size

logger = logging.getLogger("dbsam.train")
EVAL_RESULTS_FILE = "eval_results.json"
EVALUATIONS_DIR = "evaluations"  # per-case scores and the summary of every evaluation, inside output_dir
NOT_MODEL_INPUTS = ("labels", "original_sizes", "reshaped_input_sizes")
STAGING_DIR = ".saving"  # a checkpoint is written here, then renamed into output_dir when complete


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN or infinite: training stops before the weights are touched."""


class DBSamTrainer(Trainer):
    """transformers' Trainer where the project differs from it; everything else is Trainer's own."""

    def __init__(self, *args, config: RunConfig, transform: SamBoxTransform, **kwargs):
        super().__init__(*args, **kwargs)
        # Not Trainer's processing_class, which it takes for a tokenizer's wrapper (align_special_tokens); saved by _save.
        self.config, self.transform, self.processor = config, transform, transform.processor
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer scales it for accumulation
        self.pixels = SamPixels(self.processor) if not transform.normalize else None
        self._staging: Path | None = None
        self._seeded = (-1, 0)  # (optimizer step, micro-batches seeded in it)
        self._loss_terms = torch.zeros(3)  # bce, dice, micro-batches since the last log
        self._last_loss = torch.zeros(())  # the loss of this step's last micro-batch, or its first non-finite one

    # ---- data ---------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        """A permutation of ``(seed, epoch)``; its ``set_epoch`` also moves the box jitter to that epoch."""
        return EpochShuffleSampler(len(train_dataset or self.train_dataset), self.args.seed, self.transform.set_epoch)

    def model_inputs(self, batch: dict) -> dict:
        """Every batch entry but targets and sizes goes to the model; uint8 pixels are normalised here, on the device."""
        inputs = {name: value for name, value in batch.items() if name not in NOT_MODEL_INPUTS}
        if self.pixels is not None and inputs["pixel_values"].dtype == torch.uint8:  # as loader workers send them
            inputs["pixel_values"] = self.pixels.normalize(inputs["pixel_values"], batch["reshaped_input_sizes"])
            if "conv_pixel_values" in inputs:
                conv = self.pixels.normalize_conv(inputs["conv_pixel_values"], batch["original_sizes"])
                inputs["conv_pixel_values"] = conv
        return inputs

    # ---- the step -------------------------------------------------------------------------------------------

    def _inner_training_loop(self, *args, **kwargs):
        self._seeded = (-1, 0)  # auto_find_batch_size reruns the loop from step 0 after an out-of-memory error
        return super()._inner_training_loop(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Re-seed dropout and drop path from (seed, step, micro-batch, process): a resumed run draws the same."""
        step, micro = self._seeded if self._seeded[0] == self.state.global_step else (self.state.global_step, 0)
        torch.manual_seed(derive_seed(self.args.seed, step, micro, self.args.process_index))
        self._seeded = (step, micro + 1)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """BCE + Dice on the low-res logits of the single-mask output."""
        outputs = model(**self.model_inputs(inputs), multimask_output=False)
        logits = outputs.pred_masks[:, :, 0]
        losses = bce_dice_loss(logits, inputs["labels"].to(logits.dtype))
        loss = losses.loss.detach()
        previous = self._last_loss.to(loss.device)
        self._last_loss = torch.where(torch.isfinite(previous), loss, previous)
        terms = torch.stack([losses.bce.detach(), losses.dice.detach(), torch.ones_like(loss)])
        self._loss_terms = self._loss_terms.to(loss.device) + terms
        return (losses.loss, outputs) if return_outputs else losses.loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Stop every process, before the optimizer step, when any process has a NaN or inf loss or gradient norm."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        norm = torch.as_tensor(0.0 if self.args.fp16 else grad_norm, dtype=torch.float32, device=self.args.device)
        values = self.accelerator.gather(torch.stack([self._last_loss.to(norm.device).float(), norm])[None])
        self._last_loss = torch.zeros(())
        for what, column in (("loss", values[:, 0]), ("gradient norm", values[:, 1])):
            bad = column[~torch.isfinite(column)]
            if len(bad):
                latest = latest_checkpoint(self.args.output_dir)
                kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
                raise NonFiniteError(
                    f"{what} is {bad[0].item()} at step {self.state.global_step + 1} (epoch {int(self.state.epoch)}); "
                    f"training stopped and {kept}. The run is deterministic, so resuming with the same settings "
                    "repeats it: check the data, or train again with other settings (a lower learning_rate, fp32)"
                )
        return grad_norm

    def log(self, logs: dict, start_time=None) -> None:
        """Trainer's logs, plus the BCE and Dice terms of the training loss."""
        if "loss" in logs:
            terms = self.accelerator.reduce(self._loss_terms.to(self.args.device), "sum")
            logs["bce"], logs["dice"] = (terms[:2] / terms[2].clamp(min=1)).tolist()
            self._loss_terms = torch.zeros(3)
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model) -> list[str]:
        """Weight decay on matrices and kernels only: biases and normalisation weights (1-D) are not decayed."""
        return [name for name, parameter in model.named_parameters() if parameter.ndim >= 2]

    # ---- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score the model on the eval split with ``dbsam evaluate``'s case-level DSC/NSD protocol."""
        folder = Path(self.args.output_dir) / EVALUATIONS_DIR / f"step-{self.state.global_step}"
        precision = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        evaluation = evaluate_during_training(
            self.accelerator,
            self.model_wrapped,
            self.processor,
            eval_dataset if eval_dataset is not None else self.eval_dataset,
            self.config.data.eval_protocol,
            folder,
            self.args.per_device_eval_batch_size,
            precision,
        )
        if self.accelerator.is_main_process:
            atomic_write(folder / "summary.json", lambda path: Path(path).write_text(json.dumps(evaluation, indent=2)))
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in evaluation["metrics"].items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's push of the output_dir (weights copied from the checkpoint) with the processor, which Trainer
        leaves out: every pushed revision loads with it. Pushed once the staged checkpoint is renamed."""
        if self._staging is None:
            if self.is_world_process_zero():
                self.processor.save_pretrained(self.args.output_dir)
            super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written into a staging folder and renamed when complete: a run killed while saving
        leaves the previous checkpoints intact, and ``latest`` never picks a partial one."""
        root = Path(self.args.output_dir)
        final = root / f"checkpoint-{self.state.global_step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(root / STAGING_DIR, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = root / STAGING_DIR
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            best = self.state.best_model_checkpoint
            if best is not None and Path(best).parent == root / STAGING_DIR:
                self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(root / STAGING_DIR / final.name / "trainer_state.json"))
            shutil.rmtree(final, ignore_errors=True)  # an older run's checkpoint of this step
            os.replace(root / STAGING_DIR / final.name, final)
            (root / STAGING_DIR).rmdir()
            fsync_folder(root)
            rotate_checkpoints(str(root), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        self.processor.save_pretrained(output_dir or self.args.output_dir)

    # ---- the published folder -------------------------------------------------------------------------------

    def published_evaluation(self) -> dict | None:
        """The evaluation of the weights that get published (the best checkpoint's or the last step's), if any."""
        best = self.args.load_best_model_at_end and self.state.best_model_checkpoint
        step = int(Path(best).name.split("-")[1]) if best else self.state.global_step
        path = Path(self.args.output_dir) / EVALUATIONS_DIR / f"step-{step}" / "summary.json"
        return {"step": step, **json.loads(path.read_text(encoding="utf-8"))} if path.is_file() else None

    def create_model_card(self, **kwargs) -> None:
        """Trainer's card (hyper-parameters), with the training losses and validation scores along the run and the
        per-task scores of the published weights."""
        kwargs.setdefault("tags", ["dbsam", "medical-image-segmentation", "image-segmentation"])
        kwargs.setdefault("finetuned_from", self.config.model.model)
        kwargs.setdefault("dataset", Path(self.config.data.data).name)
        super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return
        lines, loss = ["", "## Training and validation results", ""], None
        lines += ["| step | epoch | training loss | validation DSC | validation NSD |", "|---:|---:|---:|---:|---:|"]
        for entry in self.state.log_history:
            loss = entry.get("loss", loss)
            if "eval_dsc" in entry:
                lines.append(
                    f"| {entry['step']} | {entry['epoch']:.2f} | {'-' if loss is None else f'{loss:.4f}'} "
                    f"| {entry['eval_dsc']:.4f} | {entry['eval_nsd']:.4f} |"
                )
        if (evaluation := self.published_evaluation()) is not None:
            lines += ["", f"Published weights: step {evaluation['step']}, {evaluation['protocol']['summary']}.", ""]
            lines += ["| task | cases | DSC | NSD |", "|---|---:|---:|---:|"]
            lines += [f"| {t['task']} | {t['cases']} | {t['dsc']:.4f} | {t['nsd']:.4f} |" for t in evaluation["tasks"]]
        card = Path(self.args.output_dir) / "README.md"
        card.write_text(card.read_text(encoding="utf-8") + "\n".join(lines) + "\n", encoding="utf-8")

    def publish(self) -> None:
        """Write the Hub-ready folder: weights, config, processor, training config, evaluation results, model card;
        with push_to_hub, Trainer's push_to_hub saves the weights and the card and uploads the folder, once."""
        if self.is_world_process_zero():
            results = Path(self.args.output_dir) / EVAL_RESULTS_FILE
            if (evaluation := self.published_evaluation()) is not None:
                atomic_write(
                    results, lambda path: Path(path).write_text(json.dumps(evaluation, indent=2)), overwrite=True
                )
            else:
                results.unlink(missing_ok=True)  # an older run's results would describe other weights
        if self.args.push_to_hub:
            self.push_to_hub()
        else:
            self.save_model()
            self.create_model_card()


def fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def training_and_eval_sets(config: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training split and the split that selects the model: the dataset's own, or one carved from the
    training split by case (``validation_fraction``). The test split is left to ``dbsam evaluate``."""
    data = config.data
    splits = datasets.load_from_disk(data.data)
    train_set = splits[data.train_split]
    if data.validation_fraction > 0:
        train_set, validation = carve_validation(train_set, data.validation_fraction, data.validation_seed)
        splits = {**splits, "validation": validation}
    return train_set, splits[data.eval_split] if config.training.eval_strategy != "no" else None


def check_eval_set(eval_set: datasets.Dataset, config: RunConfig) -> None:
    """The eval split is not empty and yields metric_for_best_model (a 2D metric needs 2D tasks...)."""
    if len(eval_set) == 0:
        raise ConfigError(f"eval_split {config.data.eval_split!r} of {config.data.data} is empty")
    name = config.training.metric_for_best_model
    if name is not None and name.removeprefix("eval_") not in (names := available_metrics(eval_set)):
        raise ConfigError(
            f"metric_for_best_model {name!r} cannot be computed on eval_split {config.data.eval_split!r}; "
            f"it yields {', '.join(names)}"
        )


def prepare_output_dir(config: RunConfig) -> None:
    """Main process: start over if told to, drop an interrupted checkpoint save, record the configuration."""
    output_dir = Path(config.training.output_dir)
    if config.training.process_index == 0:
        if config.training.overwrite_output_dir:  # stale checkpoints and scores must never be mistaken for this run's
            for folder in [*output_dir.glob("checkpoint-*"), output_dir / EVALUATIONS_DIR]:
                shutil.rmtree(folder, ignore_errors=True)
        if (output_dir / STAGING_DIR).exists():
            logger.warning(f"removed {output_dir / STAGING_DIR}: an interrupted checkpoint save")
            shutil.rmtree(output_dir / STAGING_DIR)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / CONFIG_FILE_NAME, config.save, overwrite=True)


def build_trainer(config: RunConfig) -> DBSamTrainer:
    """Data, model and Trainer of a run; refuses what the data cannot give before a model is loaded."""
    args = config.training
    train_set, eval_set = training_and_eval_sets(config)
    if eval_set is not None:
        check_eval_set(eval_set, config)
    transformers.set_seed(args.seed)  # identical random init (adapters, or all from model_config) on every rank
    model = build_model(config.model)
    processor = build_processor(config.model, model.config, config.data.data)  # records the data's intensity rule
    model.freeze_for_training()
    if wants_sync_batch_norm(args.sync_batch_norm, args.world_size, args.device):
        convert_to_sync_batch_norm(model)
    # Box jitter is a function of (seed, epoch, example); loader workers only resize: uint8 batches (a quarter of
    # the bytes) are normalised on the device, by the processor's own table.
    transform = SamBoxTransform(
        processor,
        max_shift=config.data.max_box_shift,
        horizontal_flip=config.data.horizontal_flip,
        seed=args.seed,
        normalize=not SamPixels.supports(processor),
        conv_size=conv_input_size(model),  # I_conv from each native image, as the paper does
        passthrough=(),
    )
    with args.main_process_first(local=False, desc="output_dir"):
        prepare_output_dir(config)
    return DBSamTrainer(
        model=model,
        args=args,
        train_dataset=train_set.with_transform(transform),
        eval_dataset=eval_set,
        data_collator=collate_batch,
        config=config,
        transform=transform,
    )


def setup_logging() -> None:
    # DDP: the channel attention's depthwise kernels (C, 1, 3, 3) get gradients whose strides differ from the
    # parameter's only on the size-1 dimension, the same memory layout (tests/test_training_run.py checks that
    # no other parameter differs); DDP copies them into its bucket as they are.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        setup_logging()
        trainer = build_trainer(config)
    except (ValueError, FileNotFoundError) as error:  # configuration, model or data problems found in setup
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    resume = config.training.resume_from_checkpoint
    try:
        trainer.train(
            resume_from_checkpoint=str(resolve_checkpoint(resume, config.training.output_dir)) if resume else None
        )
    except NonFiniteError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    trainer.publish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
