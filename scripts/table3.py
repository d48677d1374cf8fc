"""Table 3 of the paper (ablation of DB-SAM's parts) at CPU scale: one command, every row, several seeds.

From a pretrained SAM (by default the small SAM shipped in ``modeling_dbsam/pretrained/small-sam``, frozen
as the paper freezes ViT-B), fine-tune four models through ``training/train.py``'s public options:

1. decoder-only: every DB-SAM switch off, only SAM's mask decoder trained (the MedSAM baseline of the
   paper's Table 3);
2. decoder + neck: as 1, plus SAM's neck, which the DB-SAM rows also train (the authors' code does), so
   that the adapters' effect is not confounded with the neck's;
3. + channel attention;
4. + convolution branch and bilateral cross-attention;
5. + fusion: the full DB-SAM.

Each (row, seed) trains on ``--train_split``, is scored on ``--validation_split`` during training, and the
best validation checkpoint is kept (model selection never reads the test split). Then each kept model
is scored once on ``--test_split`` by ``dbsam evaluate`` (DSC and NSD, paper protocol), next to the
pretrained model with no fine-tuning (zero-shot) and "filling the box". The report gives mean and
standard deviation over seeds, averaged and per structure, as ``table3.md``, ``table3.json`` and
``table3.png`` in ``--output``. Runs that finished are reused: a killed command, rerun, continues.

    python scripts/table3.py --output outputs/table3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np

from modeling_dbsam.evaluation import PAPER, aggregate, box_filling_cases, summary_metrics
from modeling_dbsam.io import atomic_write

REPOSITORY = Path(__file__).resolve().parents[1]
ROWS = {  # name -> DB-SAM switches (train.py options); the neck trains in every row but the first (authors' code)
    "decoder-only (MedSAM)": {
        "use_channel_attention": False,
        "use_conv_branch": False,
        "use_fusion": False,
        "train_neck": False,
    },
    "decoder + neck": {"use_channel_attention": False, "use_conv_branch": False, "use_fusion": False},
    "+ channel attention": {"use_channel_attention": True, "use_conv_branch": False, "use_fusion": False},
    "+ conv branch & cross-attention": {"use_channel_attention": True, "use_conv_branch": True, "use_fusion": False},
    "+ fusion (DB-SAM)": {"use_channel_attention": True, "use_conv_branch": True, "use_fusion": True},
}
DEFAULT_MODEL = REPOSITORY / "modeling_dbsam" / "pretrained" / "small-sam"
FINISHED = "model.safetensors"
SETTINGS_FILE = "settings.json"  # the settings of the runs in --output
RUN_SELECTION = ("output", "rows", "seeds", "jobs")  # which runs, and how many at once: not what a run computes


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def train_command(args: argparse.Namespace, switches: dict, seed: int, output_dir: Path) -> list[str]:
    """``training/train.py`` with TrainingArguments-named options only, so the experiment outlives its internals."""
    options = {
        "model": args.model,
        "data": args.data,
        "train_split": args.train_split,
        "eval_split": args.validation_split,
        "output_dir": output_dir,
        "seed": seed,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "weight_decay": 0.01,
        "warmup_steps": 0.05,
        "max_box_shift": 20,
        "adapter_dropout": args.adapter_dropout,
        "adapter_drop_path_rate": args.adapter_dropout,
        "train_neck": args.train_neck,
        "eval_strategy": "steps",
        "eval_steps": args.eval_steps,
        "eval_protocol": "paper",
        "metric_for_best_model": "dsc",
        "load_best_model_at_end": True,
        "save_strategy": "steps",  # checkpoint where it evaluates, so the best one is loaded at the end
        "save_steps": args.eval_steps,
        "save_total_limit": 1,
        "logging_steps": 20,
        "report_to": "none",
        "use_cpu": True,
        **switches,
    }
    command = [sys.executable, str(REPOSITORY / "training" / "train.py"), "--overwrite_output_dir", "--disable_tqdm"]
    for key, value in options.items():
        command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return command


def evaluate_command(args: argparse.Namespace, model: Path, name: str, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modeling_dbsam.cli",
        "evaluate",
        "--model",
        str(model),
        "--data",
        args.data,
        "--split",
        args.test_split,
        "--protocol",
        "paper",
        "--output",
        str(output),
        "--name",
        name,
        "--overwrite",
    ]


def run_logged(command: list[str], log: Path) -> float:
    """Run one subprocess with one thread (the runs go side by side), its output in ``log``; return wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPOSITORY)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8").splitlines()[-20:]
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({result.returncode}); {log}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def train_and_test(args: argparse.Namespace, row: str, seed: int) -> dict:
    """One (row, seed): train with validation model selection (skipped if done), then score on the test split."""
    folder = Path(args.output) / slug(row) / f"seed{seed}"
    timing_file = folder / "timing.json"
    if not (folder / FINISHED).exists() or not timing_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        seconds = run_logged(train_command(args, ROWS[row], seed, folder), folder.parent / f"seed{seed}.train.log")
        examples = training_steps(args) * args.batch_size
        timing = {"train_seconds": seconds, "examples_per_second": examples / seconds}
        timing_file.write_text(json.dumps(timing))
    results_file = folder / "test" / "results.json"
    if not results_file.exists():
        run_logged(
            evaluate_command(args, folder, f"{row} seed {seed}", folder / "test"),
            folder.parent / f"seed{seed}.test.log",
        )
    selected = json.loads((folder / "eval_results.json").read_text())  # the kept checkpoint's validation scores
    validation = {"validation_dsc": selected["metrics"]["dsc"], "selected_step": selected["step"]}
    return {"row": row, "seed": seed, "folder": str(folder), **validation, **json.loads(timing_file.read_text())}


