"""The training run's configuration: typed dataclasses filled from a YAML file and the command line.

Every field is a command-line option of the same name (``--learning_rate 3e-4``), named as in
transformers' ``TrainingArguments`` where one exists; a ``--config`` YAML file sets defaults that
the command line overrides. Everything is checked before any work starts, and every problem is a
``ConfigError`` naming the field or file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from checkpointing import resolve_checkpoint
from periodic_eval import SUMMARY_METRICS, is_metric_name
from transformers import HfArgumentParser

CONFIG_FILE_NAME = "training_config.yaml"  # the resolved configuration, saved in output_dir
CHECKPOINTS_DIR = "checkpoints"  # inside output_dir
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "none")


class ConfigError(ValueError):
    """A configuration problem found before training starts."""


@dataclass
class ModelArguments:
    """Which model to train. Adapter fields left unset keep the checkpoint's (or DBSamConfig's) value."""

    _argument_group_name = "model"

    model: str | None = field(
        default=None,
        metadata={"help": "SAM, MedSAM or DB-SAM checkpoint: a local folder or a Hub id (facebook/sam-vit-base)."},
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "A DBSamConfig/SamConfig JSON file: build a randomly initialised model from it instead."},
    )
    processor: str | None = field(
        default=None,
        metadata={"help": "Folder of the SamProcessor to use; defaults to --model's, or one matching --model_config."},
    )
    adapter_variant: Literal["paper", "authors"] | None = field(
        default=None,
        metadata={"help": "Adapter blocks as the paper's text describes them or as the authors' release."},
    )
    use_channel_attention: bool | None = field(default=None, metadata={"help": "Channel attention blocks (Eq. 1)."})
    use_conv_branch: bool | None = field(default=None, metadata={"help": "Conv branch + bilateral cross-attention."})
    use_fusion: bool | None = field(default=None, metadata={"help": "ViT-Conv fusion (Eq. 2)."})
    adapter_dropout: float | None = field(default=None, metadata={"help": "Dropout in the adapters (paper: 0.4)."})
    adapter_drop_path_rate: float | None = field(default=None, metadata={"help": "Drop path on adapters (0.4)."})
    adapter_init: Literal["paper", "identity"] | None = field(default=None, metadata={"help": "Adapter init."})
    train_neck: bool | None = field(default=None, metadata={"help": "Train SAM's neck too (the authors do)."})

    def config_overrides(self) -> dict[str, Any]:
        """The adapter fields that were set, as DBSamConfig keyword arguments."""
        names = ("adapter_variant", "use_channel_attention", "use_conv_branch", "use_fusion", "adapter_dropout")
        names += ("adapter_drop_path_rate", "adapter_init", "train_neck")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class DataArguments:
    """The dataset: a ``DatasetDict`` folder written by ``save_to_disk`` (``modeling_dbsam.data`` schema)."""

    _argument_group_name = "data"

    data: str | None = field(default=None, metadata={"help": "Dataset folder written by DatasetDict.save_to_disk."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(
        default="validation",
        metadata={"help": "Split that evaluation during training (model selection) reads; never the test split."},
    )
    validation_fraction: float = field(
        default=0.0,
        metadata={
            "help": "If > 0: carve this fraction of train_split's cases (by case, seeded) as the 'validation' "
            "eval split, and train on the rest."
        },
    )
    validation_seed: int = field(default=0, metadata={"help": "Seed of the case-level validation carve."})
    max_box_shift: int = field(
        default=20, metadata={"help": "Box jitter: each side moves out by randint(0, max_box_shift) px at 256 px."}
    )
    horizontal_flip: float = field(
        default=0.0,
        metadata={"help": "Probability of mirroring a training example left-right (the paper uses no augmentation)."},
    )


@dataclass
class TrainingArguments:
    """How to train; names follow transformers' ``TrainingArguments``."""

    _argument_group_name = "training"

    output_dir: str | None = field(default=None, metadata={"help": "Where the trained model and checkpoints go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in a non-empty output_dir (its checkpoints are deleted)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (newest checkpoint in output_dir) or a checkpoint folder."}
    )
    seed: int = field(default=42, metadata={"help": "Seeds data order, box jitter, dropout and adapter init."})
    num_train_epochs: int = field(default=12, metadata={"help": "Epochs (paper: 12)."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0: total optimizer steps, overriding epochs."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Images per process per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Images per encoder batch in evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (paper: 1e-4)."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (the authors' config: 0.01; the paper states none)."}
    )
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps (overrides warmup_ratio if > 0)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of all steps."})
    lr_end: float = field(default=0.0, metadata={"help": "Learning rate at the end of the polynomial decay."})
    lr_power: float = field(default=1.0, metadata={"help": "Power of the polynomial decay."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision (with loss scaling)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing: less memory."})
    use_cpu: bool = field(
        default=False, metadata={"help": "Train on CPU even where a GPU exists; with torchrun: one CPU process each."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per process."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, lr, grad norm, throughput every N steps."})
    logging_dir: str | None = field(default=None, metadata={"help": "Tracker folder; defaults to output_dir/runs."})
    report_to: str = field(default="tensorboard", metadata={"help": f"Tracker: one of {', '.join(TRACKERS)}."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps (and at every epoch end)."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep the last K checkpoints (and the best)."})
    eval_strategy: Literal["no", "steps", "epoch"] = field(default="epoch", metadata={"help": "When to evaluate."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (eval_strategy=steps)."})
    eval_protocol: Literal["paper", "physical"] = field(default="paper", metadata={"help": "Evaluation protocol."})
    metric_for_best_model: str | None = field(
        default=None,
        metadata={"help": "Evaluation metric that picks the best checkpoint: dsc, nsd, nsd_3d_2d_mean, dsc/<task>..."},
    )
    greater_is_better: bool = field(
        default=True, metadata={"help": "Whether a larger metric_for_best_model is better (DSC and NSD: yes)."}
    )
    load_best_model_at_end: bool = field(default=False, metadata={"help": "Save the best checkpoint's model."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    sync_batch_norm: bool | None = field(
        default=None,
        metadata={
            "help": "SyncBatchNorm in the conv branch (the authors' choice) so BatchNorm sees the global batch; "
            "default: on with more than one GPU process."
        },
    )

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / CHECKPOINTS_DIR


# Fields that may change when a run is resumed: they do not change what is computed.
RUN_CONTROL_FIELDS = frozenset(
    {
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "logging_steps",
        "logging_dir",
        "report_to",
        "disable_tqdm",
        "dataloader_num_workers",
        "save_total_limit",
        "per_device_eval_batch_size",
    }
)

ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    training: TrainingArguments

    def to_dict(self) -> dict[str, Any]:
        """All fields, flat, as they appear in the YAML file."""
        return {**dataclasses.asdict(self.model), **dataclasses.asdict(self.data), **dataclasses.asdict(self.training)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _field_types() -> dict[str, Any]:
    return {name: hint for cls in ARGUMENT_CLASSES for name, hint in typing.get_type_hints(cls).items()}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type, or a ConfigError naming the field, the value and the expected type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is Literal:
        if value in args:
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{name} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config: a mapping of known field names to values of the right type."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    hints = _field_types()
    unknown = [key for key in values if key not in hints]
    if unknown:
        hints_text = "; ".join(
            f"{key!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(key, hints, n=1))
            else repr(key)
            for key in unknown
        )
        raise ConfigError(f"{path}: unknown option {hints_text}")
    try:
        return {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(ARGUMENT_CLASSES, description="Train DB-SAM (or the decoder-only baseline).")
    parser.add_argument("--config", help="YAML file of options; command-line options override it.")
    return parser


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse ``--config`` YAML and command-line overrides into a validated RunConfig."""
    parser = build_parser()
    config_path = argparse.ArgumentParser(add_help=False)
    config_path.add_argument("--config")
    known, _ = config_path.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**load_yaml_config(known.config))
    try:
        *arguments, _ = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # HfArgumentParser: options no dataclass knows
        raise ConfigError(str(error)) from None
    config = RunConfig(*arguments)
    validate(config)
    return config


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _dataset_splits(path: Path) -> list[str]:
    """Split names of a ``DatasetDict.save_to_disk`` folder, read from its index without loading data."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        hint = " (a single Dataset, not a DatasetDict)" if (path / "dataset_info.json").is_file() else ""
        raise ConfigError(f"data {path}: not a DatasetDict folder written by save_to_disk{hint}: no dataset_dict.json")
    return list(json.loads(index.read_text(encoding="utf-8"))["splits"])


def validate(config: RunConfig) -> None:
    """Every check that needs no model and no data loading, so mistakes surface in a second."""
    model, data, train = config.model, config.data, config.training
    _check((model.model is None) != (model.model_config is None), "give exactly one of model and model_config")
    if model.model_config is not None:
        _check(Path(model.model_config).is_file(), f"model_config {model.model_config}: no such file")
    if model.processor is not None:
        _check(Path(model.processor).is_dir(), f"processor {model.processor}: no such folder")
    for name in ("adapter_dropout", "adapter_drop_path_rate"):
        value = getattr(model, name)
        _check(value is None or 0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")

    _check(data.data is not None, "data is required: a DatasetDict folder written by save_to_disk")
    data_path = Path(data.data)
    _check(data_path.is_dir(), f"data {data_path}: no such folder")
    splits = _dataset_splits(data_path)
    _check(data.train_split in splits, f"train_split {data.train_split!r} not in {data_path} (splits: {splits})")
    _check(
        0.0 <= data.validation_fraction < 1.0, f"validation_fraction must be in [0, 1), got {data.validation_fraction}"
    )
    if data.validation_fraction > 0:
        _check(
            data.eval_split == "validation",
            f"validation_fraction carves the split named 'validation'; set eval_split: validation, not {data.eval_split!r}",
        )
        _check(
            "validation" not in splits,
            f"data {data_path} has its own validation split: set validation_fraction: 0 to evaluate on it",
        )
    if train.eval_strategy != "no":
        _check(
            data.eval_split != "test",
            "eval_split 'test': evaluation during training selects the model, so it must not read the test split; "
            "evaluate on a validation split (the dataset's, or validation_fraction: 0.1 to carve one from "
            "train_split by case) and score the test split once with `dbsam evaluate` after training",
        )
        _check(
            data.eval_split in splits or data.validation_fraction > 0,
            f"eval_split {data.eval_split!r} not in {data_path} (splits: {splits}); set validation_fraction "
            "(e.g. 0.1) to carve a validation split from train_split by case, or eval_strategy: no",
        )
    _check(data.max_box_shift >= 0, f"max_box_shift must be >= 0, got {data.max_box_shift}")
    _check(0.0 <= data.horizontal_flip <= 1.0, f"horizontal_flip must be in [0, 1], got {data.horizontal_flip}")

    _check(train.output_dir is not None, "output_dir is required")
    _check(train.max_steps > 0 or train.num_train_epochs > 0, "set num_train_epochs > 0 or max_steps > 0")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _check(getattr(train, name) >= 1, f"{name} must be >= 1, got {getattr(train, name)}")
    _check(train.logging_steps >= 1, f"logging_steps must be >= 1, got {train.logging_steps}")
    _check(train.learning_rate > 0, f"learning_rate must be > 0, got {train.learning_rate}")
    _check(0 <= train.lr_end < train.learning_rate, f"lr_end must be in [0, learning_rate), got {train.lr_end}")
    _check(train.lr_power > 0, f"lr_power must be > 0, got {train.lr_power}")
    _check(train.weight_decay >= 0, f"weight_decay must be >= 0, got {train.weight_decay}")
    _check(train.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {train.max_grad_norm}")
    _check(train.warmup_steps >= 0, f"warmup_steps must be >= 0, got {train.warmup_steps}")
    _check(0 <= train.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {train.warmup_ratio}")
    _check(not (train.bf16 and train.fp16), "choose one of bf16 and fp16")
    _check(train.dataloader_num_workers >= 0, "dataloader_num_workers must be >= 0")
    _check(train.save_steps >= 0, f"save_steps must be >= 0 (0: only at epoch ends), got {train.save_steps}")
    _check(
        train.save_total_limit is None or train.save_total_limit >= 1,
        f"save_total_limit must be >= 1 or null, got {train.save_total_limit}",
    )
    _check(train.report_to in TRACKERS, f"report_to must be one of {', '.join(TRACKERS)}, got {train.report_to!r}")
    if train.eval_strategy == "steps":
        _check(train.eval_steps is not None and train.eval_steps >= 1, "eval_strategy steps needs eval_steps >= 1")
    if train.metric_for_best_model is not None:
        _check(train.eval_strategy != "no", "metric_for_best_model needs evaluation: set eval_strategy steps or epoch")
        _check(
            is_metric_name(train.metric_for_best_model),
            f"metric_for_best_model {train.metric_for_best_model!r} is not an evaluation metric: use one of "
            f"{', '.join(SUMMARY_METRICS)} or dsc/<task>, nsd/<task>",
        )
    if train.load_best_model_at_end:
        _check(train.metric_for_best_model is not None, "load_best_model_at_end needs metric_for_best_model")
    _check(
        not (train.overwrite_output_dir and train.resume_from_checkpoint),
        "overwrite_output_dir and resume_from_checkpoint contradict each other: choose one",
    )
    validate_output_dir(config)


def validate_output_dir(config: RunConfig) -> None:
    """Refuse a non-empty output_dir unless this run resumes it with the same configuration, or may overwrite it;
    check that the checkpoint to resume from exists."""
    train = config.training
    output_dir = Path(train.output_dir)
    resume = train.resume_from_checkpoint
    _check(not output_dir.exists() or output_dir.is_dir(), f"output_dir {output_dir}: exists and is not a folder")
    holds_files = output_dir.is_dir() and any(output_dir.iterdir())
    saved_path = output_dir / CONFIG_FILE_NAME
    if holds_files and not train.overwrite_output_dir:
        if resume is None:
            what = "a training run" if saved_path.is_file() else "files"
            raise ConfigError(
                f"output_dir {output_dir} already holds {what}: pass --resume_from_checkpoint latest to continue it, "
                "--overwrite_output_dir to start over, or choose another output_dir"
            )
        _check(saved_path.is_file(), f"output_dir {output_dir} holds no {CONFIG_FILE_NAME}: it is not a run to resume")
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
        current = config.to_dict()
        changed = [
            f"{key}: {saved.get(key)!r} -> {current[key]!r}"
            for key in current
            if key not in RUN_CONTROL_FIELDS and saved.get(key) != current[key]
        ]
        _check(
            not changed,
            f"output_dir {output_dir} holds a run with a different configuration ({'; '.join(changed)}); resuming "
            "needs the same settings, or use --overwrite_output_dir / another output_dir",
        )
    if resume is not None:
        try:
            resolve_checkpoint(resume, train.checkpoints_dir)
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
