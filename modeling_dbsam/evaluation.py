"""Evaluate a box-prompted model on a dataset split and report the paper's tables (DSC and NSD per task).

Scoring (paper section 3.1; the authors' evaluation code):
- An object is a ``(case_id, label)`` of one task. A 3D object is scored as one volume: its
  per-slice masks stacked in ``slice_index`` order; slices inside its range that have no example
  (no foreground on import) are empty in both prediction and ground truth. A 2D object is one
  example scored on its image.
- A case's score in a task is the mean over its objects of that task; a task's score is the mean
  over its cases; the 3D and 2D averages are unweighted means over tasks.

Two protocols fix everything that changes the numbers (:class:`Protocol`): ``paper`` reproduces
the authors' code (256x256 grid, unit spacing, tolerance 1, box +9 px per side at 256 px);
``physical`` scores at each image's own resolution with its real spacing, tolerance in mm.

The loop runs the shared predictor (:func:`modeling_dbsam.predictor.predict_boxes`: one encoder
pass per slice for all its boxes), appends each finished case to ``cases.jsonl`` so that a rerun
skips it, and finally writes ``results.json``, ``results.csv``, ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from modeling_dbsam.boxes import box_prompt
from modeling_dbsam.io import atomic_write
from modeling_dbsam.metrics import dice_score, normalized_surface_dice
from modeling_dbsam.predictor import predict_boxes

RESULTS_FORMAT = "dbsam-evaluation/1"
RUN_FILE, CASES_FILE = "run.json", "cases.jsonl"
REPORT_FILES = ("results.json", "results.csv", "results.md", "results.png")
METADATA_COLUMNS = ("case_id", "slice_index", "label", "task", "modality", "dimension", "spacing")


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """Everything about scoring that changes the numbers, recorded in every report."""

    name: str
    resolution: int | None  # images and masks resized to this square grid; None: each image's own size
    physical_spacing: bool  # True: the example's spacing in mm, (z, y, x); False: unit spacing
    tolerance: float  # NSD tolerance, in mm (physical spacing) or pixels (unit spacing)
    box_shift: int = 9  # every box side moved outward by this many pixels ...
    box_resolution: int = 256  # ... of an image this size (scaled to the image's own size)

    @property
    def tolerance_unit(self) -> str:
        return "mm" if self.physical_spacing else "px"

    def describe(self) -> dict:
        grid = f"{self.resolution}x{self.resolution} grid" if self.resolution else "each image's own resolution"
        spacing = "real spacing in mm, (z, y, x) / (y, x)" if self.physical_spacing else "unit spacing"
        scaled = "" if self.resolution == self.box_resolution else ", scaled to each image's size"
        return {
            "name": self.name,
            "grid": grid,
            "spacing": spacing,
            "tolerance": self.tolerance,
            "tolerance_unit": self.tolerance_unit,
            "box_rule": f"tight box of the ground truth + {self.box_shift} px per side at {self.box_resolution} px{scaled}",
            "summary": f"{self.name}: {grid}, {spacing}, NSD tolerance {self.tolerance:g} {self.tolerance_unit}",
        }


PAPER = Protocol(name="paper", resolution=256, physical_spacing=False, tolerance=1.0)


def get_protocol(name: str, tolerance: float | None = None) -> Protocol:
    """``paper`` (fixed) or ``physical`` with ``tolerance`` mm (default 1 mm, the paper's stated value)."""
    if name == "paper":
        if tolerance is not None and tolerance != PAPER.tolerance:
            raise ValueError("the paper protocol fixes the tolerance at 1 px; use --protocol physical for another one")
        return PAPER
    if name == "physical":
        tolerance = 1.0 if tolerance is None else float(tolerance)
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number of mm >= 0, got {tolerance}")
        return Protocol(name="physical", resolution=None, physical_spacing=True, tolerance=tolerance)
    raise ValueError(f"unknown protocol {name!r}: choose 'paper' or 'physical'")


# ---------------------------------------------------------------------------------------------
# Scoring one case
# ---------------------------------------------------------------------------------------------


@dataclass
class ObjectScore:
    task: str
    modality: str
    dimension: str
    label: int
    slices: int
    dsc: float
    nsd: float
    units: str  # "mm" or "px": what the tolerance was measured in


@dataclass
class CaseResult:
    case_id: str
    objects: list[ObjectScore]
    slices_per_task: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, record: dict) -> CaseResult:
        return cls(record["case_id"], [ObjectScore(**o) for o in record["objects"]], record["slices_per_task"])


