"""The run's configuration: transformers' ``TrainingArguments`` plus the project's model and data fields, read by
``HfArgumentParser`` from a ``--config`` YAML file and the command line, each problem one ``ConfigError`` line
before any model is loaded."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SchedulerType

CONFIG_FILE_NAME = "training_config.yaml"  # the resolved configuration, saved in output_dir
# Fields a resumed run may change: they do not change what is computed.
RUN_CONTROL_FIELDS = frozenset(
    "resume_from_checkpoint overwrite_output_dir logging_steps logging_first_step report_to disable_tqdm use_cpu "  # noqa: SIM905
    "dataloader_num_workers dataloader_pin_memory save_total_limit save_steps per_device_eval_batch_size run_name "
    "eval_accumulation_steps push_to_hub hub_model_id hub_strategy hub_private_repo hub_token output_dir".split()
)


class ConfigError(ValueError):
    """A configuration problem found before training starts."""


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors (a wrong type, a value not among the choices) raise a ConfigError."""

    def error(self, message: str):
        raise ConfigError(re.sub(r"^argument --(\w+)(/--[\w-]+)?: ", r"\1: ", message))


def option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    """Which model to train. Adapter fields left unset keep the checkpoint's (or DBSamConfig's) value."""

    model: str | None = option(None, "SAM, MedSAM or DB-SAM checkpoint: a folder or a Hub id (facebook/sam-vit-base).")
    model_config: str | None = option(None, "A DBSamConfig/SamConfig JSON file: a randomly initialised model.")
    processor: str | None = option(None, "SamProcessor folder; defaults to --model's, or one fitting --model_config.")
    adapter_variant: Literal["paper", "authors"] | None = option(None, "Adapters as the paper or the authors' code.")
    use_channel_attention: bool | None = option(None, "Channel attention blocks (Eq. 1).")
    use_conv_branch: bool | None = option(None, "Conv branch + bilateral cross-attention.")
    use_fusion: bool | None = option(None, "ViT-Conv fusion (Eq. 2).")
    adapter_dropout: float | None = option(None, "Dropout in the adapters (paper: 0.4).")
    adapter_drop_path_rate: float | None = option(None, "Drop path on adapters (paper: 0.4).")
    adapter_init: Literal["paper", "identity"] | None = option(None, "Adapter initialisation.")
    train_neck: bool | None = option(None, "Train SAM's neck too (the authors do).")

    def config_overrides(self) -> dict[str, Any]:
        """The adapter fields that were set, as DBSamConfig keyword arguments."""
        names = [f.name for f in dataclasses.fields(self)][3:]  # after model, model_config, processor
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class DataArguments:
    """The dataset: a ``DatasetDict`` folder written by ``save_to_disk`` (``modeling_dbsam.data`` schema)."""

    data: str | None = option(None, "Dataset folder written by DatasetDict.save_to_disk.")
    train_split: str = option("train", "Split to train on.")
    eval_split: str = option("validation", "Split that evaluation during training (model selection) reads; not test.")
    validation_fraction: float = option(0.0, "If > 0: carve this fraction of train_split's cases as 'validation'.")
    validation_seed: int = option(0, "Seed of the case-level validation carve.")
    max_box_shift: int = option(20, "Box jitter: each side moves out by randint(0, max_box_shift) px at 256 px.")
    horizontal_flip: float = option(0.0, "Probability of mirroring a training example (the paper uses none).")
    eval_protocol: Literal["paper", "physical"] = option("paper", "Evaluation protocol.")


