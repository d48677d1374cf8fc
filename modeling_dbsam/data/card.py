"""Dataset cards (README.md) for MedSAM-format datasets: what is in them, how they were made, whose data it is."""

from __future__ import annotations

import os
import re
from collections import Counter

import datasets
import yaml

from modeling_dbsam.data.tasks import SOURCES, TASKS

SCHEMA_NOTE = """\
| column | content |
|---|---|
| `image` | H x W x 3 uint8 (PNG; grayscale stored as one channel, decoded to three) |
| `mask` | H x W uint8 0/1: one object |
| `task`, `modality`, `dimension` | task name (`"<modality> <structure>"`), modality, `"2D"`/`"3D"` |
| `case_id`, `slice_index` | the case (patient/volume/image) and the slice in it |
| `label` | the object's label value: an object of a case is `(case_id, label)` |
| `spacing` | mm in array order: (z, y, x) for volumes, (y, x) for 2D images; null when unknown |
"""

LICENCE_NOTE = """\
Each source dataset keeps its own licence and terms of use, which bind any copy or derivative
of its images and labels: read them before redistributing. Several sources allow research use
only or forbid commercial use. The Medical Segmentation Decathlon is CC BY-SA 4.0."""


def _counts(dataset_dict: datasets.DatasetDict) -> tuple[dict[str, Counter], dict[str, Counter], dict[str, str]]:
    """Examples and cases per task and split, and each task's modality and dimension as the rows state them."""
    examples, cases, kinds = {}, {}, {}
    for split, dataset in dataset_dict.items():
        columns = dataset.select_columns(["task", "case_id", "modality", "dimension"])[:]  # honours select/filter
        rows = list(zip(columns["task"], columns["case_id"], columns["modality"], columns["dimension"]))
        examples[split] = Counter(task for task, *_ in rows)
        cases[split] = Counter(task for task, _ in {(task, case) for task, case, *_ in rows})
        for task, _, modality, dimension in rows:
            kinds.setdefault(task, set()).add((modality, dimension))
    described = {
        task: " | ".join(", ".join(sorted(set(values))) for values in zip(*pairs)) for task, pairs in kinds.items()
    }
    return examples, cases, described


def _size_category(total: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if total < limit:
            return name
    return "1M<n<10M"


def dataset_card(
    dataset_dict: datasets.DatasetDict,
    title: str,
    intensity: str,
    report=None,
    label_names: dict[int, str] | None = None,
    licence: str = "other",
    extra: str = "",
) -> str:
    """README.md text: YAML metadata, counts per task and split, intensity rules, schema, sources and licences.

    ``report`` is an :class:`~modeling_dbsam.data.raw.ImportReport` whose drops and skips are listed.
    """
    examples, cases, described = _counts(dataset_dict)
    splits = list(dataset_dict)
    tasks = sorted({t for counter in examples.values() for t in counter}, key=lambda t: (t not in TASKS, t))
    total = sum(sum(c.values()) for c in examples.values())
    metadata = {
        "license": licence,
        "task_categories": ["image-segmentation"],
        "tags": ["medical", "segment-anything", "box-prompt", "medsam", "db-sam"],
        "pretty_name": title,
        "size_categories": [_size_category(total)],
    }
    header = "| task | modality | dim | " + " | ".join(f"{s} cases | {s} examples" for s in splits) + " |"
    rows = [header, "|" + "---|" * (3 + 2 * len(splits))]
    for task in tasks:
        counts = " | ".join(f"{cases[s][task]} | {examples[s][task]}" for s in splits)
        rows.append(f"| {task} | {described[task]} | {counts} |")
    sources = sorted({source for task in tasks if task in TASKS for source in TASKS[task].sources})
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {title}",
        "",
        "Box-prompted segmentation examples in the MedSAM format used by DB-SAM (MICCAI 2024): one object",
        "on one 2D slice per row. Load with `datasets.load_from_disk(path)` or",
        "`modeling_dbsam.data.load_medsam_dataset(path)`; turn rows into model inputs with",
        "`modeling_dbsam.data.SamBoxTransform`.",
        "",
        "## Contents",
        "",
        *rows,
        "",
        "## How the images were made",
        "",
        intensity,
        "",
    ]
    if label_names:
        lines += ["## Label values", "", "| label | structure |", "|---|---|"]
        lines += [f"| {value} | {name} |" for value, name in sorted(label_names.items())] + [""]
    if report is not None:
        lines += [
            "## Import report",
            "",
            f"Small connected components removed at native resolution (MedSAM's rules): "
            f"{report.small_components_dropped_3d} in 3D, {report.small_components_dropped_2d} in 2D slices. "
            f"Objects that vanished in resizing: {report.objects_lost_in_resize}. "
            f"Slices without foreground dropped: {report.empty_slices_dropped}. "
            f"Files or cases skipped: {len(report.skipped)}.",
            "",
        ]
        lines += [f"- {reason}" for reason in report.skipped[:50]] + ([""] if report.skipped else [])
    lines += ["## Schema", "", SCHEMA_NOTE, "## Sources and licences", ""]
    lines += [f"- {SOURCES[source]}" for source in sources] or [
        "- not one of the paper's 30 tasks: see the data's own source"
    ]
    lines += ["", LICENCE_NOTE, ""]
    if extra:
        lines += [extra.strip(), ""]
    return "\n".join(lines)


def _split_front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n?(.*)$", text, flags=re.DOTALL)
    if not match:
        return {}, text
    return yaml.safe_load(match[1]) or {}, match[2]


def merge_card(hub_readme: str, card: str) -> str:
    """Our card with the metadata ``push_to_hub`` wrote (``dataset_info``, ``configs``) kept, so the Hub still finds the data."""
    hub_metadata, _ = _split_front_matter(hub_readme)
    metadata, body = _split_front_matter(card)
    merged = {**hub_metadata, **metadata}
    return "---\n" + yaml.safe_dump(merged, sort_keys=False).strip() + "\n---\n" + body


def push_to_hub_with_card(
    dataset_dict: datasets.DatasetDict, repo_id: str, card: str, token: str | None = None, **push_kwargs
) -> None:
    """``dataset_dict.push_to_hub(repo_id)``, then replace the generated README with ``card`` (its YAML kept)."""
    from huggingface_hub import HfApi

    dataset_dict.push_to_hub(repo_id, token=token, **push_kwargs)
    api = HfApi(token=token)
    readme = api.hf_hub_download(repo_id, "README.md", repo_type="dataset")
    with open(readme, encoding="utf-8") as handle:
        merged = merge_card(handle.read(), card)
    api.upload_file(
        path_or_fileobj=merged.encode("utf-8"),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Dataset card",
    )


def write_card(folder: str | os.PathLike, card: str) -> None:
    """Write ``card`` as ``folder/README.md`` (beside ``save_to_disk`` output)."""
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