@dataclass
class _Example:
    """One object on one slice, ready to score: masks already on the protocol's grid."""

    task: str
    modality: str
    dimension: str
    label: int
    slice_index: int
    spacing: tuple[float, float, float] | None
    gt: np.ndarray
    pred: np.ndarray


def _example(meta: dict, row: int, gt: np.ndarray, pred: np.ndarray) -> _Example:
    """The example of dataset row ``row`` (columns in ``meta``) with its grid masks."""
    spacing = meta["spacing"][row]
    return _Example(
        task=meta["task"][row],
        modality=meta["modality"][row],
        dimension=meta["dimension"][row],
        label=int(meta["label"][row]),
        slice_index=int(meta["slice_index"][row]),
        spacing=None if spacing is None else tuple(float(s) for s in spacing),
        gt=gt,
        pred=pred,
    )


def _object_spacing(examples: list[_Example], protocol: Protocol, ndim: int, case_id: str) -> tuple:
    """Spacing in array axis order and its unit; pixels when the data has none."""
    if not protocol.physical_spacing:
        return (1.0,) * ndim, "px"
    spacings = {ex.spacing for ex in examples}
    if len(spacings) > 1:
        raise ValueError(
            f"case {case_id!r}, label {examples[0].label}: slices disagree on spacing: {sorted(map(str, spacings))}"
        )
    spacing = spacings.pop()
    if spacing is None:
        return (1.0,) * ndim, "px"
    return tuple(spacing[-ndim:]), "mm"


def _score_object(examples: list[_Example], protocol: Protocol, case_id: str) -> ObjectScore:
    first = examples[0]
    if first.dimension == "3D":
        start = min(ex.slice_index for ex in examples)
        depth = max(ex.slice_index for ex in examples) - start + 1
        gt = np.zeros((depth, *first.gt.shape), dtype=bool)
        pred = np.zeros_like(gt)
        for ex in examples:
            gt[ex.slice_index - start], pred[ex.slice_index - start] = ex.gt, ex.pred
    else:
        gt, pred = first.gt, first.pred
    spacing, units = _object_spacing(examples, protocol, gt.ndim, case_id)
    return ObjectScore(
        task=first.task,
        modality=first.modality,
        dimension=first.dimension,
        label=first.label,
        slices=len(examples),
        dsc=dice_score(pred, gt),
        nsd=normalized_surface_dice(pred, gt, spacing, protocol.tolerance),
        units=units,
    )


def score_case(case_id: str, examples: list[_Example], protocol: Protocol) -> CaseResult:
    """3D objects (same task and label) are stacked into volumes; each 2D example is its own object."""
    objects: dict[tuple, list[_Example]] = defaultdict(list)
    slices: dict[str, set[int]] = defaultdict(set)
    for position, ex in enumerate(examples):
        key = ("3D", ex.task, ex.label) if ex.dimension == "3D" else ("2D", position)
        if any(other.slice_index == ex.slice_index for other in objects[key]):
            raise ValueError(
                f"case {case_id!r}: label {ex.label} of {ex.task!r} appears twice on slice {ex.slice_index}"
            )
        objects[key].append(ex)
        slices[ex.task].add(ex.slice_index)
    scores = [
        _score_object(sorted(group, key=lambda e: e.slice_index), protocol, case_id) for group in objects.values()
    ]
    return CaseResult(case_id, scores, {task: len(s) for task, s in slices.items()})


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def aggregate(cases: Sequence[CaseResult]) -> dict:
    """Per task: mean over cases of the case's mean over objects; then unweighted means over 3D and 2D tasks."""
    per_task: dict[str, dict] = {}
    for case in cases:
        by_task: dict[str, list[ObjectScore]] = defaultdict(list)
        for obj in case.objects:
            by_task[obj.task].append(obj)
        for task, objects in by_task.items():
            entry = per_task.setdefault(
                task,
                {
                    "task": task,
                    "modality": objects[0].modality,
                    "dimension": objects[0].dimension,
                    "case_dsc": [],
                    "case_nsd": [],
                    "slices": 0,
                    "objects": 0,
                    "units": set(),
                },
            )
            if entry["dimension"] != objects[0].dimension or entry["modality"] != objects[0].modality:
                raise ValueError(f"task {task!r} mixes modalities or dimensions across cases")
            entry["case_dsc"].append(float(np.mean([o.dsc for o in objects])))
            entry["case_nsd"].append(float(np.mean([o.nsd for o in objects])))
            entry["slices"] += case.slices_per_task.get(task, 0)
            entry["objects"] += len(objects)
            entry["units"].update(o.units for o in objects)
    tasks = []
    for entry in sorted(per_task.values(), key=lambda e: (e["dimension"] != "3D", e["modality"], e["task"])):
        tasks.append(
            {
                "task": entry["task"],
                "modality": entry["modality"],
                "dimension": entry["dimension"],
                "cases": len(entry["case_dsc"]),
                "slices": entry["slices"],
                "objects": entry["objects"],
                "dsc": float(np.mean(entry["case_dsc"])),
                "nsd": float(np.mean(entry["case_nsd"])),
                "units": "mm" if entry["units"] == {"mm"} else "px" if entry["units"] == {"px"} else "mixed",
            }
        )
    averages = {}
    for dimension in ("3D", "2D"):
        group = [t for t in tasks if t["dimension"] == dimension]
        if group:
            averages[dimension] = {
                "tasks": len(group),
                "cases": sum(t["cases"] for t in group),
                "slices": sum(t["slices"] for t in group),
                "dsc": float(np.mean([t["dsc"] for t in group])),
                "nsd": float(np.mean([t["nsd"] for t in group])),
            }
    return {"tasks": tasks, "averages": averages}