@dataclass
class DBSamTrainingArguments(TrainingArguments):
    """transformers' ``TrainingArguments`` with the paper's recipe as defaults, and the project's own fields."""

    overwrite_output_dir: bool = option(False, "Start over in a non-empty output_dir (its checkpoints are deleted).")
    resume_from_checkpoint: str | None = option(None, "'latest' (newest complete checkpoint) or a checkpoint folder.")
    num_train_epochs: float = option(12, "Epochs (paper: 12).")
    per_device_train_batch_size: int = option(4, "Images per process per micro-batch.")
    learning_rate: float = option(1e-4, "Peak learning rate (paper: 1e-4).")
    weight_decay: float = option(0.01, "Weight decay, not on biases and norms (paper: 0.01).")
    lr_scheduler_type: SchedulerType | str = option("polynomial", "transformers' scheduler (polynomial: linear to 0).")
    eval_strategy: IntervalStrategy | str = option("epoch", "When to evaluate on eval_split: no, steps, epoch.")
    logging_steps: float = option(10, "Log loss, lr and grad norm every N steps.")
    report_to: None | str | list[str] = option("tensorboard", "A tracker, all or none (a YAML list for several).")
    save_total_limit: int | None = option(3, "Keep the last K checkpoints (and the best).")
    disable_tqdm: bool = option(False, "No progress bars (a bare --disable_tqdm works, as for every switch).")
    remove_unused_columns: bool = option(False, "Must stay false: the box transform reads every column.")
    ddp_find_unused_parameters: bool | None = option(False, "Every trainable part gets a gradient.")
    sync_batch_norm: bool | None = option(None, "SyncBatchNorm in the conv branch; default: on with >1 GPU process.")
    dataloader_pin_memory: bool = option(torch.cuda.is_available(), "Pinned host memory for the batches.")

    def __post_init__(self):
        if self.lr_scheduler_type == "polynomial" and not self.lr_scheduler_kwargs:
            self.lr_scheduler_kwargs = {"lr_end": 0.0, "power": 1.0}
        check(self.save_strategy != "steps" or self.save_steps, "save_steps 0 never saves: use save_strategy epoch")
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, DBSamTrainingArguments)


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    training: DBSamTrainingArguments

    def to_dict(self) -> dict[str, Any]:
        """All fields, flat, JSON types."""
        values = {**dataclasses.asdict(self.model), **dataclasses.asdict(self.data), **self.training.to_dict()}
        return json.loads(json.dumps(values, default=str))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _unknown(names: list[str], known: list[str], where: str) -> ConfigError:
    hints = [
        f"{name!r} (did you mean {close[0]!r}?)"
        if (close := difflib.get_close_matches(name, known, n=1))
        else repr(name)
        for name in names
    ]
    return ConfigError(f"{where}unknown option {'; '.join(hints)}")


def _token(value: Any) -> str:
    """A YAML scalar or mapping as the command line spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def load_yaml_config(path: str | Path, parser: ArgumentParser) -> dict[str, Any]:
    """Read a YAML config of option names and values, each parsed by ``parser`` as on the command line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(values, dict | None):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    values = values or {}
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    if unknown := [key for key in values if key not in actions]:
        raise _unknown(unknown, list(actions), f"{path}: ")
    argv, as_is = [], {}
    for key, value in values.items():
        if value is None or (isinstance(value, list) and actions[key].nargs not in ("+", "*")):
            as_is[key] = value  # null, and several trackers for report_to, have no command-line spelling
        elif isinstance(value, list):
            argv += [f"--{key}", *map(_token, value)]
        else:
            argv.append(f"--{key}={_token(value)}")
    try:
        parsed = vars(parser.parse_args(argv))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return {**{key: parsed[key] for key in values}, **as_is}


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse ``--config`` YAML and command-line overrides into a validated RunConfig."""
    parser = ArgumentParser(
        ARGUMENT_CLASSES, description="Train DB-SAM (or the decoder-only baseline).", allow_abbrev=False
    )
    parser.add_argument("--config", help="YAML file of options; command-line options override it.")
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**load_yaml_config(known.config, parser))
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        options = [item.lstrip("-").split("=")[0] for item in remaining if item.startswith("--")] or remaining
        raise _unknown(options, [a.dest for a in parser._actions], "command line: ")
    check_engines(namespace)
    values = vars(namespace)
    try:
        config = RunConfig(
            *(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}) for cls in ARGUMENT_CLASSES)
        )
    except (ValueError, ImportError) as error:  # TrainingArguments' own checks
        raise ConfigError(str(error).strip().splitlines()[0]) from None
    validate(config)
    return config


def check_engines(options) -> None:
    """Distributed engines that cannot work here, before TrainingArguments sets them up."""
    deepspeed = options.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if deepspeed:
        check(importlib.util.find_spec("deepspeed") is not None, "DeepSpeed was requested but is not installed")
        check(torch.cuda.is_available(), "DeepSpeed was requested but needs CUDA GPUs, and none is visible")
    if options.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        check(not deepspeed, "choose one of FSDP and DeepSpeed")
        check(torch.cuda.is_available(), "FSDP was requested but needs CUDA GPUs: on CPU, Accelerate runs DDP only")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: RunConfig) -> None:
    """Every check that needs no model and no data loading, so mistakes surface in a second."""
    model, data, train = config.model, config.data, config.training
    check((model.model is None) != (model.model_config is None), "give exactly one of model and model_config")
    if model.model_config is not None:
        check(Path(model.model_config).is_file(), f"model_config {model.model_config}: no such file")
    if model.processor is not None:
        check(Path(model.processor).is_dir(), f"processor {model.processor}: no such folder")
    for name in ("adapter_dropout", "adapter_drop_path_rate"):
        value = getattr(model, name)
        check(value is None or 0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")

    check(data.data is not None, "data is required: a DatasetDict folder written by save_to_disk")
    fraction, evaluates = data.validation_fraction, train.eval_strategy != IntervalStrategy.NO
    check(0.0 <= fraction < 1.0, f"validation_fraction must be in [0, 1), got {fraction}")
    check(
        fraction == 0 or data.eval_split == "validation",
        f"validation_fraction carves the split named 'validation'; set eval_split: validation, not {data.eval_split!r}",
    )
    check(
        not evaluates or data.eval_split != "test",
        "eval_split 'test': evaluation during training selects the model, so it must not read the test split; "
        "evaluate on a validation split (the dataset's, or validation_fraction: 0.1 to carve one from "
        "train_split by case) and score the test split once with `dbsam evaluate` after training",
    )
    check(data.max_box_shift >= 0, f"max_box_shift must be >= 0, got {data.max_box_shift}")
    check(0.0 <= data.horizontal_flip <= 1.0, f"horizontal_flip must be in [0, 1], got {data.horizontal_flip}")

    check(not train.fp16 or torch.cuda.is_available(), "fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32")
    check(train.learning_rate > 0, f"learning_rate must be > 0, got {train.learning_rate}")
    trackers = sorted(INTEGRATION_TO_CALLBACK)
    for name in set(train.report_to) - {"none", "all"}:
        check(name in trackers, f"report_to {name!r} is not a tracker: use {', '.join(trackers)}, all or none")
        check(name in get_available_reporting_integrations(), f"report_to {name!r}: its package is not installed")
    check(not train.dataloader_persistent_workers, "dataloader_persistent_workers would freeze the box jitter")
    check(
        evaluates or train.metric_for_best_model is None,
        "metric_for_best_model needs evaluation: set eval_strategy steps or epoch",
    )
    check(
        not (train.overwrite_output_dir and train.resume_from_checkpoint),
        "overwrite_output_dir and resume_from_checkpoint contradict each other: choose one",
    )
    validate_output_dir(config)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: a ``checkpoint-<step>`` folder whose ``trainer_state.json``, which Trainer
    writes after the weights, optimizer, scheduler and RNG states, reads whole (a killed save leaves none, or half)."""
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    folders = {
        int(p.name[len(prefix) :]): p for p in Path(output_dir).glob(f"{prefix}*") if p.name[len(prefix) :].isdigit()
    }
    return next((folders[step] for step in sorted(folders, reverse=True) if is_complete(folders[step])), None)


