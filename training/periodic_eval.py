"""Evaluation during training: the evaluation module's own case scoring, split across processes.

Each process predicts and scores a share of the cases with :func:`modeling_dbsam.evaluation.run_cases`
(the same predictor, protocol and per-case scoring as ``dbsam evaluate``) into its own
``cases-<rank>.jsonl``; the main process then aggregates all cases with
:func:`modeling_dbsam.evaluation.aggregate`. A case is never split between processes, since its
slices are scored as one volume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from modeling_dbsam.evaluation import aggregate, get_protocol, index_cases, read_finished_cases, run_cases

SUMMARY_METRICS = ("dsc", "nsd", "dsc_3d", "nsd_3d", "dsc_2d", "nsd_2d", "dsc_3d_2d_mean", "nsd_3d_2d_mean")
TASK_METRIC_PREFIXES = ("dsc/", "nsd/")


def is_metric_name(name: str) -> bool:
    """Whether ``name`` is one of the metrics :func:`metrics_from_summary` can produce."""
    return name in SUMMARY_METRICS or (name.startswith(TASK_METRIC_PREFIXES) and len(name) > 4)


def available_metrics(dataset) -> list[str]:
    """The metric names an evaluation of ``dataset`` produces, known before it runs (from two metadata columns)."""
    tasks = set(zip(dataset["task"], dataset["dimension"]))
    dimensions = {dimension.lower() for _, dimension in tasks}
    names = ["dsc", "nsd", "dsc_3d_2d_mean", "nsd_3d_2d_mean"]
    names += [f"{metric}_{dimension}" for metric in ("dsc", "nsd") for dimension in sorted(dimensions)]
    return names + [f"{metric}/{task}" for metric in ("dsc", "nsd") for task, _ in sorted(tasks)]


def metrics_from_summary(summary: dict) -> dict[str, float]:
    """Flat metrics of an :func:`aggregate` summary.

    ``dsc`` / ``nsd``: unweighted mean over tasks; ``*_3d`` / ``*_2d``: the paper's 3D and 2D averages;
    ``*_3d_2d_mean``: the mean of those two averages (where both exist); ``dsc/<task>``, ``nsd/<task>``.
    """
    metrics: dict[str, float] = {}
    for name in ("dsc", "nsd"):
        metrics[name] = sum(task[name] for task in summary["tasks"]) / len(summary["tasks"])
        averages = [summary["averages"][d][name] for d in ("3D", "2D") if d in summary["averages"]]
        for dimension, average in summary["averages"].items():
            metrics[f"{name}_{dimension.lower()}"] = average[name]
        metrics[f"{name}_3d_2d_mean"] = sum(averages) / len(averages)
        metrics.update({f"{name}/{task['task']}": task[name] for task in summary["tasks"]})
    return metrics


def evaluate_during_training(
    accelerator: Accelerator,
    model: torch.nn.Module,
    processor,
    dataset,
    protocol_name: str,
    folder: Path,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
) -> dict:
    """Score ``model`` on ``dataset`` (all processes call this); returns ``{"metrics", "tasks", "averages"}``."""
    protocol = get_protocol(protocol_name)
    cases, _ = index_cases(dataset)
    share = cases[accelerator.process_index :: accelerator.num_processes]
    cases_path = folder / f"cases-{accelerator.process_index}.jsonl"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    cases_path.unlink(missing_ok=True)  # a rerun of this step after a resume starts afresh
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    if share:
        rows = sorted(row for case in share for rows in case.slices.values() for row in rows)
        run_cases(unwrapped, processor, dataset.select(rows), protocol, cases_path, set(), batch_size, autocast_dtype)
    unwrapped.train(was_training)
    accelerator.wait_for_everyone()
    scored = [
        case
        for rank in range(accelerator.num_processes)
        for case in read_finished_cases(folder / f"cases-{rank}.jsonl").values()
    ]
    summary = aggregate(scored)
    return {"protocol": protocol.describe(), "metrics": metrics_from_summary(summary), **summary}