def summary_metrics(summary: dict) -> dict[str, float]:
    """An :func:`aggregate` summary as flat metrics, as training logs them: ``dsc`` / ``nsd`` (unweighted mean over
    tasks), ``*_3d`` / ``*_2d`` (the paper's averages), ``*_3d_2d_mean`` (the mean of those two averages where both
    exist), ``dsc/<task>`` and ``nsd/<task>``."""
    metrics: dict[str, float] = {}
    for name in ("dsc", "nsd"):
        averages = {dimension.lower(): average[name] for dimension, average in summary["averages"].items()}
        metrics[name] = sum(task[name] for task in summary["tasks"]) / len(summary["tasks"])
        metrics.update({f"{name}_{dimension}": value for dimension, value in averages.items()})
        metrics[f"{name}_3d_2d_mean"] = sum(averages.values()) / len(averages)
        metrics.update({f"{name}/{task['task']}": task[name] for task in summary["tasks"]})
    return metrics


def metric_names(dataset) -> list[str]:
    """The :func:`summary_metrics` names an evaluation of ``dataset`` yields, known before it runs."""
    tasks, scores = set(zip(dataset["task"], dataset["dimension"])), {"dsc": 0.0, "nsd": 0.0}
    summary = {"tasks": [{"task": task, **scores} for task, _ in tasks], "averages": {d: scores for _, d in tasks}}
    return sorted(summary_metrics(summary))


# ---------------------------------------------------------------------------------------------
# The dataset split, case by case
# ---------------------------------------------------------------------------------------------


@dataclass
class _CaseRows:
    case_id: str
    slices: dict[int, list[int]]  # slice_index -> dataset rows of the objects on that slice


def index_cases(dataset) -> tuple[list[_CaseRows], dict[str, list]]:
    """Group a split's rows by case and slice, reading only the metadata columns."""
    missing = [c for c in (*METADATA_COLUMNS, "image", "mask") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the dataset lacks the columns {missing} (has {dataset.column_names})")
    meta = {column: list(dataset[column]) for column in METADATA_COLUMNS}
    bad = sorted({d for d in meta["dimension"] if d not in ("2D", "3D")})
    if bad:
        raise ValueError(f"dimension must be '2D' or '3D', found {bad}")
    cases: dict[str, _CaseRows] = {}
    for row, (case_id, slice_index) in enumerate(zip(meta["case_id"], meta["slice_index"])):
        case = cases.setdefault(case_id, _CaseRows(case_id, {}))
        case.slices.setdefault(int(slice_index), []).append(row)
    return list(cases.values()), meta


def _image_to_grid(image: np.ndarray, resolution: int | None) -> np.ndarray:
    """H x W x 3 uint8 on the protocol's square grid (bicubic, as MedSAM's preprocessing)."""
    if image.dtype != np.uint8:  # arrays stored as plain lists come back as int64
        if image.size and (image.min() < 0 or image.max() > 255 or not np.issubdtype(image.dtype, np.integer)):
            raise ValueError(f"images must be uint8 (0-255), got {image.dtype} in [{image.min()}, {image.max()}]")
        image = image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if resolution is None or image.shape[:2] == (resolution, resolution):
        return image
    return np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC))