def is_complete(checkpoint: Path) -> bool:
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | Path) -> Path:
    """``latest`` (the newest complete checkpoint in ``output_dir``) or an explicit checkpoint folder."""
    folder = latest_checkpoint(output_dir) if resume_from_checkpoint == "latest" else Path(resume_from_checkpoint)
    check(folder is not None, f"resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
    check(is_complete(folder), f"{folder}: not a training checkpoint (no complete trainer_state.json)")
    return folder


def validate_output_dir(config: RunConfig) -> None:
    """Refuse a non-empty output_dir unless this run resumes it with the same configuration, or may overwrite it;
    refuse a checkpoint of a run with another configuration."""
    train = config.training
    output_dir, resume = Path(train.output_dir), train.resume_from_checkpoint
    check(not output_dir.exists() or output_dir.is_dir(), f"output_dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not train.overwrite_output_dir and resume is None:
        what = "a training run" if (output_dir / CONFIG_FILE_NAME).is_file() else "files"
        raise ConfigError(
            f"output_dir {output_dir} already holds {what}: pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to start over, or choose another output_dir"
        )
    if resume is None:
        return
    checkpoint = resolve_checkpoint(resume, output_dir)
    saved_path = checkpoint.parent / CONFIG_FILE_NAME
    check(saved_path.is_file(), f"{checkpoint.parent} holds no {CONFIG_FILE_NAME}: it is not a run to resume")
    saved, current = yaml.safe_load(saved_path.read_text(encoding="utf-8")), config.to_dict()
    changed = [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in current.items()
        if k not in RUN_CONTROL_FIELDS and saved.get(k) != v
    ]
    check(
        not changed,
        f"{checkpoint} belongs to a run with a different configuration ({'; '.join(changed)}); resuming needs the "
        "same settings, or use --overwrite_output_dir / another output_dir",
    )