def training_steps(args: argparse.Namespace) -> int:
    if args.max_steps > 0:
        return args.max_steps
    examples = datasets.load_from_disk(args.data)[args.train_split].num_rows
    return args.num_train_epochs * -(-examples // args.batch_size)


def object_scores(results_dir: Path) -> dict[int, tuple[float, float]]:
    """Per structure (label): mean DSC and NSD over the test cases, from ``dbsam evaluate``'s per-case file."""
    by_label: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for line in (results_dir / "cases.jsonl").read_text(encoding="utf-8").splitlines():
        for obj in json.loads(line)["objects"]:
            by_label[obj["label"]].append((obj["dsc"], obj["nsd"]))
    return {label: tuple(np.mean(values, axis=0)) for label, values in by_label.items()}


def label_names(data: str) -> dict[int, str]:
    """Structure names from the dataset card's label table (``| 3 | Frontal Sup L |``)."""
    card = Path(data) / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    return {int(value): name.strip() for value, name in re.findall(r"^\| (\d+) \| ([^|]+) \|$", text, re.MULTILINE)}


def summarise(args: argparse.Namespace, runs: list[dict], zero_shot: Path, box: dict) -> dict:
    names = label_names(args.data)
    rows = {}
    for row in ROWS:
        if not any(r["row"] == row for r in runs):
            continue
        seeds = [r for r in runs if r["row"] == row]
        averages, structures = [], defaultdict(list)
        for run in seeds:
            metrics = summary_metrics(json.loads((Path(run["folder"]) / "test" / "results.json").read_text()))
            averages.append((metrics["dsc"], metrics["nsd"]))
            for label, scores in object_scores(Path(run["folder"]) / "test").items():
                structures[label].append(scores)
        values = np.asarray(averages)
        rows[row] = {
            "seeds": [r["seed"] for r in seeds],
            "dsc": values[:, 0].tolist(),
            "nsd": values[:, 1].tolist(),
            "dsc_mean": float(values[:, 0].mean()),
            "dsc_std": float(values[:, 0].std(ddof=1)) if len(values) > 1 else 0.0,
            "nsd_mean": float(values[:, 1].mean()),
            "nsd_std": float(values[:, 1].std(ddof=1)) if len(values) > 1 else 0.0,
            "structures": {
                str(label): {
                    "name": names.get(label, str(label)),
                    "dsc_mean": float(np.mean([s[0] for s in scores])),
                    "dsc_std": float(np.std([s[0] for s in scores], ddof=1)) if len(scores) > 1 else 0.0,
                    "nsd_mean": float(np.mean([s[1] for s in scores])),
                }
                for label, scores in sorted(structures.items())
            },
            "validation_dsc_mean": float(np.mean([r["validation_dsc"] for r in seeds])),
            "selected_steps": [r["selected_step"] for r in seeds],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in seeds])),
            "examples_per_second_mean": float(np.mean([r["examples_per_second"] for r in seeds])),
        }
    zero = summary_metrics(json.loads((zero_shot / "results.json").read_text()))
    reference = {
        "zero-shot (pretrained, no fine-tuning)": {
            "dsc": zero["dsc"],
            "nsd": zero["nsd"],
            "structures": {str(k): {"dsc": v[0], "nsd": v[1]} for k, v in sorted(object_scores(zero_shot).items())},
        },
        "filling the box": box,
    }
    return {
        "setup": setup(args),
        "rows": rows,
        "references": reference,
        "label_names": {str(k): v for k, v in names.items()},
    }


