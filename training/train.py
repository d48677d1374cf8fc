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
import numpy as np
import torch
import transformers
from arguments import (
    CONFIG_FILE_NAME,
    ConfigError,
    ModelArguments,
    RunConfig,
    latest_checkpoint,
    parse_config,
    resolve_checkpoint,
)
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from modeling_dbsam import DBSamConfig, DBSamModel
from modeling_dbsam.convert import build_sam_processor, pixel_statistics
from modeling_dbsam.data import SamBoxTransform, collate_batch
from modeling_dbsam.data.card import read_preprocessing
from modeling_dbsam.data.splits import carve_validation
from modeling_dbsam.evaluation import (
    aggregate,
    get_protocol,
    index_cases,
    read_finished_cases,
    run_cases,
    summary_metrics,
)
from modeling_dbsam.io import atomic_write
from modeling_dbsam.losses import bce_dice_loss
from modeling_dbsam.modeling_dbsam import reset_to_pytorch_init
from modeling_dbsam.pixels import SamPixels, conv_input_size
from modeling_dbsam.processing import load_processor, set_dataset_preprocessing

logger = logging.getLogger("dbsam.train")
EVAL_RESULTS_FILE = "eval_results.json"
EVALUATIONS_DIR = "evaluations"  # per-case scores and the summary of every evaluation, inside output_dir
NOT_MODEL_INPUTS = ("labels", "original_sizes", "reshaped_input_sizes")
STAGING_DIR = ".saving"  # a checkpoint is written here, then renamed into output_dir when complete


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN or infinite: training stops before the weights are touched."""


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for each tuple of non-negative keys (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of the training set that is a function of ``(seed, epoch)`` alone. Accelerate shards its
    batches across processes and calls ``set_epoch`` before each epoch, which also moves the box jitter to it
    (before the epoch's loader workers copy the transform)."""

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

    def __init__(self, *args, config: RunConfig, transform: SamBoxTransform, **kwargs):
        super().__init__(*args, **kwargs)
        # Not Trainer's processing_class, which it takes for a tokenizer's wrapper (align_special_tokens); saved by _save.
        self.config, self.transform, self.processor = config, transform, transform.processor
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer scales it for accumulation
        self._staging: Path | None = None
        self._seeded = (-1, 0)  # (optimizer step, micro-batches seeded in it)
        self._loss_terms = torch.zeros(4)  # loss, BCE, Dice and micro-batches since the last log

    def _get_train_sampler(self, train_dataset=None):
        return EpochShuffleSampler(len(train_dataset or self.train_dataset), self.args.seed, self.transform)

    def model_inputs(self, batch: dict) -> dict:
        """Every batch entry but targets and sizes goes to the model; uint8 pixels are normalised here, on the device."""
        inputs = {name: value for name, value in batch.items() if name not in NOT_MODEL_INPUTS}
        if inputs["pixel_values"].dtype == torch.uint8:  # as loader workers send them (transform.normalize off)
            pixels = self.transform.pixels
            inputs["pixel_values"] = pixels.normalize(inputs["pixel_values"], batch["reshaped_input_sizes"])
            if "conv_pixel_values" in inputs:
                inputs["conv_pixel_values"] = pixels.normalize_conv(
                    inputs["conv_pixel_values"], batch["original_sizes"]
                )
        return inputs

    def _inner_training_loop(self, *args, **kwargs):
        # auto_find_batch_size reruns the loop from step 0 after an out-of-memory error: so do the seeds and the sums
        self._seeded, self._loss_terms = (-1, 0), torch.zeros(4)
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
        terms = torch.stack([losses.loss, losses.bce, losses.dice, torch.ones_like(losses.loss)]).detach()
        self._loss_terms = self._loss_terms.to(terms.device) + terms  # a NaN or inf loss stays in the sum
        return (losses.loss, outputs) if return_outputs else losses.loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Stop every process, before the optimizer step, when any process has a NaN or inf loss or gradient norm."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        norm = torch.as_tensor(0.0 if self.args.fp16 else grad_norm, dtype=torch.float32, device=self.args.device)
        values = self.accelerator.gather(torch.stack([self._loss_terms[0].to(norm), norm])[None])
        for what, column in (("loss", values[:, 0]), ("gradient norm", values[:, 1])):
            if not (finite := torch.isfinite(column)).all():
                latest = latest_checkpoint(self.args.output_dir)
                kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
                raise NonFiniteError(
                    f"{what} is {column[~finite][0].item()} at step {self.state.global_step + 1} "
                    f"(epoch {int(self.state.epoch)}); training stopped and {kept}. The run is deterministic, so "
                    "resuming with the same settings repeats it: check the data, or train again with other "
                    "settings (a lower learning_rate, fp32)"
                )
        return grad_norm

    def log(self, logs: dict, start_time=None) -> None:
        """Trainer's logs, plus the BCE and Dice terms of the training loss."""
        if "loss" in logs:
            terms = self.accelerator.reduce(self._loss_terms.to(self.args.device), "sum")
            logs["bce"], logs["dice"] = (terms[1:3] / terms[3].clamp(min=1)).tolist()
            self._loss_terms = torch.zeros(4)
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model) -> list[str]:
        """Weight decay on matrices and kernels only: biases and normalisation weights (1-D) are not decayed."""
        return [name for name, parameter in model.named_parameters() if parameter.ndim >= 2]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score the model on the eval split with ``dbsam evaluate``'s case-level DSC/NSD protocol, each process
        predicting a share of the cases (a case's slices are scored as one volume, so a case is never split)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        folder = Path(self.args.output_dir) / EVALUATIONS_DIR / f"step-{self.state.global_step}"
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        case_ids = [case.case_id for case in index_cases(dataset)[0]]
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        share = folder / f"cases-{rank}.jsonl"
        share.unlink(missing_ok=True)  # a rerun of this step after a resume starts afresh
        model = self.accelerator.unwrap_model(self.model_wrapped).eval()  # training_step sets train() again
        others = set(case_ids) - set(case_ids[rank::processes])  # run_cases skips these, as if finished
        precision = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        protocol = get_protocol(self.config.data.eval_protocol)
        batch_size = self.args.per_device_eval_batch_size
        run_cases(model, self.processor, dataset, protocol, share, others, batch_size, precision)
        self.accelerator.wait_for_everyone()
        scored = [case for r in range(processes) for case in read_finished_cases(folder / f"cases-{r}.jsonl").values()]
        summary = aggregate(scored)
        evaluation = {"protocol": protocol.describe(), "metrics": summary_metrics(summary), **summary}
        if self.accelerator.is_main_process:
            atomic_write(folder / "summary.json", lambda path: Path(path).write_text(json.dumps(evaluation, indent=2)))
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in evaluation["metrics"].items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

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
        staging, final = root / STAGING_DIR, root / f"checkpoint-{self.state.global_step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if self.state.best_model_checkpoint == str(staging / final.name):
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(staging / final.name / "trainer_state.json"))
            shutil.rmtree(final, ignore_errors=True)  # an older run's checkpoint of this step
            os.replace(staging / final.name, final)
            staging.rmdir()
            rotate_checkpoints(str(root), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))

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
        """Trainer's card (hyper-parameters), with the training loss and validation scores along the run and the
        per-task scores of the published weights."""
        kwargs.setdefault("tags", ["dbsam", "medical-image-segmentation", "image-segmentation"])
        kwargs.setdefault("dataset", Path(self.config.data.data).name)
        super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return
        lines = ["", "## Training and validation results", "", "| step | epoch | training loss | DSC | NSD |"]
        lines.append("|---:|---:|---:|---:|---:|")
        loss = "-"
        for entry in self.state.log_history:
            loss = f"{entry['loss']:.4f}" if "loss" in entry else loss
            if "eval_dsc" in entry:
                epoch, dsc, nsd = entry["epoch"], entry["eval_dsc"], entry["eval_nsd"]
                lines.append(f"| {entry['step']} | {epoch:.2f} | {loss} | {dsc:.4f} | {nsd:.4f} |")
        if (evaluation := self.published_evaluation()) is not None:
            lines += ["", f"Published weights: step {evaluation['step']}, {evaluation['protocol']['summary']}.", ""]
            lines += ["| task | cases | DSC | NSD |", "|---|---:|---:|---:|"]
            lines += [f"| {t['task']} | {t['cases']} | {t['dsc']:.4f} | {t['nsd']:.4f} |" for t in evaluation["tasks"]]
        card = Path(self.args.output_dir) / "README.md"
        card.write_text(card.read_text(encoding="utf-8") + "\n".join(lines) + "\n", encoding="utf-8")

    def publish(self) -> None:
        """Write the Hub-ready folder: weights, config, processor, training config, evaluation results, model card;
        with push_to_hub, Trainer's push_to_hub saves the weights and the card and uploads the folder, once."""
        results = Path(self.args.output_dir) / EVAL_RESULTS_FILE
        evaluation = self.published_evaluation()
        if self.is_world_process_zero() and evaluation is None:
            results.unlink(missing_ok=True)  # an older run's results would describe other weights
        elif self.is_world_process_zero():
            atomic_write(results, lambda path: Path(path).write_text(json.dumps(evaluation, indent=2)), overwrite=True)
        if self.args.push_to_hub:
            self.push_to_hub()
        else:
            self.save_model()
            self.create_model_card()


