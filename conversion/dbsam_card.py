"""Model cards for DB-SAM checkpoints, rendered from the Jinja templates in ``model_cards/``.

``converted.md`` describes a checkpoint fresh from the converter (SAM/MedSAM weights, untrained
adapters); ``trained.md`` a trained one with its training configuration and evaluation results. Both
extend ``base.md``, which holds what every card says (architecture, usage, intended use, limitations,
preprocessing, citation). The YAML metadata is built with ``huggingface_hub.ModelCardData``.

Evaluation results are read from the evaluation's ``results.json``; see :func:`read_results` for the
accepted layout.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_cards"
CONVERSION_FILE = "conversion.json"  # the converter's record of source and parity, kept with the weights
CONVERTED_TEMPLATE = "converted.md"
TRAINED_TEMPLATE = "trained.md"

LIBRARY_NAME = "transformers"
PIPELINE_TAG = "mask-generation"
TAGS = ["dbsam", "sam", "segment-anything", "medical-imaging", "medical-image-segmentation", "image-segmentation"]
DEFAULT_LICENSE = "apache-2.0"
TASK_TYPE = "image-segmentation"
TASK_NAME = "Box-prompted medical image segmentation"
DATASET_TYPE = "medical-image-segmentation"
_DSC_KEYS = ("dsc", "dice")
_NSD_KEYS = ("nsd",)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


@dataclass
class Scores:
    """DSC and NSD as fractions in [0, 1]; ``None`` where the results have none."""

    dsc: float | None = None
    nsd: float | None = None

    @property
    def dsc_percent(self) -> str:
        return percent(self.dsc)

    @property
    def nsd_percent(self) -> str:
        return percent(self.nsd)


@dataclass
class TaskScores(Scores):
    name: str = ""
    modality: str | None = None
    dimension: str | None = None
    cases: int | None = None


@dataclass
class EvaluationResults:
    model: str | None = None
    protocol: dict[str, str] = field(default_factory=dict)
    tasks: list[TaskScores] = field(default_factory=list)
    averages: dict[str, Scores] = field(default_factory=dict)


def _metric(entry: Mapping, names: tuple[str, ...], where: str) -> float | None:
    lowered = {str(key).lower(): value for key, value in entry.items()}
    name = next((name for name in names if name in lowered), None)
    value = lowered.get(name)
    if isinstance(value, Mapping):
        value = value.get("mean")
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {name} must be a number, got {value!r}") from error
    if math.isnan(value):
        return None
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{where}: {name} = {value} is not a fraction in [0, 1] (results hold fractions, not percent)"
        )
    return value


def _text(value) -> str | None:
    return None if value is None else str(value)


def _task_entries(tasks, where: str) -> list[tuple[str, Mapping]]:
    if isinstance(tasks, Mapping):
        return [(str(name), entry) for name, entry in tasks.items()]
    if isinstance(tasks, list):
        entries = []
        for index, entry in enumerate(tasks):
            name = entry.get("task", entry.get("name")) if isinstance(entry, Mapping) else None
            if name is None:
                raise ValueError(f"{where}: tasks[{index}] has no 'task' or 'name'")
            entries.append((str(name), entry))
        return entries
    raise ValueError(f"{where}: 'tasks' must be a mapping of task name to scores or a list of scores")


def read_results(path: str | os.PathLike) -> EvaluationResults:
    """Read evaluation results: ``dbsam evaluate``'s ``results.json`` or training's ``eval_results.json``.

    Layout (only ``tasks`` is required; unknown keys such as ``data`` or ``baselines`` are ignored)::

        {"model": {"name": "...", ...}  (or just a name),
         "protocol": {"name": "paper", "summary": "...", ...}  (or just a name),
         "tasks": [{"task": "CT Liver", "modality": "CT", "dimension": "3D", "dsc": 0.9, "nsd": 0.8,
                    "cases": 3}, ...]
                  (or a mapping from task name to such entries; "name" may stand for "task"),
         "averages": {"3D": {"dsc": ..., "nsd": ...}, "2D": {...}}}

    Metric keys are case-insensitive (``dsc`` or ``dice``; ``nsd``); a metric may be a number or
    ``{"mean": number, ...}``, and may be missing, null or NaN (shown as n/a). Values are fractions in
    [0, 1]; anything else is an error naming the task, because a percentage read as a fraction (or the
    reverse) would publish wrong numbers.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(raw, Mapping) or "tasks" not in raw:
        raise ValueError(f"{path}: expected a JSON object with a 'tasks' entry")
    protocol = raw.get("protocol") or {}
    protocol = {"name": str(protocol)} if not isinstance(protocol, Mapping) else protocol
    tasks = []
    for name, entry in _task_entries(raw["tasks"], str(path)):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path}: task {name!r} must map metric names to values")
        where = f"{path}: task {name!r}"
        cases = entry.get("cases")
        tasks.append(
            TaskScores(
                dsc=_metric(entry, _DSC_KEYS, where),
                nsd=_metric(entry, _NSD_KEYS, where),
                name=name,
                modality=_text(entry.get("modality")),
                dimension=_text(entry.get("dimension")),
                cases=None if cases is None else int(cases),
            )
        )
    averages = {
        str(name): Scores(
            _metric(entry, _DSC_KEYS, f"{path}: average {name!r}"),
            _metric(entry, _NSD_KEYS, f"{path}: average {name!r}"),
        )
        for name, entry in (raw.get("averages") or {}).items()
        if isinstance(entry, Mapping)
    }
    model = raw.get("model")
    return EvaluationResults(
        model=_text(model.get("name") if isinstance(model, Mapping) else model),
        protocol={str(key): str(value) for key, value in protocol.items()},
        tasks=tasks,
        averages=averages,
    )