def _mask_to_grid(mask: np.ndarray, resolution: int | None) -> np.ndarray:
    """Boolean mask on the protocol's square grid (nearest neighbour)."""
    if resolution is None or mask.shape == (resolution, resolution):
        return mask.astype(bool)
    return (
        np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((resolution, resolution), Image.Resampling.NEAREST))
        > 0
    )


def _chunks(cases: Sequence[_CaseRows], min_slices: int) -> Iterator[list[_CaseRows]]:
    """Consecutive cases holding at least ``min_slices`` slices, so that small 2D cases share encoder batches."""
    chunk, slices = [], 0
    for case in cases:
        chunk.append(case)
        slices += len(case.slices)
        if slices >= min_slices:
            yield chunk
            chunk, slices = [], 0
    if chunk:
        yield chunk


def _predict_chunk(model, processor, dataset, meta, chunk, protocol, batch_size, autocast_dtype):
    """Predict every object of the chunk's cases: one image per slice, all of its boxes at once."""
    slice_rows = [rows for case in chunk for rows in case.slices.values()]
    images = dataset.select_columns(["image"])[[rows[0] for rows in slice_rows]]["image"]
    masks = dataset.select_columns(["mask"])[[row for rows in slice_rows for row in rows]]["mask"]
    examples: dict[int, _Example] = {}
    model_images, model_boxes, model_rows = [], [], []
    mask_iter = iter(masks)
    for rows, image in zip(slice_rows, images):
        grid_image = _image_to_grid(np.asarray(image), protocol.resolution)
        boxes, boxed_rows = [], []
        for row in rows:
            gt = _mask_to_grid(np.asarray(next(mask_iter)), protocol.resolution)
            if gt.shape != grid_image.shape[:2]:
                raise ValueError(f"row {row}: mask shape {gt.shape} does not match its image {grid_image.shape[:2]}")
            examples[row] = _example(meta, row, gt, np.zeros_like(gt))
            if gt.any():  # a mask can vanish when resized to the grid: nothing to prompt, nothing predicted
                boxes.append(box_prompt(gt, fixed_shift=protocol.box_shift, resolution=protocol.box_resolution))
                boxed_rows.append(row)
        if boxes:
            model_images.append(grid_image)
            model_boxes.append(np.stack(boxes))
            model_rows.append(boxed_rows)
    predictions = predict_boxes(model, processor, model_images, model_boxes, batch_size, autocast_dtype)
    for rows, prediction in zip(model_rows, predictions):
        for row, mask in zip(rows, prediction.masks):
            examples[row].pred = mask
    return examples