def available_metrics(dataset: datasets.Dataset) -> list[str]:
    """The metric names an evaluation of ``dataset`` yields, known before it runs: those of a summary of its tasks."""
    tasks = set(zip(dataset["task"], dataset["dimension"]))
    scores = {"dsc": 0.0, "nsd": 0.0}
    summary = {"tasks": [{"task": task, **scores} for task, _ in tasks], "averages": {d: scores for _, d in tasks}}
    return sorted(summary_metrics(summary))


def build_model(args: ModelArguments) -> DBSamModel:
    """A DB-SAM from a SAM / MedSAM / DB-SAM checkpoint, or from ``model_config`` with PyTorch's initialisation of
    SAM's layers (adapters keep their own). Adapter fields of ``args`` override the configuration; seed first."""
    if args.model_config is None:
        return DBSamModel.from_pretrained(args.model, **args.config_overrides())
    config = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    model = DBSamModel(DBSamConfig.from_dict(config, **args.config_overrides()))
    reset_to_pytorch_init(model, keep=model.adapter_modules())
    return model


def build_processor(args: ModelArguments, config: DBSamConfig, data_dir: str | None = None):
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
    """Whether the conv branch's BatchNorm should be synchronised: by default when several GPU processes
    each see a slice of the batch. PyTorch's SyncBatchNorm runs on accelerators only."""
    if setting and num_processes > 1 and device.type == "cpu":
        raise ValueError("sync_batch_norm: PyTorch's SyncBatchNorm needs GPU processes; set it false on CPU")
    return (num_processes > 1 and device.type != "cpu") if setting is None else setting