def setup(args: argparse.Namespace) -> dict:
    keys = ("model", "data", "train_split", "validation_split", "test_split", "seeds", "num_train_epochs", "max_steps")
    keys += ("batch_size", "learning_rate", "adapter_dropout", "eval_steps", "train_neck", "jobs")
    return {key: getattr(args, key) for key in keys}


def box_filling(args: argparse.Namespace) -> dict:
    split = datasets.load_from_disk(args.data)[args.test_split]
    cases = box_filling_cases(split, PAPER)
    metrics = summary_metrics(aggregate(cases))
    by_label = defaultdict(list)
    for case in cases:
        for obj in case.objects:
            by_label[obj.label].append((obj.dsc, obj.nsd))
    return {
        "dsc": metrics["dsc"],
        "nsd": metrics["nsd"],
        "structures": {
            str(label): {"dsc": float(np.mean([v[0] for v in values])), "nsd": float(np.mean([v[1] for v in values]))}
            for label, values in sorted(by_label.items())
        },
    }


def render_markdown(summary: dict) -> str:
    rows, refs, names = summary["rows"], summary["references"], summary["label_names"]
    box = refs["filling the box"]
    lines = [
        "| model | seeds | test DSC (%) | test NSD (%) | validation DSC (%) | train s / run | examples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, values in rows.items():
        lines.append(
            f"| {row} | {len(values['seeds'])} | {100 * values['dsc_mean']:.1f} ± {100 * values['dsc_std']:.1f} | "
            f"{100 * values['nsd_mean']:.1f} ± {100 * values['nsd_std']:.1f} | {100 * values['validation_dsc_mean']:.1f} | "
            f"{values['train_seconds_mean']:.0f} | "
            f"{values['examples_per_second_mean']:.1f} |"
        )
    for name, values in refs.items():
        lines.append(f"| {name} | - | {100 * values['dsc']:.1f} | {100 * values['nsd']:.1f} | - | - | - |")
    labels = sorted({label for values in rows.values() for label in values["structures"]}, key=int)
    header = "| structure | " + " | ".join(rows) + " | filling the box |"
    lines += ["", "Per structure, DSC (%) mean ± std over seeds:", "", header, "|" + "---|" * (len(rows) + 2)]
    for label in labels:
        cells = []
        for values in rows.values():
            score = values["structures"].get(label)
            cells.append(f"{100 * score['dsc_mean']:.1f} ± {100 * score['dsc_std']:.1f}" if score else "-")
        fill = box["structures"].get(label)
        lines.append(f"| {names.get(label, label)} | " + " | ".join(cells) + f" | {100 * fill['dsc']:.1f} |")
    return "\n".join(lines) + "\n"


def short_name(row: str) -> str:
    """A tick label: the row's name without its parenthesis, wrapped."""
    return textwrap.fill(row.split(" (")[0], 12)


def render_figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, refs = summary["rows"], summary["references"]
    names = list(rows)
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2.2]})
    positions = np.arange(len(names))
    for offset, (metric, colour) in enumerate((("dsc", "tab:blue"), ("nsd", "tab:orange"))):
        x = positions + (offset - 0.5) * 0.25
        means = [100 * rows[n][f"{metric}_mean"] for n in names]
        stds = [100 * rows[n][f"{metric}_std"] for n in names]
        axes[0].errorbar(x, means, yerr=stds, fmt="o", capsize=4, color=colour, label=f"test {metric.upper()}")
        for index, name in enumerate(names):
            axes[0].scatter(
                [x[index]] * len(rows[name][metric]), 100 * np.asarray(rows[name][metric]), s=10, color="gray"
            )
    zero = refs["zero-shot (pretrained, no fine-tuning)"]
    axes[0].axhline(100 * zero["dsc"], color="tab:blue", linestyle=":", label="zero-shot DSC")
    axes[0].axhline(100 * zero["nsd"], color="tab:orange", linestyle=":", label="zero-shot NSD")
    axes[0].set_xticks(positions, [short_name(n) for n in names], fontsize=7)
    axes[0].set_ylabel("test score (%): mean ± std, dots = seeds")
    box = refs["filling the box"]
    axes[0].set_title(
        f"Ablation (paper Table 3), CPU scale\nfilling the box: DSC {100 * box['dsc']:.1f}, NSD {100 * box['nsd']:.1f}",
        fontsize=9,
    )
    axes[0].legend(fontsize=7)
    labels = sorted({label for values in rows.values() for label in values["structures"]}, key=int)
    width = 0.8 / (len(names) + 1)
    x = np.arange(len(labels))
    for index, name in enumerate(names):
        means = [100 * rows[name]["structures"].get(label, {"dsc_mean": np.nan})["dsc_mean"] for label in labels]
        axes[1].bar(x + index * width, means, width, label=name)
    fill = [100 * refs["filling the box"]["structures"][label]["dsc"] for label in labels]
    axes[1].bar(x + len(names) * width, fill, width, color="lightgray", label="filling the box")
    axes[1].set_xticks(
        x + 0.4, [summary["label_names"].get(label, label) for label in labels], rotation=60, fontsize=7, ha="right"
    )
    axes[1].set_ylabel("test DSC (%), mean over seeds")
    axes[1].set_title("Per structure")
    axes[1].set_ylim(0, 100)  # headroom above the bars for the legend
    axes[1].legend(fontsize=6, ncol=3, loc="upper center")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"), overwrite=True)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="pretrained SAM folder (default: the shipped small SAM)"
    )
    parser.add_argument("--data", default="data/sample", help="DatasetDict folder with train/validation/test splits")
    parser.add_argument("--output", default="outputs/table3")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--validation_split", default="validation")
    parser.add_argument("--test_split", default="test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--num_train_epochs", type=int, default=12, help="the paper's 12")
    parser.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides epochs")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--learning_rate", type=float, default=1e-4, help="the paper's 1e-4 (1e-3 was worse on validation)"
    )
    parser.add_argument("--adapter_dropout", type=float, default=0.4, help="dropout and drop path (paper: 0.4)")
    parser.add_argument("--train_neck", type=lambda v: v.lower() == "true", default=True)
    parser.add_argument("--eval_steps", type=int, default=80, help="validation every N steps (model selection)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    return parser.parse_args(argv)


def check_settings(args: argparse.Namespace, output: Path) -> None:
    """Record the settings of the runs in ``output``; refuse to reuse finished runs made with other settings,
    which would be reported as this command's. Which rows and seeds, and how many at once, may change."""
    settings = {name: value for name, value in vars(args).items() if name not in RUN_SELECTION}
    path = output / SETTINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if changed := [
            f"{name} {saved.get(name)!r} -> {value!r}" for name, value in settings.items() if saved.get(name) != value
        ]:
            raise SystemExit(
                f"table3.py: error: {output} holds runs made with other settings ({'; '.join(changed)}); "
                "choose another --output"
            )
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)), overwrite=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    check_settings(args, output)
    started = time.perf_counter()
    jobs = [(row, seed) for seed in args.seeds for row in args.rows]
    with ThreadPoolExecutor(args.jobs) as pool:
        zero_shot = pool.submit(
            run_logged,
            evaluate_command(args, Path(args.model), "zero-shot", output / "zero-shot"),
            output / "zero-shot.log",
        )
        runs = list(pool.map(lambda job: train_and_test(args, *job), jobs))
        zero_shot.result()
    summary = summarise(args, runs, output / "zero-shot", box_filling(args))
    summary["wall_seconds"] = time.perf_counter() - started
    summary["runs"] = runs
    atomic_write(
        output / "table3.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)), overwrite=True
    )
    markdown = render_markdown(summary)
    atomic_write(output / "table3.md", lambda tmp: Path(tmp).write_text(markdown), overwrite=True)
    render_figure(summary, output / "table3.png")
    print(markdown)
    print(f"{len(runs)} runs in {summary['wall_seconds'] / 60:.1f} min; report: {output}/table3.md, table3.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