def eval_results(results: EvaluationResults) -> list[EvalResult]:
    """The Hub's model-index entries: one DSC and one NSD (in percent) per task."""
    protocol = results.protocol.get("name")
    entries = []
    for task in results.tasks:
        for metric_type, metric_name, value in (("dice", "DSC (%)", task.dsc), ("nsd", "NSD (%)", task.nsd)):
            if value is None:
                continue
            entries.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=DATASET_TYPE,
                    dataset_name=task.name,
                    dataset_config=task.dimension,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=round(100 * value, 2),
                    metric_config=protocol,
                )
            )
    return entries


def card_metadata(
    model_name: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    results: EvaluationResults | None = None,
) -> ModelCardData:
    entries = eval_results(results) if results is not None else []
    return ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=datasets or None,
        license=license or DEFAULT_LICENSE,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        eval_results=entries or None,
    )


@dataclass
class ModelFacts:
    """What the card states about a checkpoint, read from its loaded model and processor."""

    hidden_size: int
    depth: int
    heads: int
    global_layers: list[int]
    window_size: int
    image_size: int
    patch_size: int
    mask_size: int
    conv_input_size: int
    channel_attention: str
    conv_branch: str
    fusion: str
    adapter_init: str
    decoder_heads: int
    total_parameters: str
    adapter_parameters: str
    processor_file: str
    image_mean: list[float]
    image_std: list[float]
    modality: str | None
    window: str | None


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count:,}"


def model_facts(model, processor, processor_file: str) -> ModelFacts:
    """Facts for the card from a ``DBSamModel`` and its ``SamProcessor``."""
    from modeling_dbsam.processing import get_intensity_config

    config = model.config
    vision = config.vision_config
    image_processor = processor.image_processor
    intensity = get_intensity_config(processor)
    grid = vision.image_size // vision.patch_size
    adapter_count = sum(model.get_parameter(name).numel() for name in model.adapter_parameter_names())
    return ModelFacts(
        hidden_size=vision.hidden_size,
        depth=vision.num_hidden_layers,
        heads=vision.num_attention_heads,
        global_layers=list(vision.global_attn_indexes),
        window_size=vision.window_size,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        mask_size=4 * grid,
        conv_input_size=config.conv_input_size,
        channel_attention=f"after ViT layers {config.channel_attention_indexes}"
        if config.use_channel_attention
        else "off",
        conv_branch=f"cross-attention after ViT layers {config.stage_end_indexes}"
        if config.use_conv_branch
        else "off",
        fusion="on" if config.use_fusion else "off",
        adapter_init=config.adapter_init,
        decoder_heads=config.mask_decoder_config.num_attention_heads,
        total_parameters=_millions(model.num_parameters()),
        adapter_parameters=_millions(adapter_count),
        processor_file=f"`{processor_file}`",
        image_mean=[round(float(v), 4) for v in image_processor.image_mean],
        image_std=[round(float(v), 4) for v in image_processor.image_std],
        modality=intensity.modality,
        window=None if intensity.window is None else str(intensity.window),
    )


def render_card(template: str, card_data: ModelCardData, **context) -> ModelCard:
    """Fill ``model_cards/<template>``; every placeholder must be given (StrictUndefined)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    text = environment.get_template(template).render(card_data=card_data.to_yaml(), **context)
    return ModelCard(text)


def processor_file(folder: str | os.PathLike) -> str:
    """Name of the processor config in a saved model folder."""
    from modeling_dbsam.processing import processor_config_path

    path = processor_config_path(folder)
    if path is None:
        raise FileNotFoundError(f"{folder}: no processor_config.json or preprocessor_config.json")
    return Path(path).name


def converted_card(
    model_name: str, repo_id: str, facts: ModelFacts, record: dict, license: str | None = None
) -> ModelCard:
    """Card of a checkpoint fresh from the converter, from its ``conversion.json`` record."""
    parity = record["parity"]
    adapters_on = parity.get("adapters_on")
    conversion = {
        "source": record["source"],
        "source_name": record["source_description"],
        "sha256": record.get("source_sha256"),
        "parity": f"mask logits max abs difference {parity['mask_logits']:.2g} against "
        f"{parity['reference']}, computed in float64 (tolerance {parity['tolerance']:g}).",
        "adapters_on": None
        if adapters_on is None
        else f"the identity-initialised adapters move the mask logits by at most "
        f"{adapters_on['mask_logits']:.2g} from the adapters-off outputs.",
    }
    base_model = record.get("base_model")
    return render_card(
        CONVERTED_TEMPLATE,
        card_metadata(model_name, base_model=base_model, license=license),
        model_name=model_name,
        repo_id=repo_id,
        facts=facts,
        conversion=conversion,
        base_model=base_model,
    )


def trained_card(
    model_name: str,
    repo_id: str,
    facts: ModelFacts,
    results: EvaluationResults | None,
    training_config: str | None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
) -> ModelCard:
    """Card of a trained checkpoint with its training configuration and evaluation results."""
    return render_card(
        TRAINED_TEMPLATE,
        card_metadata(model_name, base_model=base_model, datasets=datasets, license=license, results=results),
        model_name=model_name,
        repo_id=repo_id,
        facts=facts,
        results=results,
        training_config=training_config,
        base_model=base_model,
        datasets=datasets,
    )