def training_and_eval_sets(config: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training split and the split that selects the model (the dataset's own, or one carved from the
    training split by case: ``validation_fraction``), each checked. The test split is left to ``dbsam evaluate``."""
    data, metric = config.data, config.training.metric_for_best_model
    splits = datasets.load_from_disk(data.data)
    train_set = splits[data.train_split]
    if data.validation_fraction > 0:
        train_set, validation = carve_validation(train_set, data.validation_fraction, data.validation_seed)
        splits = {**splits, "validation": validation}
    if len(train_set) == 0:
        raise ConfigError(f"train_split {data.train_split!r} of {data.data} is empty")
    if config.training.eval_strategy == "no":
        return train_set, None
    eval_set = splits[data.eval_split]
    if len(eval_set) == 0:
        raise ConfigError(f"eval_split {data.eval_split!r} of {data.data} is empty")
    if metric is not None and metric.removeprefix("eval_") not in (names := available_metrics(eval_set)):
        raise ConfigError(
            f"metric_for_best_model {metric!r} cannot be computed on eval_split {data.eval_split!r}; it yields "
            f"{', '.join(names)}"
        )
    return train_set, eval_set


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
    transformers.set_seed(args.seed)  # identical random init (adapters, or all from model_config) on every rank
    model = build_model(config.model)
    processor = build_processor(config.model, model.config, config.data.data)  # records the data's intensity rule
    model.freeze_for_training()
    if wants_sync_batch_norm(args.sync_batch_norm, args.world_size, args.device):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the conv branch's BatchNorm layers
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