def run_cases(
    model,
    processor,
    dataset,
    protocol: Protocol,
    cases_path: Path,
    finished: set[str],
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> None:
    """Predict and score every case not in ``finished``, appending each to ``cases_path`` as it completes."""
    cases, meta = index_cases(dataset)
    todo = [case for case in cases if case.case_id not in finished]
    progress = tqdm(total=sum(len(c.slices) for c in todo), unit="slice", desc=f"evaluate ({protocol.name})")
    with open(cases_path, "a", encoding="utf-8") as out, progress:
        for chunk in _chunks(todo, batch_size):
            examples = _predict_chunk(model, processor, dataset, meta, chunk, protocol, batch_size, autocast_dtype)
            for case in chunk:
                rows = [row for rows in case.slices.values() for row in rows]
                result = score_case(case.case_id, [examples[row] for row in rows], protocol)
                out.write(json.dumps(asdict(result)) + "\n")
                out.flush()
                os.fsync(out.fileno())
                progress.update(len(case.slices))


def box_filling_cases(dataset, protocol: Protocol) -> list[CaseResult]:
    """Every case scored with "filling the box" as the prediction: the evaluation's box prompt itself as the mask.

    The baseline a box-prompted model must beat to be worth using: for compact structures it is strong.
    """
    cases, meta = index_cases(dataset)
    results = []
    for case in cases:
        rows = [row for rows in case.slices.values() for row in rows]
        examples = []
        for row, mask in zip(rows, dataset.select_columns(["mask"])[rows]["mask"]):
            gt = _mask_to_grid(np.asarray(mask), protocol.resolution)
            filled = np.zeros_like(gt)
            if gt.any():
                x0, y0, x1, y1 = np.round(
                    box_prompt(gt, fixed_shift=protocol.box_shift, resolution=protocol.box_resolution)
                ).astype(int)
                filled[y0 : y1 + 1, x0 : x1 + 1] = True
            examples.append(_example(meta, row, gt, filled))
        results.append(score_case(case.case_id, examples, protocol))
    return results


# ---------------------------------------------------------------------------------------------
# Output folder: identity, resume, refusal
# ---------------------------------------------------------------------------------------------


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """SHA-256 of the config and weight files, so that a retrained model in the same folder is a different run."""
    digest = hashlib.sha256()
    folder = Path(model_dir)
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_finished_cases(cases_path: Path) -> dict[str, CaseResult]:
    """Cases already written; a last line cut short by a crash is dropped from the file."""
    if not cases_path.exists():
        return {}
    text = cases_path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        with open(cases_path, "r+", encoding="utf-8") as handle:
            handle.truncate(len(complete.encode("utf-8")))
    results = (CaseResult.from_json(json.loads(line)) for line in complete.splitlines() if line.strip())
    return {result.case_id: result for result in results}


def _identity_difference(previous: dict, identity: dict) -> str:
    """Which parts of two run identities differ, e.g. ``model (fingerprint), protocol (tolerance)``."""
    parts = []
    for key in sorted(set(previous) | set(identity)):
        old, new = previous.get(key), identity.get(key)
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                parts.append(f"{key} ({', '.join(fields)})")
            else:
                parts.append(f"{key} ({old} vs {new})")
    return ", ".join(parts)


def _write_json(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"), overwrite=True)


def prepare_output(output: Path, identity: dict, overwrite: bool = False) -> dict[str, CaseResult]:
    """Make or reuse the output folder; return the cases a previous run of the same identity finished.

    Refuses a folder holding a finished report, another run (different model, data or protocol)
    or foreign files, unless ``overwrite``; then only this module's files are removed.
    """
    ours = [output / name for name in (RUN_FILE, CASES_FILE, *REPORT_FILES)]
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output}: exists and is not a folder")
    if output.exists():
        run_file = output / RUN_FILE
        previous = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else None
        foreign = [p.name for p in output.iterdir() if p not in ours and not p.name.startswith(".")]
        if not overwrite:
            if (output / "results.json").exists():
                raise FileExistsError(f"{output}: holds a finished report; pass --overwrite to recompute it")
            if previous is None and (foreign or (output / CASES_FILE).exists()):
                raise FileExistsError(
                    f"{output}: is not empty and was not made by dbsam evaluate; choose another folder"
                )
            if previous is not None and previous != identity:
                raise ValueError(
                    f"{output}: holds an evaluation of a different {_identity_difference(previous, identity)}; "
                    "choose another --output folder or pass --overwrite to replace it"
                )
            finished = read_finished_cases(output / CASES_FILE)
            if finished:
                return finished
        for path in ours:
            path.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    _write_json(output / RUN_FILE, identity)
    return {}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _task_label(task: str, modality: str) -> str:
    """The paper's "Segmentation Task" column: the task name without its modality prefix."""
    prefix = f"{modality} "
    return task[len(prefix) :] if task.startswith(prefix) and len(task) > len(prefix) else task


def load_baseline(path: str | os.PathLike, protocol: Protocol) -> dict:
    """An earlier ``results.json``, checked to be comparable (same protocol)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: baseline results not found")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path}: not a results.json written by dbsam evaluate ({RESULTS_FORMAT})")
    if results["protocol"] != protocol.describe():
        raise ValueError(
            f"{path}: was evaluated with protocol {results['protocol']['summary']!r}, this run uses "
            f"{protocol.describe()['summary']!r}; the numbers are not comparable"
        )
    return results


def _models(results: dict) -> list[dict]:
    """This run first, then its baselines: name, per-task scores and averages."""
    models = [{"name": results["model"]["name"], "tasks": results["tasks"], "averages": results["averages"]}]
    models += [
        {"name": b["model"]["name"], "tasks": b["tasks"], "averages": b["averages"]} for b in results["baselines"]
    ]
    return models


def _percent_cells(values: list[float | None]) -> list[str]:
    """Values as percentages, the best in bold when several models are compared."""
    present = [v for v in values if v is not None]
    best = max(present) if len(values) > 1 and present else None
    cells = []
    for value in values:
        text = "–" if value is None else f"{100 * value:.2f}"
        cells.append(f"**{text}**" if value is not None and value == best else text)
    return cells


def _table_rows(results: dict, dimension: str) -> list[dict]:
    """Rows of one table: per task (union over models), then the average; ``None`` where a model lacks a task."""
    models = _models(results)
    own = {t["task"]: t for t in results["tasks"]}
    keys = {}
    for model in models:
        for t in model["tasks"]:
            if t["dimension"] == dimension:
                keys.setdefault(t["task"], t)
    rows = []
    for task, info in sorted(keys.items(), key=lambda kv: (kv[1]["modality"], kv[0])):
        lookup = [{t["task"]: t for t in m["tasks"]}.get(task) for m in models]
        rows.append(
            {
                "task": task,
                "dimension": dimension,
                "label": _task_label(task, info["modality"]),
                "modality": info["modality"],
                "dsc": [None if t is None else t["dsc"] for t in lookup],
                "nsd": [None if t is None else t["nsd"] for t in lookup],
                "cases": own[task]["cases"] if task in own else None,
                "slices": own[task]["slices"] if task in own else None,
                "units": own[task]["units"] if task in own else None,
            }
        )
    if rows:
        averages = [m["averages"].get(dimension) for m in models]
        own_average = results["averages"].get(dimension, {})
        rows.append(
            {
                "task": "Average",
                "dimension": dimension,
                "label": "**Average**",
                "modality": "",
                "dsc": [None if a is None else a["dsc"] for a in averages],
                "nsd": [None if a is None else a["nsd"] for a in averages],
                "cases": own_average.get("cases"),
                "slices": own_average.get("slices"),
                "units": None,
            }
        )
    return rows


def render_markdown(results: dict) -> str:
    """``results.md``: the run's description, then Table 1 (3D tasks) and Table 2 (2D tasks) as in the paper."""
    names = [m["name"] for m in _models(results)]
    protocol = results["protocol"]
    lines = [
        f"# DSC and NSD of {names[0]}",
        "",
        f"- Model: {names[0]} (`{results['model']['path']}`)",
        f"- Data: `{results['data']['path']}`, split `{results['data']['split']}` "
        f"({results['data']['examples']} examples, {results['data']['cases']} cases)",
        f"- Protocol: {protocol['summary']}",
        f"- Grid: {protocol['grid']}; spacing: {protocol['spacing']}; NSD tolerance: "
        f"{protocol['tolerance']:g} {protocol['tolerance_unit']}",
        f"- Box prompts: {protocol['box_rule']}",
        "- Scores: 3D objects scored as volumes (slices stacked), mean over cases per task, "
        "unweighted mean over tasks for the averages",
    ]
    if len(names) > 1:
        lines.append(f"- Compared with: {', '.join(names[1:])} (best in bold)")
    headers = ["Segmentation Task", "Modality"]
    headers += [f"DSC (%) {n}" for n in names] + [f"NSD (%) {n}" for n in names] + ["Cases", "Slices"]
    pixel_tasks = False
    for number, dimension in ((1, "3D"), (2, "2D")):
        rows = _table_rows(results, dimension)
        if not rows:
            continue
        lines += ["", f"## Table {number}: {dimension} tasks", ""]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "---|" * 2 + "---:|" * (len(headers) - 2))
        for row in rows:
            marker = ""
            if protocol["tolerance_unit"] == "mm" and row["units"] in ("px", "mixed"):
                marker, pixel_tasks = " †", True
            counts = ["–" if row[key] is None else str(row[key]) for key in ("cases", "slices")]
            cells = [row["label"] + marker, row["modality"], *_percent_cells(row["dsc"]), *_percent_cells(row["nsd"])]
            lines.append("| " + " | ".join(cells + counts) + " |")
    if pixel_tasks:
        lines += ["", "† Some examples of this task have no spacing: their NSD tolerance was applied in pixels."]
    return "\n".join(lines) + "\n"


