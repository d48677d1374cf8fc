"""Train DB-SAM (or the decoder-only MedSAM-style baseline) with the paper's recipe, on transformers' Trainer.

    accelerate launch --config_file training/accelerate/ddp.yaml training/train.py --config training/configs/paper.yaml \\
        --model facebook/sam-vit-base --data /data/medsam-arrow --output_dir outputs/dbsam-vitb
    python training/train.py --config training/configs/quickstart.yaml [--resume_from_checkpoint latest]

Every ``TrainingArguments`` option works. ``DBSamTrainer`` changes only what the project does differently; data
order, box jitter and dropout depend on (seed, epoch, step) alone, so a resumed run ends as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import arguments
import datasets
import numpy as np
import torch
import transformers
from transformers import Trainer

from modeling_dbsam import DBSamConfig, DBSamModel, evaluation
from modeling_dbsam.convert import build_sam_processor, pixel_statistics
from modeling_dbsam.data import SamBoxTransform, collate_batch
from modeling_dbsam.data.card import read_preprocessing
from modeling_dbsam.data.save import load_splits
from modeling_dbsam.data.splits import carve_validation
from modeling_dbsam.io import atomic_write
from modeling_dbsam.losses import bce_dice_loss
from modeling_dbsam.modeling_dbsam import reset_to_pytorch_init
from modeling_dbsam.pixels import SamPixels, conv_input_size
from modeling_dbsam.processing import load_processor, set_dataset_preprocessing

EVAL_RESULTS_FILE = "eval_results.json"
EVALUATIONS_DIR = "evaluations"  # per-case scores and the summary of every evaluation, inside output_dir
NOT_MODEL_INPUTS = ("labels", "original_sizes", "reshaped_input_sizes")


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN or infinite: training stops before the weights are touched."""


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for each tuple of non-negative keys (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation that is a function of ``(seed, epoch)`` alone. Accelerate shards it across processes and calls
    ``set_epoch`` before each epoch, which moves the box jitter too (before loader workers copy the transform)."""

    def __init__(self, size: int, seed: int, transform: SamBoxTransform):
        self.size, self.seed, self.epoch, self.transform = size, seed, 0, transform

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.transform.set_epoch(epoch)

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())

    def __len__(self) -> int:
        return self.size


class DBSamTrainer(Trainer):
    """transformers' Trainer where the project differs from it; everything else is Trainer's own."""

    def __init__(self, *args, config: arguments.RunConfig, transform: SamBoxTransform, **kwargs):
        super().__init__(*args, **kwargs)
        # Not Trainer's processing_class, which it takes for a tokenizer's wrapper (align_special_tokens).
        self.config, self.transform, self.processor = config, transform, transform.processor
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer scales it for accumulation
        self._seeded = (-1, 0)  # (optimizer step, micro-batches seeded in it)
        self._loss_sum = torch.zeros(())  # NaN or inf once any micro-batch's loss was

    def _get_train_sampler(self, train_dataset=None):
        return EpochShuffleSampler(len(train_dataset or self.train_dataset), self.args.seed, self.transform)

    def model_inputs(self, batch: dict) -> dict:
        """The batch without targets and sizes; uint8 pixels (as loader workers send them) normalised on the device."""
        inputs = {name: value for name, value in batch.items() if name not in NOT_MODEL_INPUTS}
        if inputs["pixel_values"].dtype == torch.uint8:
            pixels = self.transform.pixels
            inputs["pixel_values"] = pixels.normalize(inputs["pixel_values"], batch["reshaped_input_sizes"])
            if "conv_pixel_values" in inputs:
                inputs["conv_pixel_values"] = pixels.normalize_conv(
                    inputs["conv_pixel_values"], batch["original_sizes"]
                )
        return inputs

    def _inner_training_loop(self, *args, **kwargs):
        # auto_find_batch_size reruns the loop from step 0 after an out-of-memory error: so do the seeds and the sums
        self._seeded, self._loss_sum = (-1, 0), torch.zeros(())
        return super()._inner_training_loop(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Re-seed dropout and drop path from (seed, step, micro-batch, process): a resumed run draws the same."""
        step, micro = self._seeded if self._seeded[0] == self.state.global_step else (self.state.global_step, 0)
        torch.manual_seed(derive_seed(self.args.seed, step, micro, self.args.process_index))
        self._seeded = (step, micro + 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._loss_sum = self._loss_sum.to(loss.device) + loss.float()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """BCE + Dice on the low-res logits of the single-mask output."""
        outputs = model(**self.model_inputs(inputs), multimask_output=False)
        logits = outputs.pred_masks[:, :, 0]
        loss = bce_dice_loss(logits, inputs["labels"].to(logits.dtype)).loss
        return (loss, outputs) if return_outputs else loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Stop every process, before the optimizer step, when any process has a NaN or inf loss or gradient norm."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        norm = torch.as_tensor(0.0 if self.args.fp16 else grad_norm, dtype=torch.float32, device=self.args.device)
        values = self.accelerator.gather(torch.stack([self._loss_sum.to(norm), norm])[None])
        for what, column in (("loss", values[:, 0]), ("gradient norm", values[:, 1])):
            if not (finite := torch.isfinite(column)).all():
                latest = arguments.latest_checkpoint(self.args.output_dir)
                kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
                raise NonFiniteError(
                    f"{what} is {column[~finite][0].item()} at step {self.state.global_step + 1} "
                    f"(epoch {int(self.state.epoch)}); training stopped and {kept}. The run is deterministic, so "
                    "resuming with the same settings repeats it: check the data, or train again with other "
                    "settings (a lower learning_rate, fp32)"
                )
        return grad_norm

    def get_decay_parameter_names(self, model) -> list[str]:
        """Weight decay on matrices and kernels only: biases and normalisation weights (1-D) are not decayed."""
        return [name for name, parameter in model.named_parameters() if parameter.ndim >= 2]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """``dbsam evaluate``'s case-level DSC/NSD on the eval split, each process scoring a share of whole cases."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        folder = Path(self.args.output_dir) / EVALUATIONS_DIR / f"step-{self.state.global_step}"
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        case_ids = [case.case_id for case in evaluation.index_cases(dataset)[0]]
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        (share := folder / f"cases-{rank}.jsonl").unlink(missing_ok=True)  # a rerun of this step after a resume
        model = self.accelerator.unwrap_model(self.model_wrapped).eval()  # training_step sets train() again
        others = set(case_ids) - set(case_ids[rank::processes])  # run_cases skips these, as if finished
        precision = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        protocol = evaluation.get_protocol(self.config.data.eval_protocol)
        batch_size = self.args.per_device_eval_batch_size
        evaluation.run_cases(model, self.processor, dataset, protocol, share, others, batch_size, precision)
        self.accelerator.wait_for_everyone()
        shares = [evaluation.read_finished_cases(folder / f"cases-{r}.jsonl").values() for r in range(processes)]
        summary = evaluation.aggregate([case for share in shares for case in share])
        result = {"protocol": protocol.describe(), "metrics": evaluation.summary_metrics(summary), **summary}
        if self.accelerator.is_main_process:
            atomic_write(folder / "summary.json", lambda path: Path(path).write_text(json.dumps(result, indent=2)))
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in result["metrics"].items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        self.processor.save_pretrained(output_dir or self.args.output_dir)

    def published_evaluation(self) -> dict | None:
        """The evaluation of the weights that get published (the best checkpoint's or the last step's), if any."""
        best = self.args.load_best_model_at_end and self.state.best_model_checkpoint
        step = int(Path(best).name.split("-")[1]) if best else self.state.global_step
        path = Path(self.args.output_dir) / EVALUATIONS_DIR / f"step-{step}" / "summary.json"
        return {"step": step, **json.loads(path.read_text(encoding="utf-8"))} if path.is_file() else None

    def create_model_card(self, **kwargs) -> None:
        """Trainer's card, with the training loss and validation scores along the run and the published weights'
        per-task scores (Trainer's own results table needs an eval_loss, which this evaluation has not)."""
        kwargs.setdefault("tags", ["dbsam", "medical-image-segmentation", "image-segmentation"])
        kwargs.setdefault("dataset", Path(self.config.data.data).name)
        super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return
        lines = ["", "## Training and validation results", "", "| step | epoch | training loss | DSC | NSD |"]
        lines, loss = [*lines, "|---:|---:|---:|---:|---:|"], "-"
        for entry in self.state.log_history:
            loss = f"{entry['loss']:.4f}" if "loss" in entry else loss
            if "eval_dsc" in entry:
                epoch, dsc, nsd = entry["epoch"], entry["eval_dsc"], entry["eval_nsd"]
                lines.append(f"| {entry['step']} | {epoch:.2f} | {loss} | {dsc:.4f} | {nsd:.4f} |")
        if (published := self.published_evaluation()) is not None:
            lines += ["", f"Published weights: step {published['step']}, {published['protocol']['summary']}.", ""]
            lines += ["| task | cases | DSC | NSD |", "|---|---:|---:|---:|"]
            lines += [f"| {t['task']} | {t['cases']} | {t['dsc']:.4f} | {t['nsd']:.4f} |" for t in published["tasks"]]
        card = Path(self.args.output_dir) / "README.md"
        card.write_text(card.read_text(encoding="utf-8") + "\n".join(lines) + "\n", encoding="utf-8")

    def publish(self) -> None:
        """The Hub-ready folder: weights, config, processor, training config, the published weights' evaluation and
        the card; with push_to_hub, Trainer's push_to_hub saves the weights and the card and uploads it, once."""
        results, published = Path(self.args.output_dir) / EVAL_RESULTS_FILE, self.published_evaluation()
        if self.is_world_process_zero() and published is None:
            results.unlink(missing_ok=True)  # an older run's results would describe other weights
        elif self.is_world_process_zero():
            atomic_write(results, lambda path: Path(path).write_text(json.dumps(published, indent=2)), overwrite=True)
        if self.args.push_to_hub:
            self.push_to_hub()
        else:
            self.save_model()
            self.create_model_card()


def build_model(args: arguments.ModelArguments) -> DBSamModel:
    """A DB-SAM from a SAM / MedSAM / DB-SAM checkpoint, or from ``model_config`` with PyTorch's initialisation of
    SAM's layers (adapters keep their own). Adapter fields of ``args`` override the configuration; seed first."""
    if args.model_config is None:
        return DBSamModel.from_pretrained(args.model, **args.config_overrides())
    config = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    model = DBSamModel(DBSamConfig.from_dict(config, **args.config_overrides()))
    reset_to_pytorch_init(model, keep=model.adapter_modules())
    return model


def build_processor(args: arguments.ModelArguments, config: DBSamConfig, data_dir: str | None = None):
    """The processor named by ``processor``, the checkpoint's own, or SAM's preprocessing sized to ``model_config``,
    with the intensity rule of the training data (``data_dir``'s card), so that inference reproduces it."""
    source = args.processor or args.model
    processor = build_sam_processor(config, *pixel_statistics({})) if source is None else load_processor(source)
    size, expected = processor.image_processor.size["longest_edge"], config.vision_config.image_size
    if size != expected:
        raise ValueError(f"the processor of {source} resizes images to {size} px but the model takes {expected} px")
    if data_dir is not None and (preprocessing := read_preprocessing(data_dir)) is not None:
        set_dataset_preprocessing(processor, preprocessing)
    return processor


def wants_sync_batch_norm(setting: bool | None, num_processes: int, device: torch.device) -> bool:
    """Synchronise the conv branch's BatchNorm when several GPU processes each see a slice of the batch (by
    default); PyTorch's SyncBatchNorm runs on accelerators only."""
    if setting and num_processes > 1 and device.type == "cpu":
        raise ValueError("sync_batch_norm: PyTorch's SyncBatchNorm needs GPU processes; set it false on CPU")
    return (num_processes > 1 and device.type != "cpu") if setting is None else setting


def training_and_eval_sets(config: arguments.RunConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training split and the split that selects the model (the dataset's own, or one carved from the training
    split by case: ``validation_fraction``), checked before a model is loaded; the test split is dbsam evaluate's."""
    data, metric, check = config.data, config.training.metric_for_best_model, arguments.check
    try:
        splits = dict(load_splits(data.data))  # memory-mapped: reads the index, not the images
    except (OSError, ValueError) as error:
        raise arguments.ConfigError(f"data {error}") from None
    where = f"{data.data} (splits: {', '.join(splits)})"
    check(data.train_split in splits, f"train_split {data.train_split!r} not in {where}")
    if data.validation_fraction > 0:
        check("validation" not in splits, f"data {data.data} has its own validation split: set validation_fraction: 0")
        carved = carve_validation(splits[data.train_split], data.validation_fraction, data.validation_seed)
        splits[data.train_split], splits["validation"] = carved
    check(len(splits[data.train_split]) > 0, f"train_split {data.train_split!r} of {data.data} is empty")
    if config.training.eval_strategy == "no":
        return splits[data.train_split], None
    check(
        data.eval_split in splits,
        f"eval_split {data.eval_split!r} not in {where}; set validation_fraction (e.g. 0.1) to carve a validation "
        "split from train_split by case, or eval_strategy: no",
    )
    check(len(eval_set := splits[data.eval_split]) > 0, f"eval_split {data.eval_split!r} of {data.data} is empty")
    names = evaluation.metric_names(eval_set)
    check(
        metric is None or metric.removeprefix("eval_") in names,
        f"metric_for_best_model {metric!r} cannot be computed on eval_split {data.eval_split!r}; it yields "
        + ", ".join(names),
    )
    return splits[data.train_split], eval_set


def prepare_output_dir(config: arguments.RunConfig, processor) -> None:
    """Main process: start over if told to, record the configuration and the processor (every upload of output_dir,
    which Trainer makes from checkpoints, then loads with it)."""
    output_dir = Path(config.training.output_dir)
    if config.training.process_index == 0:
        if config.training.overwrite_output_dir:  # stale checkpoints and scores must never be mistaken for this run's
            for folder in [*output_dir.glob("checkpoint-*"), output_dir / EVALUATIONS_DIR]:
                shutil.rmtree(folder, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / arguments.CONFIG_FILE_NAME, config.save, overwrite=True)
        processor.save_pretrained(output_dir)


def build_trainer(config: arguments.RunConfig) -> DBSamTrainer:
    """Data, model and Trainer of a run; refuses what the data cannot give before a model is loaded."""
    args = config.training
    train_set, eval_set = training_and_eval_sets(config)
    transformers.set_seed(args.seed)  # identical random init (adapters, or all from model_config) on every rank
    model = build_model(config.model)
    processor = build_processor(config.model, model.config, config.data.data)  # records the data's intensity rule
    model.freeze_for_training()
    if wants_sync_batch_norm(args.sync_batch_norm, args.world_size, args.device):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the conv branch's BatchNorm layers
    # Loader workers resize only, to uint8 (a quarter of the bytes), normalised on the device by the processor's table.
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
        prepare_output_dir(config, processor)
    train_set = train_set.with_transform(transform)
    return DBSamTrainer(model, args, collate_batch, train_set, eval_set, config=config, transform=transform)


def setup_logging() -> None:
    # DDP: the channel attention's depthwise kernels (C, 1, 3, 3) get gradients whose strides differ from the
    # parameter's on the size-1 dimension only, the same memory layout (tests/test_training_run.py checks that no
    # other parameter differs); DDP copies them into its bucket as they are.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    try:
        config = arguments.parse_config(argv)
        setup_logging()
        trainer = build_trainer(config)
        resume = config.training.resume_from_checkpoint
        checkpoint = str(arguments.resolve_checkpoint(resume, config.training.output_dir)) if resume else None
    except (ValueError, FileNotFoundError) as error:  # configuration, model or data problems found in setup
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    trainer.publish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