def render_csv(results: dict) -> str:
    """``results.csv``: one row per model and task, and per model and average, in long format."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "dimension", "task", "modality", "cases", "slices", "dsc", "nsd"])
    for model in _models(results):
        for t in model["tasks"]:
            writer.writerow(
                [model["name"], t["dimension"], t["task"], t["modality"], t["cases"], t["slices"], t["dsc"], t["nsd"]]
            )
        for dimension, a in model["averages"].items():
            writer.writerow([model["name"], dimension, "Average", "", a["cases"], a["slices"], a["dsc"], a["nsd"]])
    return buffer.getvalue()


def render_chart(results: dict, path: str) -> None:
    """Grouped bars per task (3D tasks, then 2D), one colour per model, DSC above NSD."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = _models(results)
    rows = [row for dimension in ("3D", "2D") for row in _table_rows(results, dimension)]
    labels = [
        f"{row['dimension']} average" if row["task"] == "Average" else f"{row['label']}\n{row['modality']}"
        for row in rows
    ]
    figure = Figure(figsize=(max(6.0, 2 + 0.4 * len(rows) * (1 + 0.3 * len(models))), 7), layout="constrained")
    FigureCanvasAgg(figure)
    width = 0.8 / len(models)
    positions = np.arange(len(rows))
    for axis, metric in zip(figure.subplots(2, 1, sharex=True), ("dsc", "nsd")):
        for m, model in enumerate(models):
            values = [100 * v if v is not None else np.nan for v in (row[metric][m] for row in rows)]
            axis.bar(positions + (m - (len(models) - 1) / 2) * width, values, width, label=model["name"])
        axis.set_ylabel(f"{metric.upper()} (%)")
        axis.set_ylim(0, 100)
        axis.grid(axis="y", alpha=0.3)
    axis.set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
    handles, names = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=len(models), fontsize=8)
    figure.suptitle(f"DSC and NSD per task ({results['protocol']['summary']})", fontsize=10)
    figure.savefig(path, format="png", dpi=120)


def write_report(output: Path, results: dict) -> None:
    """Write the four report files atomically."""
    _write_json(output / "results.json", results)
    for name, text in (("results.csv", render_csv(results)), ("results.md", render_markdown(results))):
        atomic_write(
            output / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"), overwrite=True
        )
    atomic_write(output / "results.png", lambda tmp: render_chart(results, tmp), overwrite=True)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def evaluate_model(
    load_model: Callable[[], tuple],
    dataset,
    protocol: Protocol,
    output: str | os.PathLike,
    *,
    model_info: dict,
    data_info: dict,
    baselines: Sequence[dict] = (),
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict:
    """Evaluate a model on ``dataset`` (one split) into ``output``, resuming a run of the same identity.

    ``load_model()`` returns ``(model, processor)``; it is called only when cases remain, after the
    output folder was accepted. ``model_info`` needs ``name``, ``path`` and ``fingerprint``;
    ``data_info`` needs ``path``, ``split`` and ``fingerprint``; ``baselines`` are results from
    :func:`load_baseline`. Returns the results written to ``results.json``.
    """
    output = Path(output)
    data_info = {**data_info, "examples": dataset.num_rows}
    identity = {
        "format": RESULTS_FORMAT,
        "model": model_info,
        "data": data_info,
        "protocol": protocol.describe(),
        "dtype": str(autocast_dtype or torch.float32),
    }
    finished = prepare_output(output, identity, overwrite)
    if len(finished) < len({str(case_id) for case_id in dataset["case_id"]}):
        model, processor = load_model()
        run_cases(model, processor, dataset, protocol, output / CASES_FILE, set(finished), batch_size, autocast_dtype)
    cases = list(read_finished_cases(output / CASES_FILE).values())
    results = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_info["name"], "path": model_info["path"]},
        "data": {**data_info, "cases": len(cases)},
        "protocol": protocol.describe(),
        "dtype": identity["dtype"],
        **aggregate(cases),
        "baselines": [
            {"model": b["model"], "tasks": b["tasks"], "averages": b["averages"], "data": b["data"]} for b in baselines
        ],
    }
    write_report(output, results)
    return results
